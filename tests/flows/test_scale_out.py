"""Scaling out through the flow: the cache stage in N shard task runs (each its own process, tagged
``gpu``) then one finalize, byte-identical to one process; per-shard caching and resume; CRaFT
training with 2 torchrun processes on the sharded store; refusals before any work."""

import json
from pathlib import Path

import pytest
import zarr

from craft_core.config import load_preset
from craft_core.pipeline import plan_pipeline
from craft_core.pipeline.fingerprint import StageDir

# Arrays whose bytes must not depend on how many processes wrote the store.
COMPARED = ("targets", "inputs", "provenance")


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def store_files(url: str) -> dict[str, bytes]:
    """Every file (chunks and array metadata) under the compared groups, by relative path."""
    root = Path(url)
    files = {}
    for group in COMPARED:
        for path in sorted((root / group).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


def task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def run_flow(config):
    from flows.craft_flow import craft

    state = craft(config=config, return_state=True)
    assert state.is_completed(), state
    return state.state_details.flow_run_id


@pytest.mark.timeout(900)
def test_sharded_cache_is_byte_identical_resumable_and_feeds_two_process_training(prefect_server, tmp_path):
    from craft_core.extraction import extract_anchors

    config = load_preset("smoke", [f"artifacts_root={tmp_path / 'artifacts'}", "stages=[assets,cache]",
                                   "cache.num_shards=2", "cache.chunk_anchors=2"])
    first = run_flow(config)
    runs = task_runs(first)
    assert set(runs) == {"assets", "cache_shard_0", "cache_shard_1", "cache"}
    assert all(runs[name].state_name == "Completed" for name in runs)
    assert {"gpu", "craft-cache-shard"} <= set(runs["cache_shard_0"].tags) and "gpu" in runs["cache_shard_1"].tags

    plans = plan_pipeline(config)
    plan = plans["cache"]
    assert StageDir(plan.artifacts_root, "cache", plan.fingerprint).is_complete()
    result = plan.stage_dir().result()
    sharded_url = result["store_url"]
    assert sharded_url == str(Path(plan.path) / "anchors.zarr") and result["n_anchors"] == 8
    group = zarr.open_group(sharded_url, mode="r")
    assert group.attrs["complete"] is True and group.attrs["n_blocks"] == 4

    # The same anchors written by one process: the same bytes in every target, input and provenance array.
    kwargs = plans["cache"].kwargs(plans["assets"].path)
    single_url = str(tmp_path / "single.zarr")
    extract_anchors(kwargs["cfg"].model_copy(update={"num_shards": 1}), single_url,
                    normalization=kwargs["normalization"], task_dataset=kwargs["task_dataset"])
    single, sharded = store_files(single_url), store_files(sharded_url)
    assert any(name.startswith("targets/prefix/hidden/c") for name in single)  # chunks, not only metadata
    assert sorted(sharded) == sorted(single)
    for name in single:
        assert sharded[name] == single[name], name

    # A shard killed after writing a block's data but before its marker, and the stage left
    # incomplete: run again, the finished shard is Cached and the killed one resumes alone.
    Path(plan.path, "manifest.json").unlink()
    writable = zarr.open_group(sharded_url, mode="r+")
    writable.attrs["complete"] = False
    writable["progress/block_written"][3] = 0
    untouched = {name: data for name, data in store_files(sharded_url).items()}
    second = run_flow(config)
    runs = task_runs(second)
    assert runs["cache_shard_0"].state_name == "Cached"
    assert runs["cache_shard_1"].state_name == "Completed"
    assert runs["cache"].state_name == "Completed"
    shard_result = json.loads(json.dumps(plan.stage_dir().result()))
    assert shard_result["n_anchors"] == 8
    assert store_files(sharded_url) == untouched == single

    # Everything complete: a third run is Cached throughout.
    runs = task_runs(run_flow(config))
    assert {name: run.state_name for name, run in runs.items()} == {name: "Cached" for name in runs}

    # CRaFT training on that store with 2 processes through torchrun (gloo): the stage's result,
    # checkpoints, metrics and progress artifact as with one process, and both ranks end with the same λ.
    train_config = load_preset("smoke", [f"artifacts_root={tmp_path / 'artifacts'}", "stages=[train]",
                                         "cache.num_shards=2", "cache.chunk_anchors=2", "runs={craft: {}}",
                                         "train.num_processes=2", "train.batch_size=1"])
    runs = task_runs(run_flow(train_config))
    assert runs["train_craft"].state_name == "Completed"
    train_plan = plan_pipeline(train_config)["train_craft"]
    assert train_plan.upstream["cache"] == plan.fingerprint  # the sharded store
    result = train_plan.stage_dir().result()
    assert result["num_processes"] == 2 and result["steps"] == 4 and result["retention"] is True
    assert sorted(result["checkpoints"]) == ["4"] and Path(result["checkpoint"], "model.safetensors").is_file()
    records = [json.loads(line) for line in Path(result["metrics"]).read_text().splitlines()]
    # every_k=2 with the first step a retention step (as in one process): steps 1 and 3
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [bool(r.get("retention_step")) for r in records] == [True, False, True, False]
    ranks = [json.loads(Path(train_plan.path, "launch", f"result.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["final_lambda"] == ranks[1]["final_lambda"] == result["final_lambda"]
    import httpx
    from prefect.settings import PREFECT_API_URL

    progress = httpx.get(f"{PREFECT_API_URL.value()}/artifacts/craft-train-craft-progress/latest", timeout=30).json()
    assert progress["type"] == "progress" and float(progress["data"]) == pytest.approx(100.0)


def test_more_shards_than_blocks_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"num_shards=3 is larger than the store's 2 block\(s\).*lower cache.num_shards"):
        load_preset("smoke", ["cache.num_shards=3", "cache.chunk_anchors=4"])
    with pytest.raises(ValueError, match="num_shards=9 is larger than n_anchors=8"):
        load_preset("smoke", ["cache.num_shards=9"])


def test_unwritable_store_root_and_too_many_processes_are_refused_before_any_stage(prefect_server, tmp_path):
    from flows.craft_flow import craft

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = load_preset("smoke", [f"artifacts_root={tmp_path / 'artifacts'}", f"cache.store_root={blocker}/stores"])
    with pytest.raises(ValueError, match=r"cache.store_root=.* cannot be written"):
        craft.fn(config)
    config = load_preset("smoke", [f"artifacts_root={tmp_path / 'artifacts'}", "train.num_processes=64"])
    with pytest.raises(ValueError, match=r"train.num_processes=64 .* but it has \d+ CPU core\(s\)"):
        craft.fn(config)
    assert not (tmp_path / "artifacts").exists()  # nothing ran
