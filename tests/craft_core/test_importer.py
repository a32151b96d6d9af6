"""Importing the first CRaFT tool's .pt-shard caches (shards written here, in its format)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from craft_core.importer import CacheImportError, import_pt_cache
from craft_core.store import AnchorDataset, AnchorStoreError, open_anchor_store

SIZES = (5, 5, 3)  # anchors per shard; with chunk_anchors=4 blocks straddle shards
T, H, L, V, D = 6, 16, 2, 2, 8


def write_cache(folder: Path, target: str = "teacher_hidden", sizes=SIZES, seed=0, metadata_extra=None) -> dict:
    """A cache as the first tool writes it; returns the concatenated tensors for comparison."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    everything: dict[str, list] = {}
    for index, size in enumerate(sizes):
        # Images as that tool made them: uint8 frames / 255 * 2 - 1, then a bilinear resize (off-grid values).
        pixels = torch.rand(size, 3, H, H, generator=gen) * 2 - 1
        ids = torch.randint(2, 100, (size, T), generator=gen)
        mask = torch.ones(size, T, dtype=torch.long)
        mask[:, 4:] = 0
        shard = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask,
                 "prompts": [f"prompt {index}-{i}" for i in range(size)]}
        if target == "teacher_hidden":
            shard["teacher_hidden"] = torch.randn(size, L, V, D, generator=gen)
            shard["meta"] = {"layers_to_save": [16, 17], "n_vecs": 2, "hidden_dim": D}
        elif target == "target_features":
            shard["target_features"] = torch.randn(size, D, generator=gen)
        else:
            shard["labels"] = torch.randint(-100, 50, (size, 9), generator=gen)
        torch.save(shard, folder / f"shard_{index:04d}.pt")
        for key, value in shard.items():
            everything.setdefault(key, []).append(value)
    metadata = {"num_anchors": sum(sizes), "num_shards": len(sizes), "layers_to_save": [-2, -1],
                "policy_pretrained_path": "physical-intelligence/pi0-fast", "dataset_repo_id": "lerobot/aloha_sim",
                "seed": 42, "cache_type": "hidden_state_anchoring"}
    metadata.update(metadata_extra or {})
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return {k: (torch.cat(v) if torch.is_tensor(v[0]) else v) for k, v in everything.items() if k != "meta"}


HIDDEN = "targets/prefix/hidden"


def read(url: str, path: str) -> np.ndarray:
    return zarr.open_group(url, mode="r")[path][:]


def test_import_hidden_state_cache(tmp_path):
    source = write_cache(tmp_path / "cache")
    url = str(tmp_path / "store.zarr")
    calls = []
    info = import_pt_cache(tmp_path / "cache", url, chunk_anchors=4, progress=lambda *a: calls.append(a))
    assert list(info["targets"]) == ["prefix"] and info["n_anchors"] == 13
    assert info["layers"] == [17, 18] and info["depth"] == 18 and info["hidden_size"] == D
    assert info["pooling"] == ["vision_token_mean", "text_token_last"]
    assert info["teacher"]["path"] == "physical-intelligence/pi0-fast"
    assert [c[:2] for c in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]

    expected_images = torch.round((source["pixel_values"] + 1) * 127.5).to(torch.uint8)[:, None].numpy()
    np.testing.assert_array_equal(read(url, "inputs/images"), expected_images)
    np.testing.assert_array_equal(read(url, "inputs/lang_tokens"), source["input_ids"].numpy().astype(np.int32))
    np.testing.assert_array_equal(read(url, "inputs/lang_masks"), source["attention_mask"].bool().numpy())
    assert read(url, "inputs/image_masks").all()
    np.testing.assert_array_equal(read(url, HIDDEN), source["teacher_hidden"].numpy())
    assert read(url, "provenance/task").tolist() == sum(source["prompts"], [])

    store = open_anchor_store(url)
    assert list(store.targets) == ["prefix"]
    error = store.attrs["source"]["pixel_quantisation_max_error"]
    assert 0 < error <= 1 / 255 + 1e-6  # half a uint8 step in [-1, 1] units
    assert len(store.heldout_indices) == 1 and len(store.train_indices) == 12
    dataset = AnchorDataset(url, split="heldout")
    np.testing.assert_array_equal(dataset[0]["targets"]["prefix"]["hidden"].numpy(),
                                  source["teacher_hidden"][store.heldout_indices[0]].numpy())


