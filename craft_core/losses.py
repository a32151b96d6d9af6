"""Retention losses: how far the student is from the teacher's cached targets, one per target.

- ``retention_loss`` (target ``prefix``): pooled hidden states, below.
- ``token_distribution_kl`` (target ``action_output``, pi0_fast): the teacher's next-token
  distribution at its own greedy FAST tokens, kept as top-k log-probabilities plus the rest of the
  mass as one bin.
- ``hard_token_cross_entropy`` (``action_output`` with ``top_k: 0``): the teacher's greedy tokens
  as labels; the policy's own FAST cross-entropy.
- ``velocity_mse`` (target ``action_output``, flow matching): the teacher's velocity at stored
  noisy actions and times, over the real action dimensions.

All are computed in float32 (float64 inputs stay float64) and are exactly 0 for a student that is
a copy of the teacher on a float32 store, except the hard-label cross-entropy, which is the
teacher's own (non-zero) loss on its greedy tokens.

Pooled hidden states (``prefix``):

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


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def token_distribution_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one bin for the rest of the mass.

    ``student_logits [B, T, V]`` predict the token at each position; ``topk_ids [B, T, k]`` and
    ``topk_logprobs [B, T, k]`` are the teacher's; ``mask [B, T]`` marks the positions that count.
    Returns the mean over those positions (0 when a copy of the teacher is compared on float32 targets).
    """
    if student_logits.shape[:2] != topk_ids.shape[:2] or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"token_distribution_kl: logits {tuple(student_logits.shape)}, ids {tuple(topk_ids.shape)} and "
            f"log-probs {tuple(topk_logprobs.shape)} must share [B, T] (and k)"
        )
    dtype = _compute_dtype(student_logits, topk_logprobs)
    log_q_all = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_q = log_q_all.gather(-1, topk_ids.long())
    log_p = topk_logprobs.to(dtype)
    p = log_p.exp()
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - log_q.exp().sum(-1)).clamp_min(torch.finfo(dtype).tiny)
    head = (p * (log_p - log_q)).sum(-1)
    # p_rest * log(p_rest / q_rest), 0 where p_rest is 0 (the teacher put all its mass on the top k).
    tail = torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp_min(torch.finfo(dtype).tiny)) - torch.log(q_rest)),
                       torch.zeros_like(p_rest))
    per_position = head + tail
    weight = mask.to(dtype)
    return (per_position * weight).sum() / weight.sum().clamp_min(1.0)


def hard_token_cross_entropy(student_logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of ``student_logits [B, T, V]`` on ``tokens [B, T]`` at ``mask`` positions (mean)."""
    dtype = _compute_dtype(student_logits)
    per_position = torch.nn.functional.cross_entropy(
        student_logits.to(dtype).flatten(0, 1), tokens.long().flatten(), reduction="none"
    ).view(tokens.shape)
    weight = mask.to(dtype)
    return (per_position * weight).sum() / weight.sum().clamp_min(1.0)


def velocity_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference of velocities ``[B, S, H, A]`` (A = the real action dimensions)."""
    if student.shape != teacher.shape:
        raise ValueError(f"velocity_mse: student {tuple(student.shape)} != teacher {tuple(teacher.shape)}")
    dtype = _compute_dtype(student, teacher)
    return (student.to(dtype) - teacher.to(dtype)).square().mean()
