"""Reading a store: the validated handle, and torch reading in chunk-aware batches.

``open_anchor_store`` refuses anything incomplete, of another schema, or inconsistent; whether the
store fits a given student is :func:`craft_core.store.validation.check_fits_student`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import zarr
import zarr.errors

from craft_core.policies.base import ArraySpec
from craft_core.store.layout import HELDOUT, LABELS, MARKERS, PROVENANCE, TEACHER, AnchorStoreError, open_group
from craft_core.store.validation import check_structure, check_values


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


def open_anchor_store(url: str | Path, *, validate_values: bool = True) -> AnchorStore:
    """Open a complete store, refusing (with what is wrong and what to do) anything incomplete, of
    another schema, or inconsistent; ``validate_values`` also reads every teacher target."""
    url = str(url)
    try:
        group = open_group(url, "r")
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError, zarr.errors.BaseZarrError) as exc:
        raise AnchorStoreError(
            url, f"no Zarr v3 group found there ({type(exc).__name__}: {exc})",
            "Run the cache stage (extract_anchors) or import_pt_cache to create it, or fix the path.",
        ) from None
    attrs = dict(group.attrs)
    check_structure(url, group, attrs, require_complete=True)
    markers = group[MARKERS][:]
    if not markers.all():
        raise AnchorStoreError(
            url, f"it is marked complete but {int((markers == 0).sum())} blocks have no written marker",
            "The store was modified after extraction: delete it and re-run the cache stage.",
        )
    if validate_values:
        check_values(url, group, attrs)
    store = AnchorStore(url, group, attrs)
    if int(attrs.get("n_heldout") or 0) != int(store.heldout.sum()):
        raise AnchorStoreError(
            url, f"attribute n_heldout={attrs.get('n_heldout')} but split/heldout marks {int(store.heldout.sum())} anchors",
            "The split was modified after extraction: delete the store and re-run the cache stage.",
        )
    return store


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

    def __init__(self, url: str | Path, *, split: str = "train", cache_chunks: int = 4, validate: bool = True):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        store = open_anchor_store(url, validate_values=validate)
        self.store = store
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
        state.update(store=None, _store=None, _chunks=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store_indices)

    def _handle(self) -> AnchorStore:
        if self._store is None:
            group = open_group(self.url, "r")
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

