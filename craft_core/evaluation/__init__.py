"""Stage 3: evaluate fine-tuned checkpoints in simulation, by drift from the teacher, and by loss.

An :class:`Evaluator` evaluates one policy at a time: it loads the ``pretrained_model`` folder with
lerobot (its own saved pipeline: what a user deploys), rolls it out in the configured sim envs
through lerobot's ``eval_policy_all`` (sim.py), measures how far it moved from the teacher on the
anchor store's held-out anchors and on further frame sets (drift.py), and its own loss on held-out
frames (action_loss.py: forgetting in loss). ``evaluate`` runs it over several policies and writes
``report.json`` + ``report.md`` with a comparison table (report.py).

In the pipeline every evaluated policy is its own stage (``eval_teacher``, ``eval_<run>``,
``eval_<reference>``: :func:`eval_run_stage`), cached on what that policy depends on, so the
teacher is evaluated once however many fine-tuning seeds are compared with it; the ``report``
stage (:func:`report_stage`) assembles them.
"""

import gc
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

import craft_core
from craft_core.config import CacheConfig, EvalConfig, PolicySource
from craft_core.devices import resolve_device
from craft_core.evaluation.action_loss import HeldoutActionLoss
from craft_core.evaluation.drift import DriftAccumulator, drift_columns, measure_drift
from craft_core.evaluation.report import comparison_rows, render_markdown, write_report
from craft_core.evaluation.sim import (
    SimulatorUnavailableError,
    check_simulator_installed,
    make_env_cfg,
    sim_key,
    simulate,
)

__all__ = [
    "CheckpointError",
    "DriftAccumulator",
    "HeldoutActionLoss",
    "SimulatorUnavailableError",
    "comparison_rows",
    "Evaluator",
    "eval_run_stage",
    "evaluate",
    "report_stage",
    "load_checkpoint",
    "measure_drift",
    "render_markdown",
    "simulate",
    "write_report",
]

REPORT_SCHEMA = "craft.eval/1"


class CheckpointError(ValueError):
    """A run's checkpoint folder is missing, incomplete or does not load."""



