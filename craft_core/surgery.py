"""Gradient surgery of a CRaFT retention step, in place on the parameters' ``.grad``.

The task gradient ``g_t`` is what ``loss.backward()`` left in ``.grad``; the retention gradient
``g_r`` comes separately from :func:`retention_gradients` (``torch.autograd.grad``). Then:

1. Statistics over the whole parameter vector (float64 sums of float32 partial results, so bf16
   parameters do not lose the conflict test): ``dot = <g_t, g_r>``, ``|g_t|``, ``|g_r|`` and
   ``cosine = dot / (|g_t| |g_r|)`` (0 when either norm is 0).
2. Conflict when ``cosine < conflict_threshold`` (the *cosine*, not the raw dot product). Then
   PCGrad: ``g_t <- g_t - (dot / |g_r|^2) g_r``, skipped when ``|g_r|^2`` is ~0.
3. Merge: ``weighted`` ``g_t + lam g_r``; ``equal`` ``(g_t + g_r) / 2``; ``task_priority``
   ``g_t + min(lam, 1) g_r``.

Steps 2 and 3 are one linear combination ``a g_t + b g_r`` per parameter, written into ``.grad``
with ``torch._foreach_*`` ops: ``a`` is the merge's task weight and ``b = merge weight of g_r -
a * projection coefficient``. Nothing gradient-sized is allocated, so the only gradient-sized
buffer beyond ``.grad`` is the retention gradient itself (the first CRaFT implementation kept
three copies: ≈14 GB each in fp32 for a 3.5B model).

A parameter whose gradient is ``None`` in one objective is treated as a zero gradient there
(exactly what the full-vector formulas say):

- task grad ``None``, retention grad present: ``.grad`` becomes ``b g_r`` (the retention tensor
  is scaled in place and reused as ``.grad``, no copy);
- retention grad ``None``: ``.grad`` becomes ``a g_t`` (untouched when ``a == 1``);
- both ``None``: ``.grad`` stays ``None``.

"Untouched" is literal: a ``.grad`` tensor whose coefficients are ``a == 1`` and ``b == 0`` (no
projection, ``weighted`` merge with ``lam == 0``) is not written at all, so it stays bit-identical;
in general, a task gradient is never modified before the merge unless the conflict test fires.

The retention gradients passed in are consumed: they may be scaled in place and handed to
``.grad``. Don't reuse them after the call.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MERGE_MODES: tuple[str, ...] = ("weighted", "equal", "task_priority")

# |g_r|^2 at or below this is "zero": the projection coefficient dot / |g_r|^2 would be noise.
_TINY_SQUARED_NORM = 1e-30

# Low-precision gradients are upcast to float32 for the dot product this many elements at a time,
# so the temporary stays small whatever the largest parameter (a 257k x 2048 embedding, say).
_DOT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SurgeryStats:
    """Statistics of one retention step, all measured *before* projection and merge."""

    dot: float
    cosine: float
    task_norm: float
    retention_norm: float
    projected: bool


def retention_gradients(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """``d loss / d params`` without touching ``.grad`` (``None`` where ``loss`` doesn't depend on a param).

    Call it on a retention loss computed through the *unwrapped* module under DDP, then average
    the result with :func:`craft_core.distributed.all_reduce_gradients_`.
    """
    params = list(params)
    if loss.dim() != 0:
        raise ValueError(f"retention_gradients: loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            "retention_gradients: loss does not require grad; compute it from the student's forward "
            "with grad enabled (not under torch.no_grad())"
        )
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    grads: list[Tensor | None] = [None] * len(params)
    if trainable:
        found = torch.autograd.grad(loss, [params[i] for i in trainable], allow_unused=True)
        for i, grad in zip(trainable, found):
            grads[i] = grad
    return grads


def _merge_weights(merge: str, lam: float) -> tuple[float, float]:
    """(task weight, retention weight) of the merge."""
    if merge == "weighted":
        return 1.0, lam
    if merge == "equal":
        return 0.5, 0.5
    if merge == "task_priority":
        return 1.0, min(lam, 1.0)
    raise ValueError(f"apply_gradient_surgery: unknown merge '{merge}'; choose one of {list(MERGE_MODES)}")


def _squared_norm(tensors: list[Tensor]) -> Tensor:
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    squares = []
    for dtype, group in by_dtype.items():
        norms = torch._foreach_norm(group, 2, dtype=torch.promote_types(dtype, torch.float32))
        squares.append(torch.stack([n.to(norms[0].device) for n in norms]).double().square().sum())
    if not squares:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([s.to(squares[0].device) for s in squares]).sum()


def _dot(task: list[Tensor], retention: list[Tensor]) -> Tensor:
    # torch has no _foreach dot, and _foreach_mul would allocate a gradient-sized product, so each
    # pair goes through torch.dot on flat views (BLAS, no temporary for float32/float64).
    partial = []
    for a, b in zip(task, retention):
        a, b = a.reshape(-1), b.reshape(-1)
        if a.dtype in (torch.float32, torch.float64) and b.dtype == a.dtype:
            partial.append(torch.dot(a, b).to(torch.float64))
            continue
        for start in range(0, a.numel(), _DOT_CHUNK_ELEMENTS):
            stop = start + _DOT_CHUNK_ELEMENTS
            partial.append(torch.dot(a[start:stop].float(), b[start:stop].float()).to(torch.float64))
    if not partial:
        return torch.zeros((), dtype=torch.float64)
    device = partial[0].device
    return torch.stack([p.to(device) for p in partial]).sum()


def _check_lists(params: list[Tensor], retention_grads: list[Tensor | None]) -> None:
    if len(params) != len(retention_grads):
        raise ValueError(
            f"apply_gradient_surgery: {len(params)} params but {len(retention_grads)} retention gradients; "
            "pass the list retention_gradients(loss, params) returned for the same params"
        )
    for i, (p, g_r) in enumerate(zip(params, retention_grads)):
        if g_r is None:
            continue
        if g_r.shape != p.shape:
            raise ValueError(
                f"apply_gradient_surgery: retention gradient {i} has shape {tuple(g_r.shape)} but its "
                f"parameter has shape {tuple(p.shape)}"
            )
        if p.grad is not None and p.grad.dtype != g_r.dtype:
            raise ValueError(
                f"apply_gradient_surgery: parameter {i} has a {p.grad.dtype} .grad but a {g_r.dtype} "
                "retention gradient; both must come from the same parameters"
            )


def apply_gradient_surgery(
    params: Iterable[Tensor],
    retention_grads: Sequence[Tensor | None],
    *,
    lam: float,
    merge: str = "weighted",
    conflict_threshold: float = -0.1,
) -> SurgeryStats:
    """Project (on conflict) and merge the retention gradient into ``.grad`` in place; see the module doc."""
    params = list(params)
    retention_grads = list(retention_grads)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"apply_gradient_surgery: lam must be a finite number >= 0, got {lam}")
    task_weight, retention_weight = _merge_weights(merge, float(lam))
    _check_lists(params, retention_grads)

    both = [i for i, (p, g_r) in enumerate(zip(params, retention_grads)) if p.grad is not None and g_r is not None]
    task_only = [i for i, (p, g_r) in enumerate(zip(params, retention_grads)) if p.grad is not None and g_r is None]
    retention_only = [i for i, (p, g_r) in enumerate(zip(params, retention_grads)) if p.grad is None and g_r is not None]

    task_sq = _squared_norm([params[i].grad for i in both + task_only])
    retention_sq = _squared_norm([retention_grads[i] for i in both + retention_only])
    dot = _dot([params[i].grad for i in both], [retention_grads[i] for i in both])
    # One host sync for all statistics.
    dot_value, task_sq_value, retention_sq_value = torch.stack(
        [dot, task_sq.to(dot.device), retention_sq.to(dot.device)]
    ).tolist()

    task_norm = math.sqrt(task_sq_value)
    retention_norm = math.sqrt(retention_sq_value)
    denominator = task_norm * retention_norm
    cosine = dot_value / denominator if denominator > 0 else 0.0
    projected = cosine < conflict_threshold and retention_sq_value > _TINY_SQUARED_NORM
    projection = dot_value / retention_sq_value if projected else 0.0
    # merged = a * (g_t - c * g_r) + w_r * g_r = a * g_t + (w_r - a * c) * g_r
    a = task_weight
    b = retention_weight - task_weight * projection

    task_grads = [params[i].grad for i in both + task_only]
    if a != 1.0 and task_grads:
        torch._foreach_mul_(task_grads, a)
    if b != 0.0 and both:
        torch._foreach_add_([params[i].grad for i in both], [retention_grads[i] for i in both], alpha=b)
    if retention_only:
        moved = [retention_grads[i] for i in retention_only]
        torch._foreach_mul_(moved, b)
        for i, g_r in zip(retention_only, moved):
            params[i].grad = g_r

    return SurgeryStats(
        dot=dot_value, cosine=cosine, task_norm=task_norm, retention_norm=retention_norm, projected=projected
    )
