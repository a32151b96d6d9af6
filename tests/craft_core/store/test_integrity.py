"""Corruption suite: a store made by the cache stage, damaged in many ways, is always refused.

One real store is built once (tiny pi0_fast, a recorded pusht dataset, targets ``prefix`` and
``action_output``); every test damages its own copy and opens it the way the train stage does
(``open_anchor_store`` for structure, identity and every target block, then ``AnchorDataset``
reading every block of the inputs). Each damage must end in an ``AnchorStoreError`` that names the
damaged array (or attribute / metadata file) and says what to do; never a raw codec/JSON error,
never fill values read as data.

``pytest -s`` prints the first line of each refusal (the list the integrity note quotes).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from craft_core.config import CacheConfig, DatasetSource, PolicySource
from craft_core.store import AnchorDataset, AnchorStoreError, open_anchor_store

HIDDEN = "targets/prefix/hidden"
ACTION_ARRAYS = ("targets/action_output/tokens", "targets/action_output/token_mask",
                 "targets/action_output/topk_ids", "targets/action_output/topk_logprobs")
INPUT_ARRAYS = ("inputs/images", "inputs/lang_tokens", "inputs/lang_masks")
CHUNK_ANCHORS = 4
REFUSALS: dict[str, str] = {}


@pytest.fixture(scope="module")
def cache_store(tiny_pi0_fast, pusht_datasets, tmp_path_factory) -> Path:
    from craft_core.extraction import extract_anchors
    from tests.fixtures.data import FIXTURE_PUSHT_TASKS

    torch.set_num_threads(1)
    dataset = pusht_datasets[FIXTURE_PUSHT_TASKS[-1]]
    cfg = CacheConfig(
        teacher=PolicySource(path=str(tiny_pi0_fast)),
        dataset=DatasetSource(repo_id=dataset["repo_id"], root=str(dataset["root"])),
        targets=["prefix", "action_output"], n_anchors=12, seed=3, chunk_anchors=CHUNK_ANCHORS, batch_size=4,
        dtype="float32", device="cpu", heldout_fraction=0.25,
    )
    url = tmp_path_factory.mktemp("integrity") / "anchors.zarr"
    extract_anchors(cfg, str(url))
    yield url
    if REFUSALS:
        print("\nfirst line of each refusal:")
        for kind, line in sorted(REFUSALS.items()):
            print(f"- {kind}: {line}")


@pytest.fixture
def store_copy(cache_store, tmp_path) -> Path:
    url = tmp_path / "anchors.zarr"
    shutil.copytree(cache_store, url)
    return url


def open_like_training(url: Path) -> None:
    """What the train stage does: open (targets verified), then read every block of the inputs."""
    open_anchor_store(url)
    dataset = AnchorDataset(url, split="all", validate=False)
    for block in range(len(dataset.store.blocks)):
        dataset._block(block)


# ---------------------------------------------------------------- kinds of damage


def chunk_file(url: Path, array: str, block: int) -> Path:
    path = url / array / "c" / str(block)
    files = [path] if path.is_file() else [f for f in sorted(path.rglob("*")) if f.is_file()]
    assert len(files) == 1, f"{array} block {block}: expected one chunk file, found {files}"
    return files[0]


def missing_chunk(array, block=1):
    def damage(url):
        chunk_file(url, array, block).unlink()
    return damage


def truncated_chunk(array, block=1):
    def damage(url):
        path = chunk_file(url, array, block)
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    return damage


def garbage_chunk(array, block=1):
    def damage(url):
        path = chunk_file(url, array, block)
        path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return damage


def swapped_chunks(array, a=0, b=1):
    """Two valid chunks exchanged: each decodes fine, but holds another block's anchors."""
    def damage(url):
        first, second = chunk_file(url, array, a), chunk_file(url, array, b)
        data_a, data_b = first.read_bytes(), second.read_bytes()
        first.write_bytes(data_b)
        second.write_bytes(data_a)
    return damage


def edited_value(array, index):
    """One value changed through Zarr itself (a valid chunk with other content)."""
    def damage(url):
        values = zarr.open_array(str(url / array), mode="r+")
        old = values[index]
        values[index] = (old + 1) if np.asarray(old).dtype.kind != "b" else not old
    return damage


def garbage_metadata(node):
    def damage(url):
        (url / node / "zarr.json").write_text("{ not json")
    return damage


def set_attrs(**changes):
    def damage(url):
        zarr.open_group(str(url), mode="r+").attrs.update(changes)
    return damage


def changed_attr(name, change):
    def damage(url):
        group = zarr.open_group(str(url), mode="r+")
        group.attrs.update({name: change(json.loads(json.dumps(group.attrs[name])))})
    return damage


def _other_pooling(pooling):
    return list(reversed(pooling))


def _other_top_k(targets):
    targets["action_output"]["top_k"] = 4
    return targets


def _other_teacher(teacher):
    teacher["path"] = teacher["path"] + "_other"
    return teacher


def _other_image_size(spec):
    spec["images"]["shape"][-1] = 32
    return spec


