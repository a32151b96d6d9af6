"""Sharded extraction across workers, for real: a local Prefect server, a process work pool with two
workers, the shard deployment ``craft/extract-shard``, and the anchor store on an S3-compatible
endpoint (moto's server on 127.0.0.1, started here) with credentials from the environment.

The parent flow (``craft`` with ``cache.shard_runner: deployment``) runs in this process against the
server; its two shard task runs each start a run of the deployment, which the workers pick up in
their own flow-run processes; the parent then finalizes the store on S3. The finished store is
byte-identical to one written by a single local process. Before that, a shard deployment the server
does not have and a store URL nobody can write are refused before any stage runs.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from craft_core.config import load_preset
from deployments.local_stack import LocalPrefect

BUCKET = "craft-stores"
COMPARED = ("targets", "inputs", "provenance")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_endpoint(tmp_path, monkeypatch):
    """moto's S3 server on 127.0.0.1 with one bucket; its credentials and endpoint in the environment."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "moto.log", "ab")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "craft-test", "AWS_SECRET_ACCESS_KEY": "craft-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        import boto3

        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield env
    finally:
        os.killpg(server.pid, 9)
        server.wait()
        log.close()


def s3_files(url: str) -> dict[str, bytes]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    files = {}
    for group in COMPARED:
        for path in sorted(fs.find(f"{root}/{group}")):
            files[path[len(root) + 1:]] = fs.cat_file(path)
    return files


def local_files(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for group in COMPARED for p in sorted((root / group).rglob("*"))
            if p.is_file()}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_shards_on_two_workers_write_one_store_on_s3(tmp_path, s3_endpoint):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from craft_core.extraction import extract_anchors
    from craft_core.pipeline import plan_pipeline
    from flows.craft_flow import craft

    overrides = [f"artifacts_root={tmp_path / 'artifacts'}", "stages=[assets,cache]", "cache.num_shards=2",
                 "cache.chunk_anchors=2", "cache.shard_runner=deployment", f"cache.store_root=s3://{BUCKET}/stores"]
    config = load_preset("smoke", overrides)
    stack = LocalPrefect(tmp_path / "prefect-home", extra_env={"OMP_NUM_THREADS": "1", **s3_endpoint})
    try:
        stack.start_server()
        with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
            # Refused before any stage: no shard deployment yet; then a bucket that does not exist.
            with pytest.raises(ValueError, match=r"cache.shard_deployment='craft/extract-shard'.*no such deployment"):
                craft.fn(config)
            stack.deploy("extract-shard")
            missing_bucket = load_preset("smoke", overrides + ["cache.store_root=s3://no-such-bucket/stores"])
            with pytest.raises(ValueError, match=r"cache.store_root='s3://no-such-bucket/stores' cannot be written"):
                craft.fn(missing_bucket)
            assert not (tmp_path / "artifacts").exists()

            stack.start_worker("worker-a")
            stack.start_worker("worker-b")
            state = craft(config=config, return_state=True)
            assert state.is_completed(), (state, stack.log("worker-a")[-3000:], stack.log("worker-b")[-3000:])

        shard_runs = stack.api("POST", "/flow_runs/filter", json={
            "deployments": {"name": {"any_": ["extract-shard"]}}})
        assert sorted(run["name"] for run in shard_runs) == ["extract-shard-0", "extract-shard-1"]
        assert all(run["state_type"] == "COMPLETED" for run in shard_runs)
        parents = {run["parent_task_run_id"] for run in shard_runs}
        assert None not in parents and len(parents) == 2  # each started by its own shard task of the parent

        plans = plan_pipeline(config)
        result = plans["cache"].stage_dir().result()
        url = result["store_url"]
        assert url == f"s3://{BUCKET}/stores/{plans['cache'].fingerprint}/anchors.zarr"
        assert result["n_anchors"] == 8
        import zarr

        assert zarr.open_group(url, mode="r").attrs["complete"] is True

        kwargs = plans["cache"].kwargs(plans["assets"].path)
        single = str(tmp_path / "single.zarr")
        extract_anchors(kwargs["cfg"].model_copy(update={"num_shards": 1, "store_root": None}), single,
                        normalization=kwargs["normalization"], task_dataset=kwargs["task_dataset"])
        on_s3, local = s3_files(url), local_files(single)
        assert any(name.startswith("targets/prefix/hidden/c") for name in local)
        assert sorted(on_s3) == sorted(local)
        for name in local:
            assert on_s3[name] == local[name], name
    finally:
        stack.stop()
