"""Memory and time of craft's in-place gradient surgery vs the clone-everything approach.

Both sides do the same maths on the same gradients: cosine conflict test, PCGrad projection
(the gradients are made to conflict, so it always fires), weighted merge ``g_t + lam g_r``.

- craft:  ``craft_core.surgery.apply_gradient_surgery`` (foreach ops in place on ``.grad``).
- clone:  what the method's first implementation did: clone the task gradients, clone the
  retention gradients, project into a new list, build a merged list, hand it to ``.grad``.

What "extra" means: each approach runs in a fresh process holding the parameters and their task
gradients (``.grad``). The resident set size (RSS) then is the baseline, and the kernel's RSS
high-water mark is reset (``/proc/self/clear_refs`` = 5). Then the retention gradients are
allocated (identically for both sides: a real step gets them from ``torch.autograd.grad``) and
the surgery runs. ``*_extra_bytes`` = high-water RSS (``VmHWM``) − baseline RSS: the peak memory
each approach needs beyond params + ``.grad``, *including* the one retention-gradient buffer. The
issue's bound is that craft needs nothing gradient-sized beyond that buffer, i.e.
``craft_extra_bytes`` ≲ ``grad_bytes``. RSS is measured by the kernel, so torch's allocations
(invisible to tracemalloc) count; every buffer is written before it is measured (untouched pages
are not resident). Where clear_refs is unavailable, ``ru_maxrss`` of the fresh process is used
(its setup writes buffers in place, so the pre-baseline peak is the baseline itself).

Time: the surgery call only (retention gradients already in memory), min over ``--repeats``.

Usage: ``python benchmarks/bench_surgery.py [--layers 24 --width 1024]`` (~302M float32 params,
~3.6 GB for craft and ~7 GB for clone, one process at a time). Last stdout line: one JSON object.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from craft_core.surgery import apply_gradient_surgery  # noqa: E402

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
LAM = 0.5
CONFLICT_THRESHOLD = -0.1


def transformer_shapes(layers: int, width: int) -> list[tuple[int, ...]]:
    """Per block: q, k, v, o [d, d]; MLP up [4d, d] and down [d, 4d]; biases; two norms."""
    d = width
    block = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 4 + [(4 * d,), (d,)] + [(d,)] * 4
    return block * layers


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_worked: bool) -> int:
    if reset_worked:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fill_gradients(params: list[torch.Tensor], retention: list[torch.Tensor], seed: int) -> None:
    """In place: task grads ~ U(-1, 1); retention = U(-1, 1) - 0.5 g_t, i.e. cosine ~ -0.45 (conflict)."""
    generator = torch.Generator().manual_seed(seed)
    for p, r in zip(params, retention):
        p.grad.uniform_(-1.0, 1.0, generator=generator)
        r.uniform_(-1.0, 1.0, generator=generator).add_(p.grad, alpha=-0.5)


def clone_surgery(params: list[torch.Tensor], retention: list[torch.Tensor]) -> dict:
    """The first implementation's shape: copies of both gradients and a merged list."""
    task = [p.grad.clone() for p in params]
    ret = [r.clone() for r in retention]
    dot = sum(torch.dot(t.reshape(-1), r.reshape(-1)).double() for t, r in zip(task, ret)).item()
    task_norm = math.sqrt(sum(torch.linalg.vector_norm(t).double() ** 2 for t in task).item())
    ret_norm = math.sqrt(sum(torch.linalg.vector_norm(r).double() ** 2 for r in ret).item())
    cosine = dot / (task_norm * ret_norm)
    projected = cosine < CONFLICT_THRESHOLD and ret_norm**2 > 1e-30
    if projected:
        coefficient = dot / ret_norm**2
        task = [t - coefficient * r for t, r in zip(task, ret)]
    merged = [t + LAM * r for t, r in zip(task, ret)]
    for p, g in zip(params, merged):
        p.grad = g
    return {"cosine": cosine, "projected": projected}


def craft_surgery(params: list[torch.Tensor], retention: list[torch.Tensor]) -> dict:
    stats = apply_gradient_surgery(params, retention, lam=LAM, merge="weighted", conflict_threshold=CONFLICT_THRESHOLD)
    return {"cosine": stats.cosine, "projected": stats.projected}


def worker(method: str, layers: int, width: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    surgery = craft_surgery if method == "craft" else clone_surgery
    shapes = transformer_shapes(layers, width)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape).fill_(0.01))
        p.grad = torch.empty(shape).fill_(0.0)
        params.append(p)
    n_params = sum(p.numel() for p in params)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)

    baseline = _rss_bytes()
    reset_worked = _reset_peak()
    retention = [torch.empty_like(p) for p in params]
    _fill_gradients(params, retention, seed=0)
    start = time.perf_counter()
    result = surgery(params, retention)
    times = [time.perf_counter() - start]
    extra = _peak_bytes(reset_worked) - baseline
    # Same maths on both sides: the merged gradient's checksum is compared across the processes.
    checksum = sum(p.grad.double().sum().item() for p in params[:12])

    for repeat in range(1, repeats):
        _fill_gradients(params, retention, seed=repeat)
        start = time.perf_counter()
        surgery(params, retention)
        times.append(time.perf_counter() - start)
    return {
        "method": method, "params": n_params, "grad_bytes": grad_bytes, "extra_bytes": extra,
        "seconds": min(times), "all_seconds": times, "checksum": checksum, "peak_source":
        "VmHWM after clear_refs" if reset_worked else "ru_maxrss", **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["craft", "clone"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.width, args.repeats)))
        return

    results = {}
    for method in ("craft", "clone"):  # one fresh process each, one after the other
        out = subprocess.run(
            [sys.executable, __file__, "--worker", method, "--layers", str(args.layers), "--width",
             str(args.width), "--repeats", str(args.repeats)],
            check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method}: {results[method]}", flush=True)
    craft, clone = results["craft"], results["clone"]
    if not (craft["projected"] and clone["projected"]):
        raise SystemExit("the benchmark's gradients were meant to conflict; both sides must project")
    if not math.isclose(craft["checksum"], clone["checksum"], rel_tol=1e-4):
        raise SystemExit(f"merged gradients differ: craft {craft['checksum']} vs clone {clone['checksum']}")
    grad_bytes = craft["grad_bytes"]
    print(f"craft extra = {craft['extra_bytes'] / grad_bytes:.3f} x grad bytes, "
          f"clone extra = {clone['extra_bytes'] / grad_bytes:.3f} x grad bytes; "
          f"clone/craft time = {clone['seconds'] / craft['seconds']:.2f}")
    print(json.dumps({
        "params": craft["params"],
        "grad_bytes": grad_bytes,
        "craft_extra_bytes": craft["extra_bytes"],
        "clone_extra_bytes": clone["extra_bytes"],
        "craft_s": round(craft["seconds"], 4),
        "clone_s": round(clone["seconds"], 4),
        "craft_extra_over_grad": round(craft["extra_bytes"] / grad_bytes, 4),
        "clone_extra_over_grad": round(clone["extra_bytes"] / grad_bytes, 4),
        "clone_over_craft_time": round(clone["seconds"] / craft["seconds"], 3),
        "threads": 1,
        "peak_source": craft["peak_source"],
    }))


if __name__ == "__main__":
    main()
