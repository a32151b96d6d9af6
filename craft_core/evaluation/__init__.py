"""Stage 3: evaluate fine-tuned checkpoints in simulation, by drift from the teacher, and by loss.

``evaluate`` loads each run's ``pretrained_model`` folder with lerobot, rolls it out in the
configured sim envs through lerobot's ``eval_policy_all`` (sim.py), measures how far its pooled
hidden states moved from the teacher's on the anchor store's held-out anchors and on further
frame sets (drift.py), measures its own loss on held-out frames (action_loss.py: forgetting in
loss), and writes ``report.json`` + ``report.md`` with a comparison table of the runs (report.py).
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
    "eval_stage",
    "evaluate",
    "load_checkpoint",
    "measure_drift",
    "render_markdown",
    "simulate",
    "write_report",
]

REPORT_SCHEMA = "craft.eval/1"


class CheckpointError(ValueError):
    """A run's checkpoint folder is missing, incomplete or does not load."""


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
    for required in ("config.json", "model.safetensors"):
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

    ``drift_stores`` (name -> eval-only store URL, see :func:`extract_drift_sets`) adds drift on
    every anchor of those stores; ``train_results`` (run -> the train stage's result) adds the final
    task loss and, with ``cfg.every_checkpoint``, curves over the run's saved checkpoints.
    """
    from craft_core.evaluation.drift import open_heldout
    from craft_core.policy_io import policy_loading_context, policy_type_of

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if not runs:
        raise ValueError("evaluate: 'runs' is empty; name at least one checkpoint, e.g. {'craft': <folder>}")
    # Everything that can be checked without a rollout is checked before the first (slow) one.
    for sim in cfg.sim:
        check_simulator_installed(sim.env)
    keys = [sim_key(sim, make_env_cfg(sim)) for sim in cfg.sim]
    if len(set(keys)) != len(keys):
        raise ValueError(f"eval.sim lists the same env/task twice ({keys}); give each entry its own task")
    sources = {name: run_source(name, path, teacher) for name, path in runs.items()}
    heldout = open_heldout(store_url) if cfg.drift and store_url else None
    drift_sets = {name: open_heldout(url, split="all") for name, url in (drift_stores or {}).items()}
    for anchors in filter(None, [heldout, *drift_sets.values()]):
        for name, source in sources.items():
            anchors.check_policy_type(policy_type_of(source), name)
    device = str(resolve_device(cfg.device, field="eval.device"))
    action_losses = {
        loss.name: HeldoutActionLoss(teacher, loss.dataset, batch_size=cfg.loss_batch_size, seed=cfg.loss_seed)
        for loss in cfg.action_loss
    } if teacher is not None else {}
    if cfg.action_loss and teacher is None:
        raise ValueError("eval.action_loss needs the teacher (its pipeline preprocesses the held-out frames)")

    def measure(policy) -> dict:
        """Losses and drifts of one loaded policy: the numbers of a report row or a curve point."""
        row = {f"{name}_loss": loss(policy) for name, loss in action_losses.items()}
        for name, anchors in drift_sets.items():
            row.update(drift_columns(anchors.drift(policy, anchors.for_policy(policy), cfg.drift_batch_size), name))
        return row

    report: dict = {
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
    if cfg.drift and heldout is None:
        report["drift_skipped"] = "no anchor store was given"

    has_measures = bool(action_losses or drift_sets)
    total = len(sources) * (len(cfg.sim) + (heldout is not None) + has_measures)
    done = 0
    sim_seconds = drift_seconds = 0.0
    for name, source in sources.items():
        with policy_loading_context(source.path):
            loaded_at = time.perf_counter()
            policy, preprocessor, postprocessor = load_checkpoint(name, source, device)
            report["runs"][name] = {
                "checkpoint": source.path,
                "revision": source.revision,
                "policy_type": policy.config.type,
                "n_parameters": sum(p.numel() for p in policy.parameters()),
                "load_s": time.perf_counter() - loaded_at,
            }
            anchors = heldout.for_policy(policy) if heldout is not None else None
            for sim, key in zip(cfg.sim, keys, strict=True):
                videos_dir = out_dir / "videos" / name / key.replace("/", "_")
                sim_started = time.perf_counter()
                result = simulate(
                    policy, preprocessor, postprocessor, sim, checkpoint=source.path, videos_dir=videos_dir
                )
                sim_seconds += time.perf_counter() - sim_started
                result["videos"] = [str(Path(v).relative_to(out_dir)) for v in result["videos"]]
                report["sim"].setdefault(name, {})[key] = result
                done += 1
                if progress:
                    progress(done, total, {"run": name, "env": key, "success_rate": result["success_rate"]})
            if heldout is not None:
                drift_started = time.perf_counter()
                report["drift"][name] = heldout.drift(policy, anchors, cfg.drift_batch_size)
                drift_seconds += time.perf_counter() - drift_started
                done += 1
                if progress:
                    progress(done, total, {"run": name, "drift_mse": report["drift"][name]["mse"]})
            if has_measures:
                report["measures"][name] = measure(policy)
                done += 1
                if progress:
                    progress(done, total, {"run": name, **report["measures"][name]})
            del policy, preprocessor, postprocessor, anchors
            gc.collect()
        if cfg.every_checkpoint and name in (train_results or {}):
            report["curves"][name] = _curve(name, train_results[name], heldout, measure, cfg.drift_batch_size)

    for name, result in (train_results or {}).items():
        if name in report["runs"]:
            report["train"][name] = {
                key: result.get(key)
                for key in ("final_task_loss", "final_lambda", "steps", "cache_type", "checkpoint", "metrics")
            }
    report["drift_sets"] = {name: anchors.info["n_anchors"] for name, anchors in drift_sets.items()}
    report["action_loss_frames"] = {name: loss.n_frames for name, loss in action_losses.items()}
    report["timings"] = {
        "sim_s": sim_seconds,
        "drift_s": drift_seconds,
        "total_s": time.perf_counter() - started,
    }
    return write_report(report, out_dir)


def _curve(name: str, train_result: dict, heldout, measure, drift_batch_size: int) -> list[dict]:
    """Losses and drifts at every checkpoint a run saved, in step order."""
    from craft_core.policy_io import load_policy, policy_loading_context

    points = []
    for step, path in sorted(train_result.get("checkpoints", {}).items(), key=lambda item: int(item[0])):
        with policy_loading_context(path):
            policy = load_policy(run_source(name, path, None))
            point = {"step": int(step), **measure(policy)}
            if heldout is not None:
                point.update(drift_columns(heldout.drift(policy, heldout.for_policy(policy), drift_batch_size), "anchors"))
        points.append(point)
        del policy
        gc.collect()
    return points


DRIFT_STORES_DIR = "drift_sets"


def extract_drift_sets(cfg: EvalConfig, *, teacher: PolicySource, store_info: dict, out_dir: Path) -> dict[str, str]:
    """Eval-only anchor stores on ``cfg.drift_sets`` frames, with the cache's layers and pooling.

    Built with the cache stage's own extraction into ``out_dir/drift_sets/<name>.zarr`` (resumed
    like any store), so the teacher's targets there are computed exactly as the cache's are.
    """
    from craft_core.extraction import extract_anchors

    targets = store_info["targets"]
    action = targets.get("action_output", {})
    stores = {}
    for drift_set in cfg.drift_sets:
        url = str(Path(out_dir) / DRIFT_STORES_DIR / f"{drift_set.name}.zarr")
        extract_anchors(CacheConfig(
            teacher=teacher, dataset=drift_set.dataset, n_anchors=drift_set.n_anchors, heldout_fraction=0.0,
            targets=list(targets), layers=list(store_info["layers"] or [-1]),
            pooling=list(store_info["pooling"] or ["vision_token_mean"]),
            action_output={"top_k": int(action.get("top_k", 8)), "flow_steps": action.get("steps")},
            dtype=store_info.get("dtype") or "float32", device=cfg.device, seed=0,
        ), url)
        stores[drift_set.name] = url
    return stores


def eval_stage(cfg: EvalConfig, *, teacher: PolicySource, runs: list[str], upstream: dict[str, dict], out_dir: Path,
               progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """The pipeline's eval stage: the teacher, every fine-tuning run and the reference runs."""
    from craft_core.evaluation.report import comparison_rows

    out_dir = Path(out_dir)
    cache = upstream["cache"]
    train_results = {run: upstream[f"train_{run}"] for run in runs}
    checkpoints = {"teacher": teacher.path, **{run: result["checkpoint"] for run, result in train_results.items()},
                   **cfg.reference_runs}
    drift_stores = extract_drift_sets(cfg, teacher=teacher, store_info=cache, out_dir=out_dir)
    fingerprints = {stage: result["stage"]["fingerprint"] for stage, result in upstream.items() if "stage" in result}
    report = evaluate(cfg, runs=checkpoints, teacher=teacher, store_url=cache["store_url"], out_dir=out_dir,
                      train_results=train_results, fingerprints=fingerprints, drift_stores=drift_stores,
                      progress=progress)
    return {
        "report_json": str(out_dir / "report.json"),
        "report_md": str(out_dir / "report.md"),
        "comparison": comparison_rows(report),
        "runs": sorted(report["runs"]),
    }
