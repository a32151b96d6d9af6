"""Retention experiment: does CRaFT make fine-tuning forget less than plain fine-tuning?

    python experiments/retention.py                       # configs/experiments/retention.yaml
    python experiments/retention.py --config configs/experiments/smoke.yaml --out /tmp/x

For each policy type (tiny real pi0_fast, then smolvla), with the craft stage functions:

1. ``build_demo_assets`` records two scripted gym-pusht datasets (task A = push the T, task B =
   go to the corner) and builds the tiny policy. The last ``heldout_episodes`` episodes of each
   task are held out: never trained on, never anchored.
2. ``train`` (retention off) pretrains the tiny policy on task A's training episodes: the teacher.
3. ``extract_anchors`` builds the anchor store from task-A training episodes (its own held-out
   split gives "drift on held-out anchors"), and a second, evaluation-only store from the
   held-out task-A episodes ("drift on held-out episodes").
4. For every seed, ``train`` fine-tunes the teacher on task B twice with the same seed, steps and
   learning rate: baseline (retention off) and CRaFT.
5. Every saved checkpoint (and the teacher) is measured on held-out episodes: task-B action loss,
   task-A action loss (forgetting) and drift on both held-out anchor sets.

Action losses are the policy's own training loss (``policy.forward``) in eval mode without
gradients. Each task's frames go through one preprocessor, built from the teacher's saved
pipeline with that task's dataset statistics, so teacher, baseline and CRaFT are scored on
identical inputs and targets; the global RNG is reseeded before every evaluation so flow-matching
policies (smolvla) draw the same noise and times for every model.

Outputs (``--out``): results.json, results.md (mean ± std over seeds), plots/<policy>.png
(held-out drift, task-A loss, λ and ε against steps, both runs). Intermediate artifacts live in
``--work`` and are reused when their settings match, so a sweep over retention settings only
re-runs the fine-tuning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from pydantic import Field

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from craft_core.pipeline.fingerprint import StageDir, code_version, run_stage, stage_fingerprint  # noqa: E402
from craft_core.config import (  # noqa: E402
    AssetsConfig,
    CacheConfig,
    DatasetSource,
    PolicySource,
    RetentionConfig,
    StrictModel,
    TrainConfig,
)

RESULTS_SCHEMA = "craft.experiment.retention/1"
RUNS = ("baseline", "craft")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


class DataSettings(StrictModel):
    env: str = "pusht"
    task_a: str = "push_t"
    task_b: str = "corner"
    episodes_per_task: int = Field(default=8, ge=2)
    heldout_episodes: int = Field(default=2, ge=1, description="Last episodes of each task, for evaluation only")
    max_episode_steps: int = Field(default=40, ge=2)
    image_size: int = Field(default=64, ge=16)


class TeacherSettings(StrictModel):
    pretrain_steps: int = Field(default=150, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)


class AnchorSettings(StrictModel):
    n_anchors: int = Field(default=64, ge=2)
    heldout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    layers: list[int] = Field(default_factory=lambda: [-2, -1])
    pooling: list[str] = Field(default_factory=lambda: ["vision_token_mean", "text_token_last"])
    heldout_episode_anchors: int = Field(default=32, ge=1, description="Frames of held-out task-A episodes for drift")


class FinetuneSettings(StrictModel):
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    checkpoint_every: int = Field(default=20, ge=1, description="Drift/loss curves are measured at these steps")
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


class EvalSettings(StrictModel):
    batch_size: int = Field(default=16, ge=1)
    seed: int = 1234


class ExperimentConfig(StrictModel):
    name: str = "retention"
    policies: list[str] = Field(default_factory=lambda: ["pi0_fast", "smolvla"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    data: DataSettings = Field(default_factory=DataSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    anchors: AnchorSettings = Field(default_factory=AnchorSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    # Per-policy replacements of whole sections' fields, e.g. {"smolvla": {"finetune": {"lr": 3e-4}}}.
    per_policy: dict[str, dict] = Field(default_factory=dict)

    def for_policy(self, policy_type: str) -> "ExperimentConfig":
        override = self.per_policy.get(policy_type)
        if not override:
            return self
        data = self.model_dump()
        _merge(data, override)
        return ExperimentConfig.model_validate(data)


def _merge(base: dict, override: dict) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = yaml.safe_load(raw)


def load_experiment_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. finetune.steps=50)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    return ExperimentConfig.model_validate(data or {})


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _measurement_code() -> list[str]:
    """Code versions a measured result depends on, so a code change never reuses a stale result."""
    return [code_version(m) for m in ("craft_core.demo.assets", "craft_core.extraction", "craft_core.train",
                                      "craft_core.evaluation.drift")]


def _cached_stage(work: Path, stage: str, config: dict, code_module: str, make) -> dict:
    """``make(out_dir) -> payload``, run once per (config, code of ``code_module``) in craft's own
    content-addressed stage directory ``work/<stage>/<fingerprint>/``: a finished one is reused, a
    killed one resumes in place (the stage functions resume), and a code change re-runs it."""
    code = code_version(code_module)
    stage_dir = StageDir(work, stage, stage_fingerprint(stage, config, code=code))
    clock = Clock()

    def body(out: Path) -> dict:
        payload = make(out)
        payload["cost"] = clock.cost()
        return payload

    result, executed = run_stage(stage_dir, body, config=config, code=code)
    return {**result, "made_now": executed}


class Clock:
    """Wall and CPU seconds since creation. With one torch thread, CPU time is what the work takes
    on a quiet core; on a busy shared machine the wall time is several times larger."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    def cost(self) -> dict:
        return {"wall_s": time.time() - self.wall, "cpu_s": time.process_time() - self.cpu}


