"""Reading a store: the validated handle, and torch reading in chunk-aware batches.

``open_anchor_store`` refuses anything incomplete, of another schema, inconsistent or damaged:
it checks the structure and the identity attributes, then reads every teacher target (small)
completely, checking each block against the digest recorded when it was written. The model inputs
(large) are checked as they are read, block by block, by :class:`AnchorDataset`. Whether the store
fits a given student is :func:`craft_core.store.validation.check_fits_student`.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from craft_core.policies.base import TargetRequest
from craft_core.store.layout import DIGESTS, HELDOUT, MARKERS, PROVENANCE, AnchorStoreError, block_ranges, open_group
from craft_core.store.validation import (
    DAMAGED,
    StoreDescription,
    check_digests,
    check_structure,
    check_values,
    read_block,
    request_from_attrs,
    verify_block,
)


class LegacyStoreWarning(UserWarning):
    """A schema-1 store is read without content verification (it has no digests)."""


class AnchorStore:
    """A validated, read-only handle on a complete store."""

    def __init__(self, url: str | Path, group, attrs: dict, description: StoreDescription):
        self.url = str(url)
        self.group = group
        self.attrs = attrs
        self.description = description
        self.n_anchors: int = description.n_anchors
        self.chunk_anchors: int = int(attrs["chunk_anchors"])
        self.block_anchors: int = int(attrs.get("block_anchors") or self.chunk_anchors)
        self.blocks = block_ranges(self.n_anchors, self.block_anchors)
        self.input_spec = description.input_spec
        self.targets: dict[str, dict] = description.targets
        self.target_arrays = description.target_arrays
        self.digests = read_block(self.url, group, DIGESTS, 0, len(self.blocks)) if description.schema_version >= 2 else None
        if self.digests is not None:
            check_digests(self.url, self.digests)
        self.heldout = self.read(0, self.n_anchors, [HELDOUT])[HELDOUT].astype(bool)

    @property
    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.heldout)

    @property
    def heldout_indices(self) -> np.ndarray:
        return np.flatnonzero(self.heldout)

    def request(self, targets: Sequence[str] | None = None, prefix_loss: str = "mse") -> TargetRequest:
        """The TargetRequest that reproduces this store's targets (all, or ``targets``)."""
        return request_from_attrs(self.attrs, self.targets, list(targets or self.targets), prefix_loss)

    def array_names(self) -> list[str]:
        return [*self.description.target_paths(), *(f"inputs/{name}" for name in self.input_spec)]

    def read(self, start: int, stop: int, names: Sequence[str] | None = None, *, verify: bool = True) -> dict[str, np.ndarray]:
        """Anchors ``start..stop-1`` as numpy arrays keyed by array path; with ``verify`` (default) the
        range must be whole blocks, each checked against its recorded digest."""
        names = list(names or self.array_names())
        blocks = [b for b, (lo, hi) in enumerate(self.blocks) if lo < stop and hi > start]
        if verify and self.digests is not None and (self.blocks[blocks[0]][0] != start or self.blocks[blocks[-1]][1] != stop):
            raise ValueError(f"verified reads cover whole blocks of {self.block_anchors} anchors, got {start}..{stop}")
        out = {}
        for name in names:
            parts = []
            for block in blocks:
                lo, hi = max(self.blocks[block][0], start), min(self.blocks[block][1], stop)
                values = read_block(self.url, self.group, name, lo, hi)
                if verify:
                    verify_block(self.url, self.description, self.digests, block, name, values)
                parts.append(values)
            out[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out

    def provenance(self) -> dict[str, np.ndarray]:
        values = self.read(0, self.n_anchors, list(PROVENANCE))
        return {path.split("/", 1)[1]: values[path] for path in PROVENANCE}

    def info(self) -> dict:
        """The StoreInfo dict: what downstream stages need to know, JSON-able."""
        attrs = self.attrs
        return {
            "store_url": self.url,
            "schema_version": attrs["schema_version"],
            "targets": {name: dict(target) for name, target in self.targets.items()},
            "n_anchors": self.n_anchors,
            "n_heldout": int(self.heldout.sum()),
            "n_train": int((~self.heldout).sum()),
            "layers": attrs.get("layers"),
            "depth": attrs.get("depth"),
            "hidden_size": attrs.get("hidden_size"),
            "pooling": attrs.get("pooling"),
            "dtype": attrs.get("dtype") or attrs.get("teacher_hidden_dtype"),
            "teacher": attrs.get("teacher"),
            "dataset": attrs.get("dataset"),
            "input_spec": attrs["input_spec"],
            "chunk_anchors": self.chunk_anchors,
            "shard_chunks": attrs.get("shard_chunks"),
            "fingerprint": attrs.get("fingerprint"),
        }


def _open(url: str, mode: str):
    try:
        return open_group(url, mode)
    except FileNotFoundError as exc:
        raise AnchorStoreError(
            url, f"no Zarr v3 group found there ({type(exc).__name__}: {exc})",
            "Run the cache stage (extract_anchors) or import_pt_cache to create it, or fix the path.",
        ) from None
    except Exception as exc:  # a garbage or truncated zarr.json, a node of another type
        raise AnchorStoreError(
            url, f"its root metadata (zarr.json) cannot be read ({type(exc).__name__}: {exc})", DAMAGED
        ) from None


def open_anchor_store(url: str | Path, *, verify: bool = True) -> AnchorStore:
    """Open a complete store, refusing (with what is wrong and what to do) anything incomplete, of
    another schema, inconsistent or damaged. ``verify`` (default) reads every teacher target,
    the provenance and the split completely and checks them against the recorded digests and for
    non-finite values; without it only the structure and the attributes are checked."""
    url = str(url)
    group = _open(url, "r")
    try:
        attrs = dict(group.attrs)
    except Exception as exc:
        raise AnchorStoreError(url, f"its attributes cannot be read ({type(exc).__name__}: {exc})", DAMAGED) from None
    description = check_structure(url, group, attrs, require_complete=True)
    if description.schema_version < 2:
        warnings.warn(
            f"anchor store {url}: schema {description.schema_version} (legacy) carries no content digests, so a "
            "missing or altered chunk cannot be detected; re-run the cache stage for a verified store",
            LegacyStoreWarning, stacklevel=2,
        )
    markers = read_block(url, group, MARKERS, 0, int(attrs["n_blocks"]))
    if not markers.all():
        raise AnchorStoreError(
            url, f"it is marked complete but {int((markers == 0).sum())} blocks have no written marker in {MARKERS} "
            f"(blocks {np.flatnonzero(markers == 0)[:10].tolist()})",
            "The store was modified after extraction: delete it and re-run the cache stage.",
        )
    store = AnchorStore(url, group, attrs, description)
    if verify:
        small = [*description.target_paths(), *PROVENANCE, HELDOUT]
        for start, stop in store.blocks:
            check_values(url, description, store.read(start, stop, small))
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
    """Anchors as ``{"index", "inputs": {name: tensor}, "targets": {target: {array: tensor}}}``.

    Floating target arrays come out as float32 (losses are computed in float32). Reads whole
    blocks, each checked against its recorded digest, and keeps the last ``cache_chunks`` decoded,
    so a batch from :class:`ChunkAwareBatchSampler` costs a few block reads; a damaged block stops
    the reader with an :class:`AnchorStoreError` naming the array and the block. The Zarr group is
    opened lazily in each process, so the dataset works in DataLoader workers (only the URL is
    pickled). ``split`` picks ``"train"`` (never the held-out anchors), ``"heldout"`` or ``"all"``;
    indices ``0..len-1`` address that split, ``store_indices`` maps them to store positions.
    """

    def __init__(self, url: str | Path, *, split: str = "train", cache_chunks: int = 4, validate: bool = True,
                 targets: Sequence[str] | None = None):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        store = open_anchor_store(url, verify=validate)
        self.store = store
        self.url = store.url
        self.split = split
        self.targets = list(targets if targets is not None else store.targets)
        unknown = [t for t in self.targets if t not in store.targets]
        if unknown:
            raise AnchorStoreError(self.url, f"it holds the targets {list(store.targets)}, not {unknown}",
                                   "Read only the store's targets, or re-run the cache stage with them.")
        self.block_anchors = store.block_anchors
        self.chunk_anchors = store.chunk_anchors
        self.info = store.info()
        self.train_indices = store.train_indices
        self.heldout_indices = store.heldout_indices
        self.store_indices = {
            "train": store.train_indices, "heldout": store.heldout_indices, "all": np.arange(store.n_anchors)
        }[split]
        self.paths = {target: {name: path for name, (path, _) in store.target_arrays[target].items()}
                      for target in self.targets}
        self.cache_chunks = cache_chunks
        self._store: AnchorStore | None = store
        self._blocks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(store=None, _store=None, _blocks=OrderedDict(), _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store_indices)

    def _handle(self) -> AnchorStore:
        if self._store is None:  # in a DataLoader worker: the structure was validated by the parent
            group = _open(self.url, "r")
            attrs = dict(group.attrs)
            self._store = AnchorStore(self.url, group, attrs, check_structure(self.url, group, attrs,
                                                                              require_complete=True))
        return self._store

    def _block(self, block: int) -> dict[str, np.ndarray]:
        with self._lock:
            if block in self._blocks:
                self._blocks.move_to_end(block)
                return self._blocks[block]
        store = self._handle()
        names = [*(p for paths in self.paths.values() for p in paths.values()), *(f"inputs/{n}" for n in store.input_spec)]
        start, stop = store.blocks[block]
        data = store.read(start, stop, names)
        with self._lock:
            self._blocks[block] = data
            while len(self._blocks) > self.cache_chunks:
                self._blocks.popitem(last=False)
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
            data = self._block(index // self.block_anchors)
            row = index % self.block_anchors
            sample = {"index": index, "inputs": {}, "targets": {}}
            for name in self._handle().input_spec:
                sample["inputs"][name] = torch.from_numpy(np.ascontiguousarray(data[f"inputs/{name}"][row]))
            for target, paths in self.paths.items():
                arrays = {}
                for name, path in paths.items():
                    tensor = torch.from_numpy(np.ascontiguousarray(data[path][row]))
                    arrays[name] = tensor.float() if tensor.is_floating_point() else tensor
                sample["targets"][target] = arrays
            samples.append(sample)
        return samples

    def loader(self, batch_size: int, *, num_workers: int = 0, **sampler_kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over this split with the chunk-aware sampler."""
        return torch.utils.data.DataLoader(
            self, batch_sampler=self.sampler(batch_size, **sampler_kwargs), num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )


class _SplitBatchSampler(ChunkAwareBatchSampler):
    """Chunk-aware batches over a split: groups by store block, yields split positions."""

    def __init__(self, dataset: AnchorDataset, batch_size: int, **kwargs):
        super().__init__(dataset.store_indices, dataset.block_anchors, batch_size, **kwargs)
        self._position = {int(idx): pos for pos, idx in enumerate(dataset.store_indices.tolist())}

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield [self._position[i] for i in batch]
