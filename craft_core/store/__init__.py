"""The anchor store: one Zarr v3 group per cache of teacher targets.

Split by job: ``layout`` (schema, blocks, digests, held-out split, fingerprint), ``writer``
(block-by-block writing, finalising), ``validation`` (structure, digests, values, and the one
"does this store fit this student" check) and ``reader`` (the validated handle, chunk-aware torch
reading). Extraction and the importer only produce blocks of numpy arrays; everything that writes
or validates the layout is here.
"""

from craft_core.store.layout import (
    DIGESTS,
    HELDOUT,
    MARKERS,
    PROVENANCE,
    SCHEMA_VERSION,
    AnchorStoreError,
    StoreLayout,
    block_digest,
    block_ranges,
    bytes_per_anchor,
    default_chunk_anchors,
    heldout_mask,
    input_path,
    store_fingerprint,
    target_path,
    worker_blocks,
)
from craft_core.store.reader import AnchorDataset, AnchorStore, ChunkAwareBatchSampler, open_anchor_store
from craft_core.store.validation import check_fits_student
from craft_core.store.writer import AnchorStoreWriter, finalize_store

__all__ = [
    "DIGESTS",
    "HELDOUT",
    "MARKERS",
    "PROVENANCE",
    "SCHEMA_VERSION",
    "AnchorDataset",
    "AnchorStore",
    "AnchorStoreError",
    "AnchorStoreWriter",
    "ChunkAwareBatchSampler",
    "StoreLayout",
    "block_digest",
    "block_ranges",
    "bytes_per_anchor",
    "check_fits_student",
    "default_chunk_anchors",
    "finalize_store",
    "heldout_mask",
    "input_path",
    "open_anchor_store",
    "store_fingerprint",
    "target_path",
    "worker_blocks",
]
