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


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


TARGET_MARKERS = ("o", "x", "^", "s")
TARGET_LINESTYLES = ("-", "--", ":", "-.")


def comparison_panels(retaining: list[str]) -> list[str]:
    """The panels of the comparison figure: the task loss always; the retention panels only when a
    run retains (a baseline-only pipeline gets no empty panels)."""
    return ["task_loss"] + (["retention", "lambda", "grad_cosine"] if retaining else [])


def plot_comparison(runs: dict[str, Path], out_png: Path, *, retaining: list[str], title: str) -> Path:
    """One figure comparing the training runs of a pipeline (run name -> metrics.jsonl).

    Panels: every run's task loss (raw, faint; moving average, solid); for the runs in
    ``retaining``: each target's retention loss against its bound ε_t(t) on one axis, λ_t, and the
    gradient cosine with the projected (conflicting) steps marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {run: read_metrics(path) for run, path in runs.items()}
    colors = {run: ("black" if run == "baseline" else f"C{i}") for i, run in enumerate(runs)}
    panels = comparison_panels(retaining)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.5 * len(panels) + 0.6), sharex=True, squeeze=False)
    axes = dict(zip(panels, axes[:, 0], strict=True))

    ax = axes["task_loss"]
    for run, recs in records.items():
        steps, values = _series(recs, "task_loss")
        if not steps:
            continue
        window = max(1, len(values) // 20)
        ax.plot(steps, values, linewidth=0.6, alpha=0.3, color=colors[run])
        ax.plot(steps, _smoothed(values, window), linewidth=1.4, color=colors[run],
                label=run + (f" (mean of {window})" if window > 1 else ""))
    ax.set_ylabel("task loss")
    ax.legend(fontsize=7, loc="best")

    if retaining:
        ax_ret, ax_lam, ax_cos = axes["retention"], axes["lambda"], axes["grad_cosine"]
        schedules: dict[tuple, list[str]] = {}  # one ε(t) curve per distinct schedule, named by its targets
        for run in retaining:
            recs = records[run]
            for j, target in enumerate(target_names(recs)):
                marker, style = TARGET_MARKERS[j % 4], TARGET_LINESTYLES[j % 4]
                steps, losses = _series(recs, f"retention_loss/{target}")
                window = max(1, len(losses) // 20)
                ax_ret.plot(steps, losses, marker=marker, markersize=2, linewidth=0.4, alpha=0.3, color=colors[run])
                ax_ret.plot(steps, _smoothed(losses, window), linestyle=style, linewidth=1.4, color=colors[run],
                            label=f"L {target} ({run})" + (f", mean of {window}" if window > 1 else ""))
                eps = _series(recs, f"epsilon/{target}")
                if eps[0]:
                    names = schedules.setdefault((tuple(eps[0]), tuple(eps[1])), [])
                    if target not in names:
                        names.append(target)
                ax_lam.plot(*_series(recs, f"lambda/{target}"), linestyle=style, linewidth=1.2, color=colors[run],
                            label=f"λ {target} ({run})")
            steps, cosines = _series(recs, "grad_cosine")
            ax_cos.plot(steps, cosines, marker=".", markersize=3, linewidth=0.5, color=colors[run], label=run)
            projected = [(r["step"], _as_float(r.get("grad_cosine"))) for r in recs if r.get("projected")]
            projected = [(s, v) for s, v in projected if v is not None]
            if projected:
                ax_cos.scatter(*zip(*projected), marker="x", color="red", s=20, zorder=3,
                               label=f"projected ({run}: {len(projected)})")
        for k, ((steps, values), names) in enumerate(schedules.items()):
            ax_ret.plot(steps, values, linestyle=(0, (4, 2)), linewidth=2.0, color="black", alpha=0.8, zorder=4,
                        label=f"ε(t) {', '.join(names)}")
        ax_ret.set_ylabel("retention loss vs ε(t)")
        ax_ret.set_yscale("log", nonpositive="mask")  # a student still equal to the teacher (L = 0) is not drawn
        ax_lam.set_ylabel("λ (dual ascent)")
        ax_cos.axhline(0.0, color="black", linewidth=0.5)
        ax_cos.set_ylabel("cos(g_task, g_ret)")
        for axis in (ax_ret, ax_lam, ax_cos):
            axis.legend(fontsize=7, loc="best")
    for axis in axes.values():
        axis.grid(alpha=0.3)
    axes[panels[-1]].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