def _total_cost(costs) -> dict:
    costs = list(costs)
    return {"wall_s": sum(c["wall_s"] for c in costs), "cpu_s": sum(c["cpu_s"] for c in costs)}


# ---------------------------------------------------------------------------------------------
# Stages (each reuses a craft_core stage function; outputs cached under work/ by settings digest)
# ---------------------------------------------------------------------------------------------


def episode_split(data: DataSettings) -> tuple[list[int], list[int]]:
    n_train = data.episodes_per_task - data.heldout_episodes
    if n_train < 1:
        raise ValueError(
            f"data.heldout_episodes={data.heldout_episodes} leaves no training episode out of "
            f"data.episodes_per_task={data.episodes_per_task}; raise episodes_per_task"
        )
    return list(range(n_train)), list(range(n_train, data.episodes_per_task))


def build_teacher(cfg: ExperimentConfig, policy_type: str, work: Path, log) -> dict:
    """Datasets + tiny policy (build_demo_assets), then pretraining on task A's training episodes."""
    config = {"policy_type": policy_type, "data": cfg.data.model_dump(mode="json"),
              "teacher": cfg.teacher.model_dump(mode="json")}
    return _cached_stage(work, f"{policy_type}/teacher", config, "craft_core.demo.assets",
                         lambda out: _build_teacher(cfg, policy_type, out, log))


