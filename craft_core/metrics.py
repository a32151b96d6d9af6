"""Training observability: one JSON line per step, optional wandb, and the end-of-run plot.

metrics.jsonl is flushed line by line so that a killed run keeps everything it logged; on resume
the lines of steps after the checkpoint are dropped, because those steps are trained again.
"""

import json
import math
from pathlib import Path

def _json_safe(value):
    # NaN/inf are not JSON; a skipped non-finite step logs them as strings so the line stays valid.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends per-step records to ``metrics.jsonl`` and mirrors them to wandb when configured."""

    def __init__(self, path: Path, *, resume_step: int = 0, wandb_project: str | None = None,
                 wandb_config: dict | None = None, run_name: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        with open(self.path, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        self._file = open(self.path, "a")
        self._wandb_run = None
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError(
                    f"train.wandb_project is set to {wandb_project!r} but wandb is not installed; "
                    "install it (pip install wandb) or unset train.wandb_project"
                ) from exc
            self._wandb_run = wandb.init(project=wandb_project, name=run_name, config=wandb_config,
                                         resume="allow")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self._wandb_run.log(numeric, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl; a torn last line (run killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _as_float(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def target_names(records: list[dict]) -> list[str]:
    """The retention targets a metrics.jsonl logs (``lambda/<target>`` columns), in order."""
    return list(dict.fromkeys(k.split("/", 1)[1] for r in records for k in r if k.startswith("lambda/")))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], _as_float(r.get(key))) for r in records]
    points = [(s, v) for s, v in points if v is not None]
    return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])


def plot_training(metrics_path: Path, out_png: Path, title: str | None = None) -> Path:
    """The training curves of one run as a PNG: task loss; for CRaFT also each target's retention
    loss against its bound ε_t(t) on one axis, λ_t, and the gradient cosine with projected steps marked.
    A baseline run gets the task-loss panel only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    targets = target_names(records)
    n_panels = 4 if targets else 1
    fig, axes = plt.subplots(n_panels, 1, figsize=(7, 2.4 * n_panels), sharex=True, squeeze=False)
    axes = axes[:, 0]
    steps, values = _series(records, "task_loss")
    axes[0].plot(steps, values, linewidth=1, color="black")
    axes[0].set_ylabel("task loss")
    if targets:
        for i, target in enumerate(targets):
            color = f"C{i}"
            axes[1].plot(*_series(records, f"retention_loss/{target}"), marker=".", markersize=3, linewidth=1,
                         color=color, label=f"L {target}")
            axes[1].plot(*_series(records, f"epsilon/{target}"), linestyle="--", linewidth=1, color=color,
                         label=f"ε {target}")
            axes[2].plot(*_series(records, f"lambda/{target}"), linewidth=1, color=color, label=f"λ {target}")
        axes[1].set_ylabel("retention loss vs ε(t)")
        axes[1].set_yscale("symlog", linthresh=1e-6)
        axes[2].set_ylabel("λ (dual ascent)")
        cos_steps, cosines = _series(records, "grad_cosine")
        axes[3].plot(cos_steps, cosines, marker=".", markersize=3, linewidth=0.5, color="gray")
        projected = [(r["step"], _as_float(r.get("grad_cosine"))) for r in records if r.get("projected")]
        if projected:
            axes[3].scatter(*zip(*projected), color="red", s=12, zorder=3, label="projected (conflict)")
        axes[3].axhline(0.0, color="black", linewidth=0.5)
        axes[3].set_ylabel("cos(g_task, g_ret)")
        for ax in axes[1:3]:
            ax.legend(fontsize=7, loc="best")
        if projected:
            axes[3].legend(fontsize=7, loc="best")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
