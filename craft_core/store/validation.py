"""Validating a store: structure against its attributes, values, and fit with a student.

Every refusal is an :class:`~craft_core.store.layout.AnchorStoreError` that says what is wrong and
what to do.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import zarr

from craft_core.policies.base import ArraySpec
from craft_core.store.layout import (
    HELDOUT,
    KINDS,
    LABELS,
    MARKERS,
    PROVENANCE,
    SCHEMA_VERSION,
    TEACHER,
    AnchorStoreError,
)

_RERUN = "Delete the store and re-run the cache stage (or the importer)."


def check_structure(url: str, group: zarr.Group, attrs: dict, *, require_complete: bool) -> None:
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


def check_values(url: str, group: zarr.Group, attrs: dict) -> None:
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


def check_fits_student(store, student, *, layers: Sequence[int] | None = None) -> None:
    """The one check "does this store fit this student": refuses, with what to do, a store whose
    teacher targets the student cannot be compared with.

    ``store`` is an opened :class:`~craft_core.store.reader.AnchorStore`; ``student`` a
    :class:`~craft_core.policies.PolicyAdapter` of the model that will be compared with the teacher
    (policy type, backbone depth and width, prefix inputs, token-label support); ``layers``, when
    given, the layers the consumer asks for (resolved against the student's depth).
    """
    from craft_core.policies.base import resolve_layers

    url, attrs = store.url, store.attrs
    teacher = attrs.get("teacher") or {}
    rerun = "Use a store made from the student's base model (re-run the cache stage with it as teacher)."
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
    student_spec = {name: ArraySpec.from_json(spec.to_json()) for name, spec in student.input_spec().items()}
    if stored_spec != student_spec:
        raise AnchorStoreError(
            url, f"stored inputs {_spec_text(stored_spec)} differ from the student's prefix inputs {_spec_text(student_spec)}",
            "The student must see the same prefix as the teacher (same policy type, image size, tokenizer length): "
            "re-run the cache stage with the student's base model.",
        )
    if store.kind == "token_level":
        if not getattr(student, "supports_token_labels", False):
            raise AnchorStoreError(
                url, f"it is a token_level cache but the {student.policy_type} adapter has no token-level labels",
                "Use a hidden_state cache for this policy.",
            )
        wanted = {name: ArraySpec.from_json(spec.to_json()) for name, spec in student.label_spec().items()}
        if wanted != store.labels_spec:
            raise AnchorStoreError(
                url, f"stored labels {_spec_text(store.labels_spec)} differ from the student's token-level labels "
                f"{_spec_text(wanted)}",
                "Import or extract the labels in the student's format (adapter.label_spec()).",
            )
        return
    if attrs["hidden_size"] != student.hidden_size:
        raise AnchorStoreError(
            url, f"teacher hidden size {attrs['hidden_size']} differs from the student's {student.hidden_size}", rerun
        )
    stored_layers = list(attrs["layers"])
    try:
        fits = resolve_layers(stored_layers, student.depth) == stored_layers
    except ValueError as exc:
        fits, why = False, str(exc)
    else:
        why = "they are not absolute hidden-state indices"
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


def _spec_text(spec: dict[str, ArraySpec]) -> str:
    return "{" + ", ".join(f"{name}: {list(s.shape)} {s.dtype}" for name, s in sorted(spec.items())) + "}"


# ---------------------------------------------------------------- torch reader
