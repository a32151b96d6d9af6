"""Step time of craft's train loop vs lerobot's own training step, and of CRaFT on top of it.

One tiny real pi0_fast policy (built offline with ``craft_core.demo.tiny``), one recorded pusht task
dataset, the same batch size, seed and optimizer preset (the policy's own: AdamW + cosine decay with
warm-up, grad clip from the preset), trained ``--steps`` steps four ways:

- ``lerobot``: ``update_policy`` from ``lerobot/scripts/lerobot_train.py``, driven the way that
  script's ``train()`` drives it: an ``Accelerator`` built as the script builds it, ``set_seed``,
  ``make_dataset`` of a ``TrainPipelineConfig`` (validated, so the optimizer and scheduler are the
  policy presets), ``make_policy``, ``make_pre_post_processors`` with the script's overrides,
  ``make_optimizer_and_scheduler``, ``EpisodeAwareSampler`` + ``DataLoader``,
  ``accelerator.prepare``, a ``MetricsTracker``, and the loop body (uint8 images to float, the
  preprocessor, ``update_policy``, ``tracker.step()``). The only additions are what lerobot cannot
  do offline for a tiny folder: the tiny folder's loading context and its local tokenizer paths.
- ``craft``: ``craft_core.train.train`` with retention off (``normalization: task``, as lerobot-train);
- ``craft_k5_prefix``: CRaFT with a retention step every 5 steps, target ``prefix``;
- ``craft_k5_prefix_action``: the same with targets ``prefix`` and ``action_output``.

The four run interleaved, ``--rounds`` times, in this one process (the order rotates per round), so
machine load hits them alike. A step's time is the wall time from one call of the loop's
``update_policy`` to the next (both loops' module-level ``update_policy`` are wrapped by a clock
that calls the real one): everything one iteration of each loop does — data, preprocessing,
forward, backward, retention, optimizer, logging. The first two periods of each run (iterator
start-up, optimizer-state allocation) are left out. Medians per variant; ratios to lerobot's.

The runs also check that they train the same thing: lerobot's and craft's baseline losses are
compared step by step (pi0_fast's loss has no noise, so with the same weights, data order and
optimizer they agree to float precision).

Last stdout line: one JSON object with ``*_step_s`` (median seconds per step: for CRaFT at K=5 that
is a plain step), ``*_step_mean_s`` (mean, retention steps included), ``*_retention_step_s``,
``ratio_*`` / ``ratio_mean_*`` (to lerobot's), ``paired_ratio_*_median`` (per-round ratio, median
over rounds) and ``craft_vs_lerobot_within_1_05`` (the paired ratio of craft's baseline to lerobot's
≤ 1.05; pooled medians are reported too, but on a shared machine they mix rounds of different load).

    .venv/bin/python benchmarks/bench_vs_lerobot.py [--rounds 5] [--steps 12] [--batch-size 4]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class StepClock:
    """Wraps a loop's ``update_policy``: records when each call starts and how long it takes."""

    def __init__(self, module, name: str = "update_policy"):
        self.module, self.name = module, name
        self.real = getattr(module, name)
        self.starts: list[float] = []
        self.durations: list[float] = []

    def __enter__(self):
        real = self.real

        def clocked(*args, **kwargs):
            start = time.perf_counter()
            self.starts.append(start)
            try:
                return real(*args, **kwargs)
            finally:
                self.durations.append(time.perf_counter() - start)

        setattr(self.module, self.name, clocked)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.real)

    def periods(self, end: float, skip: int = 2) -> list[float]:
        """Wall time of each iteration (call start to next call start; the last one to ``end``)."""
        marks = self.starts + [end]
        return [b - a for a, b in zip(marks, marks[1:])][skip:]


def build_assets(work: Path) -> dict:
    """The same pusht tasks, tiny pi0_fast teacher and anchor store as bench_step (run as a script,
    this folder is on sys.path)."""
    from bench_step import build_assets as build_step_assets

    return build_step_assets(work)


