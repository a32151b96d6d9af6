"""Import the ``.pt``-shard caches of CRaFT's first public tool into an anchor store.

That tool writes a directory of ``shard_XXXX.pt`` files (``torch.save`` of a dict per shard) and a
``metadata.json``. Each shard holds a batch of anchors:

- ``pixel_values`` ``[B, C, H, W]`` (or ``[B, n_cameras, C, H, W]``) float32 in [-1, 1], already
  at model resolution;
- ``input_ids`` / ``attention_mask`` ``[B, T]``: the right-padded prompt tokens;
- the teacher targets, one of ``teacher_hidden`` ``[B, L, V, D]`` (pooled hidden states),
  ``target_features`` ``[B, D]`` (one pooled vector) or ``labels`` ``[B, T']`` (token level);
- optionally ``prompts`` (list of str) and ``meta`` (dict; ``layers_to_save`` there counts
  transformer blocks from 0, i.e. Hugging Face hidden-state index minus one).

The store gets pi0_fast's prefix input names (``images`` uint8, ``image_masks``, ``lang_tokens``,
``lang_masks``); pooled hidden states become the ``prefix`` target, label tokens the hard labels of
an ``action_output`` target (``labels``, in the first tool's tokenisation, which no craft student
shares: such a store is refused by the student check with that reason). Pixels are quantised to uint8 (the store keeps images as uint8); the largest
quantisation error is recorded in the ``source`` attribute because the imported teacher targets
were computed from the unquantised pixels (and by the first tool's own prefix construction), so a
student copy reproduces them only approximately, unlike a store made by ``extract_anchors``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from craft_core.policies.base import ArraySpec
from craft_core.store import (
    AnchorStoreWriter,
    StoreLayout,
    finalize_store,
    heldout_mask,
    store_fingerprint,
    target_path,
)

HIDDEN = target_path("prefix", "hidden")
LABELS = target_path("action_output", "labels")

TARGET_KEYS = ("teacher_hidden", "target_features", "labels")
INPUT_KEYS = ("pixel_values", "input_ids", "attention_mask")
SHARD_PATTERN = re.compile(r"shard_(\d+)\.pt$")
# The first tool's pooling names and craft's.
POOLING_NAMES = {
    "mean_image_tokens": "vision_token_mean",
    "vision_mean": "vision_token_mean",
    "last_text_token": "text_token_last",
    "text_last": "text_token_last",
}
DEFAULT_POOLING = ["vision_token_mean", "text_token_last"]  # what its teacher_hidden shards hold


class CacheImportError(ValueError):
    """A ``.pt`` cache that cannot be imported; says which file/field and what to do."""


def find_shards(src_dir: str | Path) -> list[Path]:
    src = Path(src_dir)
    if not src.is_dir():
        raise CacheImportError(f"{src} is not a directory; pass the folder holding shard_XXXX.pt files")
    shards = sorted((p for p in src.iterdir() if SHARD_PATTERN.search(p.name)), key=lambda p: int(SHARD_PATTERN.search(p.name)[1]))
    if not shards:
        raise CacheImportError(f"{src} holds no shard_XXXX.pt files; is it a cache of the first CRaFT tool?")
    return shards


def _load(path: Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise CacheImportError(f"cannot read {path}: {exc}. Re-create or remove this shard.") from exc
    if not isinstance(data, dict):
        raise CacheImportError(f"{path} holds a {type(data).__name__}, expected a dict of tensors")
    return data


def _shard_kind(path: Path, shard: dict) -> str:
    missing = [key for key in INPUT_KEYS if key not in shard]
    if missing:
        raise CacheImportError(f"{path} lacks {missing} (keys present: {sorted(shard)})")
    targets = [key for key in TARGET_KEYS if key in shard]
    if len(targets) != 1:
        raise CacheImportError(
            f"{path} must hold exactly one of {list(TARGET_KEYS)}, found {targets} (keys present: {sorted(shard)})"
        )
    return targets[0]


def _as_cameras(pixels: torch.Tensor, path: Path) -> torch.Tensor:
    if pixels.ndim == 4:
        pixels = pixels[:, None]
    if pixels.ndim != 5:
        raise CacheImportError(f"{path}: pixel_values has shape {list(pixels.shape)}, expected [B, C, H, W] or [B, n_cameras, C, H, W]")
    return pixels


def _shard_arrays(path: Path, shard: dict, target: str) -> tuple[dict[str, np.ndarray], float]:
    """One shard as store arrays (without provenance/split) and its largest pixel quantisation error."""
    pixels = _as_cameras(shard["pixel_values"].float(), path)
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1.0 - 1e-4 or high > 1.0 + 1e-4:
        raise CacheImportError(
            f"{path}: pixel_values range [{low:.3f}, {high:.3f}] is not within [-1, 1]; this importer expects the "
            "first tool's normalised images"
        )
    unit = (pixels.clamp(-1.0, 1.0) + 1.0) / 2.0
    images = torch.round(unit * 255.0).to(torch.uint8)
    quantisation_error = float((images.float() / 255.0 * 2.0 - 1.0 - pixels).abs().max())
    n = pixels.shape[0]
    arrays = {
        "inputs/images": images.numpy(),
        "inputs/image_masks": np.ones((n, pixels.shape[1]), dtype=bool),
        "inputs/lang_tokens": shard["input_ids"].to(torch.int32).numpy(),
        "inputs/lang_masks": shard["attention_mask"].bool().numpy(),
    }
    values = shard[target]
    if target == "labels":
        arrays[LABELS] = values.to(torch.int64).numpy()
    else:
        values = values.float() if values.dtype not in (torch.float16, torch.float32) else values
        if target == "target_features":
            values = values[:, None, None, :]
        arrays[HIDDEN] = values.numpy()
    for name, array in arrays.items():
        if array.shape[0] != n:
            raise CacheImportError(f"{path}: {name} has {array.shape[0]} rows but pixel_values has {n}")
    return arrays, quantisation_error


def import_pt_cache(
    src_dir: str | Path,
    store_url: str,
    *,
    policy_type: str = "pi0_fast",
    depth: int | None = None,
    layers: Sequence[int] | None = None,
    pooling: Sequence[str] | None = None,
    dtype: str | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    chunk_anchors: int | None = None,
    shard_chunks: int | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Convert a ``.pt``-shard cache into a store of the right kind; returns the StoreInfo dict.

    ``depth`` (backbone blocks), ``layers`` (absolute hidden-state indices) and ``pooling``
    override what ``metadata.json`` / the shards' ``meta`` say. Re-running after an interruption
    resumes (blocks already written are skipped); the held-out split is a seeded random subset.
    """
    src = Path(src_dir).expanduser().absolute()
    shards = find_shards(src)
    metadata = json.loads((src / "metadata.json").read_text()) if (src / "metadata.json").is_file() else {}

    # First pass (memory-mapped): the kind, shapes and anchor count, without reading the pixels.
    first = _load(shards[0])
    target = _shard_kind(shards[0], first)
    sizes = []
    for path in shards:
        shard = first if path == shards[0] else _load(path)
        kind_here = _shard_kind(path, shard)
        if kind_here != target:
            raise CacheImportError(f"{path} holds {kind_here} but {shards[0].name} holds {target}: mixed caches cannot be imported")
        sizes.append(int(shard["pixel_values"].shape[0]))
    n_anchors = sum(sizes)
    if metadata.get("num_anchors") not in (None, n_anchors):
        raise CacheImportError(
            f"{src}/metadata.json says num_anchors={metadata['num_anchors']} but the shards hold {n_anchors}: "
            "a shard is missing or extra"
        )
    sample, _ = _shard_arrays(shards[0], {k: (v[:1] if torch.is_tensor(v) else v) for k, v in first.items()}, target)
    input_spec = {
        name.split("/", 1)[1]: ArraySpec(tuple(array.shape[1:]), str(array.dtype))
        for name, array in sample.items() if name.startswith("inputs/")
    }

    attrs: dict[str, Any] = {
        "teacher": {"policy_type": policy_type, "path": metadata.get("policy_pretrained_path"), "revision": None},
        "dataset": {"repo_id": metadata.get("dataset_repo_id"), "root": None, "revision": None},
        "sampling": {"n_anchors": n_anchors, "seed": metadata.get("seed"), "heldout_fraction": heldout_fraction,
                     "heldout_seed": seed},
        "source": {"format": "craft .pt shards", "dir": str(src), "target": target,
                   "files": [[p.name, p.stat().st_size] for p in shards], "cache_type": metadata.get("cache_type")},
    }
    if target != "labels":  # pooled hidden states: the prefix target
        teacher_shape = tuple(sample[HIDDEN].shape[1:])
        absolute_layers, depth = _layers_and_depth(first, metadata, target, teacher_shape[0], layers, depth, src)
        pooling = list(pooling) if pooling is not None else _pooling(metadata, target, teacher_shape[1], src)
        if len(pooling) != teacher_shape[1]:
            raise CacheImportError(f"pooling {pooling} names {len(pooling)} vectors but the teacher targets hold {teacher_shape[1]}")
        dtype = dtype or str(sample[HIDDEN].dtype)
        attrs.update(layers=absolute_layers, depth=depth, hidden_size=int(teacher_shape[2]), pooling=pooling,
                     dtype=dtype)
        targets = {"prefix": {"hidden": ArraySpec(teacher_shape, dtype)}}
        target_attrs = {"prefix": {"layers": absolute_layers, "pooling": pooling}}
    else:  # label tokens: hard labels of the action_output target (in the first tool's tokenisation)
        labels = sample[LABELS]
        attrs.update(layers=[], depth=depth, hidden_size=None, pooling=[], dtype=dtype or "float32")
        targets = {"action_output": {"labels": ArraySpec(tuple(labels.shape[1:]), str(labels.dtype))}}
        target_attrs = {"action_output": {"probe": "imported_labels", "top_k": 0, "loss": "hard_token_cross_entropy"}}
    attrs["fingerprint"] = store_fingerprint({"import": attrs, "dtype": dtype, "chunk_anchors": chunk_anchors,
                                              "shard_chunks": shard_chunks})
    layout = StoreLayout(n_anchors=n_anchors, input_spec=input_spec, targets=targets, target_attrs=target_attrs,
                         chunk_anchors=chunk_anchors, shard_chunks=shard_chunks, attrs=attrs)
    writer = AnchorStoreWriter(store_url, layout)
    done = writer.written_blocks()
    split = heldout_mask(n_anchors, heldout_fraction, seed=seed)

    # Second pass: stream the shards; a block is written once all its rows are loaded.
    pending: list[tuple[int, dict[str, np.ndarray]]] = []  # (first anchor, arrays) of shards still needed
    loaded_until, block, max_error = 0, 0, 0.0
    for path, size in zip(shards, sizes):
        shard_start, loaded_until = loaded_until, loaded_until + size
        if any(b not in done for b in _blocks_touching(writer.blocks, shard_start, loaded_until)):
            arrays, error = _store_rows(path, target, size, dtype)
            max_error = max(max_error, error)
            pending.append((shard_start, arrays))
        while block < len(writer.blocks) and writer.blocks[block][1] <= loaded_until:
            start, stop = writer.blocks[block]
            if block not in done:
                data = _rows(pending, start, stop)
                data["split/heldout"] = split[start:stop]
                writer.write_block(block, data)
            if progress is not None:
                progress(block + 1, len(writer.blocks), {"anchors_written": stop})
            pending = [(first_row, arrays) for first_row, arrays in pending
                       if first_row + len(arrays["inputs/images"]) > stop]
            block += 1
    writer.group.attrs.update(source={**attrs["source"], "pixel_quantisation_max_error": max_error})
    return finalize_store(store_url)


