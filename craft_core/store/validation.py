"""Validating a store: its structure against its attributes, its content against the digests
recorded when it was written, and its fit with a student.

Every refusal is an :class:`~craft_core.store.layout.AnchorStoreError` that names the store, what
is wrong (the array and block where it applies) and what to do. Every read goes through
:func:`read_block`, so a codec, JSON or shape error never escapes as a raw exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zarr

from craft_core.policies.base import ArraySpec, TargetRequest
from craft_core.store.layout import (
    DIGEST_ALGORITHMS,
    DIGESTS,
    LEGACY_DIGEST_ALGORITHM,
    HELDOUT,
    MARKERS,
    PROVENANCE,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    TARGETS,
    V1_LABEL_NAMES,
    V1_LABELS,
    V1_TEACHER,
    AnchorStoreError,
    block_digest,
    identity_digest,
    identity_digests,
    input_path,
    target_path,
)

RERUN = "Delete the store and re-run the cache stage (or the importer)."
DAMAGED = ("The store is damaged: delete it and re-run the cache stage (it rebuilds it; a killed extraction "
           "resumes on its own, a damaged complete store does not)")


@dataclass
class StoreDescription:
    """What a store holds, from its attributes (schema v1 mapped onto v2's targets)."""

    schema_version: int
    n_anchors: int
    input_spec: dict[str, ArraySpec]
    targets: dict[str, dict]  # target -> its attributes (probe kind, top_k, layers...), without "arrays"
    target_arrays: dict[str, dict[str, tuple[str, ArraySpec]]]  # target -> array -> (path, spec)
    digest_arrays: list[str]  # paths in the order of progress/block_digests' columns (v2)
    digest_algorithm: str = LEGACY_DIGEST_ALGORITHM

    def paths(self) -> dict[str, ArraySpec]:
        """Every anchor-indexed array, by path: targets, inputs, provenance, split."""
        specs = {path: spec for arrays in self.target_arrays.values() for path, spec in arrays.values()}
        specs.update({input_path(name): spec for name, spec in self.input_spec.items()})
        specs.update(PROVENANCE)
        specs[HELDOUT] = ArraySpec((), "bool")
        return specs

    def target_paths(self) -> list[str]:
        return [path for arrays in self.target_arrays.values() for path, _ in arrays.values()]


def _spec_map(url: str, what: str, data) -> dict[str, ArraySpec]:
    try:
        return {name: ArraySpec.from_json(spec) for name, spec in data.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AnchorStoreError(url, f"attribute {what} is missing or malformed ({exc})", RERUN) from None


def describe(url: str, attrs: dict) -> StoreDescription:
    """The store's schema from its attributes; refuses anything unknown or malformed."""
    if "schema_version" not in attrs:
        raise AnchorStoreError(
            url, "the group has no schema_version attribute, so it is not an anchor store (or its creation was cut short)",
            "Point to a store made by craft's cache stage, or delete this one and re-run extraction.",
        )
    version = attrs["schema_version"]
    if version not in READABLE_SCHEMA_VERSIONS:
        raise AnchorStoreError(
            url, f"schema version {version!r} is not supported (this craft reads versions {list(READABLE_SCHEMA_VERSIONS)})",
            "Re-create the store with this craft version (re-run the cache stage).",
        )
    n_anchors = attrs.get("n_anchors")
    if not isinstance(n_anchors, int) or isinstance(n_anchors, bool) or n_anchors < 1:
        raise AnchorStoreError(url, f"attribute n_anchors={n_anchors!r} is not a positive integer", RERUN)
    input_spec = _spec_map(url, "input_spec", attrs.get("input_spec"))
    targets: dict[str, dict] = {}
    arrays: dict[str, dict[str, tuple[str, ArraySpec]]] = {}
    if version == 1:
        kind = attrs.get("kind")
        if kind == "hidden_state":
            layers, pooling, hidden = attrs.get("layers"), attrs.get("pooling"), attrs.get("hidden_size")
            if not (isinstance(layers, list) and isinstance(pooling, list) and isinstance(hidden, int)):
                raise AnchorStoreError(
                    url, f"attributes layers={layers!r}, pooling={pooling!r}, hidden_size={hidden!r} must be two lists "
                    "and an int", RERUN)
            spec = ArraySpec((len(layers), len(pooling), hidden), str(attrs.get("teacher_hidden_dtype")))
            targets["prefix"] = {"layers": layers, "pooling": pooling}
            arrays["prefix"] = {"hidden": (V1_TEACHER, spec)}
        elif kind == "token_level":
            labels = _spec_map(url, "labels_spec", attrs.get("labels_spec"))
            targets["action_output"] = {"probe": "greedy_fast_tokens", "top_k": 0, "loss": "hard_token_cross_entropy"}
            arrays["action_output"] = {V1_LABEL_NAMES.get(name, name): (f"{V1_LABELS}/{name}", spec)
                                       for name, spec in labels.items()}
        else:
            raise AnchorStoreError(url, f"unknown kind {kind!r} of a schema-1 store (expected hidden_state or token_level)",
                                   RERUN)
        return StoreDescription(1, n_anchors, input_spec, targets, arrays, [])
    raw_targets = attrs.get("targets")
    if not isinstance(raw_targets, dict) or not raw_targets:
        raise AnchorStoreError(url, f"attribute targets={raw_targets!r} must name at least one target", RERUN)
    for target, target_attrs in raw_targets.items():
        if not isinstance(target_attrs, dict):
            raise AnchorStoreError(url, f"attribute targets.{target} is malformed", RERUN)
        specs = _spec_map(url, f"targets.{target}.arrays", target_attrs.get("arrays"))
        targets[target] = {k: v for k, v in target_attrs.items() if k != "arrays"}
        arrays[target] = {name: (target_path(target, name), spec) for name, spec in specs.items()}
    digest_arrays = attrs.get("digest_arrays")
    description = StoreDescription(SCHEMA_VERSION, n_anchors, input_spec, targets, arrays, [])
    if not isinstance(digest_arrays, list) or sorted(digest_arrays) != sorted(description.paths()):
        raise AnchorStoreError(url, f"attribute digest_arrays={digest_arrays!r} does not list the store's arrays", RERUN)
    description.digest_arrays = list(digest_arrays)
    algorithm = attrs.get("digest_algorithm", LEGACY_DIGEST_ALGORITHM)
    if algorithm not in DIGEST_ALGORITHMS:
        raise AnchorStoreError(url, f"attribute digest_algorithm={algorithm!r} is not one this craft knows "
                               f"({list(DIGEST_ALGORITHMS)})", RERUN)
    description.digest_algorithm = algorithm
    return description


def check_structure(url: str, group: zarr.Group, attrs: dict, *, require_complete: bool) -> StoreDescription:
    """Schema, completeness, identity, arrays present, shapes and dtypes agreeing with the attributes."""
    description = describe(url, attrs)
    if require_complete and attrs.get("complete") is not True:
        raise AnchorStoreError(
            url, "it is incomplete (`complete` is not set: the extraction was interrupted or is still running)",
            "Re-run the cache stage with the same config to resume it, or finalize_store() once all workers are done.",
        )
    if description.schema_version >= 2 and attrs.get("identity_digest") != identity_digest(attrs):
        recorded = attrs.get("identity_digests")
        changed = ([key for key, digest in identity_digests(attrs).items() if recorded.get(key) != digest]
                   if isinstance(recorded, dict) else [])
        named = (f"attribute {changed[0]} was" if len(changed) == 1 else f"attributes {', '.join(changed)} were")
        what = (f"{named} changed after the store was written (the value differs from the one recorded with its "
                "digest)" if changed else
                "its identity attributes (layers, pooling, targets, teacher, input spec, ...) were changed after "
                "the store was written: they no longer match the digest recorded with them")
        raise AnchorStoreError(url, what, RERUN)
    n = description.n_anchors
    expected = {path: ((n, *spec.shape), spec.dtype) for path, spec in description.paths().items()}
    n_blocks = attrs.get("n_blocks")
    expected[MARKERS] = ((n_blocks,), "uint8")
    if description.schema_version >= 2:
        expected[DIGESTS] = ((n_blocks, len(description.digest_arrays)), "uint64")
    for path, (shape, dtype) in expected.items():
        try:
            array = group[path]
        except KeyError:
            raise AnchorStoreError(url, f"array {path} is missing (the store holds {sorted(expected)})", RERUN) from None
        except Exception as exc:  # a garbage zarr.json of the array
            raise AnchorStoreError(url, f"array {path} cannot be opened ({type(exc).__name__}: {exc})", DAMAGED) from None
        if not isinstance(array, zarr.Array):
            raise AnchorStoreError(url, f"{path} is a group, expected an array", RERUN)
        if tuple(array.shape) != tuple(shape):
            what = "n_anchors" if array.shape[:1] != shape[:1] else "the attributes (targets, input_spec, ...)"
            raise AnchorStoreError(url, f"array {path} has shape {tuple(array.shape)} but {what} say {tuple(shape)}",
                                   RERUN)
        if dtype == "str":
            if array.dtype.kind not in ("T", "U", "O"):
                raise AnchorStoreError(url, f"array {path} has dtype {array.dtype}, expected text", RERUN)
        elif array.dtype != np.dtype(dtype):
            raise AnchorStoreError(url, f"array {path} has dtype {array.dtype} but the attributes say {dtype}", RERUN)
    return description


def read_block(url: str, group: zarr.Group, path: str, start: int, stop: int) -> np.ndarray:
    """``group[path][start:stop]``, any read or decoding failure wrapped with the store and array named."""
    try:
        return group[path][start:stop]
    except Exception as exc:
        raise AnchorStoreError(
            url, f"array {path} (anchors {start}..{stop - 1}) cannot be read or decoded ({type(exc).__name__}: {exc})",
            DAMAGED,
        ) from None


def verify_block(url: str, description: StoreDescription, digests: np.ndarray | None, block: int, path: str,
                 values: np.ndarray) -> None:
    """Refuse ``values`` of ``block`` of ``path`` unless they match the digest recorded when written."""
    if digests is None:  # schema 1 stores carry no digests
        return
    column = description.digest_arrays.index(path)
    recorded = int(digests[block, column])
    if recorded == 0:
        raise AnchorStoreError(url, f"array {DIGESTS} holds no digest of {path} block {block} although the block is "
                               "marked written (its chunk is missing or zeroed)", DAMAGED)
    if block_digest(values, description.digest_algorithm) != recorded:
        raise AnchorStoreError(
            url, f"array {path} block {block}: its content does not match the digest recorded when it was written (a "
            f"chunk is missing, truncated or altered, or its digest in {DIGESTS} is)", DAMAGED,
        )


def check_digests(url: str, digests: np.ndarray) -> None:
    """Every block has a digest of every array (``block_digest`` is never 0: 0 is a missing chunk)."""
    missing = np.flatnonzero((digests == 0).any(axis=1))
    if len(missing):
        raise AnchorStoreError(
            url, f"array {DIGESTS} holds no digests for blocks {missing[:10].tolist()} although they are marked "
            "written (its chunks are missing or zeroed)", DAMAGED,
        )


def check_values(url: str, description: StoreDescription, arrays: dict[str, np.ndarray]) -> None:
    """Floating target arrays hold finite numbers only."""
    for path, values in arrays.items():
        if path not in description.target_paths() or values.dtype.kind != "f":
            continue
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise AnchorStoreError(
                url, f"{path} holds non-finite values (NaN/inf) at anchors {bad[:10]}",
                "Re-run extraction with dtype float32 or check the teacher weights; then delete this store.",
            )


def _spec_text(spec: dict[str, ArraySpec]) -> str:
    return "{" + ", ".join(f"{name}: {list(s.shape)} {s.dtype}" for name, s in sorted(spec.items())) + "}"


def check_fits_student(store, student, *, targets: Sequence[str] | None = None,
                       layers: Sequence[int] | None = None) -> None:
    """The one check "does this store fit this student": refuses, with what to do, a store whose
    teacher targets the student cannot be compared with.

    ``store`` is an opened :class:`~craft_core.store.reader.AnchorStore`; ``student`` a
    :class:`~craft_core.policies.PolicyAdapter` of the model that will be compared with the teacher;
    ``targets`` the targets the consumer will use (default: all of the store's); ``layers``, when
    given, the prefix layers the consumer asks for (resolved against the student's depth).
    """
    from craft_core.policies.base import resolve_layers

    url, attrs = store.url, store.attrs
    held = list(store.targets)
    wanted = list(targets) if targets is not None else held
    rerun = "Use a store made from the student's base model (re-run the cache stage with it as teacher)."
    missing = [t for t in wanted if t not in held]
    if missing:
        raise AnchorStoreError(
            url, f"it holds the targets {held} but {missing} were requested",
            f"Re-run the cache stage with cache.targets including {missing}, or constrain only {held}.",
        )
    supported = getattr(student, "retention_targets", ("prefix",))
    unsupported = [t for t in wanted if t not in supported]
    if unsupported:
        raise AnchorStoreError(
            url, f"the {student.policy_type} student cannot compute the target(s) {unsupported} (it supports "
            f"{list(supported)})", f"Constrain only {[t for t in wanted if t in supported]}.",
        )
    teacher = attrs.get("teacher") or {}
    if teacher.get("policy_type") not in (None, student.policy_type):
        raise AnchorStoreError(
            url, f"the teacher is a {teacher.get('policy_type')} policy but the student is {student.policy_type}", rerun
        )
    if attrs.get("depth") is not None and attrs["depth"] != student.depth:
        raise AnchorStoreError(
            url, f"the teacher's backbone has depth {attrs['depth']} but the student's has {student.depth}",
            "Fine-tune a copy of the teacher the store was made with, or re-run the cache stage with the student's base model.",
        )
    stored_spec = store.input_spec
    student_spec = {name: ArraySpec.from_json(spec.to_json()) for name, spec in student.input_spec(held).items()}
    if stored_spec != student_spec:
        raise AnchorStoreError(
            url, f"stored inputs {_spec_text(stored_spec)} differ from the student's inputs {_spec_text(student_spec)}",
            "The student must see the same inputs as the teacher (same policy type, image size, tokenizer length): "
            "re-run the cache stage with the student's base model.",
        )
    request = store.request(wanted)
    for target in wanted:
        stored_arrays = {name: spec for name, (_, spec) in store.target_arrays[target].items()}
        if target == "prefix":
            _check_prefix(store, student, layers, rerun)
        try:
            student_arrays, _ = student.target_spec(target, request)
        except (NotImplementedError, ValueError) as exc:
            raise AnchorStoreError(url, f"the student cannot lay out target {target!r} ({exc})", rerun) from None
        if {n: s.shape for n, s in student_arrays.items()} != {n: s.shape for n, s in stored_arrays.items()}:
            raise AnchorStoreError(
                url, f"target {target!r} holds {_spec_text(stored_arrays)} but the student lays it out as "
                f"{_spec_text(student_arrays)}", rerun,
            )


def _check_prefix(store, student, layers, rerun: str) -> None:
    from craft_core.policies.base import resolve_layers

    url, attrs = store.url, store.attrs
    if attrs.get("hidden_size") is not None and attrs["hidden_size"] != student.hidden_size:
        raise AnchorStoreError(
            url, f"teacher hidden size {attrs['hidden_size']} differs from the student's {student.hidden_size}", rerun
        )
    stored_layers = list(store.targets["prefix"].get("layers") or attrs.get("layers") or [])
    try:
        fits = resolve_layers(stored_layers, student.depth) == stored_layers
        why = "they are not absolute hidden-state indices"
    except ValueError as exc:
        fits, why = False, str(exc)
    if not fits:
        raise AnchorStoreError(url, f"its layers {stored_layers} do not fit the student ({why})", rerun)
    if layers is not None:
        try:
            requested = resolve_layers(layers, student.depth)
        except ValueError as exc:
            raise AnchorStoreError(url, f"layers {list(layers)} were requested: {exc}", rerun) from None
        if requested != stored_layers:
            raise AnchorStoreError(
                url, f"it holds layers {stored_layers} (absolute, depth {attrs.get('depth')}) but layers "
                f"{list(layers)} were requested",
                "Request the store's layers, or re-run the cache stage with these layers.",
            )


def request_from_attrs(attrs: dict, targets: dict[str, dict], wanted: Sequence[str], prefix_loss: str = "mse") -> TargetRequest:
    """The TargetRequest that reproduces a store's targets (layers, pooling, probes) for ``wanted``."""
    prefix = targets.get("prefix", {})
    action = targets.get("action_output", {})
    return TargetRequest(
        targets=tuple(wanted),
        layers=tuple(prefix.get("layers") or attrs.get("layers") or ()),
        pooling=tuple(prefix.get("pooling") or attrs.get("pooling") or ()),
        prefix_loss=prefix_loss,
        top_k=int(action.get("top_k", 0)),
        flow_steps=action.get("steps"),
        dtype=str(attrs.get("dtype") or attrs.get("teacher_hidden_dtype") or "float32"),
        noise_seed=int(attrs.get("noise_seed") or 0),
    )
