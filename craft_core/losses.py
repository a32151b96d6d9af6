"""Retention loss: how far the student's pooled hidden states are from the teacher's cached ones.

Inputs are pooled hidden states ``[B, L, V, D]`` (batch, layers, pooled vectors, hidden size).
Whatever their dtype (the cache may be float16, the student bf16), the distance is computed in
float32 so that the keystone invariant "exact copy of the teacher => L_ret ~ 0" is not drowned in
half-precision rounding. Float64 inputs stay float64 (used by tests against hand computations).

Per-sample value ``l_b`` (what ``reduction="none"`` returns, shape ``[B]``):

- ``mse``:    mean over (L, V, D) of (s - t)^2
- ``l1``:     mean over (L, V, D) of |s - t|
- ``cosine``: mean over (L, V) of 1 - cos(s[l, v], t[l, v]); the cosine is taken per pooled
  vector of size D, never across layers or strategies flattened together.

``reduction="mean"`` returns mean_b l_b (equal to the element-wise mean over the whole batch) and
``reduction="sum"`` returns sum_b l_b, so a batch's ``sum`` is ``B * mean`` and the per-element
scale does not grow with L, V or D.
"""

import torch
from torch import Tensor

LOSS_KINDS: tuple[str, ...] = ("mse", "cosine", "l1")
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")

# Floor of each vector's norm in the cosine (as torch.nn.functional.cosine_similarity does): a
# zero pooled vector has cosine 0, i.e. loss 1, with anything, instead of a NaN.
_COSINE_EPS = 1e-8


def _check_pooled(student: Tensor, teacher: Tensor) -> None:
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, Tensor):
            raise TypeError(f"retention_loss: {name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"retention_loss: {name} must be a floating tensor, got dtype {value.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"retention_loss: student shape {tuple(student.shape)} != teacher shape "
            f"{tuple(teacher.shape)}; both must be pooled hidden states [B, L, V, D] with the same "
            "layers and pooling strategies (check the anchor store's layers/pooling attributes)"
        )
    if student.dim() != 4:
        raise ValueError(
            f"retention_loss: expected pooled hidden states [B, L, V, D], got student and teacher of "
            f"shape {tuple(student.shape)} ({student.dim()} dims)"
        )


def retention_loss(student: Tensor, teacher: Tensor, kind: str = "mse", reduction: str = "mean") -> Tensor:
    """Distance between pooled hidden states ``[B, L, V, D]``, in float32 (float64 stays float64).

    ``reduction``: ``"mean"`` (scalar, mean of per-sample losses), ``"sum"`` (scalar, their sum) or
    ``"none"`` (per-sample losses, shape ``[B]``). See the module docstring for the exact formulas.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"retention_loss: unknown kind '{kind}'; choose one of {list(LOSS_KINDS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"retention_loss: unknown reduction '{reduction}'; choose one of {list(REDUCTIONS)}")
    _check_pooled(student, teacher)

    compute_dtype = torch.promote_types(student.dtype, torch.float32)
    compute_dtype = torch.promote_types(compute_dtype, teacher.dtype)
    s = student.to(compute_dtype)
    t = teacher.to(compute_dtype)

    if kind == "mse":
        per_sample = (s - t).square().mean(dim=(1, 2, 3))
    elif kind == "l1":
        per_sample = (s - t).abs().mean(dim=(1, 2, 3))
    else:
        dot = (s * t).sum(dim=-1)
        s_norm = torch.linalg.vector_norm(s, dim=-1).clamp_min(_COSINE_EPS)
        t_norm = torch.linalg.vector_norm(t, dim=-1).clamp_min(_COSINE_EPS)
        cos = dot / (s_norm * t_norm)
        per_sample = (1.0 - cos).mean(dim=(1, 2))

    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()
