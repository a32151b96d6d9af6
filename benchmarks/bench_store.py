"""Anchor store vs the first CRaFT tool's .pt shards: bytes per anchor and random-batch throughput.

Both hold the same anchors at pi0_fast-base sizes (one 224 px camera, 48 prompt tokens, teacher
vectors [2 layers, 2 pooled, 2048]). The .pt side is what that tool wrote (float32 pixels in
[-1, 1], int64 tokens, float32 targets; 100 anchors per shard) read the way it read them: a loader
that keeps one shard in memory and loads the shard of each random sample. The Zarr side is
craft's store read through AnchorDataset with the chunk-aware batch sampler. Both draw the same
number of random training batches in one process.

Also measured, on the same store:
- integrity: opening with and without the full verification of the teacher targets against their
  recorded digests, and reading every block of every array with and without checking its digest
  (a training run always checks; the unchecked read is only here as the reference);
- bytes per anchor per retention target: the prefix target of the imported store and, in a second
  store written at pi0_fast-base sizes (256 FAST tokens, top-k 8, float16) with teacher-like
  content, the action_output target.

Prints one JSON object as its last line:
  zarr_bytes_per_anchor, pt_bytes_per_anchor, zarr_samples_per_s, pt_samples_per_s (+ ratios),
  open_s / open_unverified_s, read_mb_per_s / read_unverified_mb_per_s (+ ratio),
  bytes_per_anchor_per_target, bytes_per_anchor_per_array
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from craft_core.importer import import_pt_cache
from craft_core.policies.base import ArraySpec
from craft_core.store import AnchorDataset, AnchorStoreWriter, StoreLayout, finalize_store, open_anchor_store

IMAGE, TOKENS, L, V, D = 224, 48, 2, 2, 2048


def camera_frames(n: int, rng: np.random.Generator) -> np.ndarray:
    """Image-like uint8 frames: smooth colour fields with edges and sensor noise (not white noise)."""
    coarse = rng.integers(0, 256, size=(n, 3, 8, 8)).astype(np.float32)
    smooth = coarse.repeat(IMAGE // 8, axis=2).repeat(IMAGE // 8, axis=3)
    noise = rng.normal(scale=4.0, size=smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def write_pt_cache(folder: Path, n_anchors: int, shard_size: int, seed: int) -> None:
    """The first tool's on-disk format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index, start in enumerate(range(0, n_anchors, shard_size)):
        size = min(shard_size, n_anchors - start)
        pixels = torch.from_numpy(camera_frames(size, rng)).float() / 255.0 * 2.0 - 1.0
        mask = torch.zeros(size, TOKENS, dtype=torch.long)
        mask[:, :20] = 1
        torch.save({
            "pixel_values": pixels,
            "input_ids": torch.from_numpy(rng.integers(0, 257152, size=(size, TOKENS))) * mask,
            "attention_mask": mask,
            "teacher_hidden": torch.from_numpy(rng.normal(size=(size, L, V, D)).astype(np.float32)),
            "meta": {"layers_to_save": [16, 17]},
            "prompts": [f"task {i % 7}" for i in range(start, start + size)],
        }, folder / f"shard_{index:04d}.pt")
    (folder / "metadata.json").write_text(json.dumps({
        "num_anchors": n_anchors, "shard_size": shard_size, "layers_to_save": [-2, -1], "cache_type": "hidden_state_anchoring",
    }))


