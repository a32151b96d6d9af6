"""The anchor store: one Zarr v3 group per cache of teacher targets (schema v1).

Layout (N anchors, chunked along N, every array with the same chunk length):

    teacher_hidden          [N, L, V, D] float16|float32   (kind "hidden_state")
    labels/<name>           [N, *spec.shape] spec.dtype    teacher target tokens (kind "token_level")
    inputs/<name>           [N, *spec.shape] spec.dtype    exact prefix inputs (adapter.input_spec())
    provenance/episode_index, provenance/frame_index [N] int64; provenance/task [N] str
    split/heldout           [N] bool                       anchors kept out of training (for drift eval)
    progress/block_written  [n_blocks] uint8, one Zarr chunk per block

A *block* is the unit of writing: one Zarr shard when sharding is on, else one chunk. A block's
data is written first and its marker after it, so a writer killed between the two just rewrites
that block on resume; writers of disjoint blocks never touch the same object, which is what lets
several workers fill one store. ``complete`` is set last, by :func:`finalize_store`, after every
marker is present and the content validates.

Everything that writes or validates the layout lives here; extraction and the importer only
produce blocks of numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from craft_core import __version__ as CRAFT_VERSION
from craft_core.adapters.base import ArraySpec

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


# ---------------------------------------------------------------- writing


def _open_group(url: str | Path, mode: str) -> zarr.Group:
    return zarr.open_group(str(url), mode=mode, zarr_format=3)


def _compressors(dtype: str):
    if dtype in ("str", "bool"):
        return "auto"
    # Byte-shuffling groups the high bytes of float16/float32 values, which zstd then compresses.
    shuffle = "noshuffle" if np.dtype(dtype).itemsize == 1 else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


class AnchorStoreWriter:
    """Creates (or re-opens for resume) a store and writes it block by block."""

    def __init__(self, url: str | Path, layout: StoreLayout):
        self.url = str(url)
        self.layout = layout
        self.blocks = block_ranges(layout.n_anchors, layout.block_anchors)
        self.group = self._create_or_reopen()

    def _create_or_reopen(self) -> zarr.Group:
        layout = self.layout
        fingerprint = layout.attrs.get("fingerprint")
        try:
            group = _open_group(self.url, "a")
        except zarr.errors.ContainsGroupError:
            # Another worker created the root group between our existence check and our write.
            group = _open_group(self.url, "r+")
        existing = dict(group.attrs)
        if existing.get("fingerprint") not in (None, fingerprint):
            raise AnchorStoreError(
                self.url,
                f"it already holds a cache with another fingerprint ({existing.get('fingerprint')}, "
                f"this extraction is {fingerprint}: the config, teacher or dataset differ)",
                "Delete the store or write to another path.",
            )
        if existing.get("complete") and existing.get("fingerprint") == fingerprint:
            return group
        # Existing arrays are kept as they are (never overwritten): another worker may be filling them.
        for path, spec in layout.per_anchor_specs().items():
            chunks = (layout.chunk_anchors, *spec.shape)
            shards = None if layout.shard_chunks is None else (layout.block_anchors, *spec.shape)
            dtype = str if spec.dtype == "str" else spec.dtype
            self._create_array(group, path, (layout.n_anchors, *spec.shape), chunks, shards, dtype, spec.dtype)
        self._create_array(group, MARKERS, (len(self.blocks),), (1,), None, "uint8", "uint8")
        if "fingerprint" not in existing:
            group.attrs.update(self._initial_attrs())
        return group

    def _create_array(self, group, path, shape, chunks, shards, dtype, dtype_name) -> None:
        try:
            group.create_array(
                path, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                compressors=_compressors(dtype_name), fill_value=_fill_value(dtype_name),
            )
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError):
            existing = group[path]
            if tuple(existing.shape) != tuple(shape):
                raise AnchorStoreError(
                    self.url, f"existing array {path} has shape {existing.shape}, expected {shape}",
                    "Delete the store or write to another path.",
                ) from None

    def _initial_attrs(self) -> dict[str, Any]:
        layout = self.layout
        attrs = dict(layout.attrs)
        attrs.update(
            schema_version=SCHEMA_VERSION,
            kind=layout.kind,
            complete=False,
            n_anchors=layout.n_anchors,
            n_heldout=None,
            input_spec={name: spec.to_json() for name, spec in layout.input_spec.items()},
            chunk_anchors=layout.chunk_anchors,
            shard_chunks=layout.shard_chunks,
            block_anchors=layout.block_anchors,
            n_blocks=len(self.blocks),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            craft_version=CRAFT_VERSION,
        )
        if layout.kind == "hidden_state":
            attrs["teacher_hidden_dtype"] = layout.teacher_dtype
        else:
            attrs["labels_spec"] = {name: spec.to_json() for name, spec in layout.labels_spec.items()}
        return attrs

    def written_blocks(self) -> set[int]:
        markers = self.group[MARKERS][:]
        return {int(i) for i in np.flatnonzero(markers)}

    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array of one block, then its marker (the order is what makes resume safe)."""
        start, stop = self.blocks[block]
        specs = self.layout.per_anchor_specs()
        missing = sorted(set(specs) - set(arrays))
        unknown = sorted(set(arrays) - set(specs))
        if missing or unknown:
            raise ValueError(f"block {block}: missing arrays {missing}, unknown arrays {unknown}")
        for path, spec in specs.items():
            values = np.asarray(arrays[path])
            expected = (stop - start, *spec.shape)
            if tuple(values.shape) != expected:
                raise ValueError(f"block {block}: {path} has shape {tuple(values.shape)}, expected {expected}")
            if spec.dtype != "str" and values.dtype != np.dtype(spec.dtype):
                raise ValueError(f"block {block}: {path} has dtype {values.dtype}, expected {spec.dtype}")
            if path == TEACHER and not np.isfinite(values).all():
                raise ValueError(
                    f"block {block}: the teacher produced non-finite hidden states (anchors {start}..{stop - 1}); "
                    "check the teacher weights and dtype (float16 overflows above 65504)"
                )
        for path in specs:
            self.group[path][start:stop] = arrays[path]
        self.group[MARKERS][block] = 1

    def finalize(self) -> dict:
        return finalize_store(self.url)


