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
import re
import sys
import time

if __name__ == "__main__" and not os.environ.get("PREFECT_API_URL"):
    # The temporary server a script run starts needs ~15-20 s on an idle 2-core machine and over a
    # minute on a busy one; the default limit is 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if __name__ == "__main__" and "--verbose" not in sys.argv[1:]:
    # lerobot re-enables the datasets library's progress bars after every dataset it writes
    # (SuppressProgressBars); only this variable, read when datasets is imported, keeps them off.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from craft_core.config import STAGES, ConfigError, PipelineConfig, load_config, load_preset

DEFAULT_PRESET = "demo"


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
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}: run only these (and "
                                         "stop); the stages they consume must already have complete outputs")
    parser.add_argument("--print-params", action="store_true",
                        help="print the flow parameters as JSON (for `prefect deployment run craft/full "
                             "--params`) instead of running")
    parser.add_argument("--verbose", action="store_true",
                        help="show everything: Prefect's log lines, progress bars, and the lerobot output craft "
                             "filters as known and harmless (craft_core/noise.py lists it and why)")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the pre-flight checks (e.g. --print-params for a run on another machine)")
    parser.add_argument("overrides", nargs="*", metavar="A.B=C", help="overrides, like --set (anywhere on the line)")
    return parser.parse_intermixed_args(argv)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.sets) + list(args.overrides)
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        overrides.append(f"stages={json.dumps(stages)}")
    if args.config:
        return load_config(args.config, overrides)
    return load_preset(args.preset or DEFAULT_PRESET, overrides)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def config_error_lines(exc: Exception) -> list[str]:
    """A config, override or pre-flight error as lines of its own: one per problem, no traceback."""
    from pydantic import ValidationError

    from craft_core.pipeline.preflight import PreflightError

    if isinstance(exc, PreflightError):
        return [problem.line() for problem in exc.problems]
    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "config"
            value = repr(error.get("input"))
            value = value if len(value) <= 80 else value[:77] + "..."
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message += " (unknown field: check its spelling and section)"
            lines.append(_one_line(f"config field {field}={value}: {message}"))
        return lines
    return [_one_line(exc)]


