"""The Prefect flow ``craft``: assets -> cache -> train (baseline, CRaFT) -> eval.

    python flows/craft_flow.py                          # offline CPU demo (the `demo` preset)
    python flows/craft_flow.py --preset smoke train.steps=4
    python flows/craft_flow.py --config my.yaml --set train.retention.every_k=2 --stages cache,train
    python flows/craft_flow.py --preset pi0fast_libero --print-params   # JSON for `prefect deployment run`

The flow's one parameter is the pipeline config (a pydantic model), so Prefect validates it and
draws the run form from its schema. Every stage output is content-addressed (see tasks.plan):
a stage whose output is complete is not run again, and Prefect shows its task as Cached.
"""

# No `from __future__ import annotations` here: Prefect validates the flow parameter from the
# real annotation object, and postponed (string) annotations broke that under serve().

import argparse
import json
import os
import sys
import time

if __name__ == "__main__" and not os.environ.get("PREFECT_API_URL"):
    # The temporary server a script run starts needs ~15-20 s on an idle 2-core machine and over a
    # minute on a busy one; the default limit is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow

from craft_core.config import STAGES, PipelineConfig, load_config, load_preset
from tasks.common import run_logger
from tasks.isolation import uses_cuda
from tasks.plan import StagePlan, StageRef, plan_pipeline, resolve_assets
from tasks.stages import assets_task, cache_task, eval_task, train_task

DEFAULT_PRESET = "demo"


def _stage_options(plan: StagePlan) -> dict:
    # A cached Prefect result is only trusted while the output it points to is complete; if the
    # directory was deleted or is partial, refresh the cache so the stage really runs.
    options = {"name": plan.stage, "task_run_name": plan.stage}
    if not plan.stage_dir().is_complete():
        options["refresh_cache"] = True
    return options


def _isolate(config: PipelineConfig, device: str) -> bool:
    if config.isolation == "process":
        return True
    return config.isolation == "auto" and uses_cuda(device)


@flow(name="craft", log_prints=True)
def craft(config: PipelineConfig = load_preset(DEFAULT_PRESET)) -> dict:
    """Run the CRaFT pipeline; stages whose content-addressed output exists are skipped."""
    logger = run_logger()
    plans = plan_pipeline(config)
    selected = set(config.stages)
    refs: dict[str, StageRef] = {}

    def existing(stage: str) -> StageRef:
        plan = plans[stage]
        return StageRef(stage=stage, fingerprint=plan.fingerprint, path=plan.path, result=plan.stage_dir().result())

    def run(stage: str, task_fn, **kwargs) -> None:
        plan = plans[stage]
        if plan.group in selected:
            refs[stage] = task_fn.with_options(**_stage_options(plan))(plan, **kwargs)
        else:
            refs[stage] = existing(stage)  # not selected: its output for this config must exist
            logger.info("stage %s not selected; using its output %s", stage, plan.path)

    assets_dir = plans["assets"].path if "assets" in plans else None
    if "assets" in plans:
        run("assets", assets_task, cfg=config.assets, isolate=_isolate(config, config.assets.device))

    cache_cfg = resolve_assets(config.cache, assets_dir)
    train_cfg = resolve_assets(config.train, assets_dir)
    eval_cfg = resolve_assets(config.eval, assets_dir)
    teacher = cache_cfg.teacher

    def upstream_of(stage: str) -> dict[str, StageRef]:
        return {name: refs[name] for name in plans[stage].upstream}

    run("cache", cache_task, cfg=cache_cfg, upstream=upstream_of("cache"), isolate=_isolate(config, cache_cfg.device))
    train_isolate = _isolate(config, train_cfg.device)
    if "train_baseline" in plans:
        run("train_baseline", train_task, cfg=train_cfg, teacher=teacher, upstream=upstream_of("train_baseline"),
            retention=False, isolate=train_isolate)
    run("train_craft", train_task, cfg=train_cfg, teacher=teacher, upstream=upstream_of("train_craft"),
        retention=True, isolate=train_isolate)
    if "eval" in selected or plans["eval"].stage_dir().is_complete():
        run("eval", eval_task, cfg=eval_cfg, teacher=teacher, upstream=upstream_of("eval"),
            isolate=_isolate(config, eval_cfg.device))

    summary = {
        "artifacts_root": plans["cache"].artifacts_root,
        "stages": {stage: {"fingerprint": ref.fingerprint, "path": ref.path} for stage, ref in refs.items()},
    }
    if "eval" in refs:
        summary["report"] = refs["eval"].result["report_md"]
        print(f"craft report: {summary['report']}")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python flows/craft_flow.py",
        description="Run the craft pipeline (Prefect flow `craft`). No arguments: the offline CPU demo.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="pipeline YAML file")
    source.add_argument("--preset", help=f"preset name in configs/ (default: {DEFAULT_PRESET})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="A.B=C",
                        help="override a config value (YAML-parsed); repeatable")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}; the others must "
                                         "already have complete outputs for this config")
    parser.add_argument("--print-params", action="store_true",
                        help="print the flow parameters as JSON (for `prefect deployment run craft/full "
                             "--params`) instead of running")
    parser.add_argument("overrides", nargs="*", metavar="A.B=C", help="overrides, like --set")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.sets) + list(args.overrides)
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        overrides.append(f"stages={json.dumps(stages)}")
    if args.config:
        return load_config(args.config, overrides)
    return load_preset(args.preset or DEFAULT_PRESET, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    if args.print_params:
        print(json.dumps({"config": config.model_dump(mode="json")}))
        return 0
    started = time.perf_counter()
    summary = craft(config=config)
    elapsed = time.perf_counter() - started
    print(f"craft finished in {elapsed:.1f} s; stage outputs under {summary['artifacts_root']}")
    if "report" in summary:
        print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