class Evaluator:
    """Evaluates policies one at a time against the same sim entries, anchors and held-out frames.

    Everything that can be checked without a rollout is checked on construction, before the first
    (slow) rollout: simulators installed, sim entries distinct, the anchor stores valid.
    """

    def __init__(self, cfg: EvalConfig, *, teacher: PolicySource | None, store_url: str | None,
                 drift_stores: dict[str, str] | None = None):
        from craft_core.evaluation.drift import open_heldout

        self.cfg = cfg
        self.teacher = teacher
        self.store_url = store_url
        for sim in cfg.sim:
            check_simulator_installed(sim.env)
        self.keys = [sim_key(sim, None) for sim in cfg.sim]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"eval.sim lists the same env/task twice ({self.keys}); give each entry its own name or task")
        self.heldout = open_heldout(store_url) if cfg.drift and store_url else None
        self.drift_sets = {name: open_heldout(url, split="all") for name, url in (drift_stores or {}).items()}
        self.device = str(resolve_device(cfg.device, field="eval.device"))
        if cfg.action_loss and teacher is None:
            raise ValueError("eval.action_loss needs the teacher (its pipeline preprocesses the held-out frames)")
        self.action_losses = {
            loss.name: HeldoutActionLoss(teacher, loss.dataset, batch_size=cfg.loss_batch_size, seed=cfg.loss_seed)
            for loss in cfg.action_loss
        }

    def check_policy(self, name: str, source: PolicySource) -> None:
        from craft_core.policy_io import policy_type_of

        for anchors in filter(None, [self.heldout, *self.drift_sets.values()]):
            anchors.check_policy_type(policy_type_of(source), name)

    def steps(self) -> int:
        """Progress units of one policy: its sim entries, drift, measures."""
        return len(self.cfg.sim) + (self.heldout is not None) + bool(self.action_losses or self.drift_sets)

    def measure(self, policy) -> dict:
        """Losses and drifts on extra frame sets of one loaded policy: a report row or a curve point."""
        row = {f"{name}_loss": loss(policy) for name, loss in self.action_losses.items()}
        for name, anchors in self.drift_sets.items():
            row.update(drift_columns(anchors.drift(policy, anchors.for_policy(policy), self.cfg.drift_batch_size), name))
        return row

    def evaluate_one(self, name: str, source: PolicySource, out_dir: Path, *, train_result: dict | None = None,
                     progress: Callable[[int, int, dict], None] | None = None, done: int = 0, total: int | None = None) -> dict:
        """Everything measured of one policy: {"run", "sim", "drift", "measures", "curve", "train", "timings"}."""
        from craft_core.policy_io import policy_loading_context

        out_dir = Path(out_dir)
        total = total or self.steps()
        self.check_policy(name, source)
        entry: dict = {"sim": {}, "drift": None, "measures": None, "curve": None, "timings": {}}
        started = time.perf_counter()
        with policy_loading_context(source.path):
            policy, preprocessor, postprocessor = load_checkpoint(name, source, self.device)
            entry["run"] = {
                "checkpoint": source.path,
                "revision": source.revision,
                "policy_type": policy.config.type,
                "n_parameters": sum(p.numel() for p in policy.parameters()),
                "load_s": time.perf_counter() - started,
            }
            sim_started = time.perf_counter()
            for sim, key in zip(self.cfg.sim, self.keys, strict=True):
                videos_dir = out_dir / "videos" / name / key.replace("/", "_")
                result = simulate(policy, preprocessor, postprocessor, sim, checkpoint=source.path,
                                  videos_dir=videos_dir)
                result["videos"] = [str(Path(v).resolve()) for v in result["videos"]]
                entry["sim"][key] = result
                done += 1
                if progress:
                    progress(done, total, {"run": name, "env": key, "success_rate": result["success_rate"]})
            entry["timings"]["sim_s"] = time.perf_counter() - sim_started
            drift_started = time.perf_counter()
            if self.heldout is not None:
                entry["drift"] = self.heldout.drift(policy, self.heldout.for_policy(policy), self.cfg.drift_batch_size)
                done += 1
                if progress:
                    progress(done, total, {"run": name, "drift_mse": entry["drift"]["mse"]})
            if self.action_losses or self.drift_sets:
                entry["measures"] = self.measure(policy)
                done += 1
                if progress:
                    progress(done, total, {"run": name, **entry["measures"]})
            entry["timings"]["drift_s"] = time.perf_counter() - drift_started
            del policy, preprocessor, postprocessor
            gc.collect()
        if train_result is not None:
            entry["train"] = {key: train_result.get(key) for key in
                              ("final_task_loss", "final_lambda", "targets", "steps", "cache_type", "checkpoint",
                               "metrics", "plot")}
            if self.cfg.every_checkpoint:
                entry["curve"] = self._curve(name, train_result)
        entry["timings"]["total_s"] = time.perf_counter() - started
        return entry

    def _curve(self, name: str, train_result: dict) -> list[dict]:
        """Losses and drifts at every checkpoint a run saved, in step order."""
        from craft_core.policy_io import load_policy, policy_loading_context

        points = []
        for step, path in sorted(train_result.get("checkpoints", {}).items(), key=lambda item: int(item[0])):
            with policy_loading_context(path):
                policy = load_policy(run_source(name, path, None))
                point = {"step": int(step), **self.measure(policy)}
                if self.heldout is not None:
                    drift = self.heldout.drift(policy, self.heldout.for_policy(policy), self.cfg.drift_batch_size)
                    point.update(drift_columns(drift, "anchors"))
            points.append(point)
            del policy
            gc.collect()
        return points


def new_report(cfg: EvalConfig, *, teacher: PolicySource | None, store_url: str | None, device: str,
               fingerprints: dict[str, str] | None = None) -> dict:
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "craft_version": craft_core.__version__,
        "lerobot_version": _lerobot_version(),
        "device": device,
        "config": cfg.model_dump(mode="json"),
        "teacher": teacher.model_dump() if teacher is not None else None,
        "store": store_url,
        "runs": {},
        "sim": {},
        "drift": {},
        "measures": {},
        "curves": {},
        "train": {},
        "fingerprints": dict(fingerprints or {}),
        "timings": {},
    }


def add_to_report(report: dict, name: str, entry: dict) -> None:
    """One policy's evaluation (``Evaluator.evaluate_one``) as the report's per-run sections."""
    report["runs"][name] = entry["run"]
    if entry["sim"]:
        report["sim"][name] = entry["sim"]
    if entry["drift"] is not None:
        report["drift"][name] = entry["drift"]
    if entry["measures"] is not None:
        report["measures"][name] = entry["measures"]
    if entry.get("curve") is not None:
        report["curves"][name] = entry["curve"]
    if entry.get("train") is not None:
        report["train"][name] = entry["train"]
    for key, value in entry["timings"].items():
        report["timings"][key] = report["timings"].get(key, 0.0) + value


