"""Retention gradients under DDP: 2 CPU processes (gloo) vs one process on the union of their batches.

The training loop's recipe is exercised as is: task loss backward through the DDP wrapper (DDP
averages ``.grad``), retention loss through the *unwrapped* module + ``torch.autograd.grad`` +
``all_reduce_gradients_``, then the in-place surgery. Every rank must end with the gradient a
single process computes on both ranks' batches together.
"""

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import craft_core.distributed as craft_distributed
from craft_core.distributed import all_reduce_gradients_, mean_across_ranks
from craft_core.surgery import apply_gradient_surgery, retention_gradients

WORLD = 2
# (conflict_threshold, merge, lam): always project / never project, two merge modes.
SURGERIES = [(1.0, "weighted", 0.7), (-1.0, "equal", 0.7)]


class TinyPolicy(nn.Module):
    """A shared trunk, a head only the task uses, a head and an extra only retention uses."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.task_head = nn.Linear(8, 3)
        self.anchor_head = nn.Linear(8, 5)
        self.extra = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        return self.task_head(self.trunk(x))

    def anchor_features(self, x, flagged):
        features = self.anchor_head(self.trunk(x))
        if flagged.any():  # data-dependent graph: only some batches reach `extra`
            features = features + flagged[:, None].float() * self.extra
        return features


def _model() -> TinyPolicy:
    torch.manual_seed(0)
    model = TinyPolicy()
    with torch.no_grad():
        model.extra.normal_()
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    task_x, task_y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    anchor_x, anchor_t = torch.randn(6, 4, generator=g), torch.randn(6, 5, generator=g)
    flagged = torch.tensor([True, False, True, False, False, False])  # only in rank 0's slice
    return task_x, task_y, anchor_x, anchor_t, flagged


def _task_loss(module, x, y):
    return (module(x) - y).square().mean()


def _retention_loss(model, x, target, flagged):
    return (model.anchor_features(x, flagged) - target).square().mean()


def _reference():
    """One process, both ranks' batches: mean of the per-rank losses (equal local batch sizes)."""
    task_x, task_y, anchor_x, anchor_t, flagged = _data()
    results = []
    for threshold, merge, lam in SURGERIES:
        model = _model()
        params = list(model.parameters())
        _task_loss(model, task_x, task_y).backward()
        ret_loss = sum(
            _retention_loss(model, anchor_x[r * 3 : (r + 1) * 3], anchor_t[r * 3 : (r + 1) * 3], flagged[r * 3 : (r + 1) * 3])
            for r in range(WORLD)
        ) / WORLD
        grads = retention_gradients(ret_loss, params)
        stats = apply_gradient_surgery(params, grads, lam=lam, merge=merge, conflict_threshold=threshold)
        results.append({"grads": [p.grad.clone() for p in params], "stats": stats, "ret_loss": ret_loss.item()})
    return results


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    craft_distributed.BUCKET_BYTES = 200  # flat buckets of several tensors and lone tensors alike
    task_x, task_y, anchor_x, anchor_t, flagged = _data()
    local_task = slice(rank * 4, (rank + 1) * 4)
    local_anchor = slice(rank * 3, (rank + 1) * 3)
    results = []
    for threshold, merge, lam in SURGERIES:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        params = list(model.parameters())
        _task_loss(ddp, task_x[local_task], task_y[local_task]).backward()
        ret_loss = _retention_loss(ddp.module, anchor_x[local_anchor], anchor_t[local_anchor], flagged[local_anchor])
        grads = retention_gradients(ret_loss, params)
        local_presence = {name: g is not None for (name, _), g in zip(model.named_parameters(), grads)}
        try:
            all_reduce_gradients_(list(grads))  # ranks disagree about `extra`: must raise on every rank
            mismatch_error = None
        except RuntimeError as err:
            mismatch_error = str(err)
        all_reduce_gradients_(grads, params)
        stats = apply_gradient_surgery(params, grads, lam=lam, merge=merge, conflict_threshold=threshold)
        results.append({
            "grads": [None if p.grad is None else p.grad.clone() for p in params],
            "stats": stats,
            "ret_loss": mean_across_ranks(ret_loss.item()),
            "local_presence": local_presence,
            "mismatch_error": mismatch_error,
        })
    torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def _run_workers(tmp_path: Path) -> list[list[dict]]:
    # Forked workers inherit the imported torch: a fresh interpreter per rank would re-import torch
    # and DDP's torch._dynamo dependency, which is slow where bytecode isn't cached. Import that
    # here, once, before forking.
    import torch._dynamo  # noqa: F401

    outs = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    init_file = str(tmp_path / "rendezvous")
    context = mp.start_processes(
        _fork_entry, args=(WORLD, init_file, outs), nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "distributed workers did not finish within 120 s"
    finally:
        for process in context.processes:  # never leave a worker behind (timeout or a failed sibling)
            if process.is_alive():
                process.kill()
            process.join(timeout=30)
    return [torch.load(out, weights_only=False) for out in outs]


def _fork_entry(rank: int, world: int, init_file: str, outs: list[str]) -> None:
    _worker(rank, world, init_file, outs[rank])


def test_ddp_retention_gradients_match_single_process_on_union_of_batches(tmp_path):
    per_rank = _run_workers(tmp_path)
    reference = _reference()
    for rank, results in enumerate(per_rank):
        for (threshold, merge, lam), got, want in zip(SURGERIES, results, reference):
            where = f"rank {rank}, merge={merge}, threshold={threshold}"
            assert got["stats"].projected == want["stats"].projected == (threshold == 1.0), where
            for field in ("dot", "cosine", "task_norm", "retention_norm"):
                assert getattr(got["stats"], field) == pytest.approx(getattr(want["stats"], field), rel=1e-5, abs=1e-7)
            for i, (g, w) in enumerate(zip(got["grads"], want["grads"])):
                assert g is not None, f"{where}: param {i} has no merged gradient"
                assert torch.allclose(g, w, atol=1e-6), f"{where}: param {i} differs by {(g - w).abs().max()}"
            assert got["ret_loss"] == pytest.approx(want["ret_loss"], rel=1e-12)
            assert "ranks disagree on which gradients exist" in got["mismatch_error"]
            # the data-dependent `extra` parameter really was missing on rank 1 before the reduction
            presence = got["local_presence"]
            assert presence["extra"] == (rank == 0)
            assert not presence["task_head.weight"] and presence["anchor_head.weight"] and presence["trunk.0.weight"]


def test_helpers_are_no_ops_without_torch_distributed():
    grads = [torch.ones(3), None]
    before = grads[0].clone()
    assert all_reduce_gradients_(grads) is grads and torch.equal(grads[0], before) and grads[1] is None
    assert mean_across_ranks(0.25) == 0.25
