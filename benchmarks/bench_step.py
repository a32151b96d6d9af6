"""Step time of the training loop: baseline vs CRaFT with a retention step every 1 and every 5 steps.

The same tiny real pi0_fast policy (built offline), the same pusht task data in the same order and
the same anchor store (made by the cache stage, targets ``prefix`` and ``action_output``) are
trained with ``craft_core.train.train`` in several ways, interleaved over several rounds in this
one process so machine load hits all of them alike (the order rotates per round; per-round ratios
to the baseline are reported too). The step time is the loop's own ``step_time_s`` (data, forward,
backward, surgery, optimizer step) from metrics.jsonl, the first step of each run left out
(iterator start-up).

Last stdout line: one JSON object with ``baseline_step_s``, ``craft_step_s_k1`` and
``craft_step_s_k5`` (prefix target only), ``craft_step_s_k5_action`` (``[prefix, action_output]``)
(mean seconds per step) and their ratios to the baseline. Expected: k5 <= 1.15 x baseline (a
retention step every 5th step), k1 <= 1.9 x baseline, k5 with action outputs <= 1.25 x baseline.

Two more pairs, each CRaFT (K=5, prefix) against its own baseline with the same setting:
``lora`` (``train.peft``: LoRA rank 8 on the attention q/v projections; the retention gradient and
its buffer are adapter-sized) and ``accum2`` (``train.grad_accum_steps: 2``: two micro-batches per
optimizer step, one retention step per optimizer step): ``ratio_lora_k5``, ``ratio_accum2_k5``.

    .venv/bin/python benchmarks/bench_step.py [--rounds 6] [--steps 11]
"""

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_assets(work: Path) -> dict:
    """Two recorded pusht tasks, a tiny pi0_fast teacher for task B, and its anchor store."""
    from craft_core.config import CacheConfig, DatasetSource, PolicySource
    from craft_core.extraction import extract_anchors
    from craft_core.demo.sim_datasets import PUSHT_TASKS, record_dataset
    from craft_core.demo.tiny import build_tiny_policy

    datasets = {}
    for task in ("push_t", "circle"):
        root = work / f"pusht_{task}"
        meta = record_dataset("pusht", task, repo_id=f"local/pusht_{task}", root=root, n_episodes=2,
                              max_steps=30, image_size=96, seed=0)
        datasets[task] = {"repo_id": f"local/pusht_{task}", "root": root, "meta": meta}
    teacher = build_tiny_policy("pi0_fast", work / "teacher", ds_meta=datasets["circle"]["meta"], seed=0,
                                extra_texts=list(PUSHT_TASKS.values()))
    store = work / "anchors.zarr"
    extract_anchors(
        CacheConfig(teacher=PolicySource(path=str(teacher)),
                    dataset=DatasetSource(repo_id=datasets["circle"]["repo_id"], root=str(datasets["circle"]["root"])),
                    n_anchors=32, dtype="float32", batch_size=8, device="cpu", heldout_fraction=0.0,
                    targets=["prefix", "action_output"]),
        str(store),
    )
    return {"teacher": teacher, "store": str(store), "task": datasets["push_t"]}


