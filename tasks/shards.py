"""Prefect tasks of the cache stage's shards (``cache.num_shards`` > 1).

Each shard is its own task run (``cache_shard_<i>``), tagged ``gpu`` so the concurrency limit of
that tag decides how many extract at once, and runs its extraction in its own process. Its Prefect
cache key is the cache stage's key plus the shard: a shard whose blocks are all written is Cached,
one that was killed runs again alone and resumes at its first unwritten block. Then the cache
stage's own task (``cache``) only checks the store and sets it complete.

With ``cache.shard_runner: deployment`` each shard task instead starts a run of the shard
deployment (``cache.shard_deployment``, default ``craft/extract-shard``) and waits for it: the
shards land on whatever workers serve that deployment's pool, possibly other machines, and write
the store at ``cache.store_root``.
"""

from prefect import task
from prefect.deployments import run_deployment
from prefect.futures import PrefectFuture

from craft_core.pipeline import StagePlan, StageRef
from craft_core.pipeline.scale import execute_cache_shard, shard_is_done, shard_store_url
from tasks.common import RETRY_DELAY_S, ProgressArtifact, run_logger


def shard_name(shard: int) -> str:
    return f"cache_shard_{shard}"


def shard_cache_key(context, parameters: dict) -> str:
    plan: StagePlan = parameters["plan"]
    return f"{plan.cache_key}-shard{parameters['shard']}of{plan.kwargs(parameters['assets'])['cfg'].num_shards}"


@task(name="craft-cache-shard", retries=1, retry_delay_seconds=RETRY_DELAY_S, cache_key_fn=shard_cache_key,
      persist_result=True)
def cache_shard_task(plan: StagePlan, shard: int, upstream: dict[str, StageRef], assets: str | None) -> dict:
    """Write one shard of the anchor store in its own process (nothing when its blocks are written)."""
    progress = ProgressArtifact(plan, name=shard_name(shard))
    run_logger().info("cache shard %d -> %s (own process)", shard, shard_store_url(plan, assets))
    return execute_cache_shard(plan, shard, upstream, assets=assets, progress=progress)


@task(name="craft-cache-shard-deployment", cache_key_fn=shard_cache_key, persist_result=True)
def cache_shard_deployment_task(plan: StagePlan, shard: int, upstream: dict[str, StageRef], assets: str | None) -> dict:
    """Run one shard as a run of the shard deployment and wait for it; fail if it did not complete."""
    kwargs = plan.kwargs(assets)
    cfg = kwargs["cfg"]
    parameters = {
        "cache": cfg.model_dump(mode="json"),
        "store_url": shard_store_url(plan, assets),
        "shard": shard,
        "normalization": kwargs["normalization"],
        "task_dataset": kwargs["task_dataset"].model_dump(mode="json") if kwargs["task_dataset"] else None,
        "policy_options": kwargs.get("policy_options"),
    }
    logger = run_logger()
    logger.info("cache shard %d: running deployment %s", shard, cfg.shard_deployment)
    flow_run = run_deployment(cfg.shard_deployment, parameters=parameters, timeout=None,
                              flow_run_name=f"{plan.stage}-{plan.fingerprint}-{shard_name(shard)}")
    state = flow_run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"cache shard {shard}: deployment run {flow_run.name} ({flow_run.id}) of {cfg.shard_deployment} ended "
            f"{state.name if state else 'without a state'}; see its logs, then run the flow again (finished shards are kept)"
        )
    return {"shard": [shard, cfg.num_shards], "flow_run": str(flow_run.id), "store_url": parameters["store_url"]}


def submit_cache_shards(plan: StagePlan, upstream: dict[str, StageRef], assets: str | None) -> list[PrefectFuture]:
    """Submit every shard of the cache stage at once; the caller waits for them, then finalizes."""
    cfg = plan.kwargs(assets)["cfg"]
    deployment = cfg.shard_runner == "deployment"
    futures = []
    for shard in range(cfg.num_shards):
        options = {
            "name": shard_name(shard),
            "task_run_name": shard_name(shard),
            # A shard run by a deployment holds no GPU here: the remote work pool's limits decide.
            "tags": ["craft", "craft-cache", "craft-cache-shard"] + ([] if deployment else ["gpu"]),
        }
        if not shard_is_done(plan, shard, assets):
            options["refresh_cache"] = True  # a cached result is trusted only while the shard's blocks are written
        task_fn = cache_shard_deployment_task if deployment else cache_shard_task
        futures.append(task_fn.with_options(**options).submit(plan, shard, upstream, assets))
    return futures