def finish_report(report: dict, evaluator: Evaluator, out_dir: Path, started: float) -> dict:
    report["drift_sets"] = {name: anchors.info["n_anchors"] for name, anchors in evaluator.drift_sets.items()}
    report["action_loss_frames"] = {name: loss.n_frames for name, loss in evaluator.action_losses.items()}
    if evaluator.cfg.drift and evaluator.heldout is None:
        report["drift_skipped"] = "no anchor store was given"
    report["timings"]["total_s"] = time.perf_counter() - started
    return write_report(report, Path(out_dir))


def evaluate(
    cfg: EvalConfig,
    *,
    runs: dict[str, str],
    teacher: PolicySource | None,
    store_url: str | None,
    out_dir: Path,
    train_results: dict[str, dict] | None = None,
    fingerprints: dict[str, str] | None = None,
    drift_stores: dict[str, str] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Evaluate every run; writes out_dir/report.json, report.md and videos/; returns the report.

    ``drift_stores`` (name -> eval-only store URL) adds drift on every anchor of those stores;
    ``train_results`` (run -> the train stage's result) adds the final task loss and, with
    ``cfg.every_checkpoint``, curves over the run's saved checkpoints.
    """
    started = time.perf_counter()
    if not runs:
        raise ValueError("evaluate: 'runs' is empty; name at least one checkpoint, e.g. {'craft': <folder>}")
    evaluator = Evaluator(cfg, teacher=teacher, store_url=store_url, drift_stores=drift_stores)
    sources = {name: run_source(name, path, teacher) for name, path in runs.items()}
    for name, source in sources.items():  # before the first rollout
        evaluator.check_policy(name, source)
    report = new_report(cfg, teacher=teacher, store_url=store_url, device=evaluator.device, fingerprints=fingerprints)
    total, done = evaluator.steps() * len(sources), 0
    for name, source in sources.items():
        entry = evaluator.evaluate_one(name, source, Path(out_dir), train_result=(train_results or {}).get(name),
                                       progress=progress, done=done, total=total)
        done += evaluator.steps()
        add_to_report(report, name, entry)
    return finish_report(report, evaluator, Path(out_dir), started)


EVALUATION_FILE = "evaluation.json"


def evaluated_source(policy: str, *, teacher: PolicySource, reference: str | None,
                     upstream: dict[str, dict]) -> PolicySource:
    """The checkpoint of an evaluated policy: the teacher, a run's last checkpoint or a reference run."""
    if policy == "teacher":
        return teacher
    if f"train_{policy}" in upstream:
        return run_source(policy, upstream[f"train_{policy}"]["checkpoint"], teacher)
    if reference is None:
        raise ValueError(f"eval_{policy}: {policy!r} is neither the teacher, a run nor a reference run")
    return run_source(policy, reference, teacher)


def eval_run_stage(cfg: EvalConfig, *, teacher: PolicySource, policy: str, upstream: dict[str, dict], out_dir: Path,
                   reference: str | None = None, progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """The pipeline's eval stage of one policy (``eval_<policy>``): writes ``evaluation.json``."""
    import json

    from craft_core.evaluation.report import json_safe

    out_dir = Path(out_dir)
    cache = upstream["cache"]
    evaluator = Evaluator(cfg, teacher=teacher, store_url=cache["store_url"], drift_stores=cache.get("drift_stores"))
    source = evaluated_source(policy, teacher=teacher, reference=reference, upstream=upstream)
    entry = evaluator.evaluate_one(policy, source, out_dir, train_result=upstream.get(f"train_{policy}"),
                                   progress=progress)
    entry["context"] = {"drift_sets": {name: a.info["n_anchors"] for name, a in evaluator.drift_sets.items()},
                        "action_loss_frames": {name: loss.n_frames for name, loss in evaluator.action_losses.items()},
                        "device": evaluator.device}
    path = out_dir / EVALUATION_FILE
    path.write_text(json.dumps(json_safe(entry), indent=1, allow_nan=False))
    headline = {f"{key} success": result["success_rate"] for key, result in entry["sim"].items()}
    if entry["drift"] is not None:
        headline["drift mse"] = entry["drift"]["mse"]
    return {"evaluation": str(path), "policy": policy, **headline}


def report_stage(cfg: EvalConfig, *, teacher: PolicySource, runs: list[str], evaluated: list[str],
                 upstream: dict[str, dict], out_dir: Path, about: dict | None = None,
                 progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """The pipeline's report stage: every ``eval_<policy>`` stage's evaluation in one report, with
    ``about`` (``report.pipeline_summary`` of the config: tasks, anchoring, constraints) completed by
    the cache stage's resolved layers, and one figure of every run's training curves."""
    import json

    from craft_core.evaluation.report import comparison_rows

    out_dir = Path(out_dir)
    cache = upstream["cache"]
    fingerprints = {stage: result["stage"]["fingerprint"] for stage, result in upstream.items() if "stage" in result}
    report = new_report(cfg, teacher=teacher, store_url=cache["store_url"], device="", fingerprints=fingerprints)
    context: dict = {}
    for policy in evaluated:
        entry = json.loads(Path(upstream[f"eval_{policy}"]["evaluation"]).read_text())
        context = entry.pop("context", context)
        add_to_report(report, policy, entry)
    report["device"] = context.get("device", "")
    report["drift_sets"] = context.get("drift_sets", {})
    report["action_loss_frames"] = context.get("action_loss_frames", {})
    report["fine_tuning_runs"] = list(runs)
    # <root>/report/<fingerprint>/: paths in report.md are shown relative to <root>
    report["artifacts_root"] = str(out_dir.resolve().parent.parent)
    if about is not None:
        about = json.loads(json.dumps(about))
        anchors = about.setdefault("anchors", {})
        anchors.update({"resolved_layers": cache.get("layers"), "depth": cache.get("depth"),
                        "n_heldout": cache.get("n_heldout")})
        report["about"] = about
    metrics = {run: report["train"][run]["metrics"] for run in runs
               if run in report["train"] and report["train"][run].get("metrics")
               and Path(report["train"][run]["metrics"]).is_file()}
    if metrics:
        from craft_core.metrics import plot_comparison

        retaining = [run for run in metrics if report["train"][run].get("final_lambda")]
        name = (about or {}).get("name") or "craft"
        report["plot"] = str(plot_comparison(metrics, out_dir / "training_curves.png", retaining=retaining,
                                             title=f"{name}: {' vs '.join(metrics)}"))
    report = write_report(report, out_dir)
    return {
        "report_json": str(out_dir / "report.json"),
        "report_md": str(out_dir / "report.md"),
        "plot": report.get("plot"),
        "comparison": comparison_rows(report),
        "runs": sorted(report["runs"]),
    }


def run_source(name: str, path: str, teacher: PolicySource | None) -> PolicySource:
    """The policy to load for run ``name``: a local pretrained_model folder, checked up front.

    The teacher may also be named by its hub id (``runs={"teacher": teacher.path}``); every other
    run is a folder written by the train stage.
    """
    if teacher is not None and str(path) == teacher.path and not Path(path).exists():
        return teacher
    folder = Path(path)
    hint = (
        "Pass the pretrained_model folder written by the train stage "
        "(<train dir>/checkpoints/<step>/pretrained_model) or by a policy's save_pretrained()."
    )
    if not folder.exists():
        raise CheckpointError(f"run {name!r}: checkpoint folder {folder} does not exist. {hint}")
    if not folder.is_dir():
        raise CheckpointError(f"run {name!r}: checkpoint {folder} is a file, not a folder. {hint}")
    # A PEFT checkpoint (train.peft, as lerobot saves PEFT runs) holds adapters instead of full weights.
    weights = ("adapter_config.json", "adapter_model.safetensors") if (folder / "adapter_config.json").is_file() \
        else ("model.safetensors",)
    for required in ("config.json", *weights):
        if not (folder / required).is_file():
            present = sorted(p.name for p in folder.iterdir())
            raise CheckpointError(
                f"run {name!r}: checkpoint folder {folder} has no {required} (it holds {present}), so it "
                f"is not a lerobot pretrained_model folder. {hint}"
            )
    return PolicySource(path=str(folder))


def load_checkpoint(name: str, source: PolicySource, device: str):
    """(policy, preprocessor, postprocessor) of one run, loaded the way lerobot-eval loads them.

    Must be called inside ``policy_loading_context(source.path)``.
    """
    from craft_core.policy_io import load_policy, make_processors

    try:
        policy = load_policy(source, device=device)
    except Exception as exc:
        raise CheckpointError(
            f"run {name!r}: the policy in {source.path} does not load ({type(exc).__name__}: {exc}). "
            f"Check that it was saved by lerobot {_lerobot_version()} save_pretrained and is complete; "
            f"re-run the stage that wrote it if it was interrupted."
        ) from exc
    try:
        # The saved pipelines, as lerobot-eval loads them (on the policy's device).
        preprocessor, postprocessor = make_processors(policy, pretrained_path=source.path)
    except Exception as exc:
        raise CheckpointError(
            f"run {name!r}: the processors in {source.path} do not load ({type(exc).__name__}: {exc}). "
            f"A pretrained_model folder needs policy_preprocessor.json / policy_postprocessor.json "
            f"(+ their state files) as written by the processors' save_pretrained()."
        ) from exc
    policy.eval()
    return policy, preprocessor, postprocessor


def _lerobot_version() -> str:
    from importlib.metadata import version

    return version("lerobot")


