"""Running planned stages without Prefect: one stage into its content-addressed directory, or a
whole pipeline in order. The Prefect tasks (``tasks/``) call :func:`execute_stage` too, so the
flow and the experiments share one way of running a stage.
"""

import time
from collections.abc import Callable
from pathlib import Path

from craft_core.config import PipelineConfig
from craft_core.devices import uses_cuda
from craft_core.pipeline.fingerprint import run_stage
from craft_core.pipeline.graph import StagePlan, StageRef, plan_pipeline
from craft_core.pipeline.isolation import call_stage

Progress = Callable[[int, int, dict], None]


def stage_device(cfg: PipelineConfig, section: str) -> str:
    return getattr(getattr(cfg, section), "device", "cpu")


def isolate_stage(cfg: PipelineConfig, plan: StagePlan) -> bool:
    """Whether a stage runs in its own process: always, never, or (auto) when it uses CUDA."""
    if cfg.isolation == "process":
        return True
    return cfg.isolation == "auto" and uses_cuda(stage_device(cfg, plan.section))


def assets_dir(plans: dict[str, StagePlan]) -> str | None:
    return plans["assets"].path if "assets" in plans else None


def existing_ref(plan: StagePlan) -> StageRef:
    """The complete output of a stage that is not run now (raises IncompleteStageError if absent)."""
    return StageRef(stage=plan.stage, fingerprint=plan.fingerprint, path=plan.path, result=plan.stage_dir().result())


def execute_stage(plan: StagePlan, upstream: dict[str, StageRef], *, assets: str | None, isolate: bool,
                  progress: Progress | None = None) -> tuple[StageRef, bool]:
    """Run a stage into its content-addressed dir, or reuse its complete output; (ref, executed)."""
    stage_dir = plan.stage_dir()

    def work(out_dir: Path) -> dict:
        consumed = {name: {**ref.result, "stage": {"fingerprint": ref.fingerprint, "path": ref.path}}
                    for name, ref in upstream.items()}
        kwargs = {**plan.kwargs(assets), "upstream": consumed, "out_dir": out_dir}
        return call_stage(plan.function, kwargs, isolate=isolate, progress=progress)

    result, executed = run_stage(stage_dir, work, config=plan.config, upstream=plan.upstream, code=plan.code_version)
    return StageRef(stage=plan.stage, fingerprint=plan.fingerprint, path=str(stage_dir.path), result=result), executed


def run_pipeline(cfg: PipelineConfig, *, log: Callable[[str], None] = print) -> dict[str, StageRef]:
    """Every stage of ``cfg`` in order, in this process (or its own, per ``cfg.isolation``)."""
    from craft_core.pipeline.scale import check_scale_out, run_cache_shards

    plans = plan_pipeline(cfg)
    check_scale_out(cfg)
    refs: dict[str, StageRef] = {}
    for index, (name, plan) in enumerate(plans.items(), start=1):
        started = time.perf_counter()
        if plan.kind == "cache" and cfg.cache.num_shards > 1 and not plan.stage_dir().is_complete():
            run_cache_shards(plan, {up: refs[up] for up in plan.upstream}, assets=assets_dir(plans))
        refs[name], executed = execute_stage(
            plan, {up: refs[up] for up in plan.upstream}, assets=assets_dir(plans),
            isolate=isolate_stage(cfg, plan),
        )
        status = f"done in {time.perf_counter() - started:.1f} s" if executed else "complete already (reused)"
        log(f"stage {index}/{len(plans)} {name}: {status}")
    return refs
