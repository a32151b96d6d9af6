"""Writing a store block by block, and finalising it.

A block's data is written first, then its digests, then its marker, so a writer killed in between
just rewrites that block on resume; writers of disjoint blocks never touch the same object, which
is what lets several workers fill one store. ``complete`` is set last, by :func:`finalize_store`,
after every marker is present and every block of every array matches its digest.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec

from craft_core import __version__ as CRAFT_VERSION
from craft_core.store.layout import (
    DIGEST_ALGORITHM,
    DIGESTS,
    LEGACY_DIGEST_ALGORITHM,
    HELDOUT,
    MARKERS,
    SCHEMA_VERSION,
    AnchorStoreError,
    StoreLayout,
    block_digest,
    block_ranges,
    identity_digest,
    identity_digests,
    open_group,
)
from craft_core.store.reader import AnchorStore, open_anchor_store
from craft_core.store.validation import check_structure, check_values


def _compressors(dtype: str):
    if dtype in ("str", "bool"):
        return "auto"
    # Byte-shuffling groups the high bytes of float16/float32 values, which zstd then compresses.
    shuffle = "noshuffle" if np.dtype(dtype).itemsize == 1 else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def _fill_value(dtype: str):
    if dtype == "str":
        return ""
    if dtype == "bool":
        return False
    return 0


class AnchorStoreWriter:
    """Creates (or re-opens for resume) a store and writes it block by block."""

    def __init__(self, url: str | Path, layout: StoreLayout):
        self.url = str(url)
        self.layout = layout
        self.blocks = block_ranges(layout.n_anchors, layout.block_anchors)
        self.digest_paths = list(layout.per_anchor_specs())
        self.group = self._create_or_reopen()
        # A store resumed from before the attribute existed keeps the digests it started with.
        self.digest_algorithm = self.group.attrs.get("digest_algorithm", LEGACY_DIGEST_ALGORITHM)

    def _create_or_reopen(self) -> zarr.Group:
        layout = self.layout
        fingerprint = layout.attrs.get("fingerprint")
        try:
            group = open_group(self.url, "a")
        except zarr.errors.ContainsGroupError:
            # Another worker created the root group between our existence check and our write.
            group = open_group(self.url, "r+")
        except Exception as exc:
            raise AnchorStoreError(self.url, f"it cannot be opened for writing ({type(exc).__name__}: {exc})",
                                   "Delete it (it is damaged or not a Zarr group) and re-run the cache stage.") from None
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
        self._create_array(group, DIGESTS, (len(self.blocks), len(self.digest_paths)), (1, len(self.digest_paths)),
                           None, "uint64", "uint64")
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
            complete=False,
            n_anchors=layout.n_anchors,
            n_heldout=None,
            input_spec={name: spec.to_json() for name, spec in layout.input_spec.items()},
            targets=layout.targets_attr(),
            digest_arrays=self.digest_paths,
            chunk_anchors=layout.chunk_anchors,
            shard_chunks=layout.shard_chunks,
            block_anchors=layout.block_anchors,
            n_blocks=len(self.blocks),
            digest_algorithm=DIGEST_ALGORITHM,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            craft_version=CRAFT_VERSION,
        )
        attrs["identity_digest"] = identity_digest(attrs)
        attrs["identity_digests"] = identity_digests(attrs)
        return attrs

    def written_blocks(self) -> set[int]:
        markers = self.group[MARKERS][:]
        return {int(i) for i in np.flatnonzero(markers)}

    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array of one block, then its digests, then its marker (the order makes resume safe)."""
        start, stop = self.blocks[block]
        specs = self.layout.per_anchor_specs()
        missing = sorted(set(specs) - set(arrays))
        unknown = sorted(set(arrays) - set(specs))
        if missing or unknown:
            raise ValueError(f"block {block}: missing arrays {missing}, unknown arrays {unknown}")
        digests = np.zeros(len(self.digest_paths), dtype=np.uint64)
        for column, (path, spec) in enumerate(specs.items()):
            values = np.asarray(arrays[path])
            expected = (stop - start, *spec.shape)
            if tuple(values.shape) != expected:
                raise ValueError(f"block {block}: {path} has shape {tuple(values.shape)}, expected {expected}")
            if spec.dtype != "str" and values.dtype != np.dtype(spec.dtype):
                raise ValueError(f"block {block}: {path} has dtype {values.dtype}, expected {spec.dtype}")
            if path.startswith("targets/") and values.dtype.kind == "f" and not np.isfinite(values).all():
                raise ValueError(
                    f"block {block}: the teacher produced non-finite values for {path} (anchors {start}..{stop - 1}); "
                    "check the teacher weights and dtype (float16 overflows above 65504)"
                )
            digests[column] = block_digest(values, self.digest_algorithm)
        for path in specs:
            self.group[path][start:stop] = arrays[path]
        self.group[DIGESTS][block] = digests
        self.group[MARKERS][block] = 1

    def finalize(self) -> dict:
        return finalize_store(self.url)


def finalize_store(url: str | Path) -> dict:
    """Check that every block is written and matches its digests, then set ``complete`` last."""
    group = open_group(url, "r+")
    attrs = dict(group.attrs)
    if attrs.get("complete"):
        return open_anchor_store(url).info()
    description = check_structure(str(url), group, attrs, require_complete=False)
    missing = np.flatnonzero(group[MARKERS][:] == 0)
    if len(missing):
        raise AnchorStoreError(
            url,
            f"{len(missing)} of {attrs['n_blocks']} blocks are not written yet (first: {missing[:5].tolist()})",
            "Run the remaining extraction workers (or re-run the extraction to resume), then finalize again.",
        )
    # Every block of every array once, against its digest: a store is only ever complete intact.
    store = AnchorStore(url, group, attrs, description)
    for start, stop in store.blocks:
        check_values(str(url), description, store.read(start, stop, list(description.paths())))
    group.attrs.update(n_heldout=int(store.heldout.sum()))
    group.attrs.update(complete=True)
    return open_anchor_store(url).info()