# kind -> (damage, regex the refusal must match: it names the damaged array / attribute / file)
DAMAGE = {
    f"missing chunk of {HIDDEN}": (missing_chunk(HIDDEN), f"{HIDDEN} block 1"),
    f"truncated chunk of {HIDDEN}": (truncated_chunk(HIDDEN), f"{HIDDEN} \\(anchors 4..7\\) cannot be read"),
    f"garbage chunk of {HIDDEN}": (garbage_chunk(HIDDEN), f"{HIDDEN} \\(anchors 4..7\\) cannot be read"),
    f"swapped chunks of {HIDDEN}": (swapped_chunks(HIDDEN), f"{HIDDEN} block 0"),
    f"edited value of {HIDDEN}": (edited_value(HIDDEN, (5, 0, 1, 3)), f"{HIDDEN} block 1"),
    f"garbage zarr.json of {HIDDEN}": (garbage_metadata(HIDDEN), f"array {HIDDEN} cannot be opened"),
    **{f"missing chunk of {a}": (missing_chunk(a, 2), f"{a} block 2") for a in ACTION_ARRAYS},
    **{f"truncated chunk of {a}": (truncated_chunk(a), f"{a} \\(anchors 4..7\\) cannot be read") for a in ACTION_ARRAYS},
    **{f"garbage chunk of {a}": (garbage_chunk(a, 0), f"{a} \\(anchors 0..3\\) cannot be read") for a in ACTION_ARRAYS},
    **{f"missing chunk of {a}": (missing_chunk(a), f"{a} block 1") for a in INPUT_ARRAYS},
    **{f"truncated chunk of {a}": (truncated_chunk(a), f"{a} \\(anchors 4..7\\) cannot be read") for a in INPUT_ARRAYS},
    **{f"garbage chunk of {a}": (garbage_chunk(a, 2), f"{a} \\(anchors 8..11\\) cannot be read") for a in INPUT_ARRAYS},
    "swapped chunks of inputs/images": (swapped_chunks("inputs/images"), "inputs/images block 0"),
    "edited value of inputs/lang_tokens": (edited_value("inputs/lang_tokens", (6, 0)), "inputs/lang_tokens block 1"),
    "garbage zarr.json of inputs/images": (garbage_metadata("inputs/images"), "array inputs/images cannot be opened"),
    "garbage root zarr.json": (garbage_metadata(""), "root metadata \\(zarr.json\\) cannot be read"),
    "missing chunk of provenance/task": (missing_chunk("provenance/task", 0), "provenance/task block 0"),
    "garbage chunk of provenance/frame_index": (garbage_chunk("provenance/frame_index", 1),
                                                "provenance/frame_index \\(anchors 4..7\\) cannot be read"),
    "held-out split edited": (edited_value("split/heldout", 0), "split/heldout block 0"),
    "missing chunk of progress/block_digests": (missing_chunk("progress/block_digests", 1),
                                               "array progress/block_digests holds no digests for blocks \\[1\\]"),
    "garbage chunk of progress/block_written": (garbage_chunk("progress/block_written", 0),
                                               "progress/block_written .* cannot be read"),
    "missing chunk of progress/block_written": (missing_chunk("progress/block_written", 1),
                                               "1 blocks have no written marker in progress/block_written"),
    "recorded digest edited": (edited_value("progress/block_digests", (0, 0)), "block 0"),
    "attribute layers: another valid pair": (set_attrs(layers=[0, 1]), "attribute layers"),
    "attribute pooling: another valid order": (changed_attr("pooling", _other_pooling), "attribute pooling"),
    "attribute targets: another top_k": (changed_attr("targets", _other_top_k), "attribute targets"),
    "attribute teacher: another path": (changed_attr("teacher", _other_teacher), "attribute teacher"),
    "attribute input_spec: another image size": (changed_attr("input_spec", _other_image_size),
                                                 "attribute input_spec"),
    "attribute hidden_size: another width": (set_attrs(hidden_size=32), "attribute hidden_size"),
    "attribute dtype: float16": (set_attrs(dtype="float16"), "attribute dtype"),
    "attribute complete: false": (set_attrs(complete=False), "incomplete"),
    "attribute schema_version: 3": (set_attrs(schema_version=3), "schema version 3"),
}


def test_the_undamaged_store_opens_and_reads(cache_store):
    open_like_training(cache_store)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_refused_naming_the_array(store_copy, kind):
    damage, names = DAMAGE[kind]
    damage(store_copy)
    with pytest.raises(AnchorStoreError, match=names) as excinfo:
        open_like_training(store_copy)
    error = excinfo.value
    assert str(store_copy) in str(error) and error.remedy, str(error)
    REFUSALS[kind] = str(error).splitlines()[0]


def _redigest(url: Path, algorithm: str | None) -> None:
    """Rewrite the block digests the way an earlier craft wrote them (``None``: before the
    digest_algorithm attribute existed, blake2b)."""
    from craft_core.store.layout import DIGESTS, LEGACY_DIGEST_ALGORITHM, block_digest

    store = open_anchor_store(url, verify=False)
    group = zarr.open_group(str(url), mode="r+")
    digests = np.zeros_like(group[DIGESTS][:])
    for block, (start, stop) in enumerate(store.blocks):
        values = store.read(start, stop, store.description.digest_arrays, verify=False)
        for column, name in enumerate(store.description.digest_arrays):
            digests[block, column] = block_digest(values[name], algorithm or LEGACY_DIGEST_ALGORITHM)
    group[DIGESTS][:] = digests
    if algorithm is None:
        del group.attrs["digest_algorithm"]
    else:
        group.attrs["digest_algorithm"] = algorithm


@pytest.mark.parametrize("algorithm", ["crc32+adler32", None])
def test_stores_digested_by_earlier_crafts_are_verified_too(store_copy, algorithm):
    _redigest(store_copy, algorithm)
    open_like_training(store_copy)
    garbage_chunk(INPUT_ARRAYS[0], 1)(store_copy)
    with pytest.raises(AnchorStoreError, match=INPUT_ARRAYS[0]):
        open_like_training(store_copy)
