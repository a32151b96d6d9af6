"""The anchor store's schema (v2): array paths, block layout, digests, held-out split, fingerprint.

Layout (N anchors, chunked along N, every array with the same chunk length):

    targets/<target>/<array>  [N, *spec.shape]      the teacher's retention targets, one group per
                                                    target (``prefix``: ``hidden [L, V, D]``;
                                                    ``action_output``: probes and outputs, see the
                                                    policy adapters); described by attrs["targets"]
    inputs/<name>             [N, *spec.shape]      exact model inputs (adapter.input_spec(targets))
    provenance/episode_index, provenance/frame_index [N] int64; provenance/task [N] str
    split/heldout             [N] bool              anchors kept out of training (for drift eval)
    progress/block_written    [n_blocks] uint8      one Zarr chunk per block: written last
    progress/block_digests    [n_blocks, n_arrays] uint64   per block and array, a digest of the
                                                    decoded values (order: attrs["digest_arrays"])

A *block* is the unit of writing: one Zarr shard when sharding is on, else one chunk. Digests are
taken of the decoded values, so a missing chunk (which Zarr would read as fill values), a
truncated or garbage one is caught whatever the codec (a missing chunk of a block marked written is
never read as data: its fill values do not match the block's digest, unless the block really held
only fill values). ``attrs["identity_digest"]`` covers every identity-bearing attribute (layers,
pooling, targets, teacher, input spec...), so an attribute changed to another valid value is caught
too; ``attrs["identity_digests"]`` (one per attribute) lets the refusal name it.

Schema v1 stores (``teacher_hidden`` or ``labels/*``, no digests) are still read, as legacy: as targets
``[prefix]`` (kind ``hidden_state``) or ``[action_output]`` with hard labels (kind ``token_level``).
They carry no digests, so damage to their chunks cannot be detected: opening one warns and says to
re-run the cache stage for a verified store.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zarr

from craft_core import __version__ as CRAFT_VERSION
from craft_core.policies.base import ArraySpec

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
TARGET_DTYPES = ("float16", "float32")
DEFAULT_CHUNK_BYTES = 16 * 2**20

TARGETS = "targets"  # a group: targets/<target>/<array>
HELDOUT = "split/heldout"
MARKERS = "progress/block_written"
DIGESTS = "progress/block_digests"
PROVENANCE = {
    "provenance/episode_index": ArraySpec((), "int64"),
    "provenance/frame_index": ArraySpec((), "int64"),
    "provenance/task": ArraySpec((), "str"),
}

# Schema v1 paths, read as targets.
V1_TEACHER = "teacher_hidden"
V1_LABELS = "labels"
V1_LABEL_NAMES = {"action_tokens": "tokens", "action_token_mask": "token_mask"}

# Attributes that say what the store holds; their digest is recorded at creation and checked on open.
IDENTITY_ATTRS = (
    "schema_version", "n_anchors", "chunk_anchors", "shard_chunks", "block_anchors", "n_blocks", "input_spec",
    "targets", "digest_arrays", "layers", "pooling", "depth", "hidden_size", "dtype", "teacher", "dataset",
    "sampling", "compute", "fingerprint", "noise_seed",
)


class AnchorStoreError(ValueError):
    """An anchor store that cannot be used; the message says what is wrong and what to do."""

    def __init__(self, url: str | Path, problem: str, remedy: str):
        super().__init__(f"anchor store {url}: {problem}. {remedy}")
        self.url = str(url)
        self.problem = problem
        self.remedy = remedy


def target_path(target: str, array: str) -> str:
    return f"{TARGETS}/{target}/{array}"


def input_path(name: str) -> str:
    return f"inputs/{name}"


# ---------------------------------------------------------------- layout of a new store


@dataclass
class StoreLayout:
    """Everything that fixes the arrays of a store before any anchor is written."""

    n_anchors: int
    input_spec: dict[str, ArraySpec]
    targets: dict[str, dict[str, ArraySpec]]  # target -> array -> per-anchor spec
    target_attrs: dict[str, dict] = field(default_factory=dict)  # target -> what describes it (probe kind, k...)
    chunk_anchors: int | None = None  # None: chosen so the widest array's chunks are ~16 MB
    shard_chunks: int | None = None  # chunks per Zarr shard; None = no sharding
    attrs: dict[str, Any] = field(default_factory=dict)  # teacher/dataset identity, layers, pooling...

    def __post_init__(self) -> None:
        if self.n_anchors < 1:
            raise ValueError(f"n_anchors must be >= 1, got {self.n_anchors}")
        if not self.targets:
            raise ValueError("a store needs at least one retention target")
        for target, arrays in self.targets.items():
            if not arrays:
                raise ValueError(f"target {target!r} has no arrays")
        if self.chunk_anchors is None:
            self.chunk_anchors = default_chunk_anchors(self.per_anchor_specs(), self.n_anchors)
        self.chunk_anchors = min(int(self.chunk_anchors), self.n_anchors)

    def per_anchor_specs(self) -> dict[str, ArraySpec]:
        """Every anchor-indexed array of the store, by path, in digest order."""
        specs: dict[str, ArraySpec] = {}
        for target, arrays in self.targets.items():
            for name, spec in arrays.items():
                specs[target_path(target, name)] = spec
        for name, spec in self.input_spec.items():
            specs[input_path(name)] = spec
        specs.update(PROVENANCE)
        specs[HELDOUT] = ArraySpec((), "bool")
        return specs

    def targets_attr(self) -> dict[str, dict]:
        return {
            target: {**self.target_attrs.get(target, {}),
                     "arrays": {name: spec.to_json() for name, spec in arrays.items()}}
            for target, arrays in self.targets.items()
        }

    @property
    def block_anchors(self) -> int:
        return self.chunk_anchors * (self.shard_chunks or 1)


def default_chunk_anchors(specs: dict[str, ArraySpec], n_anchors: int, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Anchors per chunk so that the widest array's chunks hold about ``target_bytes``."""
    widest = max(bytes_per_anchor(spec) for spec in specs.values())
    return max(1, min(n_anchors, target_bytes // max(widest, 1)))


def bytes_per_anchor(spec: ArraySpec) -> int:
    """Uncompressed bytes of one anchor's entry of an array (strings counted at 16 bytes)."""
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


# How block digests are computed: recorded in attrs["digest_algorithm"]. xxh3_64 detects accidental
# damage (missing, truncated, garbage, swapped chunks) at ~25 GB/s on one core, so checking every
# block as it is read costs a few per cent of decoding it (benchmarks/bench_store.py; zlib's
# crc32+adler32, used before, cost ~20 %). Stores written with the older algorithms are still read.
DIGEST_ALGORITHM = "xxh3_64"
LEGACY_DIGEST_ALGORITHM = "blake2b"  # stores written before attrs["digest_algorithm"] existed
DIGEST_ALGORITHMS = (DIGEST_ALGORITHM, "crc32+adler32", LEGACY_DIGEST_ALGORITHM)


def block_digest(values: np.ndarray, algorithm: str = DIGEST_ALGORITHM) -> int:
    """64-bit digest of an array's decoded values (dtype, shape and bytes), never 0."""
    values = np.asarray(values)
    if values.dtype.kind in ("U", "O", "T"):  # text: its characters, whatever string dtype decodes it
        header, data = f"str{values.shape}".encode(), "\0".join(str(v) for v in values.reshape(-1)).encode()
    else:
        header, data = f"{values.dtype.str}{values.shape}".encode(), memoryview(np.ascontiguousarray(values)).cast("B")
    if algorithm == "xxh3_64":
        digest = xxhash.xxh3_64(header)
        digest.update(data)
        return digest.intdigest() or 1
    if algorithm == "crc32+adler32":
        crc = zlib.crc32(data, zlib.crc32(header))
        adler = zlib.adler32(data, zlib.adler32(header))
        return (crc << 32 | adler) or 1
    if algorithm != LEGACY_DIGEST_ALGORITHM:
        raise ValueError(f"unknown digest algorithm {algorithm!r}; this craft knows {list(DIGEST_ALGORITHMS)}")
    digest = hashlib.blake2b(digest_size=8)
    digest.update(header)
    digest.update(data)
    return int.from_bytes(digest.digest(), "little") or 1


def identity_digest(attrs: dict) -> str:
    """Digest of the identity-bearing attributes (``IDENTITY_ATTRS``) of a store."""
    identity = {key: attrs.get(key) for key in IDENTITY_ATTRS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def identity_digests(attrs: dict) -> dict[str, str]:
    """One digest per identity-bearing attribute, so a refusal can name the attribute that changed."""
    return {key: hashlib.sha256(json.dumps(attrs.get(key), sort_keys=True, default=str).encode()).hexdigest()[:16]
            for key in IDENTITY_ATTRS}


def open_group(url: str | Path, mode: str) -> zarr.Group:
    return zarr.open_group(str(url), mode=mode, zarr_format=3)