class OneShardInMemory:
    """The first tool's reader: sample i loads its shard unless that shard is the one in memory."""

    def __init__(self, folder: Path, shard_size: int):
        self.files = sorted(folder.glob("shard_*.pt"))
        self.shard_size = shard_size
        self.current, self.data = None, None

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(index, self.shard_size)
        if shard != self.current:
            self.data = torch.load(self.files[shard], weights_only=True)
            self.current = shard
        return {key: self.data[key][row] for key in ("pixel_values", "input_ids", "attention_mask", "teacher_hidden")}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", type=int, default=480)
    parser.add_argument("--shard-size", type=int, default=100, help="anchors per .pt shard (the first tool's default)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--window-chunks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        pt_dir, zarr_dir = Path(tmp) / "pt_cache", Path(tmp) / "anchors.zarr"
        write_pt_cache(pt_dir, args.anchors, args.shard_size, args.seed)
        # Same anchors, converted by the importer (float16 targets, the extraction default).
        info = import_pt_cache(pt_dir, str(zarr_dir), depth=18, dtype="float16", heldout_fraction=0.0)

        random.seed(args.seed)
        pt_loader = OneShardInMemory(pt_dir, args.shard_size)
        start = time.perf_counter()
        n_pt = 0
        for _ in range(args.batches):
            batch = torch.utils.data.default_collate([pt_loader[random.randrange(args.anchors)] for _ in range(args.batch_size)])
            n_pt += len(batch["teacher_hidden"])
        pt_seconds = time.perf_counter() - start

        dataset = AnchorDataset(str(zarr_dir), split="train", cache_chunks=args.window_chunks)
        loader = dataset.loader(args.batch_size, window_chunks=args.window_chunks, seed=args.seed)
        start = time.perf_counter()
        n_zarr = 0
        while n_zarr < args.batches * args.batch_size:
            for batch in loader:
                n_zarr += len(batch["targets"]["prefix"]["hidden"])
                if n_zarr >= args.batches * args.batch_size:
                    break
        zarr_seconds = time.perf_counter() - start

        result = {
            "anchors": args.anchors,
            "batch_size": args.batch_size,
            "batches": args.batches,
            "zarr_chunk_anchors": info["chunk_anchors"],
            "zarr_bytes_per_anchor": folder_bytes(zarr_dir) / args.anchors,
            "pt_bytes_per_anchor": folder_bytes(pt_dir) / args.anchors,
            "zarr_samples_per_s": n_zarr / zarr_seconds,
            "pt_samples_per_s": n_pt / pt_seconds,
        }
        result["bytes_ratio"] = result["zarr_bytes_per_anchor"] / result["pt_bytes_per_anchor"]
        result["speedup"] = result["zarr_samples_per_s"] / result["pt_samples_per_s"]
        result.update(integrity_costs(str(zarr_dir), rounds=5))
        action_dir = Path(tmp) / "action.zarr"
        write_action_store(str(action_dir), args.anchors, args.seed)
        per_target = {"prefix": folder_bytes(zarr_dir / "targets" / "prefix") / args.anchors,
                      "action_output": folder_bytes(action_dir / "targets" / "action_output") / args.anchors}
        result["bytes_per_anchor_per_target"] = per_target
        result["bytes_per_anchor_per_array"] = {
            f"{kind}/{array.name}": folder_bytes(array) / args.anchors
            for kind, root in (("inputs", zarr_dir / "inputs"), ("prefix", zarr_dir / "targets" / "prefix"),
                               ("action_output", action_dir / "targets" / "action_output"))
            for array in sorted(root.iterdir()) if array.is_dir()
        }
    print(json.dumps(result))


def integrity_costs(url: str, rounds: int) -> dict:
    """Open time and block-read throughput with and without digest checks (best of ``rounds``)."""
    store = open_anchor_store(url)
    names = list(store.description.paths())
    nbytes = sum(store.group[name].nbytes for name in names)

    def timed(a, b) -> tuple[float, float]:
        """Best of ``rounds`` for each, the two alternating so warm-up and load drift hit both alike."""
        best = [float("inf"), float("inf")]
        for _ in range(rounds):
            for side, fn in enumerate((a, b)):
                start = time.perf_counter()
                fn()
                best[side] = min(best[side], time.perf_counter() - start)
        return best[0], best[1]

    def read_all(verify: bool) -> None:
        for start, stop in store.blocks:
            store.read(start, stop, names, verify=verify)

    read_all(False)  # warm-up: page cache, codec pools
    open_verified, open_plain = timed(lambda: open_anchor_store(url), lambda: open_anchor_store(url, verify=False))
    read_verified, read_plain = timed(lambda: read_all(True), lambda: read_all(False))
    return {
        "open_s": open_verified, "open_unverified_s": open_plain,
        "read_mb_per_s": nbytes / read_verified / 1e6, "read_unverified_mb_per_s": nbytes / read_plain / 1e6,
        "read_throughput_ratio_verified_over_unverified": read_plain / read_verified,
    }


def write_action_store(url: str, n_anchors: int, seed: int, tokens: int = 256, top_k: int = 8) -> None:
    """pi0_fast-base sized action_output arrays with teacher-like content: greedy tokens from the
    end of a 257152-token vocabulary, their top-k ids nearby and sorted float16 log-probabilities."""
    rng = np.random.default_rng(seed)
    arrays = {"tokens": ArraySpec((tokens,), "int32"), "token_mask": ArraySpec((tokens,), "bool"),
              "topk_ids": ArraySpec((tokens, top_k), "int32"), "topk_logprobs": ArraySpec((tokens, top_k), "float16")}
    layout = StoreLayout(n_anchors=n_anchors, input_spec={}, targets={"action_output": arrays},
                         target_attrs={"action_output": {"probe": "greedy_fast_tokens", "top_k": top_k}},
                         attrs={"fingerprint": "bench"})
    writer = AnchorStoreWriter(url, layout)
    for block, (start, stop) in enumerate(writer.blocks):
        n = stop - start
        lengths = rng.integers(40, 120, size=n)
        mask = np.arange(tokens)[None] < lengths[:, None]
        greedy = np.where(mask, 257152 - 1 - rng.integers(128, 1152, size=(n, tokens)), 0).astype(np.int32)
        ids = (greedy[..., None] + rng.integers(-3, 4, size=(n, tokens, top_k))).astype(np.int32)
        logprobs = -np.sort(rng.exponential(1.5, size=(n, tokens, top_k)), axis=-1).astype(np.float16)
        writer.write_block(block, {
            "targets/action_output/tokens": greedy, "targets/action_output/token_mask": mask,
            "targets/action_output/topk_ids": ids, "targets/action_output/topk_logprobs": logprobs,
            "provenance/episode_index": np.zeros(n, dtype=np.int64), "provenance/frame_index": np.zeros(n, dtype=np.int64),
            "provenance/task": np.array(["task"] * n), "split/heldout": np.zeros(n, dtype=bool),
        })
    finalize_store(url)


if __name__ == "__main__":
    main()
