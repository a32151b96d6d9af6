"""The Prefect task of every stage: run (or reuse) the stage's output, publish UI artifacts.

One task function serves every stage (``run_stage_task``): it runs the stage through
``craft_core.pipeline.execute_stage`` (the same call the experiments make), relays progress to a
progress artifact, and publishes the stage's summary (training plot, eval tables and report).
Passing the upstream ``StageRef``s as arguments is what draws the dependency graph in the UI.
"""

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from craft_core.evaluation.report import headline_rows
from craft_core.pipeline import StagePlan, StageRef, execute_stage
from tasks import common
from tasks.common import (ProgressArtifact, artifact_key, image_markdown, publish_summary, rounded_rows, run_logger,
                          stage_task)


@stage_task
def run_stage_task(plan: StagePlan, upstream: dict[str, StageRef], assets: str | None, isolate: bool) -> StageRef:
    logger = run_logger()
    progress = ProgressArtifact(plan)
    logger.info("stage %s -> %s (%s)", plan.stage, plan.path, "own process" if isolate else "in process")
    ref, executed = execute_stage(plan, upstream, assets=assets, isolate=isolate, progress=progress)
    if executed and progress.last is not None:
        done, total, metrics = progress.last
        progress.min_interval_s = 0.0
        progress(total, total, metrics)
    if not executed:
        logger.info("stage %s: complete output found at %s, not re-running", plan.stage, plan.path)
    if common.CONSOLE is not None:
        common.CONSOLE.mark(plan.stage, executed)
    PUBLISHERS[plan.kind](plan, ref, executed)
    return ref


def _publish_assets(plan: StagePlan, ref: StageRef, executed: bool) -> None:
    datasets = ref.result.get("datasets", {})
    extra = "\n".join(
        f"- {key}: `{d['repo_id']}` ({d.get('frames', '?')} frames) at `{d['root']}`" for key, d in datasets.items()
    )
    publish_summary(plan, ref, executed, extra=f"teacher: `{ref.result.get('teacher')}`\n\n{extra}")


def _publish_cache(plan: StagePlan, ref: StageRef, executed: bool) -> None:
    publish_summary(plan, ref, executed)


def _publish_train(plan: StagePlan, ref: StageRef, executed: bool) -> None:
    plot = ref.result.get("plot")
    extra = image_markdown(plot, f"{plan.stage} training") if plot and Path(plot).is_file() else ""
    publish_summary(plan, ref, executed, extra=extra)


def _publish_eval(plan: StagePlan, ref: StageRef, executed: bool) -> None:
    scalars = {k: v for k, v in ref.result.items() if k not in ("evaluation",)}
    publish_summary(plan, ref.model_copy(update={"result": scalars}), executed)


def _publish_report(plan: StagePlan, ref: StageRef, executed: bool) -> None:
    report = json.loads(Path(ref.result["report_json"]).read_text())
    create_table_artifact(rounded_rows(eval_rows(report)), key=artifact_key("craft", "eval", "results"),
                          description="Simulation and drift results per run")
    create_table_artifact(rounded_rows(headline_rows(report)), key=artifact_key("craft", "comparison"),
                          description="Teacher vs baseline fine-tuning vs CRaFT (all columns: the report)")
    create_markdown_artifact(Path(ref.result["report_md"]).read_text(), key=artifact_key("craft", "report"),
                             description=f"craft evaluation report ({ref.result['report_json']})")
    plot = ref.result.get("plot")
    extra = image_markdown(plot, "training curves") if plot and Path(plot).is_file() else ""
    publish_summary(plan, ref, executed, extra=f"report: `{ref.result['report_md']}`\n\n{extra}")


PUBLISHERS = {"assets": _publish_assets, "cache": _publish_cache, "train": _publish_train, "eval": _publish_eval,
              "report": _publish_report}


def eval_rows(report: dict) -> list[dict]:
    """One row per (run, sim env) and per (run, drift): the eval results table."""
    rows = []
    for run, per_env in report.get("sim", {}).items():
        for env, result in per_env.items():
            rows.append({
                "run": run,
                "metric source": env,
                "episodes": result.get("n_episodes"),
                "success %": 100.0 * result["success_rate"] if result.get("success_rate") is not None else None,
                "avg sum reward": result.get("avg_sum_reward"),
                "avg max reward": result.get("avg_max_reward"),
            })
    for run, drift in report.get("drift", {}).items():
        if drift:
            rows.append({"run": run, "metric source": "drift (held-out anchors)", "episodes": drift.get("n_anchors"),
                         "drift mse": drift.get("mse"), "drift cosine": drift.get("cosine")})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{c: row.get(c) for c in columns} for row in rows]
