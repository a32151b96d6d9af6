"""The anchor store's schema (v1): array paths, block layout, held-out split, fingerprint.

Layout (N anchors, chunked along N, every array with the same chunk length):

    teacher_hidden          [N, L, V, D] float16|float32   (kind "hidden_state")
    labels/<name>           [N, *spec.shape] spec.dtype    teacher target tokens (kind "token_level")
    inputs/<name>           [N, *spec.shape] spec.dtype    exact prefix inputs (adapter.input_spec())
    provenance/episode_index, provenance/frame_index [N] int64; provenance/task [N] str
    split/heldout           [N] bool                       anchors kept out of training (for drift eval)
    progress/block_written  [n_blocks] uint8, one Zarr chunk per block

A *block* is the unit of writing: one Zarr shard when sharding is on, else one chunk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from craft_core import __version__ as CRAFT_VERSION
from craft_core.policies.base import ArraySpec

SCHEMA_VERSION = 1
KINDS = ("hidden_state", "token_level")
TEACHER_DTYPES = ("float16", "float32")
DEFAULT_CHUNK_BYTES = 16 * 2**20

TEACHER = "teacher_hidden"
LABELS = "labels"  # a group: labels/<name> per label spec
HELDOUT = "split/heldout"
MARKERS = "progress/block_written"
PROVENANCE = {
    "provenance/episode_index": ArraySpec((), "int64"),
    "provenance/frame_index": ArraySpec((), "int64"),
    "provenance/task": ArraySpec((), "str"),
}


class AnchorStoreError(ValueError):
    """An anchor store that cannot be used; the message says what is wrong and what to do."""

    def __init__(self, url: str | Path, problem: str, remedy: str):
        super().__init__(f"anchor store {url}: {problem}. {remedy}")
        self.url = str(url)
        self.problem = problem
        self.remedy = remedy


# ---------------------------------------------------------------- layout of a new store


@dataclass
class StoreLayout:
    """Everything that fixes the arrays of a store before any anchor is written."""

    kind: str
    n_anchors: int
    input_spec: dict[str, ArraySpec]
    teacher_shape: tuple[int, int, int] | None = None  # (L, V, D), kind "hidden_state"
    teacher_dtype: str = "float16"
    labels_spec: dict[str, ArraySpec] | None = None  # per-anchor label arrays, kind "token_level"
    chunk_anchors: int | None = None  # None: chosen so the widest array's chunks are ~16 MB
    shard_chunks: int | None = None  # chunks per Zarr shard; None = no sharding
    attrs: dict[str, Any] = field(default_factory=dict)  # teacher/dataset identity, layers, pooling...

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"store kind must be one of {KINDS}, got {self.kind!r}")
        if self.n_anchors < 1:
            raise ValueError(f"n_anchors must be >= 1, got {self.n_anchors}")
        if self.kind == "hidden_state":
            if self.teacher_shape is None or len(self.teacher_shape) != 3:
                raise ValueError("a hidden_state store needs teacher_shape = (layers, pooled vectors, hidden size)")
            if self.teacher_dtype not in TEACHER_DTYPES:
                raise ValueError(f"teacher dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        if self.kind == "token_level" and self.labels_spec is None:
            raise ValueError("a token_level store needs labels_spec (per-anchor shapes and dtypes of the label arrays)")
        if self.chunk_anchors is None:
            self.chunk_anchors = default_chunk_anchors(self.per_anchor_specs(), self.n_anchors)
        self.chunk_anchors = min(int(self.chunk_anchors), self.n_anchors)

    def per_anchor_specs(self) -> dict[str, ArraySpec]:
        """Every anchor-indexed array of the store, by path."""
        specs: dict[str, ArraySpec] = {}
        if self.kind == "hidden_state":
            specs[TEACHER] = ArraySpec(tuple(self.teacher_shape), self.teacher_dtype)
        else:
            for name, spec in self.labels_spec.items():
                specs[f"{LABELS}/{name}"] = spec
        for name, spec in self.input_spec.items():
            specs[f"inputs/{name}"] = spec
        specs.update(PROVENANCE)
        specs[HELDOUT] = ArraySpec((), "bool")
        return specs

    @property
    def block_anchors(self) -> int:
        return self.chunk_anchors * (self.shard_chunks or 1)


def default_chunk_anchors(specs: dict[str, ArraySpec], n_anchors: int, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Anchors per chunk so that the widest array's chunks hold about ``target_bytes``."""
    widest = max(_bytes_per_anchor(spec) for spec in specs.values())
    return max(1, min(n_anchors, target_bytes // max(widest, 1)))


def _bytes_per_anchor(spec: ArraySpec) -> int:
    itemsize = 16 if spec.dtype == "str" else np.dtype(spec.dtype).itemsize
    return int(np.prod(spec.shape, dtype=np.int64)) * itemsize


def block_ranges(n_anchors: int, block_anchors: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_anchors, n_anchors)) for start in range(0, n_anchors, block_anchors)]


def worker_blocks(n_blocks: int, shard: tuple[int, int] | None) -> list[int]:
    """The blocks written by worker ``i`` of ``n``: one contiguous, disjoint range of blocks each."""
    if shard is None:
        return list(range(n_blocks))
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    return list(range(n_blocks * index // count, n_blocks * (index + 1) // count))


def heldout_mask(n_anchors: int, heldout_fraction: float, seed: int | None = None) -> np.ndarray:
    """``round(fraction * N)`` anchors (at least one, never all) kept out of training.

    With ``seed=None`` these are the last anchors: extraction stores anchors in a seeded random
    order, so the tail is a random subset, and a contiguous tail makes evaluation read whole
    chunks. Stores whose order is not random (imports) pass a seed for a random subset instead.
    """
    n_heldout = int(round(heldout_fraction * n_anchors))
    if heldout_fraction > 0 and n_anchors > 1:
        n_heldout = min(max(n_heldout, 1), n_anchors - 1)
    mask = np.zeros(n_anchors, dtype=bool)
    if seed is None:
        mask[n_anchors - n_heldout :] = True
    else:
        mask[np.random.default_rng(seed).choice(n_anchors, size=n_heldout, replace=False)] = True
    return mask


def store_fingerprint(content: dict[str, Any]) -> str:
    """Hash of everything that decides a store's content (config, teacher, dataset, craft version)."""
    payload = {"content": content, "schema_version": SCHEMA_VERSION, "craft_version": CRAFT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_group(url: str | Path, mode: str) -> zarr.Group:
    return zarr.open_group(str(url), mode=mode, zarr_format=3)
