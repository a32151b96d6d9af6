"""Stage 3: evaluate fine-tuned checkpoints in simulation and by drift from the teacher.

``evaluate`` loads each run's ``pretrained_model`` folder with lerobot, rolls it out in the
configured sim envs through lerobot's ``eval_policy_all`` (sim.py), measures how far its pooled
hidden states moved from the teacher's on the anchor store's held-out anchors (drift.py) and
writes ``report.json`` + ``report.md`` with a comparison table of the runs (report.py).
"""

import gc
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

import craft_core
from craft_core.config import EvalConfig, PolicySource
from craft_core.evaluation.drift import DriftAccumulator, measure_drift
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
    "SimulatorUnavailableError",
    "comparison_rows",
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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"eval.device={device!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device


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
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Evaluate every run; writes out_dir/report.json, report.md and videos/; returns the report."""
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
    if heldout is not None:
        for name, source in sources.items():
            heldout.check_policy_type(policy_type_of(source), name)
    device = resolve_device(cfg.device)

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
        "train": {},
        "fingerprints": dict(fingerprints or {}),
        "timings": {},
    }
    if cfg.drift and heldout is None:
        report["drift_skipped"] = "no anchor store was given"

    total = len(sources) * (len(cfg.sim) + (heldout is not None))
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
            del policy, preprocessor, postprocessor, anchors
            gc.collect()

    for name, result in (train_results or {}).items():
        if name in report["runs"]:
            report["train"][name] = {
                key: result.get(key) for key in ("final_task_loss", "steps", "cache_type", "checkpoint")
            }
    report["timings"] = {
        "sim_s": sim_seconds,
        "drift_s": drift_seconds,
        "total_s": time.perf_counter() - started,
    }
    return write_report(report, out_dir)