def test_import_target_features_cache(tmp_path):
    source = write_cache(tmp_path / "cache", target="target_features", metadata_extra={"hidden_layer": -2, "pooling": "mean_image_tokens"})
    with pytest.raises(CacheImportError, match="pass layers=.*depth="):
        import_pt_cache(tmp_path / "cache", str(tmp_path / "refused.zarr"))
    info = import_pt_cache(tmp_path / "cache", str(tmp_path / "s.zarr"), depth=4, dtype="float16")
    assert info["layers"] == [3] and info["pooling"] == ["vision_token_mean"] and info["dtype"] == "float16"
    stored = read(str(tmp_path / "s.zarr"), HIDDEN)
    assert stored.shape == (13, 1, 1, D)
    np.testing.assert_array_equal(stored[:, 0, 0], source["target_features"].numpy().astype(np.float16))


def test_import_token_level_cache(tmp_path, tiny_pi0_fast):
    """The first tool's label tokens become hard labels of an action_output target, in its own
    tokenisation: a pi0_fast student refuses them, saying why."""
    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy
    from craft_core.store import check_fits_student

    source = write_cache(tmp_path / "cache", target="labels")
    url = str(tmp_path / "s.zarr")
    info = import_pt_cache(tmp_path / "cache", url)
    assert list(info["targets"]) == ["action_output"] and info["targets"]["action_output"]["top_k"] == 0
    np.testing.assert_array_equal(read(url, "targets/action_output/labels"), source["labels"].numpy())
    sample = AnchorDataset(url, split="all")[7]
    assert torch.equal(sample["targets"]["action_output"]["labels"], source["labels"][7])
    with pytest.raises(AnchorStoreError, match="differ from the student's inputs|lays it out as"):
        check_fits_student(open_anchor_store(url), get_adapter(load_policy(tiny_pi0_fast)))


def test_interrupted_import_resumes_to_the_same_store(tmp_path):
    write_cache(tmp_path / "cache")
    reference = str(tmp_path / "ref.zarr")
    import_pt_cache(tmp_path / "cache", reference, chunk_anchors=4)

    def die_after_two_blocks(done, total, metrics):
        if done == 2:
            raise KeyboardInterrupt

    url = str(tmp_path / "s.zarr")
    with pytest.raises(KeyboardInterrupt):
        import_pt_cache(tmp_path / "cache", url, chunk_anchors=4, progress=die_after_two_blocks)
    with pytest.raises(AnchorStoreError, match="incomplete"):
        open_anchor_store(url)
    seen = []
    import_pt_cache(tmp_path / "cache", url, chunk_anchors=4, progress=lambda d, t, m: seen.append(d))
    assert seen == [1, 2, 3, 4]
    for path in (HIDDEN, "inputs/images", "inputs/lang_tokens", "split/heldout", "provenance/task"):
        np.testing.assert_array_equal(read(url, path), read(reference, path))


def _drop_key(key):
    def edit(folder: Path):
        shard = torch.load(folder / "shard_0001.pt", weights_only=True)
        del shard[key]
        torch.save(shard, folder / "shard_0001.pt")
    return edit


def _add_key(key, value):
    def edit(folder: Path):
        shard = torch.load(folder / "shard_0000.pt", weights_only=True)
        shard[key] = value
        torch.save(shard, folder / "shard_0000.pt")
    return edit


def _metadata(**changes):
    def edit(folder: Path):
        data = json.loads((folder / "metadata.json").read_text())
        data.update(changes)
        (folder / "metadata.json").write_text(json.dumps(data))
    return edit


def _remove_all_shards(folder: Path):
    for path in folder.glob("shard_*.pt"):
        path.unlink()


BAD_CACHES = {
    "no shards": (_remove_all_shards, "holds no shard_XXXX.pt files"),
    "missing input_ids": (_drop_key("input_ids"), r"shard_0001.pt lacks \['input_ids'\]"),
    "two targets": (_add_key("labels", torch.zeros(5, 3, dtype=torch.long)), "exactly one of"),
    "pixels not normalised": (_add_key("pixel_values", torch.full((5, 3, H, H), 200.0)), r"not within \[-1, 1\]"),
    "anchor count disagrees": (_metadata(num_anchors=20), "num_anchors=20 but the shards hold 13"),
    "unknown pooling": (_metadata(pooling=["max_pool", "text_last"]), r"unknown pooling \['max_pool'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_CACHES))
def test_import_refuses_bad_caches(tmp_path, case):
    edit, message = BAD_CACHES[case]
    write_cache(tmp_path / "cache")
    edit(tmp_path / "cache")
    with pytest.raises(CacheImportError, match=message):
        import_pt_cache(tmp_path / "cache", str(tmp_path / "s.zarr"))


def test_import_refuses_a_missing_folder(tmp_path):
    with pytest.raises(CacheImportError, match="is not a directory"):
        import_pt_cache(tmp_path / "nothing", str(tmp_path / "s.zarr"))
