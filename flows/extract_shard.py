"""The shard deployment's flow: one shard of the cache stage's anchor store, on whatever worker runs it.

Deployed as ``craft/extract-shard`` (``deployments/prefect.yaml``). The parent flow (``craft`` with
``cache.shard_runner: deployment``) starts one run per shard and waits for them, then finalizes
the store. The store lives at a URL every worker reaches (``cache.store_root``: s3://..., with
credentials from the worker's environment). A shard whose blocks are written already returns at
once; a killed one, run again, resumes at its first unwritten block.
"""

# No `from __future__ import annotations`: Prefect validates parameters from the real annotations.

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from craft_core.config import CacheConfig, DatasetSource
from craft_core.extraction import extract_shard
from tasks.common import artifact_key, run_logger


@task(name="craft-extract-shard", tags=["craft", "craft-cache", "gpu"])
def extract_shard_task(cache: CacheConfig, store_url: str, shard: int, normalization: str,
                       task_dataset: DatasetSource | None, policy_options: dict | None = None) -> dict:
    artifact = {"id": None}

    def progress(done: int, total: int, metrics: dict) -> None:
        percent = 100.0 * done / total if total else 100.0
        try:
            if artifact["id"] is None:
                artifact["id"] = create_progress_artifact(percent, key=artifact_key("craft", "cache", "shard", str(shard),
                                                                                   "progress"))
            else:
                update_progress_artifact(artifact["id"], percent)
        except Exception as exc:  # progress is for humans; never fail the shard on it
            run_logger().warning("progress artifact update failed: %s", exc)

    return extract_shard(cache, store_url=store_url, shard=shard, num_shards=cache.num_shards,
                         normalization=normalization, task_dataset=task_dataset, progress=progress,
                         policy_options=policy_options)


@flow(name="craft", flow_run_name="extract-shard-{shard}", log_prints=True)
def extract_shard_flow(cache: CacheConfig, store_url: str, shard: int, normalization: str = "task",
                       task_dataset: DatasetSource | None = None, policy_options: dict | None = None) -> dict:
    """Write shard ``shard`` of ``cache.num_shards`` of the anchor store at ``store_url``."""
    if not 0 <= shard < cache.num_shards:
        raise ValueError(f"shard={shard} is not one of cache.num_shards={cache.num_shards}")
    run_logger().info("extract shard %d of %d -> %s", shard, cache.num_shards, store_url)
    return extract_shard_task.with_options(task_run_name=f"cache_shard_{shard}")(
        cache, store_url, shard, normalization, task_dataset, policy_options)
