"""Scaling out, without Prefect: the cache stage's shards, and the checks that refuse a scaled-out
config before any stage runs.

* Sharded extraction: ``cache.num_shards`` = N > 1 splits the anchor store's blocks into N
  contiguous ranges (``craft_core.store.worker_blocks``); each shard is one process
  (:func:`execute_cache_shard`) writing its blocks into the one store, then the cache stage itself
  only checks the store and sets it complete. The flow runs the shards as N Prefect task runs (or
  as runs of the shard deployment); :func:`run_cache_shards` runs them here, one process each, for
  the experiments and the benchmark.
* Pre-flight (:func:`check_scale_out`): a store root that cannot be written, or more training
  processes than devices, is refused with the field named before anything runs.
"""

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from craft_core.config import PipelineConfig
from craft_core.extraction import cache_shard_stage, shard_done, store_location
from craft_core.pipeline.graph import StagePlan, StageRef
from craft_core.pipeline.isolation import call_stage

Progress = Callable[[int, int, dict], None]


def consumed_results(upstream: dict[str, StageRef]) -> dict[str, dict]:
    """Upstream refs as a stage function receives them (``upstream=``)."""
    return {name: {**ref.result, "stage": {"fingerprint": ref.fingerprint, "path": ref.path}}
            for name, ref in upstream.items()}


def shard_store_url(plan: StagePlan, assets: str | None) -> str:
    return store_location(plan.kwargs(assets)["cfg"], Path(plan.path))


def shard_is_done(plan: StagePlan, shard: int, assets: str | None) -> bool:
    """Whether shard ``shard``'s blocks are written (or the cache stage is complete already)."""
    if plan.stage_dir().is_complete():
        return True
    kwargs = plan.kwargs(assets)
    return shard_done(store_location(kwargs["cfg"], Path(plan.path)), shard, kwargs["cfg"].num_shards)


def execute_cache_shard(plan: StagePlan, shard: int, upstream: dict[str, StageRef], *, assets: str | None,
                        progress: Progress | None = None) -> dict:
    """Write shard ``shard`` of the cache stage's store, in its own process; returns the shard's result.

    Nothing is done when the stage is complete or the shard's blocks are all written already.
    """
    if plan.kind != "cache":
        raise ValueError(f"stage {plan.stage} is a {plan.kind} stage; only the cache stage has shards")
    num_shards = plan.kwargs(assets)["cfg"].num_shards
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not one of cache.num_shards={num_shards}")
    if plan.stage_dir().is_complete():
        return {"shard": [shard, num_shards], "blocks_written": 0, "complete": True}
    Path(plan.path).mkdir(parents=True, exist_ok=True)  # the stage's working directory (resumed, never committed here)
    kwargs = {**plan.kwargs(assets), "upstream": consumed_results(upstream), "out_dir": Path(plan.path), "shard": shard}
    return call_stage(cache_shard_stage, kwargs, isolate=True, progress=progress)


def run_cache_shards(plan: StagePlan, upstream: dict[str, StageRef], *, assets: str | None) -> list[dict]:
    """Every shard of the cache stage at once, one process each (the flow's task runs, without Prefect)."""
    num_shards = plan.kwargs(assets)["cfg"].num_shards
    with ThreadPoolExecutor(max_workers=num_shards, thread_name_prefix="cache-shard") as pool:
        futures = [pool.submit(execute_cache_shard, plan, shard, upstream, assets=assets) for shard in range(num_shards)]
        return [future.result() for future in futures]


# ---------------------------------------------------------------------------------------------
# Pre-flight


def check_store_root(url: str, *, field: str = "cache.store_root") -> None:
    """Refuse a store root that cannot be written: a probe object is written and removed."""
    import fsspec

    probe_name = f".craft-probe-{uuid.uuid4().hex}"
    try:
        fs, root = fsspec.core.url_to_fs(url)
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if {"file", "local"} & set(protocols):
            fs.makedirs(root, exist_ok=True)  # object stores have no folders (and must not create buckets)
        probe = f"{root.rstrip('/')}/{probe_name}"
        with fs.open(probe, "wb") as handle:
            handle.write(b"craft")
        fs.rm(probe)
    except Exception as exc:  # any failure to reach or write it: refuse, naming the field and the cause
        detail = str(exc).splitlines()[0] if str(exc) else ""
        hint = (" For s3:// the credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible service) and the bucket must exist."
                if url.startswith("s3://") else "")
        raise ValueError(f"{field}={url!r} cannot be written ({type(exc).__name__}: {detail}); the sharded anchor "
                         f"store needs storage every shard reaches.{hint}") from None


def check_train_processes(cfg: PipelineConfig) -> None:
    """Refuse more training processes per machine than this machine has devices (GPUs, or CPU cores)."""
    from craft_core.launch import check_processes_fit

    if cfg.train.num_processes > 1:
        check_processes_fit(cfg.train)


def check_scale_out(cfg: PipelineConfig) -> None:
    """Everything about scaling out that can be refused before any stage runs (Prefect-free part)."""
    stages = set(cfg.stages)
    if "cache" in stages and cfg.cache.store_root is not None:
        check_store_root(cfg.cache.store_root)
    if "train" in stages:
        check_train_processes(cfg)