def _store_rows(path: Path, target: str, size: int, dtype: str | None) -> tuple[dict[str, np.ndarray], float]:
    shard = _load(path)
    arrays, error = _shard_arrays(path, shard, target)
    prompts = shard.get("prompts") or [""] * size
    if len(prompts) != size:
        raise CacheImportError(f"{path}: {len(prompts)} prompts for {size} anchors")
    arrays["provenance/task"] = np.array([str(p) for p in prompts])
    arrays["provenance/episode_index"] = np.full(size, -1, dtype=np.int64)  # not recorded by the first tool
    arrays["provenance/frame_index"] = np.full(size, -1, dtype=np.int64)
    if dtype is not None and HIDDEN in arrays:
        arrays[HIDDEN] = arrays[HIDDEN].astype(dtype)
    return arrays, error


def _blocks_touching(blocks: list[tuple[int, int]], start: int, stop: int) -> list[int]:
    return [i for i, (b0, b1) in enumerate(blocks) if b0 < stop and b1 > start]


def _rows(pending: list[tuple[int, dict[str, np.ndarray]]], start: int, stop: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for first_row, arrays in pending:
        lo, hi = max(start, first_row), min(stop, first_row + len(arrays["inputs/images"]))
        if lo < hi:
            for name, values in arrays.items():
                parts.setdefault(name, []).append(values[lo - first_row : hi - first_row])
    return {name: np.concatenate(values) for name, values in parts.items()}


def _layers_and_depth(first, metadata, target, n_layers, layers, depth, src) -> tuple[list[int], int | None]:
    meta = first.get("meta") if isinstance(first.get("meta"), dict) else {}
    requested = metadata.get("layers_to_save") or meta.get("layers_to_save")
    if layers is None and target == "teacher_hidden" and meta.get("layers_to_save") is not None:
        # The first tool records block numbers (hidden-state index - 1).
        layers = [int(layer) + 1 for layer in meta["layers_to_save"]]
    if layers is None and target == "target_features" and metadata.get("hidden_layer") is not None:
        requested = [int(metadata["hidden_layer"])]
    if depth is None and layers is not None and requested and any(int(r) < 0 for r in requested):
        depth = int(layers[0]) - int(requested[0]) - 1  # absolute = depth + 1 + negative index
    if layers is None and requested and depth is not None:
        layers = [int(r) + depth + 1 if int(r) < 0 else int(r) for r in requested]
    if layers is None or any(int(layer) < 0 for layer in layers):
        raise CacheImportError(
            f"{src}: cannot tell which absolute hidden-state layers the teacher targets come from "
            f"(recorded: {requested}); pass layers=[...] (absolute, 0 = embeddings) and depth= (backbone blocks)"
        )
    if len(layers) != n_layers:
        raise CacheImportError(f"{src}: layers {list(layers)} name {len(layers)} layers but the targets hold {n_layers}")
    return [int(layer) for layer in layers], depth


def _pooling(metadata, target, n_vectors, src) -> list[str]:
    recorded = metadata.get("pooling")
    if recorded is not None:
        names = [recorded] if isinstance(recorded, str) else list(recorded)
        unknown = [name for name in names if POOLING_NAMES.get(name, name) not in DEFAULT_POOLING + ["text_token_mean", "prefix_mean"]]
        if unknown:
            raise CacheImportError(f"{src}: unknown pooling {unknown} in metadata.json; pass pooling=[...] with craft's names")
        return [POOLING_NAMES.get(name, name) for name in names]
    if target == "teacher_hidden" and n_vectors == len(DEFAULT_POOLING):
        return list(DEFAULT_POOLING)
    raise CacheImportError(f"{src}: metadata.json does not say how the targets were pooled; pass pooling=[...]")