def check_command_line(argv: list[str] | None = None) -> tuple[argparse.Namespace, PipelineConfig]:
    """Parse the command line, load the config and run the pre-flight checks, before Prefect or any
    stage code is imported; a bad input exits with code 2 and one line per problem, writing nothing."""
    from craft_core.pipeline.preflight import PreflightError, preflight
    from pydantic import ValidationError

    args = parse_args(argv)
    try:
        config = config_from_args(args)
        if not args.no_preflight:
            preflight(config)
    except (ConfigError, ValidationError, PreflightError, FileNotFoundError) as exc:
        for line in config_error_lines(exc):
            print(f"craft: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, config


if __name__ == "__main__":
    _ARGS, _CONFIG = check_command_line()
    if _ARGS.print_params:
        print(json.dumps({"config": _CONFIG.model_dump(mode="json")}))
        raise SystemExit(0)

# Prefect and the stages' code are imported only once the command line is known to be good.
from prefect import flow  # noqa: E402
from prefect.futures import PrefectFuture, wait  # noqa: E402

from craft_core.pipeline import StageRef, assets_dir, existing_ref, isolate_stage, plan_pipeline  # noqa: E402
from craft_core import noise  # noqa: E402
from craft_core.pipeline.preflight import preflight  # noqa: E402
from tasks import common  # noqa: E402
from tasks.common import run_logger, stage_task_options  # noqa: E402
from tasks.shards import submit_cache_shards  # noqa: E402
from tasks.stages import run_stage_task  # noqa: E402


def flow_run_name() -> str:
    """``<preset name>-<first 6 of the report stage's fingerprint>``: runs of the same config and code
    share a name, and any change to what the pipeline computes gives another."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    try:
        config = config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)
        plans = plan_pipeline(config)
        return f"{config.name}-{plans[next(reversed(plans))].fingerprint[:6]}"
    except Exception:  # a name is never worth failing the run for
        return getattr(config, "name", None) or "craft"


@flow(name="craft", log_prints=True, flow_run_name=flow_run_name)
def craft(config: PipelineConfig = load_preset(DEFAULT_PRESET)) -> dict:
    """Run the CRaFT pipeline; stages whose content-addressed output exists are skipped.

    Only the selected stages (``config.stages``) run; a stage they consume that is not selected
    must already have a complete output for this config.
    """
    logger = run_logger()
    # Bad inputs fail here, before any stage, with one line per problem (deployment runs too; the
    # command line checked them already). Consumed-but-unselected outputs are checked as consumed.
    preflight(config, check_upstream=False)
    check_shard_deployment(config)
    plans = plan_pipeline(config)
    selected = [plan for plan in plans.values() if plan.section in config.stages]
    refs: dict[str, StageRef | PrefectFuture] = {}

    def ref_of(stage: str) -> StageRef | PrefectFuture:
        if stage not in refs:  # consumed but not selected: its output for this config must exist
            refs[stage] = existing_ref(plans[stage])
            logger.info("stage %s not selected; using its output %s", stage, plans[stage].path)
        return refs[stage]

    concurrent = config.concurrent_stages
    console = common.CONSOLE if not concurrent else None  # one redrawn line per stage needs one stage at a time
    for index, plan in enumerate(selected, start=1):
        logger.info("stage %d/%d: %s", index, len(selected), plan.stage)
        if console is not None:
            console.start(index, len(selected), plan.stage)
        upstream = {stage: ref_of(stage) for stage in plan.upstream}
        if plan.kind == "cache" and config.cache.num_shards > 1:
            # N shard task runs at once (each its own process, or a run of the shard deployment);
            # the cache task after them only checks the store and sets it complete.
            _raise_failed(submit_cache_shards(plan, _resolved(upstream), assets_dir(plans)))
        task = run_stage_task.with_options(**stage_task_options(plan))
        isolate = isolate_stage(config, plan)
        if concurrent:
            # Stages submitted together share this process's threads: each runs in its own process
            # (torch's global RNG, accelerate's state and CUDA memory are per process).
            refs[plan.stage] = task.submit(plan, upstream, assets_dir(plans), isolate or plan.gpu)
        else:
            refs[plan.stage] = task(plan, _resolved(upstream), assets_dir(plans), isolate)
        if console is not None:
            console.finish(plan.stage)
    if concurrent:
        _raise_failed([ref for ref in refs.values() if isinstance(ref, PrefectFuture)])
        refs = {stage: _resolved_one(ref) for stage, ref in refs.items()}

    summary = {
        "artifacts_root": next(iter(plans.values())).artifacts_root,
        "stages": {stage: {"fingerprint": ref.fingerprint, "path": ref.path} for stage, ref in refs.items()},
    }
    if "report" in refs:
        summary["report"] = refs["report"].result["report_md"]
        print(f"craft report: {summary['report']}")
    return summary


def check_shard_deployment(config: PipelineConfig) -> None:
    """Refuse, before any stage, shard runs of a deployment the Prefect server does not have."""
    if "cache" not in config.stages or config.cache.num_shards <= 1 or config.cache.shard_runner != "deployment":
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    name = config.cache.shard_deployment
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise ValueError(
            f"cache.shard_deployment={name!r}: the Prefect server ({PREFECT_API_URL.value() or 'temporary local server'}) "
            "has no such deployment; deploy it first (prefect deploy --prefect-file deployments/prefect.yaml --name "
            "extract-shard) and start a worker on its pool, or set cache.shard_runner=tasks"
        ) from None


def _resolved_one(ref):
    return ref.result() if isinstance(ref, PrefectFuture) else ref


def _resolved(upstream: dict) -> dict:
    """Upstream refs with finished futures replaced by their results (sequential mode only waits)."""
    return {stage: _resolved_one(ref) for stage, ref in upstream.items()}


def _raise_failed(futures: list[PrefectFuture]) -> None:
    """Wait for every future; raise the first failure after all have finished (none left running)."""
    wait(futures)
    for future in futures:
        future.result()  # re-raises the task's exception


def quiet_console() -> None:
    """The command line's default view: one line per stage (tasks.common.StageConsole), Prefect's
    console at WARNING (its INFO records still reach the server and the UI), no progress bars."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    noise.set_verbose(False)
    noise.set_progress_bars(False)  # stage processes inherit it
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"  # if Prefect configures logging again
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # stage processes (see the top of this file)
    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in ("uvicorn", "fastapi"))):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)
    common.CONSOLE = common.StageConsole()


def print_results(summary: dict, elapsed: float) -> None:
    """The end of a command-line run: the comparison table and where the report is."""
    from pathlib import Path

    from craft_core.evaluation.report import console_table

    print(f"craft finished in {elapsed:.1f} s; stage outputs under {summary['artifacts_root']}")
    if "report" in summary:
        report_json = Path(summary["report"]).with_name("report.json")
        if report_json.is_file():
            print("\n" + console_table(json.loads(report_json.read_text())) + "\n")
        print(f"report: {summary['report']}")


def main(argv: list[str] | None = None) -> int:
    if argv is None and __name__ == "__main__":
        args, config = _ARGS, _CONFIG
    else:
        args, config = check_command_line(argv)
    if args.print_params:
        print(json.dumps({"config": config.model_dump(mode="json")}))
        return 0
    if args.verbose:
        noise.set_verbose(True)
    else:
        quiet_console()
        plans = plan_pipeline(config)
        selected = sum(plan.section in config.stages for plan in plans.values())
        print(f"craft: {config.name}, {selected} stages, outputs under {next(iter(plans.values())).artifacts_root} "
              "(--verbose for every log line)", flush=True)
    started = time.perf_counter()
    summary = craft(config=config)
    print_results(summary, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
