"""Memory plan vs measured peak memory of training steps, tiny real policies on CPU.

For each case (policy type x full fine-tuning / LoRA, CRaFT on, fp32 or bf16 autocast) a fresh
process loads the tiny policy, its processors, a task batch and the anchor store, runs one warm-up
step on a single sample (lazy allocations: thread pools, kernels) and frees it, then resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``) and runs training steps exactly as the train
loop does (``update_policy``: task forward/backward, retention forward + retention gradient,
surgery, AdamW step). Measured = the weights (resident before the reset, counted exactly) + the
peak RSS growth over the steps (gradients, optimizer moments, activations, retention buffer).
Planned = ``craft_core.memory_plan.plan_memory`` given the first training batch, as the train stage
gives it one (its training step probed on 1 and 8 of those samples). Each case runs ``--repeats``
times in fresh processes; the medians of plan and measurement are reported, with their spread.

Last stdout line: one JSON object: per case the plan's fields, the measured bytes and
``plan / measured``; ``all_within_25pct``.

    .venv/bin/python benchmarks/bench_memory.py [--batch-size 32] [--steps 2]
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {
    "pi0_fast full fp32": ("pi0_fast", None, "no"),
    "pi0_fast full bf16": ("pi0_fast", None, "bf16"),
    "pi0_fast lora fp32": ("pi0_fast", {"rank": 8, "target_modules": ["q_proj", "v_proj"]}, "no"),
    "smolvla full fp32": ("smolvla", None, "no"),
    "smolvla lora fp32": ("smolvla", {"rank": 8, "target_modules": ["q_proj", "v_proj"]}, "no"),
}


def build_assets(work: Path) -> dict:
    from craft_core.config import CacheConfig, DatasetSource, PolicySource
    from craft_core.demo.sim_datasets import PUSHT_TASKS, record_dataset
    from craft_core.demo.tiny import build_tiny_policy
    from craft_core.extraction import extract_anchors

    datasets = {}
    for task in ("push_t", "circle"):
        root = work / f"pusht_{task}"
        meta = record_dataset("pusht", task, repo_id=f"local/pusht_{task}", root=root, n_episodes=2,
                              max_steps=40, image_size=96, seed=0)
        datasets[task] = {"repo_id": f"local/pusht_{task}", "root": str(root), "meta": meta}
    assets = {"task": {k: v for k, v in datasets["push_t"].items() if k != "meta"}, "policies": {}}
    for policy_type in sorted({case[0] for case in CASES.values()}):
        teacher = build_tiny_policy(policy_type, work / policy_type, ds_meta=datasets["circle"]["meta"], seed=0,
                                    extra_texts=list(PUSHT_TASKS.values()))
        store = work / f"{policy_type}.zarr"
        extract_anchors(CacheConfig(teacher=PolicySource(path=str(teacher)),
                                    dataset=DatasetSource(repo_id="local/pusht_circle", root=datasets["circle"]["root"]),
                                    n_anchors=32, dtype="float32", batch_size=8, device="cpu", heldout_fraction=0.0,
                                    targets=["prefix"]), str(store))
        assets["policies"][policy_type] = {"teacher": str(teacher), "store": str(store)}
    return assets


def measure(case: str, assets: dict, batch_size: int, steps: int) -> dict:
    import torch
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    from craft_core.config import DatasetSource, PeftSettings, PolicySource, RetentionConfig, TrainConfig
    from craft_core.memory_plan import plan_memory, process_memory_bytes, reset_peak_resident
    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy, make_processors
    from craft_core.retention import open_retention
    from craft_core.train import _make_accelerator, base_policy, update_policy, wrap_with_peft

    torch.set_num_threads(1)
    policy_type, peft, precision = CASES[case]
    paths = assets["policies"][policy_type]
    teacher = PolicySource(path=paths["teacher"])
    task = assets["task"]
    meta = LeRobotDatasetMetadata(task["repo_id"], root=task["root"])
    policy = load_policy(teacher, ds_meta=meta, trainable=True)
    peft_settings = PeftSettings(**peft) if peft else None
    if peft_settings is not None:
        policy = wrap_with_peft(policy, peft_settings, teacher)
    student = base_policy(policy)
    preprocessor, _ = make_processors(student, pretrained_path=paths["teacher"])
    dataset = LeRobotDataset(task["repo_id"], root=task["root"],
                             delta_timestamps=resolve_delta_timestamps(student.config, meta), video_backend="pyav")
    collate = torch.utils.data.default_collate
    batches = [preprocessor(collate([dataset[(i * batch_size + j) % len(dataset)] for j in range(batch_size)]))
               for i in range(steps)]
    warmup = preprocessor(collate([dataset[0]]))
    cfg = TrainConfig(dataset=DatasetSource(repo_id=task["repo_id"], root=task["root"]), device="cpu",
                      mixed_precision=precision, batch_size=batch_size)
    retention_cfg = RetentionConfig(every_k=1, anchor_batch_size=8)
    retention = open_retention(retention_cfg, paths["store"], adapter=get_adapter(student), teacher=teacher, seed=0,
                               total_steps=steps + 1)
    plan = plan_memory(student, batch_size=batch_size, precision=precision, peft=peft_settings, retention=True,
                       batch=batches[0], anchor_batch_size=retention_cfg.anchor_batch_size)
    accelerator = _make_accelerator(cfg)
    params = [p for p in student.parameters() if p.requires_grad]

    def step(batch, optimizer, index):
        return update_policy(policy, batch, step=index, optimizer=optimizer, lr_scheduler=None,
                             accelerator=accelerator, params=params, grad_clip_norm=0.0, retention=retention)

    # Warm-up on one sample (lazy allocations), then everything it made is freed.
    warm_optimizer = torch.optim.AdamW(params, lr=1e-6)
    step(warmup, warm_optimizer, 0)
    del warm_optimizer
    for p in params:
        p.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_resident()
    baseline = process_memory_bytes("VmRSS")
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    for index, batch in enumerate(batches, start=1):
        step(batch, optimizer, index)
    peak = process_memory_bytes("VmHWM")
    measured = plan.weights + (peak - baseline)
    return {**{k: v for k, v in plan.as_dict().items() if k != "notes"}, "measured_total": measured,
            "measured_growth": peak - baseline, "planned_growth": plan.total - plan.weights,
            "plan_over_measured": plan.total / measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per case (medians reported)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child: one case in a fresh process
        print(json.dumps(measure(args.case, json.loads(Path(args.assets).read_text()), args.batch_size, args.steps)))
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = Path(tmp)
        assets_file = work / "assets.json"
        assets_file.write_text(json.dumps(build_assets(work)))
        for case in CASES:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, __file__, "--case", case, "--assets", str(assets_file),
                                      "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                                     check=True, capture_output=True, text=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = dict(runs[0])
            for key in ("activations", "total", "measured_total", "measured_growth", "planned_growth"):
                r[key] = statistics.median(run[key] for run in runs)
                r[f"{key}_runs"] = [run[key] for run in runs]
            r["plan_over_measured"] = r["total"] / r["measured_total"]
            r["plan_over_measured_runs"] = [run["plan_over_measured"] for run in runs]
            results[case] = r
            print(f"{case:22s} plan {r['total'] / 2**20:8.2f} MiB  measured {r['measured_total'] / 2**20:8.2f} MiB  "
                  f"plan/measured {r['plan_over_measured']:.2f}", file=sys.stderr)
    summary = {"cases": results, "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
               "all_within_25pct": all(0.75 <= r["plan_over_measured"] <= 1.25 for r in results.values())}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