def _build_teacher(cfg: ExperimentConfig, policy_type: str, out: Path, log) -> dict:
    from craft_core.demo.assets import build_demo_assets
    from craft_core.train import train

    assets = build_demo_assets(
        AssetsConfig(
            policy_type=policy_type, env=cfg.data.env, task_a=cfg.data.task_a, task_b=cfg.data.task_b,
            episodes_per_task=cfg.data.episodes_per_task, max_episode_steps=cfg.data.max_episode_steps,
            image_size=cfg.data.image_size, teacher_pretrain_steps=0, device="cpu", seed=0,
        ),
        out / "assets",
    )
    train_eps, _ = episode_split(cfg.data)
    task_a = assets["datasets"]["task_a"]
    log(f"{policy_type}: pretraining the teacher on task A ({cfg.teacher.pretrain_steps} steps)")
    pretrained = train(
        TrainConfig(
            dataset=DatasetSource(repo_id=task_a["repo_id"], root=task_a["root"], episodes=train_eps),
            steps=cfg.teacher.pretrain_steps, batch_size=cfg.teacher.batch_size, lr=cfg.teacher.lr,
            seed=0, device="cpu",
            save_every=cfg.teacher.pretrain_steps, log_every=max(1, cfg.teacher.pretrain_steps // 10),
            retention=RetentionConfig(enabled=False), compare_baseline=False,
        ),
        teacher=PolicySource(path=assets["teacher"]),  # the untrained tiny build
        store_url=None,
        out_dir=out / "pretrain",
        retention=False,
    )
    return {
        "teacher": pretrained["checkpoint"],
        "init": assets["teacher"],
        "datasets": assets["datasets"],
        "pretrain_metrics": pretrained["metrics"],
    }


def build_stores(cfg: ExperimentConfig, policy_type: str, teacher: dict, work: Path, log) -> dict:
    """Training anchors from task-A training episodes; an eval-only store from held-out episodes."""
    config = {"teacher": teacher["teacher"], "data": cfg.data.model_dump(mode="json"),
              "anchors": cfg.anchors.model_dump(mode="json")}
    return _cached_stage(work, f"{policy_type}/anchors", config, "craft_core.extraction",
                         lambda out: _build_stores(cfg, policy_type, teacher, out, log))


def _build_stores(cfg: ExperimentConfig, policy_type: str, teacher: dict, out: Path, log) -> dict:
    from craft_core.extraction import extract_anchors

    train_eps, heldout_eps = episode_split(cfg.data)
    task_a = teacher["datasets"]["task_a"]
    common = dict(teacher=PolicySource(path=teacher["teacher"]), layers=cfg.anchors.layers,
                  pooling=cfg.anchors.pooling, dtype="float32", batch_size=16, device="cpu", seed=0)
    log(f"{policy_type}: extracting {cfg.anchors.n_anchors} anchors from task-A training episodes")
    train_store = str(out / "anchors.zarr")
    extract_anchors(CacheConfig(
        dataset=DatasetSource(repo_id=task_a["repo_id"], root=task_a["root"], episodes=train_eps),
        n_anchors=cfg.anchors.n_anchors, heldout_fraction=cfg.anchors.heldout_fraction, **common), train_store)
    # Every anchor but one is "held out": the store is only ever read by drift measurement.
    n_eval = cfg.anchors.heldout_episode_anchors + 1
    eval_store = str(out / "heldout_episodes.zarr")
    extract_anchors(CacheConfig(
        dataset=DatasetSource(repo_id=task_a["repo_id"], root=task_a["root"], episodes=heldout_eps),
        n_anchors=n_eval, heldout_fraction=(n_eval - 1) / n_eval, **common), eval_store)
    return {"train_store": train_store, "eval_store": eval_store}


def finetune(cfg: ExperimentConfig, policy_type: str, teacher: dict, stores: dict, seed: int, run: str,
             work: Path, log) -> dict:
    """One fine-tuning run on task B (baseline = the same loop with retention off)."""
    retention = run == "craft"
    settings = cfg.finetune.model_dump(mode="json")
    if not retention:  # the baseline ignores retention settings: a sweep over them reuses it
        settings.pop("retention")
    config = {"teacher": teacher["teacher"], "store": stores["train_store"] if retention else None,
              "data": cfg.data.model_dump(mode="json"), "settings": settings, "seed": seed, "run": run}
    return _cached_stage(work, f"{policy_type}/{run}-s{seed}", config, "craft_core.train",
                         lambda out: _finetune(cfg, policy_type, teacher, stores, seed, run, out, log))


def _finetune(cfg: ExperimentConfig, policy_type: str, teacher: dict, stores: dict, seed: int, run: str,
              out: Path, log) -> dict:
    from craft_core.train import train

    ft = cfg.finetune
    retention = run == "craft"
    train_eps, _ = episode_split(cfg.data)
    task_b = teacher["datasets"]["task_b"]
    log(f"{policy_type}: fine-tuning on task B, {run}, seed {seed} ({ft.steps} steps)")
    result = train(
        TrainConfig(
            dataset=DatasetSource(repo_id=task_b["repo_id"], root=task_b["root"], episodes=train_eps),
            steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr,
            seed=seed, device="cpu", save_every=ft.checkpoint_every, log_every=ft.checkpoint_every,
            retention=ft.retention if retention else RetentionConfig(enabled=False), compare_baseline=False,
        ),
        teacher=PolicySource(path=teacher["teacher"]),
        store_url=stores["train_store"] if retention else None,
        out_dir=out,
        retention=retention,
    )
    checkpoints = sorted((out / "checkpoints").glob("[0-9]*"))
    return {
        "run": run, "seed": seed, "dir": str(out), "metrics": result["metrics"], "plot": result["plot"],
        "checkpoints": {int(c.name): str(c / "pretrained_model") for c in checkpoints},
    }


# ---------------------------------------------------------------------------------------------
# Measurements on held-out episodes
# ---------------------------------------------------------------------------------------------


class HeldoutActionLoss:
    """The policy's own loss on a task's held-out episodes, with fixed inputs and a fixed RNG."""

    def __init__(self, teacher_path: str, dataset: dict, episodes: list[int], batch_size: int, seed: int):
        from lerobot.datasets.factory import resolve_delta_timestamps
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

        from craft_core.policy_io import load_policy, make_processors, policy_loading_context

        self.seed = seed
        meta = LeRobotDatasetMetadata(dataset["repo_id"], root=dataset["root"])
        with policy_loading_context(teacher_path):
            teacher = load_policy(teacher_path)
            # The teacher's saved pipeline with this task's statistics: the same preprocessed
            # batches (normalised state, action targets, tokens) for every model scored.
            preprocessor, _ = make_processors(teacher, dataset_stats=meta.stats, pretrained_path=teacher_path)
        frames = LeRobotDataset(dataset["repo_id"], root=dataset["root"], episodes=episodes,
                                delta_timestamps=resolve_delta_timestamps(teacher.config, meta),
                                video_backend="pyav")
        loader = torch.utils.data.DataLoader(frames, batch_size=batch_size, shuffle=False)
        self.batches = [preprocessor(batch) for batch in loader]
        self.n_frames = len(frames)

    def __call__(self, policy) -> float:
        torch.manual_seed(self.seed)  # flow-matching noise and times: the same for every model
        total, count = 0.0, 0
        policy.eval()
        with torch.no_grad():
            for batch in self.batches:
                loss, _ = policy.forward(dict(batch))
                n = len(batch["action"])
                total += float(loss) * n
                count += n
        return total / count


def measure_checkpoint(path: str, losses: dict, drift_sets: dict, drift_batch_size: int) -> dict:
    from craft_core.policy_io import load_policy, policy_loading_context

    with policy_loading_context(path):
        policy = load_policy(path)
    row = {f"{task}_loss": measure(policy) for task, measure in losses.items()}
    for name, heldout in drift_sets.items():
        drift = heldout.drift(policy, heldout.for_policy(policy), drift_batch_size)
        row[f"drift_{name}"] = drift["mse"]
        row[f"drift_{name}_cosine"] = drift["cosine"]
    return row


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Aggregation, table, plots
# ---------------------------------------------------------------------------------------------

METRICS = (
    ("task_b_loss", "task-B loss ↓"),
    ("task_a_loss", "task-A loss (forgetting) ↓"),
    ("drift_anchors", "drift, held-out anchors (mse) ↓"),
    ("drift_episodes", "drift, held-out task-A episodes (mse) ↓"),
)


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def summarise(policy_result: dict, eps_end: float) -> dict:
    final = {run: [r["final"] for r in policy_result["runs"][run]] for run in RUNS}
    summary = {run: {m: mean_std([row[m] for row in rows]) for m, _ in METRICS} for run, rows in final.items()}
    summary["teacher"] = {m: {"mean": policy_result["teacher"][m], "std": 0.0, "n": 1}
                          for m, _ in METRICS}
    base, craft, teacher = summary["baseline"], summary["craft"], summary["teacher"]
    drift_ratio = base["drift_anchors"]["mean"] / max(craft["drift_anchors"]["mean"], 1e-12)
    summary["targets"] = {
        "craft_drift_le_eps_end": craft["drift_anchors"]["mean"] <= eps_end,
        "eps_end": eps_end,
        "drift_ratio_baseline_over_craft": drift_ratio,
        "drift_ratio_ge_3": drift_ratio >= 3.0,
        "craft_task_a_closer_to_teacher": abs(craft["task_a_loss"]["mean"] - teacher["task_a_loss"]["mean"])
        < abs(base["task_a_loss"]["mean"] - teacher["task_a_loss"]["mean"]),
        # Where fine-tuning on B did not raise task-A loss, "closer" can mean "improved less":
        # this says whether CRaFT's task-A loss is at least as low as the baseline's.
        "craft_task_a_le_baseline": craft["task_a_loss"]["mean"] <= base["task_a_loss"]["mean"],
        "task_b_loss_ratio_craft_over_baseline": craft["task_b_loss"]["mean"] / base["task_b_loss"]["mean"],
        "craft_task_b_within_10pct": craft["task_b_loss"]["mean"] <= 1.10 * base["task_b_loss"]["mean"],
    }
    return summary


def _fmt(stat: dict) -> str:
    if stat.get("n", 1) == 1 and stat["std"] == 0.0:
        return f"{stat['mean']:.4g}"
    return f"{stat['mean']:.4g} ± {stat['std']:.2g}"


def render_markdown(results: dict) -> str:
    lines = [f"# Retention experiment: baseline vs CRaFT ({results['config']['name']})", ""]
    lines.append(
        f"Seeds {results['config']['seeds']}; mean ± std over seeds of the final checkpoint, measured on "
        f"held-out episodes. Compute: {results['compute']['cpu_s'] / 60:.1f} CPU-min in all stages (their wall "
        f"times add up to {results['compute']['wall_s'] / 60:.1f} min on a shared machine), {results['machine']}."
    )
    lines.append("")
    header = "| policy | run | " + " | ".join(label for _, label in METRICS) + " |"
    lines += [header, "|" + "---|" * (len(METRICS) + 2)]
    for policy_type, policy_result in results["policies"].items():
        summary = policy_result["summary"]
        for run in ("teacher", *RUNS):
            cells = " | ".join(_fmt(summary[run][m]) for m, _ in METRICS)
            lines.append(f"| {policy_type} | {run} | {cells} |")
    lines.append("")
    for policy_type, policy_result in results["policies"].items():
        pretrain = policy_result["teacher_pretrain"]
        held = policy_result["heldout"]
        lines.append(
            f"- {policy_type} teacher: held-out task-A loss {pretrain['task_a_loss_at_init']:.4g} at init → "
            f"{policy_result['teacher']['task_a_loss']:.4g} after {pretrain['steps']} pretraining steps; held-out "
            f"episodes {held['episodes']} ({held['task_a_frames']} task-A / {held['task_b_frames']} task-B frames), "
            f"{held['heldout_anchors']} held-out anchors, {held['heldout_episode_anchors']} held-out-episode anchors; "
            f"all {policy_type} stages {policy_result['cost']['cpu_s'] / 60:.1f} CPU-min."
        )
    lines += ["", "Targets (CRaFT vs baseline):", ""]
    lines.append("| policy | CRaFT drift ≤ ε_end | drift baseline/CRaFT (≥ 3) | task-A closer to teacher "
                 "| task-A CRaFT ≤ baseline | task-B loss CRaFT/baseline (≤ 1.10) |")
    lines.append("|---|---|---|---|---|---|")
    for policy_type, policy_result in results["policies"].items():
        t = policy_result["summary"]["targets"]
        craft_drift = policy_result["summary"]["craft"]["drift_anchors"]["mean"]
        lines.append(
            f"| {policy_type} | {'yes' if t['craft_drift_le_eps_end'] else 'no'} ({craft_drift:.3g} vs "
            f"{t['eps_end']:.3g}) | {t['drift_ratio_baseline_over_craft']:.2f}× "
            f"({'yes' if t['drift_ratio_ge_3'] else 'no'}) | {'yes' if t['craft_task_a_closer_to_teacher'] else 'no'} "
            f"| {'yes' if t['craft_task_a_le_baseline'] else 'no'} "
            f"| {t['task_b_loss_ratio_craft_over_baseline']:.3f} "
            f"({'yes' if t['craft_task_b_within_10pct'] else 'no'}) |"
        )
    lines.append("")
    return "\n".join(lines)


def plot_policy(policy_type: str, policy_result: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("drift_anchors", "drift, held-out anchors"),
        ("drift_episodes", "drift, held-out episodes"),
        ("task_a_loss", "task-A loss"),
        ("task_b_loss", "task-B loss"),
        ("lambda", "λ (CRaFT)"),
        ("epsilon", "ε (CRaFT)"),
    ]
    colors = {"baseline": "tab:blue", "craft": "tab:orange"}
    fig, axes = plt.subplots(3, 2, figsize=(10, 8), sharex=True)
    teacher = policy_result["teacher"]
    for ax, (key, label) in zip(axes.flat, panels):
        for run in RUNS:
            for i, seed_run in enumerate(policy_result["runs"][run]):
                if key in ("lambda", "epsilon"):
                    points = [(r["step"], r[key]) for r in seed_run["train_log"] if r.get(key) is not None]
                else:
                    points = [(0, teacher[key])] + [(c["step"], c[key]) for c in seed_run["curve"]]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, color=colors[run], alpha=0.8, linewidth=1,
                            label=run if i == 0 else None)
        if key == "drift_anchors":
            ax.axhline(policy_result["eps_end"], color="gray", linestyle="--", linewidth=1, label="ε_end")
        if key in ("task_a_loss", "task_b_loss"):
            ax.axhline(teacher[key], color="black", linestyle=":", linewidth=1, label="teacher")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        if key.startswith("drift"):
            ax.set_yscale("symlog", linthresh=1e-4)  # the teacher's own drift (step 0) is exactly 0
            ax.set_ylim(bottom=0.0)
        ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("fine-tuning step on task B")
    fig.suptitle(f"{policy_type}: baseline vs CRaFT (one line per seed)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def run_policy(cfg: ExperimentConfig, policy_type: str, work: Path, log) -> dict:
    from craft_core.evaluation.drift import open_heldout

    cfg = cfg.for_policy(policy_type)
    settings = cfg.model_dump(mode="json", exclude={"policies", "per_policy", "name"})
    cached = work / policy_type / f"result-{_digest(settings, policy_type, _measurement_code())}.json"
    if cached.is_file():
        log(f"{policy_type}: reusing measured result {cached}")
        result = json.loads(cached.read_text())
        result["summary"] = summarise(result, cfg.finetune.retention.eps_end)
        return result
    clock = Clock()
    costs = []  # of every piece this result is made of, whether computed now or reused from work/
    teacher = build_teacher(cfg, policy_type, work, log)
    stores = build_stores(cfg, policy_type, teacher, work, log)
    costs += [teacher["cost"], stores["cost"]]
    costs_made_now = [teacher.get("made_now", False), stores.get("made_now", False)]
    _, heldout_eps = episode_split(cfg.data)
    ev = cfg.evaluation
    losses = {
        task: HeldoutActionLoss(teacher["teacher"], teacher["datasets"][task], heldout_eps, ev.batch_size, ev.seed)
        for task in ("task_a", "task_b")
    }
    drift_sets = {"anchors": open_heldout(stores["train_store"]), "episodes": open_heldout(stores["eval_store"])}
    teacher_row = measure_checkpoint(teacher["teacher"], losses, drift_sets, ev.batch_size)
    log(f"{policy_type}: teacher {json.dumps({k: round(v, 5) for k, v in teacher_row.items()})}")

    runs: dict[str, list] = {run: [] for run in RUNS}
    for seed in cfg.seeds:
        for run in RUNS:
            trained = finetune(cfg, policy_type, teacher, stores, seed, run, work, log)
            # Measurements depend on the run, the held-out data and the evaluation settings only,
            # so a sweep re-measures nothing of the shared baseline.
            measured = Path(trained["dir"]) / (
                f"measured-{_digest(cfg.data.model_dump(), ev.model_dump(), stores, _measurement_code())}.json")
            if measured.is_file():
                measurement = json.loads(measured.read_text())
            else:
                measure_clock = Clock()
                curve = [
                    {"step": int(step), **measure_checkpoint(path, losses, drift_sets, ev.batch_size)}
                    for step, path in sorted(trained["checkpoints"].items(), key=lambda item: int(item[0]))
                ]
                measurement = {"curve": curve, "cost": measure_clock.cost()}
                measured.write_text(json.dumps(measurement))
                measurement["made_now"] = True
            curve = measurement["curve"]
            costs += [trained["cost"], measurement["cost"]]
            costs_made_now += [trained.get("made_now", False), measurement.get("made_now", False)]
            train_log = [
                {k: r.get(k) for k in ("step", "task_loss", "retention_loss", "lambda", "epsilon", "projected")}
                for r in read_metrics(trained["metrics"])
            ]
            final = curve[-1]
            log(f"{policy_type}: {run} seed {seed} final "
                f"{json.dumps({k: round(v, 5) for k, v in final.items() if k != 'step'})}")
            runs[run].append({"seed": seed, "final": final, "curve": curve, "train_log": train_log,
                              "train_cost": trained["cost"]})
    result = {
        "teacher": teacher_row,
        "teacher_pretrain": _pretrain_summary(cfg, teacher, losses),
        "runs": runs,
        "eps_end": cfg.finetune.retention.eps_end,
        "stores": {"train": stores["train_store"], "heldout_episodes": stores["eval_store"]},
        "settings": cfg.model_dump(mode="json"),
        "heldout": {"episodes": heldout_eps, "task_a_frames": losses["task_a"].n_frames,
                    "task_b_frames": losses["task_b"].n_frames,
                    "heldout_anchors": drift_sets["anchors"].info["n_heldout"],
                    "heldout_episode_anchors": drift_sets["episodes"].info["n_heldout"]},
    }
    # Everything this result took to produce: every piece counts what it cost when it was made
    # (now or in an earlier call), plus this call's own work outside the pieces.
    made_now = _total_cost(costs[i] for i, made in enumerate(costs_made_now) if made)
    elapsed = clock.cost()
    own = {key: elapsed[key] - made_now[key] for key in elapsed}
    result["cost"] = _total_cost([*costs, own])
    result["summary"] = summarise(result, cfg.finetune.retention.eps_end)
    cached.write_text(json.dumps(result, allow_nan=False))
    return result


def _pretrain_summary(cfg: ExperimentConfig, teacher: dict, losses: dict) -> dict:
    """Held-out task-A loss of the untrained tiny build vs the pretrained teacher."""
    from craft_core.policy_io import load_policy, policy_loading_context

    with policy_loading_context(teacher["init"]):
        init = load_policy(teacher["init"])
    return {"steps": cfg.teacher.pretrain_steps, "task_a_loss_at_init": losses["task_a"](init)}


def run_experiment(cfg: ExperimentConfig, out: Path, work: Path, log=print) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "schema": RESULTS_SCHEMA,
        "config": cfg.model_dump(mode="json"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "policies": {},
    }
    for policy_type in cfg.policies:
        results["policies"][policy_type] = run_policy(cfg, policy_type, work, log)
    results["wall_s"] = time.time() - started
    results["compute"] = _total_cost(p["cost"] for p in results["policies"].values())
    (out / "plots").mkdir(exist_ok=True)
    for policy_type, policy_result in results["policies"].items():
        plot_policy(policy_type, policy_result, out / "plots" / f"{policy_type}.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "results.md").write_text(render_markdown(results))
    return results


def run_policies_in_parallel(args, cfg: ExperimentConfig, log) -> None:
    import subprocess

    pending = list(cfg.policies)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            policy_type = pending.pop(0)
            command = [sys.executable, __file__, "--config", args.config, "--work", args.work,
                       "--out", str(Path(args.work) / f"partial-{policy_type}"), "--threads", str(args.threads),
                       *args.overrides, f"policies=[{policy_type}]"]
            log(f"{policy_type}: started in its own process")
            running.append((policy_type, subprocess.Popen(command)))
        time.sleep(2)
        for policy_type, process in list(running):
            if process.poll() is not None:
                running.remove((policy_type, process))
                if process.returncode != 0:
                    raise SystemExit(f"the {policy_type} run failed (exit {process.returncode}); see its output above")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "experiments" / "retention.yaml"))
    parser.add_argument("--out", default=str(REPO_ROOT / "experiments" / "results"))
    parser.add_argument("--work", default=str(REPO_ROOT / "artifacts" / "experiment"),
                        help="Intermediate datasets/checkpoints/stores (reused when settings match)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--jobs", type=int, default=1,
                        help="Run up to this many policy types at once, in separate processes (one per core)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. finetune.retention.eps_end=0.005")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_experiment_config(args.config, args.overrides)
    started = time.time()

    def log(message: str) -> None:
        print(f"[retention {time.time() - started:7.1f}s] {message}", flush=True)

    if args.jobs > 1 and len(cfg.policies) > 1:
        run_policies_in_parallel(args, cfg, log)  # fills the work/ cache; assembled below
    results = run_experiment(cfg, Path(args.out), Path(args.work), log)
    log(f"done: {results['compute']['cpu_s'] / 60:.1f} CPU-min in all, {(time.time() - started) / 60:.1f} min elapsed")
    print(render_markdown(results))
    if not all(math.isfinite(v) for p in results["policies"].values() for v in p["teacher"].values()):
        raise SystemExit("non-finite teacher measurements; see results.json")


if __name__ == "__main__":
    main()