def _fill_value(dtype: str):
    if dtype == "str":
        return ""
    if dtype == "bool":
        return False
    return 0


def finalize_store(url: str | Path) -> dict:
    """Check that every block is written and the content is valid, then set ``complete`` last."""
    group = _open_group(url, "r+")
    attrs = dict(group.attrs)
    if attrs.get("complete"):
        return open_anchor_store(url).info()
    _check_structure(str(url), group, attrs, require_complete=False)
    missing = np.flatnonzero(group[MARKERS][:] == 0)
    if len(missing):
        raise AnchorStoreError(
            url,
            f"{len(missing)} of {attrs['n_blocks']} blocks are not written yet (first: {missing[:5].tolist()})",
            "Run the remaining extraction workers (or re-run the extraction to resume), then finalize again.",
        )
    _check_values(str(url), group, attrs)
    heldout = group[HELDOUT][:]
    group.attrs.update(n_heldout=int(heldout.sum()))
    group.attrs.update(complete=True)
    return open_anchor_store(url).info()


# ---------------------------------------------------------------- validation and reading


class AnchorStore:
    """A validated, read-only handle on a complete store."""

    def __init__(self, url: str | Path, group: zarr.Group, attrs: dict):
        self.url = str(url)
        self.group = group
        self.attrs = attrs
        self.kind: str = attrs["kind"]
        self.n_anchors: int = int(attrs["n_anchors"])
        self.chunk_anchors: int = int(attrs["chunk_anchors"])
        self.input_spec = {name: ArraySpec.from_json(spec) for name, spec in attrs["input_spec"].items()}
        self.labels_spec = {name: ArraySpec.from_json(spec) for name, spec in (attrs.get("labels_spec") or {}).items()}
        self.heldout = group[HELDOUT][:].astype(bool)

    @property
    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.heldout)

    @property
    def heldout_indices(self) -> np.ndarray:
        return np.flatnonzero(self.heldout)

    def array_names(self) -> list[str]:
        targets = [TEACHER] if self.kind == "hidden_state" else [f"{LABELS}/{name}" for name in self.labels_spec]
        return [*targets, *(f"inputs/{name}" for name in self.input_spec)]

    def read(self, start: int, stop: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """A contiguous range of anchors, as numpy arrays keyed by array path."""
        return {name: self.group[name][start:stop] for name in (names or self.array_names())}

    def provenance(self) -> dict[str, np.ndarray]:
        return {path.split("/", 1)[1]: self.group[path][:] for path in PROVENANCE}

    def info(self) -> dict:
        """The StoreInfo dict: what downstream stages need to know, JSON-able."""
        attrs = self.attrs
        return {
            "store_url": self.url,
            "schema_version": attrs["schema_version"],
            "kind": self.kind,
            "n_anchors": self.n_anchors,
            "n_heldout": int(self.heldout.sum()),
            "n_train": int((~self.heldout).sum()),
            "layers": attrs.get("layers"),
            "depth": attrs.get("depth"),
            "hidden_size": attrs.get("hidden_size"),
            "pooling": attrs.get("pooling"),
            "dtype": attrs.get("teacher_hidden_dtype"),
            "teacher": attrs.get("teacher"),
            "dataset": attrs.get("dataset"),
            "input_spec": attrs["input_spec"],
            "labels_spec": attrs.get("labels_spec"),
            "chunk_anchors": self.chunk_anchors,
            "shard_chunks": attrs.get("shard_chunks"),
            "fingerprint": attrs.get("fingerprint"),
        }


def open_anchor_store(
    url: str | Path,
    *,
    expect_kind: str | None = None,
    n_anchors: int | None = None,
    student_adapter: Any = None,
    teacher_policy_type: str | None = None,
    layers: Sequence[int] | None = None,
    hidden_size: int | None = None,
    check_values: bool = True,
) -> AnchorStore:
    """Open a store and refuse, with what is wrong and what to do, anything it cannot be used for.

    ``expect_kind`` is the kind the retention mode needs; ``student_adapter`` (a PolicyAdapter of the
    student) or ``teacher_policy_type`` / ``layers`` / ``hidden_size`` describe what the consumer
    will compare the teacher targets with.
    """
    url = str(url)
    try:
        group = _open_group(url, "r")
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError, zarr.errors.BaseZarrError) as exc:
        raise AnchorStoreError(
            url, f"no Zarr v3 group found there ({type(exc).__name__}: {exc})",
            "Run the cache stage (extract_anchors) or import_pt_cache to create it, or fix the path.",
        ) from None
    attrs = dict(group.attrs)
    _check_structure(url, group, attrs, require_complete=True)
    markers = group[MARKERS][:]
    if not markers.all():
        raise AnchorStoreError(
            url, f"it is marked complete but {int((markers == 0).sum())} blocks have no written marker",
            "The store was modified after extraction: delete it and re-run the cache stage.",
        )
    if check_values:
        _check_values(url, group, attrs)
    store = AnchorStore(url, group, attrs)
    if int(attrs.get("n_heldout") or 0) != int(store.heldout.sum()):
        raise AnchorStoreError(
            url, f"attribute n_heldout={attrs.get('n_heldout')} but split/heldout marks {int(store.heldout.sum())} anchors",
            "The split was modified after extraction: delete the store and re-run the cache stage.",
        )
    _check_expectations(
        store, expect_kind=expect_kind, n_anchors=n_anchors, student_adapter=student_adapter,
        teacher_policy_type=teacher_policy_type, layers=layers, hidden_size=hidden_size,
    )
    return store


