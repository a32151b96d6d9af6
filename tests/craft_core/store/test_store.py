"""The Zarr anchor store: writing, resume markers, concurrent writers, validation, reader, sampler.

These tests need no policy: the input spec is synthetic (the shapes an adapter would declare).
"""

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from craft_core.policies.base import ArraySpec, PolicyAdapter
from craft_core.store import (
    AnchorDataset,
    AnchorStoreError,
    AnchorStoreWriter,
    ChunkAwareBatchSampler,
    StoreLayout,
    check_fits_student,
    default_chunk_anchors,
    finalize_store,
    heldout_mask,
    open_anchor_store,
    store_fingerprint,
    worker_blocks,
)

N, L, V, D = 37, 2, 2, 16
HIDDEN = "targets/prefix/hidden"
INPUT_SPEC = {
    "image": ArraySpec((3, 8, 8), "uint8"),
    "tokens": ArraySpec((6,), "int64"),
    "token_mask": ArraySpec((6,), "bool"),
}


def make_layout(n_anchors=N, chunk_anchors=8, shard_chunks=None, fingerprint="fp-a", dtype="float16"):
    pooling = ["vision_token_mean", "text_token_last"]
    return StoreLayout(
        n_anchors=n_anchors,
        input_spec=INPUT_SPEC,
        targets={"prefix": {"hidden": ArraySpec((L, V, D), dtype)}},
        target_attrs={"prefix": {"layers": [1, 2], "pooling": pooling}},
        chunk_anchors=chunk_anchors,
        shard_chunks=shard_chunks,
        attrs={
            "fingerprint": fingerprint,
            "layers": [1, 2],
            "depth": 2,
            "hidden_size": D,
            "pooling": pooling,
            "dtype": dtype,
            "teacher": {"policy_type": "pi0_fast", "path": "/teachers/x", "revision": None},
        },
    )


def block_data(layout: StoreLayout, start: int, stop: int) -> dict[str, np.ndarray]:
    """Deterministic per-anchor content, so any writer order must give the same store."""
    n = stop - start
    rng = np.random.default_rng(start)
    held = heldout_mask(layout.n_anchors, 0.1)
    return {
        HIDDEN: rng.standard_normal((n, L, V, D)).astype(layout.targets["prefix"]["hidden"].dtype),
        "inputs/image": rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
        "inputs/tokens": rng.integers(0, 1000, (n, 6)).astype(np.int64),
        "inputs/token_mask": rng.random((n, 6)) > 0.3,
        "provenance/episode_index": np.arange(start, stop, dtype=np.int64) // 5,
        "provenance/frame_index": np.arange(start, stop, dtype=np.int64) % 5,
        "provenance/task": np.array([f"task {i % 3}" for i in range(start, stop)]),
        "split/heldout": held[start:stop],
    }


def write_store(url, layout=None, blocks=None, finalize=True):
    layout = layout or make_layout()
    writer = AnchorStoreWriter(url, layout)
    for block in blocks if blocks is not None else range(len(writer.blocks)):
        writer.write_block(block, block_data(layout, *writer.blocks[block]))
    if finalize:
        finalize_store(url)
    return writer


def read_all(url) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(url), mode="r")
    names = [HIDDEN, "inputs/image", "inputs/tokens", "inputs/token_mask",
             "provenance/episode_index", "provenance/frame_index", "provenance/task", "split/heldout"]
    return {name: group[name][:] for name in names}


def assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def template_store(tmp_path_factory) -> Path:
    url = tmp_path_factory.mktemp("template") / "anchors.zarr"
    write_store(str(url))
    return url


@pytest.fixture
def store_url(template_store, tmp_path) -> str:
    """A fresh copy of one complete store (tests corrupt their copy)."""
    url = tmp_path / "anchors.zarr"
    shutil.copytree(template_store, url)
    return str(url)


# ---------------------------------------------------------------- writing


def test_written_store_round_trips_and_reports_info(store_url):
    store = open_anchor_store(store_url)
    info = store.info()
    assert list(info["targets"]) == ["prefix"] and info["n_anchors"] == N
    assert info["n_heldout"] == round(0.1 * N) and info["n_train"] == N - info["n_heldout"]
    assert info["layers"] == [1, 2] and info["hidden_size"] == D and info["dtype"] == "float16"
    expected = {}
    for start in range(0, N, 8):
        for name, values in block_data(make_layout(), start, min(start + 8, N)).items():
            expected.setdefault(name, []).append(values)
    assert_same_arrays(read_all(store_url), {k: np.concatenate(v) for k, v in expected.items()})
    group = zarr.open_group(store_url, mode="r")
    assert group[HIDDEN].chunks == (8, L, V, D)
    assert group["inputs/image"].chunks == (8, 3, 8, 8)
    assert store.provenance()["task"][4] == "task 1"


