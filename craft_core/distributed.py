"""Reduce CRaFT's extra quantities across ranks exactly as DDP reduces the task gradient.

Under DDP (accelerate), the task loss's ``backward()`` averages ``.grad`` over ranks through the
reducer's hooks. The retention forward runs on the *unwrapped* module instead (so those hooks
don't fire on a second backward), which leaves each rank with a *local* retention gradient from
``torch.autograd.grad``. :func:`all_reduce_gradients_` turns it into the same average DDP would
have produced: sum over ranks, divided by the world size. :func:`mean_across_ranks` does the same
for the scalar ``L_ret`` that drives the dual update, so every rank computes the same λ.

Outside ``torch.distributed`` (or with one process) both are no-ops.
"""

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

# Gradients are all-reduced through flat buckets of at most this many bytes (DDP's default is
# 25 MiB): few collectives, and the flat copy stays small next to the gradients themselves.
BUCKET_BYTES = 32 * 1024 * 1024


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and friends) take CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(value: float) -> float:
    """Average of a python float over all ranks (``value`` itself when not distributed)."""
    value = float(value)
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item()) / dist.get_world_size()


def _buckets(grads: list[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive runs of same dtype/device gradients, each at most BUCKET_BYTES (or one tensor)."""
    bucket: list[Tensor] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        same_kind = not bucket or (grad.dtype == bucket[0].dtype and grad.device == bucket[0].device)
        if bucket and (not same_kind or size + nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += nbytes
    if bucket:
        yield bucket


def _agree_on_presence(grads: list[Tensor | None], params: list[Tensor] | None) -> None:
    """Make every rank hold the same set of gradients, so the collectives line up.

    A parameter some rank has a gradient for and another rank has not (data-dependent graph)
    counts as a zero gradient on the latter, as with DDP's find_unused_parameters.
    """
    present = torch.tensor([g is not None for g in grads], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    # Every rank sees the same counts, so every rank takes the same branch (no rank left waiting).
    disagree = [i for i, n in enumerate(present.tolist()) if 0 < n < world]
    if not disagree:
        return
    if params is None:
        raise RuntimeError(
            f"all_reduce_gradients_: ranks disagree on which gradients exist (indices {disagree[:10]}); "
            "pass params=... so a missing one is treated as a zero gradient"
        )
    for i in disagree:
        if grads[i] is None:
            grads[i] = torch.zeros_like(params[i])


def all_reduce_gradients_(grads: list[Tensor | None], params: list[Tensor] | None = None) -> list[Tensor | None]:
    """Average ``grads`` over ranks in place (sum, then divide by the world size); returns ``grads``.

    ``None`` entries stay ``None`` when no rank has that gradient. If ranks disagree about which
    entries are ``None``, the missing ones are filled with zeros shaped like ``params`` (the list
    given to ``autograd.grad``); without ``params`` that is an error (raised on every rank).
    """
    if not is_distributed():
        return grads
    if params is not None and len(params) != len(grads):
        raise ValueError(f"all_reduce_gradients_: {len(grads)} gradients but {len(params)} params")
    _agree_on_presence(grads, params)

    world = dist.get_world_size()
    device = _collective_device()
    for bucket in _buckets([g for g in grads if g is not None]):
        if len(bucket) == 1 and bucket[0].is_contiguous() and bucket[0].device == device:
            # A lone (large) tensor is reduced where it lies instead of through a flat copy.
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM)
            bucket[0].div_(world)
            continue
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
    return grads
