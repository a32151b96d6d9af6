"""The Prefect flow ``craft``: assets -> cache -> train (baseline, CRaFT) -> eval.

    python flows/craft_flow.py                          # offline CPU demo (the `demo` preset)
    python flows/craft_flow.py --preset smoke train.steps=4
    python flows/craft_flow.py --config my.yaml --set train.retention.every_k=2 --stages cache,train
    python flows/craft_flow.py --preset pi0fast_libero --print-params   # JSON for `prefect deployment run`

The flow's one parameter is the pipeline config (a pydantic model), so Prefect validates it and
draws the run form from its schema. The stages and their order come from the pipeline's stage
graph (``craft_core.pipeline``); every stage output is content-addressed, so a stage whose output
is complete is not run again, and Prefect shows its task as Cached.
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

from prefect.futures import PrefectFuture, wait

from craft_core.config import STAGES, PipelineConfig, load_config, load_preset
from craft_core.pipeline import StageRef, assets_dir, existing_ref, isolate_stage, plan_pipeline
from craft_core.pipeline.scale import check_scale_out
from tasks.common import run_logger, stage_task_options
from tasks.shards import submit_cache_shards
from tasks.stages import run_stage_task

DEFAULT_PRESET = "demo"


@flow(name="craft", log_prints=True)
def craft(config: PipelineConfig = load_preset(DEFAULT_PRESET)) -> dict:
    """Run the CRaFT pipeline; stages whose content-addressed output exists are skipped.

    Only the selected stages (``config.stages``) run; a stage they consume that is not selected
    must already have a complete output for this config.
    """
    logger = run_logger()
    plans = plan_pipeline(config)
    selected = [plan for plan in plans.values() if plan.section in config.stages]
    preflight(config)
    refs: dict[str, StageRef | PrefectFuture] = {}

    def ref_of(stage: str) -> StageRef | PrefectFuture:
        if stage not in refs:  # consumed but not selected: its output for this config must exist
            refs[stage] = existing_ref(plans[stage])
            logger.info("stage %s not selected; using its output %s", stage, plans[stage].path)
        return refs[stage]

    concurrent = config.concurrent_stages
    for index, plan in enumerate(selected, start=1):
        logger.info("stage %d/%d: %s", index, len(selected), plan.stage)
        upstream = {stage: ref_of(stage) for stage in plan.upstream}
        shards = []
        if plan.kind == "cache" and config.cache.num_shards > 1:
            # N shard task runs at once (each its own process, or a run of the shard deployment);
            # the cache task after them only checks the store and sets it complete.
            shards = submit_cache_shards(plan, _resolved(upstream), assets_dir(plans))
            _raise_failed(shards, "cache shard")
        task = run_stage_task.with_options(**stage_task_options(plan))
        isolate = isolate_stage(config, plan)
        if concurrent:
            # Stages submitted together share this process's threads: each runs in its own process
            # (torch's global RNG, accelerate's state and CUDA memory are per process).
            refs[plan.stage] = task.submit(plan, upstream, assets_dir(plans), isolate or plan.gpu)
        else:
            refs[plan.stage] = task(plan, _resolved(upstream), assets_dir(plans), isolate)
    if concurrent:
        _raise_failed([ref for ref in refs.values() if isinstance(ref, PrefectFuture)], "stage")
        refs = {stage: _resolved_one(ref) for stage, ref in refs.items()}

    summary = {
        "artifacts_root": next(iter(plans.values())).artifacts_root,
        "stages": {stage: {"fingerprint": ref.fingerprint, "path": ref.path} for stage, ref in refs.items()},
    }
    if "report" in refs:
        summary["report"] = refs["report"].result["report_md"]
        print(f"craft report: {summary['report']}")
    return summary


def preflight(config: PipelineConfig) -> None:
    """Refuse a scaled-out config that cannot work before any stage runs: a store root nobody can
    write, more training processes than devices, a shard deployment the server does not have."""
    check_scale_out(config)
    if "cache" in config.stages and config.cache.num_shards > 1 and config.cache.shard_runner == "deployment":
        check_deployment_exists(config.cache.shard_deployment, field="cache.shard_deployment")


def check_deployment_exists(name: str, *, field: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ValueError(
            f"{field}={name!r}: the Prefect server ({PREFECT_API_URL.value() or 'temporary local server'}) has no such "
            "deployment; deploy it first (prefect deploy --prefect-file deployments/prefect.yaml --name extract-shard) "
            "and start a worker on its pool, or set cache.shard_runner=tasks"
        ) from None


def _resolved_one(ref):
    return ref.result() if isinstance(ref, PrefectFuture) else ref


def _resolved(upstream: dict) -> dict:
    """Upstream refs with finished futures replaced by their results (sequential mode only waits)."""
    return {stage: _resolved_one(ref) for stage, ref in upstream.items()}


def _raise_failed(futures: list[PrefectFuture], what: str) -> None:
    """Wait for every future; raise the first failure after all have finished (none left running)."""
    wait(futures)
    for future in futures:
        future.result()  # re-raises the task's exception


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
