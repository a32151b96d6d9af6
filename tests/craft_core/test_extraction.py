"""The cache stage on a tiny real pi0_fast and a real LeRobotDataset, offline, on CPU."""

import os
import signal
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from craft_core.config import CacheConfig, DatasetSource, PolicySource
from craft_core.store import AnchorStoreError, check_fits_student, finalize_store, open_anchor_store

HIDDEN = "targets/prefix/hidden"
ARRAYS = (HIDDEN, "inputs/images", "inputs/image_masks", "inputs/lang_tokens", "inputs/lang_masks",
          "provenance/episode_index", "provenance/frame_index", "provenance/task", "split/heldout")


@pytest.fixture(scope="module")
def anchor_dataset(pusht_datasets) -> dict:
    """The dataset of the task to retain (the tiny teacher was built for it)."""
    from tests.fixtures.data import FIXTURE_PUSHT_TASKS

    return pusht_datasets[FIXTURE_PUSHT_TASKS[-1]]


@pytest.fixture(scope="module")
def cache_cfg(tiny_pi0_fast, anchor_dataset) -> CacheConfig:
    repo_id, root = anchor_dataset["repo_id"], anchor_dataset["root"]
    return CacheConfig(
        teacher=PolicySource(path=str(tiny_pi0_fast)),
        dataset=DatasetSource(repo_id=repo_id, root=str(root)),
        n_anchors=12, seed=3, chunk_anchors=2, batch_size=2, dtype="float32", device="cpu", heldout_fraction=0.25,
    )


@pytest.fixture(scope="module")
def reference_store(cache_cfg, tmp_path_factory) -> str:
    from craft_core.extraction import extract_anchors

    torch.set_num_threads(1)
    url = str(tmp_path_factory.mktemp("reference") / "anchors.zarr")
    extract_anchors(cache_cfg, url)
    return url


