"""Sharded extraction: the same anchors written by 1 shard process vs 2 shard processes at once.

Setup (not timed): the recording and benchmark-size pi0_fast of ``bench_extract.py``. Each side
runs the cache stage's shards exactly as the flow's shard tasks do: every shard is
``craft_core.extraction.extract_shard`` in its own spawned process (``call_stage(isolate=True)``),
all shards at once, one torch thread each. Timed per side:

- wall: from starting the shard processes until the last one returned (process start-up, imports
  and teacher loading included: what a user waits for);
- steady: anchors written after each shard's first block, over the time from the earliest first
  block to the last write (extraction alone, start-up left out).

The stores are checked byte for byte against each other. On a 2-core machine expect well under 2x
(two processes share two cores with whatever else runs). Rounds alternate the sides; the best of
each is kept.

Prints one JSON object as its last line: samples/s of each side and the ratios (2 shards / 1).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_extract import build_assets  # noqa: E402


def run_shards(cfg, store_url: str, num_shards: int) -> dict:
    from craft_core.extraction import extract_shard, finalize_store
    from craft_core.pipeline.isolation import call_stage

    cfg = cfg.model_copy(update={"num_shards": num_shards})
    reports: dict[int, list[tuple[float, int]]] = {shard: [] for shard in range(num_shards)}

    def one(shard: int) -> dict:
        def progress(done: int, total: int, metrics: dict) -> None:
            reports[shard].append((time.perf_counter(), done))

        kwargs = {"cfg": cfg, "store_url": store_url, "shard": shard, "num_shards": num_shards,
                  "normalization": "task", "task_dataset": None}
        return call_stage(extract_shard, kwargs, isolate=True, progress=progress)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=num_shards) as pool:
        list(pool.map(one, range(num_shards)))
    wall = time.perf_counter() - started
    finalize_store(store_url)
    # reports[s]: (t, done) at the start (nothing written) and after every block.
    first_blocks = [r[1] for r in reports.values()]
    steady_anchors = sum(r[-1][1] - r[1][1] for r in reports.values())
    steady_time = max(r[-1][0] for r in reports.values()) - min(t for t, _ in first_blocks)
    return {"wall_s": wall, "wall_samples_per_s": cfg.n_anchors / wall, "steady_samples_per_s": steady_anchors / steady_time}


def store_bytes(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for group in ("targets", "inputs", "provenance")
            for p in sorted((root / group).rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="also the anchors per block")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="steps per recorded episode")
    parser.add_argument("--workdir", type=Path, default=None, help="keep dataset/teacher here between runs")
    args = parser.parse_args()

    from craft_core.config import CacheConfig, DatasetSource, PolicySource

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        workdir = args.workdir or Path(tmp)
        repo_id, root, teacher = build_assets(workdir, args.episodes, args.steps)
        cfg = CacheConfig(
            teacher=PolicySource(path=str(teacher)), dataset=DatasetSource(repo_id=repo_id, root=str(root)),
            n_anchors=args.anchors, batch_size=args.batch_size, chunk_anchors=args.batch_size, dtype="float32",
            device="cpu", heldout_fraction=0.0,
        )
        results: dict[int, list[dict]] = {1: [], 2: []}
        for round_index in range(args.rounds):
            for shards in (1, 2) if round_index % 2 == 0 else (2, 1):
                url = str(Path(tmp) / f"anchors_{shards}_{round_index}.zarr")
                results[shards].append(run_shards(cfg, url, shards))
                print(f"round {round_index}, {shards} shard(s): {results[shards][-1]}", flush=True)
        identical = store_bytes(str(Path(tmp) / "anchors_1_0.zarr")) == store_bytes(str(Path(tmp) / "anchors_2_0.zarr"))

    best = {n: {key: max(r[key] for r in rounds) for key in ("wall_samples_per_s", "steady_samples_per_s")}
            for n, rounds in results.items()}
    print(json.dumps({
        "anchors": args.anchors, "anchors_per_block": args.batch_size, "rounds": args.rounds,
        "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "one_shard": best[1], "two_shards": best[2],
        "wall_ratio": best[2]["wall_samples_per_s"] / best[1]["wall_samples_per_s"],
        "steady_ratio": best[2]["steady_samples_per_s"] / best[1]["steady_samples_per_s"],
        "stores_byte_identical": identical,
    }))


if __name__ == "__main__":
    main()
