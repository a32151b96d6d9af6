"""Training observability: one JSON line per step, optional wandb, and the end-of-run plot.

metrics.jsonl is flushed line by line so that a killed run keeps everything it logged; on resume
the lines of steps after the checkpoint are dropped, because those steps are trained again.
"""

import json
import math
from pathlib import Path

# The four curves of the training plot: metrics.jsonl key -> panel title.
PLOT_PANELS = {
    "task_loss": "task loss",
    "retention_loss": "retention loss",
    "lambda": "λ (Lagrange multiplier)",
    "epsilon": "ε(t) (retention budget)",
}


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


def plot_training(metrics_path: Path, out_png: Path, title: str | None = None) -> Path:
    """Task loss, retention loss, λ and ε against steps, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(len(PLOT_PANELS), 1, figsize=(7, 2.2 * len(PLOT_PANELS)), sharex=True)
    for ax, (key, label) in zip(axes, PLOT_PANELS.items()):
        points = [(r["step"], _as_float(r.get(key))) for r in records]
        points = [(s, v) for s, v in points if v is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 50 else None, linewidth=1)
        else:
            ax.text(0.5, 0.5, "not logged (retention off)", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
