"""One thin Prefect task per stage: run (or reuse) the stage's output, publish UI artifacts.

Each task takes its ``StagePlan`` (fingerprint + directory, computed by the flow up front), its
resolved config section and the upstream ``StageRef``s, and returns a ``StageRef``. Passing the
upstream refs as arguments is what draws the dependency graph in the Prefect UI.
"""

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from craft_core.config import AssetsConfig, CacheConfig, EvalConfig, PolicySource, TrainConfig
from tasks.common import artifact_key, execute_stage, image_markdown, publish_summary, stage_task
from tasks.plan import StagePlan, StageRef
from tasks.stage_functions import store_url


@stage_task("assets", gpu=False)
def assets_task(plan: StagePlan, cfg: AssetsConfig, isolate: bool = False) -> StageRef:
    ref, executed = execute_stage(
        plan, "tasks.stage_functions.build_assets", {"cfg": cfg, "out_dir": plan.path}, isolate=isolate
    )
    datasets = ref.result.get("datasets", {})
    extra = "\n".join(
        f"- {key}: `{d['repo_id']}` ({d.get('frames', '?')} frames) at `{d['root']}`" for key, d in datasets.items()
    )
    publish_summary(plan, ref, executed, extra=f"teacher: `{ref.result.get('teacher')}`\n\n{extra}")
    return ref


@stage_task("cache", gpu=True)
def cache_task(plan: StagePlan, cfg: CacheConfig, upstream: dict[str, StageRef], isolate: bool = False) -> StageRef:
    ref, executed = execute_stage(
        plan, "tasks.stage_functions.extract", {"cfg": cfg, "out_dir": plan.path}, isolate=isolate
    )
    publish_summary(plan, ref, executed)
    return ref


@stage_task("train", gpu=True)
def train_task(plan: StagePlan, cfg: TrainConfig, teacher: PolicySource, upstream: dict[str, StageRef],
               retention: bool, isolate: bool = False) -> StageRef:
    """``train_baseline`` (retention off, no anchor store) or ``train_craft``."""
    store = store_url(upstream["cache"].path) if retention else None
    kwargs = {"cfg": cfg, "teacher": teacher, "store": store, "out_dir": plan.path, "retention": retention}
    ref, executed = execute_stage(plan, "tasks.stage_functions.train_run", kwargs, isolate=isolate)
    plot = ref.result.get("plot")
    extra = image_markdown(plot, f"{plan.stage} training") if plot and Path(plot).is_file() else ""
    publish_summary(plan, ref, executed, extra=extra)
    return ref


@stage_task("eval", gpu=True)
def eval_task(plan: StagePlan, cfg: EvalConfig, teacher: PolicySource, upstream: dict[str, StageRef],
              isolate: bool = False) -> StageRef:
    runs = {"teacher": teacher.path}
    train_results = {}
    for name in ("baseline", "craft"):
        train_ref = upstream.get(f"train_{name}")
        if train_ref is not None:
            runs[name] = train_ref.result["checkpoint"]
            train_results[name] = train_ref.result
    kwargs = {
        "cfg": cfg,
        "runs": runs,
        "teacher": teacher,
        "store": store_url(upstream["cache"].path),
        "out_dir": plan.path,
        "train_results": train_results,
        "fingerprints": {ref.stage: ref.fingerprint for ref in upstream.values()} | {"eval": plan.fingerprint},
    }
    ref, executed = execute_stage(plan, "tasks.stage_functions.evaluate_runs", kwargs, isolate=isolate)

    report = json.loads(Path(ref.result["report_json"]).read_text())
    create_table_artifact(eval_rows(report), key=artifact_key("craft", "eval", "results"),
                          description="Simulation and drift results per run")
    create_table_artifact(ref.result["comparison"], key=artifact_key("craft", "comparison"),
                          description="Teacher vs baseline fine-tuning vs CRaFT")
    create_markdown_artifact(Path(ref.result["report_md"]).read_text(), key=artifact_key("craft", "report"),
                             description=f"craft evaluation report ({ref.result['report_json']})")
    publish_summary(plan, ref, executed, extra=f"report: `{ref.result['report_md']}`")
    return ref


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