def read_all(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return {name: group[name][:] for name in ARRAYS}


def assert_same_store(url: str, reference: str) -> None:
    ours, theirs = read_all(url), read_all(reference)
    for name in ARRAYS:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_store_holds_what_the_teacher_saw_and_a_copy_reproduces_it(reference_store, cache_cfg, anchor_dataset):
    from lerobot.datasets import LeRobotDataset

    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy
    from craft_core.store import AnchorDataset

    store = open_anchor_store(reference_store)
    assert list(store.targets) == ["prefix"] and store.n_anchors == 12
    info = store.info()
    assert info["layers"] == [1, 2] and info["depth"] == 2  # [-2, -1] resolved against the tiny backbone
    assert info["n_heldout"] == 3 and info["dtype"] == "float32"
    assert info["teacher"]["policy_type"] == "pi0_fast"

    # Provenance names real frames of the dataset, with their task strings, all distinct.
    dataset = LeRobotDataset(anchor_dataset["repo_id"], root=anchor_dataset["root"], video_backend="pyav")
    provenance = store.provenance()
    pairs = set(zip(provenance["episode_index"].tolist(), provenance["frame_index"].tolist()))
    assert len(pairs) == 12
    columns = dataset.hf_dataset.with_format("numpy")
    for episode, frame, task in zip(provenance["episode_index"], provenance["frame_index"], provenance["task"]):
        row = np.flatnonzero((columns["episode_index"] == episode) & (columns["frame_index"] == frame))[0]
        assert dataset[int(row)]["task"] == task

    # Keystone: a student copy of the teacher, fed the stored inputs, reproduces the stored vectors.
    student = load_policy(cache_cfg.teacher, device="cpu")
    adapter = get_adapter(student)
    check_fits_student(open_anchor_store(reference_store), adapter, layers=[-2, -1])
    anchors = AnchorDataset(reference_store, split="all")
    batch = torch.utils.data.default_collate(anchors.__getitems__(list(range(12))))
    with torch.no_grad():
        pooled = adapter.pooled(batch["inputs"], info["layers"], info["pooling"])
    stored = batch["targets"]["prefix"]["hidden"]
    assert float(((pooled - stored) ** 2).mean()) <= 1e-6
    assert batch["inputs"]["images"].dtype == torch.uint8 and batch["inputs"]["image_masks"].all()
    assert float(stored.std()) > 0  # the vectors carry signal


def _extract_slowly(cfg_json: str, url: str) -> None:
    """The killed run: each block is followed by a pause so the parent's SIGKILL lands mid-run."""
    from craft_core.extraction import extract_anchors

    extract_anchors(CacheConfig.model_validate_json(cfg_json), url, progress=lambda *_: time.sleep(0.5))


def test_sigkilled_extraction_resumes_to_the_uninterrupted_arrays(cache_cfg, reference_store, tmp_path):
    from craft_core.extraction import extract_anchors

    url = str(tmp_path / "anchors.zarr")
    # A forked child starts with torch and lerobot already imported (a fresh interpreter takes
    # 5-100 s just to import them on a busy 2-core machine); SIGKILL ends it like a crash would.
    child = multiprocessing.get_context("fork").Process(target=_extract_slowly, args=(cache_cfg.model_dump_json(), url))
    child.start()
    deadline = time.monotonic() + 120
    written = 0
    try:
        while time.monotonic() < deadline and child.is_alive():
            try:
                written = int(zarr.open_group(url, mode="r")["progress/block_written"][:].sum())
            except (FileNotFoundError, KeyError, ValueError):
                written = 0  # the child has not created the store yet
            if written >= 2:
                break
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    assert 2 <= written < 6
    with pytest.raises(AnchorStoreError, match="incomplete"):
        open_anchor_store(url)

    reported = []
    info = extract_anchors(cache_cfg, url, progress=lambda done, total, metrics: reported.append(done))
    assert reported[0] >= 4 and reported[-1] == 12  # resumed at the first unwritten block
    assert info["n_anchors"] == 12
    assert zarr.open_group(url, mode="r").attrs["complete"] is True
    assert_same_store(url, reference_store)


def test_sharded_workers_write_the_same_store_as_one(cache_cfg, reference_store, tmp_path):
    from craft_core.extraction import extract_anchors

    url = str(tmp_path / "anchors.zarr")
    first = extract_anchors(cache_cfg, url, shard=(1, 2))
    assert first["complete"] is False and first["blocks_written"] == 3
    with pytest.raises(AnchorStoreError, match="3 of 6 blocks are not written"):
        finalize_store(url)
    extract_anchors(cache_cfg, url, shard=(0, 2))
    with pytest.raises(AnchorStoreError, match="incomplete"):
        open_anchor_store(url)
    finalize_store(url)
    assert_same_store(url, reference_store)


def test_selection_by_episode_stride_and_user_prompts(cache_cfg, tmp_path):
    from craft_core.extraction import extract_anchors

    prompts = ["pick up the cube", "open the drawer", "stack the blocks"]
    # num_workers=1: frames are read in a DataLoader worker process here.
    cfg = cache_cfg.model_copy(update={
        "dataset": cache_cfg.dataset.model_copy(update={"episodes": [1]}),
        "frame_stride": 2, "n_anchors": 4, "prompts": prompts, "chunk_anchors": 4, "batch_size": 4,
        "heldout_fraction": 0.0, "dtype": "float16", "num_workers": 1,
    })
    url = str(tmp_path / "anchors.zarr")
    info = extract_anchors(cfg, url)
    store = open_anchor_store(url)
    provenance = store.provenance()
    assert provenance["episode_index"].tolist() == [1] * 4
    assert all(frame % 2 == 0 for frame in provenance["frame_index"])
    assert provenance["task"].tolist() == [prompts[i % 3] for i in range(4)]
    assert info["dtype"] == "float16" and info["n_heldout"] == 0
    assert zarr.open_group(url, mode="r")[HIDDEN].dtype == np.float16

    with pytest.raises(ValueError, match="n_anchors=500 but dataset .* offers only .* frames .*lower n_anchors"):
        extract_anchors(cfg.model_copy(update={"n_anchors": 500}), str(tmp_path / "too_many.zarr"))


def test_another_config_on_an_existing_store_is_refused(cache_cfg, reference_store, tmp_path):
    from craft_core.extraction import extract_anchors

    with pytest.raises(AnchorStoreError, match="another fingerprint.*Delete the store or write to another path"):
        extract_anchors(cache_cfg.model_copy(update={"seed": 4}), reference_store)
    # Same config: a complete store is returned as is, nothing recomputed.
    before = read_all(reference_store)
    assert extract_anchors(cache_cfg.model_copy(update={"batch_size": 1}), reference_store)["n_anchors"] == 12
    np.testing.assert_array_equal(read_all(reference_store)[HIDDEN], before[HIDDEN])


@pytest.mark.parametrize("top_k", [4, 0])
def test_action_output_cache_holds_the_teachers_own_tokens_and_distributions(cache_cfg, tmp_path, top_k):
    """Both targets from one extraction; the probe is the teacher's greedy decoding of the stored
    inputs; a copy of the teacher reproduces the distributions (top_k > 0: loss 0), and the hard
    labels (top_k = 0, the former token-level cache) cost it its own cross-entropy."""
    from craft_core.extraction import extract_anchors
    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy
    from craft_core.store import AnchorDataset

    cfg = cache_cfg.model_copy(update={"targets": ["prefix", "action_output"], "n_anchors": 4, "chunk_anchors": 4,
                                       "batch_size": 4, "heldout_fraction": 0.0,
                                       "action_output": cache_cfg.action_output.model_copy(update={"top_k": top_k})})
    url = str(tmp_path / "targets.zarr")
    info = extract_anchors(cfg, url)
    assert list(info["targets"]) == ["prefix", "action_output"]
    assert info["targets"]["action_output"]["top_k"] == top_k
    store = open_anchor_store(url)
    expected = {"tokens", "token_mask"} | ({"topk_ids", "topk_logprobs"} if top_k else set())
    assert set(store.target_arrays["action_output"]) == expected

    teacher = load_policy(cfg.teacher, device="cpu")
    adapter = get_adapter(teacher)
    check_fits_student(store, adapter)
    batch = torch.utils.data.default_collate(AnchorDataset(url, split="all").__getitems__([0, 1, 2, 3]))
    stored = batch["targets"]["action_output"]
    with torch.no_grad():
        tokens, mask = adapter.greedy_fast_tokens(batch["inputs"])
        losses = adapter.retention_losses(batch["inputs"], batch["targets"], store.request())
    assert torch.equal(stored["tokens"], tokens) and torch.equal(stored["token_mask"], mask)
    assert mask[:, :2].all()  # <bos> and at least one generated token
    assert float(losses["prefix"]) <= 1e-6
    if top_k:
        assert float(losses["action_output"]) <= 1e-6
    else:
        assert float(losses["action_output"]) > 0  # the teacher's own cross-entropy on its greedy tokens