def test_default_chunks_target_about_16_mb():
    specs = {"image": ArraySpec((3, 224, 224), "uint8"), "t": ArraySpec((2, 2, 2048), "float16")}
    chunk = default_chunk_anchors(specs, n_anchors=10_000)
    assert 8 * 2**20 <= chunk * 3 * 224 * 224 <= 32 * 2**20
    assert default_chunk_anchors(specs, n_anchors=10) == 10


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_store_at_a_url(tmp_path, scheme):
    url = f"memory://anchors-{id(tmp_path)}" if scheme == "memory" else (tmp_path / "a.zarr").as_uri()
    write_store(url, make_layout(shard_chunks=2))
    dataset = AnchorDataset(url, split="all")
    sample = dataset[9]
    expected = block_data(make_layout(), 0, 16)
    np.testing.assert_array_equal(sample["inputs"]["image"].numpy(), expected["inputs/image"][9])
    hidden = sample["targets"]["prefix"]["hidden"]
    assert hidden.dtype == torch.float32
    np.testing.assert_array_equal(hidden.numpy(), expected[HIDDEN][9].astype(np.float32))


def test_resume_reports_written_blocks_and_rewrites_nothing_else(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_store(url, blocks=[0, 2], finalize=False)
    # A "killed" writer: data of block 3 written but not its marker.
    writer = AnchorStoreWriter(url, make_layout())
    group = zarr.open_group(url, mode="r+")
    group[HIDDEN][24:32] = np.full((8, L, V, D), 7, dtype=np.float16)
    assert writer.written_blocks() == {0, 2}
    with pytest.raises(AnchorStoreError, match="incomplete"):
        open_anchor_store(url)
    with pytest.raises(AnchorStoreError, match="3 of 5 blocks are not written"):
        finalize_store(url)
    for block in sorted(set(range(len(writer.blocks))) - writer.written_blocks()):
        writer.write_block(block, block_data(writer.layout, *writer.blocks[block]))
    finalize_store(url)
    reference = str(tmp_path / "ref.zarr")
    write_store(reference)
    assert_same_arrays(read_all(url), read_all(reference))
    assert zarr.open_group(url, mode="r").attrs["complete"] is True


def test_reopening_with_another_fingerprint_is_refused(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_store(url, blocks=[0], finalize=False)
    with pytest.raises(AnchorStoreError, match="another fingerprint.*Delete the store or write to another path"):
        AnchorStoreWriter(url, make_layout(fingerprint="fp-b"))


def test_concurrent_writers_of_disjoint_blocks_equal_one_writer(tmp_path):
    layout = make_layout(n_anchors=38, chunk_anchors=2, shard_chunks=2)  # 10 blocks of 4 anchors
    single = str(tmp_path / "single.zarr")
    write_store(single, layout)
    shared = str(tmp_path / "shared.zarr")
    n_workers = 3
    assigned = [worker_blocks(10, (i, n_workers)) for i in range(n_workers)]
    assert sorted(sum(assigned, [])) == list(range(10))  # disjoint and covering

    errors = []

    def work(blocks):
        try:
            write_store(shared, make_layout(n_anchors=38, chunk_anchors=2, shard_chunks=2), blocks=blocks, finalize=False)
        except Exception as exc:  # surfaced below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(blocks,)) for blocks in assigned]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    finalize_store(shared)
    assert_same_arrays(read_all(shared), read_all(single))
    assert zarr.open_group(shared, mode="r")[HIDDEN].shards == (4, L, V, D)


def test_write_block_rejects_wrong_shapes_and_non_finite_values(tmp_path):
    writer = AnchorStoreWriter(str(tmp_path / "s.zarr"), make_layout())
    data = block_data(writer.layout, 0, 8)
    with pytest.raises(ValueError, match="inputs/image has shape"):
        writer.write_block(0, {**data, "inputs/image": data["inputs/image"][:, :2]})
    data[HIDDEN][3, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        writer.write_block(0, data)
    assert writer.written_blocks() == set()


def test_fingerprint_depends_on_content():
    assert store_fingerprint({"a": 1, "b": [1, 2]}) == store_fingerprint({"b": [1, 2], "a": 1})
    assert store_fingerprint({"a": 1}) != store_fingerprint({"a": 2})


# ---------------------------------------------------------------- validation


def _set_attrs(**changes):
    def corrupt(url):
        zarr.open_group(url, mode="r+").attrs.update(changes)
    return corrupt


def _delete(path):
    def corrupt(url):
        shutil.rmtree(Path(url) / path)
    return corrupt


def _write(path, index, value):
    def corrupt(url):
        zarr.open_group(url, mode="r+")[path][index] = value
    return corrupt


def _replace_teacher_dtype(url):
    group = zarr.open_group(url, mode="r+")
    values = group[HIDDEN][:]
    del group[HIDDEN]
    group.create_array(HIDDEN, data=values.astype(np.float32), chunks=(8, L, V, D))


def changed(attribute):
    return f"attribute {attribute} was changed after the store was written"


# Attribute edits are caught by the identity digest (tests/craft_core/store/test_integrity.py has
# the full corruption suite on a store made by the cache stage); these check the layers below it.
CORRUPTIONS = {
    "incomplete": (_set_attrs(complete=False), "incomplete.*resume"),
    "unknown schema": (_set_attrs(schema_version=7), "schema version 7 is not supported"),
    "no schema attribute": (_set_attrs(schema_version=None), "schema version None"),
    "no targets": (_set_attrs(targets={}), "must name at least one target"),
    "missing input array": (_delete("inputs/tokens"), "array inputs/tokens is missing"),
    "missing teacher array": (_delete(HIDDEN), f"array {HIDDEN} is missing"),
    "missing split": (_delete("split"), "array split/heldout is missing"),
    "hidden size disagrees": (_set_attrs(hidden_size=32), changed("hidden_size")),
    "layers disagree": (_set_attrs(layers=[0, 1, 2]), changed("layers")),
    "input spec disagrees": (
        _set_attrs(input_spec={**{k: v.to_json() for k, v in INPUT_SPEC.items()}, "image": {"shape": [3, 9, 9], "dtype": "uint8"}}),
        changed("input_spec"),
    ),
    "teacher dtype disagrees": (_replace_teacher_dtype, f"{HIDDEN} has dtype float32 but the attributes say float16"),
    "wrong n_anchors attribute": (_set_attrs(n_anchors=40), changed("n_anchors")),
    "NaN teacher value": (_write(HIDDEN, (20, 1, 0, 3), np.nan), f"{HIDDEN} block 2: its content does not match"),
    "inf teacher value": (_write(HIDDEN, (36, 0, 1, 0), np.inf), f"{HIDDEN} block 4: its content does not match"),
    "missing block marker": (_write("progress/block_written", 2, 0), "1 blocks have no written marker"),
    "split edited": (_write("split/heldout", 0, True), "split/heldout block 0: its content does not match"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_open_refuses_corrupted_store(store_url, case):
    corrupt, message = CORRUPTIONS[case]
    open_anchor_store(store_url)  # valid before
    corrupt(store_url)
    with pytest.raises(AnchorStoreError, match=message) as excinfo:
        open_anchor_store(store_url)
    assert excinfo.value.remedy  # every refusal says what to do


def test_open_refuses_a_missing_path(tmp_path):
    with pytest.raises(AnchorStoreError, match="no Zarr v3 group.*Run the cache stage"):
        open_anchor_store(tmp_path / "nowhere.zarr")


class StandInAdapter(PolicyAdapter):
    """The adapter surface the store compares a student with (policy type, depth, width, inputs),
    without a model: the real adapters meet it in tests/craft_core/test_extraction.py."""

    retention_targets = ("prefix",)

    def __init__(self, policy_type, depth, hidden_size, input_spec):
        super().__init__(policy=None)
        self.policy_type, self._depth, self._hidden_size, self._input_spec = policy_type, depth, hidden_size, input_spec

    depth = property(lambda self: self._depth)
    hidden_size = property(lambda self: self._hidden_size)

    def input_spec(self, targets=("prefix",)):
        return self._input_spec

    def anchor_inputs(self, batch, targets=("prefix",)):
        raise NotImplementedError

    def prefix_hidden_states(self, inputs, layers):
        raise NotImplementedError


def student(policy_type="pi0_fast", depth=2, hidden_size=D, input_spec=INPUT_SPEC):
    return StandInAdapter(policy_type, depth, hidden_size, input_spec)


EXPECTATIONS = {
    "student policy type": (dict(student=student(policy_type="smolvla")), "teacher is a pi0_fast policy but the student is smolvla"),
    "student hidden size": (dict(student=student(hidden_size=32)), "hidden size 16 differs from the student's 32"),
    "student depth": (dict(student=student(depth=4)), "depth 2 but the student's has 4"),
    "student prefix inputs": (
        dict(student=student(input_spec={**INPUT_SPEC, "image": ArraySpec((3, 16, 16), "uint8")})),
        "differ from the student's inputs",
    ),
    "requested layers": (dict(student=student(), layers=[-3, -1]), r"holds layers \[1, 2\] .* layers \[-3, -1\] were requested"),
    "requested target the store lacks": (dict(student=student(), targets=["action_output"]),
                                         r"holds the targets \['prefix'\] but \['action_output'\] were requested"),
}


@pytest.mark.parametrize("case", sorted(EXPECTATIONS))
def test_store_refuses_an_incompatible_student(store_url, case):
    kwargs, message = EXPECTATIONS[case]
    with pytest.raises(AnchorStoreError, match=message):
        check_fits_student(open_anchor_store(store_url), **kwargs)


def test_store_accepts_a_compatible_student(store_url):
    store = open_anchor_store(store_url)
    check_fits_student(store, student(), layers=[-2, -1])
    assert list(store.targets) == ["prefix"] and store.info()["layers"] == [1, 2]


# ---------------------------------------------------------------- reader


def test_sampler_covers_each_index_once_within_windows():
    indices = np.arange(100)[np.arange(100) % 7 != 0]
    sampler = ChunkAwareBatchSampler(indices, chunk_anchors=10, batch_size=6, window_chunks=3, seed=1)
    batches = list(sampler)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == sorted(indices.tolist()) and len(batches) == len(sampler)
    # Consecutive groups of 3 chunks are served together: a window's anchors are contiguous in the order.
    chunk_sequence = [i // 10 for i in flat]
    windows = []
    for chunk in chunk_sequence:
        if not windows or (chunk not in windows[-1] and len(windows[-1]) == 3):
            windows.append(set())
        windows[-1].add(chunk)
    assert sum(len(w) for w in windows) == 10  # each chunk in exactly one window
    assert all(len(w) <= 3 for w in windows)
    assert flat != sorted(flat)
    again = [i for batch in ChunkAwareBatchSampler(indices, 10, 6, window_chunks=3, seed=1) for i in batch]
    assert again == flat
    sampler.set_epoch(1)
    assert [i for batch in sampler for i in batch] != flat


def test_dataset_splits_are_disjoint_and_values_match(store_url):
    train = AnchorDataset(store_url, split="train")
    heldout = AnchorDataset(store_url, split="heldout")
    assert set(train.store_indices) & set(heldout.store_indices) == set()
    assert len(train) + len(heldout) == N
    assert heldout.store_indices.tolist() == np.flatnonzero(heldout_mask(N, 0.1)).tolist()
    seen = []
    for batch in train.loader(5, window_chunks=2, seed=3):
        seen += batch["index"].tolist()
        assert batch["targets"]["prefix"]["hidden"].shape[1:] == (L, V, D)
        assert batch["inputs"]["token_mask"].dtype == torch.bool
    assert sorted(seen) == train.store_indices.tolist()
    data = block_data(make_layout(), 32, 37)
    sample = heldout[0]
    assert sample["index"] == 33
    np.testing.assert_array_equal(sample["inputs"]["tokens"].numpy(), data["inputs/tokens"][1])


def test_dataloader_workers_give_the_same_batches(store_url):
    dataset = AnchorDataset(store_url, split="train")
    plain = list(dataset.loader(4, seed=5))
    workers = list(AnchorDataset(store_url, split="train").loader(4, seed=5, num_workers=2))
    assert len(plain) == len(workers)
    for a, b in zip(plain, workers):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["targets"]["prefix"]["hidden"], b["targets"]["prefix"]["hidden"])
        assert torch.equal(a["inputs"]["image"], b["inputs"]["image"])
