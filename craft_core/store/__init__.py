"""The anchor store: one Zarr v3 group per cache of teacher targets.

Split by job: ``layout`` (schema, blocks, held-out split, fingerprint), ``writer`` (block-by-block
writing, finalising), ``validation`` (structure, values, and the one "does this store fit this
student" check) and ``reader`` (the validated handle, chunk-aware torch reading). Extraction and
the importer only produce blocks of numpy arrays; everything that writes or validates the layout
is here.
"""

from craft_core.store.layout import (
    HELDOUT,
    KINDS,
    LABELS,
    MARKERS,
    PROVENANCE,
    SCHEMA_VERSION,
    TEACHER,
    AnchorStoreError,
    StoreLayout,
    block_ranges,
    default_chunk_anchors,
    heldout_mask,
    store_fingerprint,
    worker_blocks,
)
from craft_core.store.reader import AnchorDataset, AnchorStore, ChunkAwareBatchSampler, open_anchor_store
from craft_core.store.validation import check_fits_student
from craft_core.store.writer import AnchorStoreWriter, finalize_store

__all__ = [
    "HELDOUT",
    "KINDS",
    "LABELS",
    "MARKERS",
    "PROVENANCE",
    "SCHEMA_VERSION",
    "TEACHER",
    "AnchorDataset",
    "AnchorStore",
    "AnchorStoreError",
    "AnchorStoreWriter",
    "ChunkAwareBatchSampler",
    "StoreLayout",
    "block_ranges",
    "check_fits_student",
    "default_chunk_anchors",
    "finalize_store",
    "heldout_mask",
    "open_anchor_store",
    "store_fingerprint",
    "worker_blocks",
]