_RERUN = "Delete the store and re-run the cache stage (or the importer)."


def _check_structure(url: str, group: zarr.Group, attrs: dict, *, require_complete: bool) -> None:
    """Schema, completeness, arrays present, shapes and dtypes agreeing with the attributes."""
    if "schema_version" not in attrs:
        raise AnchorStoreError(
            url, "the group has no schema_version attribute, so it is not an anchor store (or its creation was cut short)",
            "Point to a store made by craft's cache stage, or delete this one and re-run extraction.",
        )
    if attrs["schema_version"] != SCHEMA_VERSION:
        raise AnchorStoreError(
            url, f"schema version {attrs['schema_version']!r} is not supported (this craft reads version {SCHEMA_VERSION})",
            "Re-create the store with this craft version (re-run the cache stage).",
        )
    if require_complete and attrs.get("complete") is not True:
        raise AnchorStoreError(
            url, "it is incomplete (`complete` is not set: the extraction was interrupted or is still running)",
            "Re-run the cache stage with the same config to resume it, or finalize_store() once all workers are done.",
        )
    kind = attrs.get("kind")
    if kind not in KINDS:
        raise AnchorStoreError(url, f"unknown kind {kind!r} (expected one of {KINDS})", _RERUN)
    n_anchors = attrs.get("n_anchors")
    if not isinstance(n_anchors, int) or n_anchors < 1:
        raise AnchorStoreError(url, f"attribute n_anchors={n_anchors!r} is not a positive integer", _RERUN)
    try:
        input_spec = {name: ArraySpec.from_json(spec) for name, spec in attrs["input_spec"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise AnchorStoreError(url, f"attribute input_spec is missing or malformed ({exc})", _RERUN) from None

    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    if kind == "hidden_state":
        layers, pooling, hidden = attrs.get("layers"), attrs.get("pooling"), attrs.get("hidden_size")
        if not (isinstance(layers, list) and isinstance(pooling, list) and isinstance(hidden, int)):
            raise AnchorStoreError(
                url, f"attributes layers={layers!r}, pooling={pooling!r}, hidden_size={hidden!r} must be two lists and an int",
                _RERUN,
            )
        expected[TEACHER] = ((n_anchors, len(layers), len(pooling), hidden), attrs.get("teacher_hidden_dtype"))
    else:
        try:
            labels_spec = {name: ArraySpec.from_json(spec) for name, spec in attrs["labels_spec"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AnchorStoreError(url, f"attribute labels_spec is missing or malformed ({exc})", _RERUN) from None
        for name, spec in labels_spec.items():
            expected[f"{LABELS}/{name}"] = ((n_anchors, *spec.shape), spec.dtype)
    for name, spec in input_spec.items():
        expected[f"inputs/{name}"] = ((n_anchors, *spec.shape), spec.dtype)
    for path, spec in PROVENANCE.items():
        expected[path] = ((n_anchors,), spec.dtype)
    expected[HELDOUT] = ((n_anchors,), "bool")
    expected[MARKERS] = ((attrs.get("n_blocks"),), "uint8")

    for path, (shape, dtype) in expected.items():
        try:
            array = group[path]
        except KeyError:
            raise AnchorStoreError(
                url, f"array {path} is missing (a {kind} store holds {sorted(expected)})", _RERUN
            ) from None
        if not isinstance(array, zarr.Array):
            raise AnchorStoreError(url, f"{path} is a group, expected an array", _RERUN)
        if tuple(array.shape) != tuple(shape):
            what = "n_anchors" if array.shape[:1] != shape[:1] else "the attributes (layers, pooling, hidden_size, input_spec)"
            raise AnchorStoreError(
                url, f"array {path} has shape {tuple(array.shape)} but {what} say {tuple(shape)}", _RERUN
            )
        if dtype == "str":
            if array.dtype.kind not in ("T", "U", "O"):
                raise AnchorStoreError(url, f"array {path} has dtype {array.dtype}, expected text", _RERUN)
        elif array.dtype != np.dtype(dtype):
            raise AnchorStoreError(
                url, f"array {path} has dtype {array.dtype} but the attributes say {dtype}", _RERUN
            )


def _check_values(url: str, group: zarr.Group, attrs: dict) -> None:
    if attrs["kind"] != "hidden_state":
        return
    teacher = group[TEACHER]
    step = teacher.chunks[0]
    for start in range(0, teacher.shape[0], step):
        values = teacher[start : start + step]
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite.all():
            bad = (start + np.flatnonzero(~finite)).tolist()
            raise AnchorStoreError(
                url, f"teacher_hidden holds non-finite values (NaN/inf) at anchors {bad[:10]}",
                "Re-run extraction with dtype float32 or check the teacher weights; then delete this store.",
            )


def _check_expectations(
    store: AnchorStore, *, expect_kind, n_anchors, student_adapter, teacher_policy_type, layers, hidden_size
) -> None:
    url, attrs = store.url, store.attrs
    if expect_kind is not None and expect_kind != store.kind:
        mode = {"hidden_state": "hidden-state anchoring", "token_level": "token-level distillation"}
        raise AnchorStoreError(
            url, f"it is a {store.kind} cache but the requested retention mode needs a {expect_kind} cache",
            f"Use a {expect_kind} store, or switch the retention mode to {mode.get(store.kind, store.kind)}.",
        )
    if n_anchors is not None and n_anchors != store.n_anchors:
        raise AnchorStoreError(
            url, f"it holds {store.n_anchors} anchors but {n_anchors} were requested",
            "Re-run the cache stage with this n_anchors (to another path), or request the store's n_anchors.",
        )
    teacher = attrs.get("teacher") or {}
    if student_adapter is not None:
        teacher_policy_type = teacher_policy_type or student_adapter.policy_type
        hidden_size = hidden_size or student_adapter.hidden_size
        if attrs.get("depth") is not None and attrs["depth"] != student_adapter.depth:
            raise AnchorStoreError(
                url, f"the teacher's backbone has depth {attrs['depth']} but the student's has {student_adapter.depth}",
                "Fine-tune a copy of the teacher the store was made with, or re-run the cache stage with the student's base model.",
            )
        stored_spec = store.input_spec
        student_spec = {name: ArraySpec.from_json(spec.to_json()) for name, spec in student_adapter.input_spec().items()}
        if stored_spec != student_spec:
            raise AnchorStoreError(
                url, f"stored inputs {_spec_text(stored_spec)} differ from the student's prefix inputs {_spec_text(student_spec)}",
                "The student must see the same prefix as the teacher (same policy type, image size, tokenizer length): "
                "re-run the cache stage with the student's base model.",
            )
        if store.kind == "token_level":
            student_labels = getattr(student_adapter, "label_spec", None)
            if student_labels is None:
                raise AnchorStoreError(
                    url, f"it is a token_level cache but the {student_adapter.policy_type} adapter has no token-level labels",
                    "Use a hidden_state cache for this policy.",
                )
            wanted = {name: ArraySpec.from_json(spec.to_json()) for name, spec in student_labels().items()}
            if wanted != store.labels_spec:
                raise AnchorStoreError(
                    url, f"stored labels {_spec_text(store.labels_spec)} differ from the student's token-level labels "
                    f"{_spec_text(wanted)}",
                    "Import or extract the labels in the student's format (adapter.label_spec()).",
                )
    if teacher_policy_type is not None and teacher.get("policy_type") not in (None, teacher_policy_type):
        raise AnchorStoreError(
            url, f"the teacher is a {teacher.get('policy_type')} policy but the student is {teacher_policy_type}",
            "Use a store made from the student's base model (re-run the cache stage with it as teacher).",
        )
    if store.kind == "hidden_state":
        if hidden_size is not None and hidden_size != attrs["hidden_size"]:
            raise AnchorStoreError(
                url, f"teacher hidden size {attrs['hidden_size']} differs from the student's {hidden_size}",
                "Use a store made from the student's base model (re-run the cache stage with it as teacher).",
            )
        if layers is not None:
            depth = attrs.get("depth")
            requested = [layer + depth + 1 if layer < 0 and depth is not None else layer for layer in layers]
            if requested != list(attrs["layers"]):
                raise AnchorStoreError(
                    url, f"it holds layers {attrs['layers']} (absolute, depth {depth}) but layers {list(layers)} were requested",
                    "Request the store's layers, or re-run the cache stage with these layers.",
                )


def _spec_text(spec: dict[str, ArraySpec]) -> str:
    return "{" + ", ".join(f"{name}: {list(s.shape)} {s.dtype}" for name, s in sorted(spec.items())) + "}"


# ---------------------------------------------------------------- torch reader


class ChunkAwareBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Random batches that read few chunks: shuffle chunk order, then shuffle within a window of chunks.

    A plain random sampler draws each sample from a different chunk, so every batch decodes
    ``batch_size`` chunks; here a window of ``window_chunks`` chunks is decoded once and its anchors
    are served in random order. Each epoch (``set_epoch``) reshuffles deterministically from ``seed``.
    """

    def __init__(
        self,
        indices: Sequence[int],
        chunk_anchors: int,
        batch_size: int,
        *,
        window_chunks: int = 4,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ):
        if batch_size < 1 or chunk_anchors < 1 or window_chunks < 1:
            raise ValueError("batch_size, chunk_anchors and window_chunks must be >= 1")
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError("ChunkAwareBatchSampler got no indices (is the split empty?)")
        self.chunk_anchors = chunk_anchors
        self.batch_size = batch_size
        self.window_chunks = window_chunks
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.sort(self.indices)
        rng = np.random.default_rng([self.seed, self.epoch])
        chunk_of = self.indices // self.chunk_anchors
        chunks = np.unique(chunk_of)
        rng.shuffle(chunks)
        order = []
        for w in range(0, len(chunks), self.window_chunks):
            window = self.indices[np.isin(chunk_of, chunks[w : w + self.window_chunks])]
            order.append(rng.permutation(window))
        return np.concatenate(order)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size].tolist()


class AnchorDataset(torch.utils.data.Dataset):
    """Anchors as ``{"index", "inputs": {name: tensor}, "teacher_hidden" [L,V,D] float32 | "labels": {name: tensor}}``.

    Reads whole chunks and keeps the last ``cache_chunks`` decoded, so a batch from
    :class:`ChunkAwareBatchSampler` costs a few chunk reads. The Zarr group is opened lazily in
    each process, so the dataset works in DataLoader workers (only the URL is pickled).
    ``split`` picks ``"train"`` (never the held-out anchors), ``"heldout"`` or ``"all"``; indices
    ``0..len-1`` address that split, ``store_indices`` maps them to store positions.
    """

    def __init__(self, url: str | Path, *, split: str = "train", cache_chunks: int = 4, validate: bool = True, **expect):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        store = open_anchor_store(url, check_values=validate, **expect)
        self.url = store.url
        self.split = split
        self.kind = store.kind
        self.chunk_anchors = store.chunk_anchors
        self.info = store.info()
        self.train_indices = store.train_indices
        self.heldout_indices = store.heldout_indices
        self.store_indices = {
            "train": store.train_indices, "heldout": store.heldout_indices, "all": np.arange(store.n_anchors)
        }[split]
        self.cache_chunks = cache_chunks
        self._store: AnchorStore | None = None
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_store=None, _chunks=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store_indices)

    def _handle(self) -> AnchorStore:
        if self._store is None:
            group = _open_group(self.url, "r")
            self._store = AnchorStore(self.url, group, dict(group.attrs))
        return self._store

    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        with self._lock:
            if chunk in self._chunks:
                self._chunks.move_to_end(chunk)
                return self._chunks[chunk]
        store = self._handle()
        start = chunk * self.chunk_anchors
        data = store.read(start, min(start + self.chunk_anchors, store.n_anchors))
        with self._lock:
            self._chunks[chunk] = data
            while len(self._chunks) > self.cache_chunks:
                self._chunks.popitem(last=False)
        return data

    def sampler(self, batch_size: int, **kwargs) -> ChunkAwareBatchSampler:
        """A chunk-aware batch sampler over this split (positions 0..len-1 of this dataset)."""
        return _SplitBatchSampler(self, batch_size, **kwargs)

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[dict]:
        store_idx = self.store_indices[np.asarray(positions, dtype=np.int64)]
        samples = []
        for index in store_idx.tolist():
            chunk = self._chunk(index // self.chunk_anchors)
            row = index % self.chunk_anchors
            sample = {"index": index, "inputs": {}}
            if self.kind == "token_level":
                sample[LABELS] = {}
            for path, values in chunk.items():
                tensor = torch.from_numpy(np.ascontiguousarray(values[row]))
                if path == TEACHER:
                    sample[TEACHER] = tensor.float()  # losses are computed in float32
                else:
                    group, name = path.split("/", 1)
                    sample[group][name] = tensor
            samples.append(sample)
        return samples

    def loader(self, batch_size: int, *, num_workers: int = 0, **sampler_kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over this split with the chunk-aware sampler."""
        return torch.utils.data.DataLoader(
            self, batch_sampler=self.sampler(batch_size, **sampler_kwargs), num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )


class _SplitBatchSampler(ChunkAwareBatchSampler):
    """Chunk-aware batches over a split: groups by store chunk, yields split positions."""

    def __init__(self, dataset: AnchorDataset, batch_size: int, **kwargs):
        super().__init__(dataset.store_indices, dataset.chunk_anchors, batch_size, **kwargs)
        self._position = {int(idx): pos for pos, idx in enumerate(dataset.store_indices.tolist())}

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield [self._position[i] for i in batch]