def run_lerobot(teacher: Path, task: dict, *, steps: int, batch_size: int, seed: int, out_dir: Path) -> dict:
    """``steps`` steps of lerobot's ``update_policy``, set up and driven as ``lerobot_train.train`` does."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from lerobot.configs.default import DatasetConfig
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.datasets import EpisodeAwareSampler
    from lerobot.datasets.factory import make_dataset
    from lerobot.optim.factory import make_optimizer_and_scheduler
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.scripts import lerobot_train
    from lerobot.utils.logging_utils import AverageMeter, MetricsTracker
    from lerobot.utils.random_utils import set_seed
    from lerobot.utils.utils import cycle

    from craft_core.policy_io import folder_plugin, load_policy_config, policy_loading_context

    # What `lerobot-train --policy.path=<teacher> --dataset.repo_id=... --dataset.root=...` builds.
    policy_cfg = load_policy_config(teacher)  # PreTrainedConfig.from_pretrained + the tiny folder's tokenizer paths
    policy_cfg.device = "cpu"
    cfg = TrainPipelineConfig(
        dataset=DatasetConfig(repo_id=task["repo_id"], root=str(task["root"]), video_backend="pyav"),
        policy=policy_cfg, output_dir=out_dir, batch_size=batch_size, steps=steps, seed=seed, num_workers=0,
        save_checkpoint=False, log_freq=10**6,
    )
    cfg.validate()  # optimizer / scheduler = the policy's presets (use_policy_training_preset)

    mixed_precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}.get(getattr(policy_cfg, "dtype", None))
    accelerator = Accelerator(step_scheduler_with_optimizer=False, mixed_precision=mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], cpu=True)
    set_seed(cfg.seed, accelerator=accelerator)
    device = accelerator.device
    dataset = make_dataset(cfg)
    with policy_loading_context(policy_cfg.pretrained_path):
        policy = make_policy(cfg=cfg.policy, ds_meta=dataset.meta, rename_map=cfg.rename_map)
        preprocessor_overrides = {
            "device_processor": {"device": device.type},
            "normalizer_processor": {
                "features": {**policy.config.input_features, **policy.config.output_features},
                "norm_map": policy.config.normalization_mapping,
                "stats": dataset.meta.stats,
            },
            "rename_observations_processor": {"rename_map": cfg.rename_map},
        }
        # Offline only: the tiny folder's local tokenizers (lerobot would fetch the hub names).
        for step_name, fields in folder_plugin(policy_cfg.pretrained_path).processor_overrides(
                Path(policy_cfg.pretrained_path), policy_cfg).items():
            preprocessor_overrides.setdefault(step_name, {}).update(fields)
        preprocessor, _ = make_pre_post_processors(
            policy_cfg=cfg.policy, pretrained_path=policy_cfg.pretrained_path, dataset_stats=dataset.meta.stats,
            preprocessor_overrides=preprocessor_overrides,
            postprocessor_overrides={"unnormalizer_processor": {
                "features": policy.config.output_features, "norm_map": policy.config.normalization_mapping,
                "stats": dataset.meta.stats}},
        )
    optimizer, lr_scheduler = make_optimizer_and_scheduler(cfg, policy)
    sampler = EpisodeAwareSampler(
        dataset.meta.episodes["dataset_from_index"], dataset.meta.episodes["dataset_to_index"],
        episode_indices_to_use=dataset.episodes, drop_n_last_frames=getattr(cfg.policy, "drop_n_last_frames", 0),
        shuffle=True, seed=cfg.seed, absolute_to_relative_idx=dataset.absolute_to_relative_idx,
    )
    dataloader = torch.utils.data.DataLoader(dataset, num_workers=cfg.num_workers, batch_size=cfg.batch_size,
                                             shuffle=False, sampler=sampler, pin_memory=device.type == "cuda",
                                             drop_last=False)
    policy, optimizer, dataloader, lr_scheduler = accelerator.prepare(policy, optimizer, dataloader, lr_scheduler)
    dl_iter = cycle(dataloader)
    policy.train()
    train_metrics = {
        "loss": AverageMeter("loss", ":.3f", reduction="mean"), "grad_norm": AverageMeter("grdn", ":.3f"),
        "lr": AverageMeter("lr", ":0.1e"), "update_s": AverageMeter("updt_s", ":.3f", reduction="max"),
        "dataloading_s": AverageMeter("data_s", ":.3f", reduction="max"),
        "samples_per_s": AverageMeter("smp/s", ":.0f"),
    }
    tracker = MetricsTracker(cfg.batch_size, dataset.num_frames, dataset.num_episodes, train_metrics,
                             initial_step=0, accelerator=accelerator)

    losses = []
    with StepClock(lerobot_train) as clock:
        for _ in range(cfg.steps):  # the body of lerobot_train.train's loop (no log/eval/save steps due)
            start_time = time.perf_counter()
            batch = next(dl_iter)
            for cam_key in dataset.meta.camera_keys:
                if cam_key in batch and batch[cam_key].dtype == torch.uint8:
                    batch[cam_key] = batch[cam_key].to(dtype=torch.float32) / 255.0
            batch = preprocessor(batch)
            tracker.dataloading_s = time.perf_counter() - start_time
            tracker, _ = lerobot_train.update_policy(tracker, policy, batch, optimizer, cfg.optimizer.grad_clip_norm,
                                                     accelerator=accelerator, lr_scheduler=lr_scheduler)
            losses.append(tracker.loss.val)
            tracker.step()
        end = time.perf_counter()
    accelerator.end_training()
    return {"periods": clock.periods(end), "updates": clock.durations[2:], "losses": losses,
            "retention": [False] * len(clock.periods(end)),
            "grad_clip_norm": cfg.optimizer.grad_clip_norm, "optimizer": type(optimizer.optimizer).__name__,
            "scheduler": type(lr_scheduler.scheduler).__name__ if lr_scheduler is not None else None}


def run_craft(teacher: Path, task: dict, store: str, *, retention, steps: int, batch_size: int, seed: int,
              out_dir: Path) -> dict:
    """``steps`` steps of ``craft_core.train.train`` (retention None = craft's baseline)."""
    import craft_core.train as craft_train
    from craft_core.config import DatasetSource, PolicySource, TrainConfig

    cfg = TrainConfig(dataset=DatasetSource(repo_id=task["repo_id"], root=str(task["root"])), steps=steps,
                      batch_size=batch_size, seed=seed, device="cpu", normalization="task",
                      save_every=10**6, log_every=10**6, retention=retention)
    with StepClock(craft_train) as clock:
        craft_train.train(cfg, teacher=PolicySource(path=str(teacher)),
                          store_url=store if retention is not None else None, out_dir=out_dir)
    # The loop's last iteration ends when metrics.jsonl gets its last line; train() then writes
    # its final checkpoint and plot, which are not a step: take the end from the log file.
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    end = clock.starts[-1] + records[-1]["step_time_s"]
    return {"periods": clock.periods(end), "updates": clock.durations[2:],
            "losses": [r["task_loss"] for r in records],
            "retention": [bool(r["retention_step"]) for r in records[2:]]}  # aligned with the periods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="steps per run; the first 2 are not timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:])

    import torch

    from craft_core.config import RetentionConfig

    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]

    def retention(targets):
        return RetentionConfig(every_k=5, targets={t: {} for t in targets}, anchor_batch_size=args.batch_size)

    variants = {
        "lerobot": None,
        "craft": None,
        "craft_k5_prefix": retention(["prefix"]),
        "craft_k5_prefix_action": retention(["prefix", "action_output"]),
    }
    samples = {name: {"periods": [], "updates": [], "retention": []} for name in variants}
    round_medians: list[dict[str, float]] = []
    loss_gaps: list[float] = []
    extra: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_vs_lerobot_") as tmp:
        work = Path(tmp)
        assets = build_assets(work)
        names = list(variants)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            losses, medians = {}, {}
            for name in names[shift:] + names[:shift]:
                out_dir = work / f"run_{round_index}_{name}"
                common = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, out_dir=out_dir)
                if name == "lerobot":
                    result = run_lerobot(assets["teacher"], assets["task"], **common)
                    extra.update(grad_clip_norm=result["grad_clip_norm"], optimizer=result["optimizer"],
                                 scheduler=result["scheduler"])
                else:
                    result = run_craft(assets["teacher"], assets["task"], assets["store"], retention=variants[name],
                                       **common)
                samples[name]["periods"] += result["periods"]
                samples[name]["updates"] += result["updates"]
                samples[name]["retention"] += result["retention"]
                medians[name] = statistics.median(result["periods"])
                losses[name] = result["losses"]
            round_medians.append(medians)
            loss_gaps.append(max(abs(a - b) for a, b in zip(losses["lerobot"], losses["craft"])))
            print(f"round {round_index}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in medians.items()),
                  file=sys.stderr, flush=True)

    result = {f"{name}_step_s": statistics.median(s["periods"]) for name, s in samples.items()}
    # Means include the retention steps (one in K): what a run's wall time scales with.
    result.update({f"{name}_step_mean_s": statistics.fmean(s["periods"]) for name, s in samples.items()})
    result.update({f"{name}_update_s": statistics.median(s["updates"]) for name, s in samples.items()})
    for name, s in samples.items():
        retention_periods = [p for p, r in zip(s["periods"], s["retention"]) if r]
        if retention_periods:
            result[f"{name}_retention_step_s"] = statistics.median(retention_periods)
            result[f"{name}_retention_steps_timed"] = len(retention_periods)
    base = result["lerobot_step_s"]
    for name in names[1:]:
        result[f"ratio_{name}"] = result[f"{name}_step_s"] / base
        result[f"ratio_mean_{name}"] = result[f"{name}_step_mean_s"] / result["lerobot_step_mean_s"]
        # Paired within a round (same minutes of machine load), then the median over rounds.
        result[f"paired_ratio_{name}_median"] = statistics.median(m[name] / m["lerobot"] for m in round_medians)
    result.update(
        # The verdict uses the paired ratio: on a shared machine, load drifts between rounds far more
        # than within one (pooled medians mix rounds of different load).
        craft_vs_lerobot_within_1_05=result["paired_ratio_craft_median"] <= 1.05,
        max_abs_loss_gap_lerobot_vs_craft=max(loss_gaps),
        **extra,
        policy="pi0_fast (tiny)", batch_size=args.batch_size, steps_per_run=args.steps,
        timed_steps_per_variant=len(samples["lerobot"]["periods"]), rounds=args.rounds, torch_threads=1,
        load_average_1min_start=load_start, load_average_1min_end=os.getloadavg()[0],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