def timed_steps(metrics_path: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return records[1:]  # step 1 includes the data iterator's start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=11, help="steps per run; 11 = 10 timed, 2 of them retention at K=5")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    import torch

    from craft_core.config import DatasetSource, PolicySource, RetentionConfig, TrainConfig
    from craft_core.train import train

    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    from craft_core.config import PeftSettings

    # name -> (retention every K steps, targets or None for the baseline, other train settings).
    prefix, both = {"prefix": {}}, {"prefix": {}, "action_output": {}}
    lora = {"peft": PeftSettings(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])}
    accum = {"grad_accum_steps": 2}
    variants = {"baseline_step_s": (1, None, {}), "craft_step_s_k1": (1, prefix, {}), "craft_step_s_k5": (5, prefix, {}),
                "craft_step_s_k5_action": (5, both, {}),
                "baseline_lora_step_s": (1, None, lora), "craft_lora_step_s_k5": (5, prefix, lora),
                "baseline_accum2_step_s": (1, None, accum), "craft_accum2_step_s_k5": (5, prefix, accum)}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        work = Path(tmp)
        assets = build_assets(work)
        task = assets["task"]
        samples: dict[str, list[dict]] = {name: [] for name in variants}
        round_means: list[dict[str, float]] = []
        names = list(variants)
        for round_index in range(args.rounds):
            round_means.append({})
            # Rotate the order each round so no variant always runs first (warm caches, load drift).
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                every_k, targets, extra = variants[name]
                cfg = TrainConfig(
                    dataset=DatasetSource(repo_id=task["repo_id"], root=str(task["root"])),
                    steps=args.steps, batch_size=args.batch_size, lr=1e-4, device="cpu", seed=0,
                    save_every=10**6, log_every=10**6, **extra,
                    retention=RetentionConfig(every_k=every_k, targets=targets, anchor_batch_size=args.batch_size)
                    if targets else None,
                )
                out_dir = work / f"run_{round_index}_{name}"
                train(cfg, teacher=PolicySource(path=str(assets["teacher"])),
                      store_url=assets["store"] if targets else None, out_dir=out_dir)
                records = timed_steps(out_dir / "metrics.jsonl")
                samples[name] += records
                round_means[-1][name] = statistics.fmean(r["step_time_s"] for r in records)

    result = {name: statistics.fmean(r["step_time_s"] for r in records) for name, records in samples.items()}
    # Where the time goes: plain task steps vs retention steps, and medians (robust to load spikes).
    breakdown = {}
    for name, records in samples.items():
        for label, wanted in (("task_steps", False), ("retention_steps", True)):
            times = [r["step_time_s"] for r in records if r["retention_step"] is wanted]
            if times:
                breakdown[f"{name}_{label}_mean"] = statistics.fmean(times)
        breakdown[f"{name}_median"] = statistics.median(r["step_time_s"] for r in records)
    baseline = result["baseline_step_s"]
    # Paired per round (same minutes of machine load): robust to load drift between rounds.
    paired = {
        f"paired_ratio_{k}_median": statistics.median(m[f"craft_step_s_{k}"] / m["baseline_step_s"] for m in round_means)
        for k in ("k1", "k5", "k5_action")
    }
    for setting in ("lora", "accum2"):
        paired[f"paired_ratio_{setting}_k5_median"] = statistics.median(
            m[f"craft_{setting}_step_s_k5"] / m[f"baseline_{setting}_step_s"] for m in round_means)
    result.update(
        ratio_k1=result["craft_step_s_k1"] / baseline,
        ratio_k5=result["craft_step_s_k5"] / baseline,
        ratio_k5_action=result["craft_step_s_k5_action"] / baseline,
        ratio_lora_k5=result["craft_lora_step_s_k5"] / result["baseline_lora_step_s"],
        ratio_accum2_k5=result["craft_accum2_step_s_k5"] / result["baseline_accum2_step_s"],
        lora_baseline_vs_full_baseline=result["baseline_lora_step_s"] / baseline,
        k5_within_1_15=result["craft_step_s_k5"] <= 1.15 * baseline,
        k1_within_1_9=result["craft_step_s_k1"] <= 1.9 * baseline,
        k5_action_within_1_25=result["craft_step_s_k5_action"] <= 1.25 * baseline,
        **paired,
        **breakdown,
        load_average_1min_start=load_start, load_average_1min_end=os.getloadavg()[0],
        policy="pi0_fast (tiny)", batch_size=args.batch_size, anchor_batch_size=args.batch_size,
        timed_steps_per_variant=len(samples["baseline_step_s"]), rounds=args.rounds, torch_threads=1,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
