"""The training stage: one loop for CRaFT and for the baseline (the same loop, retention off).

Read it top to bottom. It is lerobot's own training recipe (``lerobot_train.py``): ``make_policy``
(through ``craft_core.policy_io``), the policy's pre/post processors, a ``LeRobotDataset`` with the
policy's delta timestamps, lerobot's episode-aware sampler, ``make_optimizer_and_scheduler`` with
the policy's presets, ``accelerate`` for devices / DDP / mixed precision, and lerobot's checkpoint
layout. CRaFT adds one thing: every K-th step is a *retention step* (DESIGN.md, "The method"):

    g_t   task gradient: policy.forward's loss on a task batch, backward through the (DDP) model
    g_r   retention gradient: student's pooled hidden states on a batch of stored anchor inputs
          vs the teacher's cached vectors, ``autograd.grad`` on the *unwrapped* model (so DDP's
          hooks stay quiet), then averaged over ranks like DDP averages g_t
    .grad <- surgery(g_t, g_r): conflict test on the cosine, PCGrad, merge with λ
    λ     <- clip(λ + η (L_ret - ε(t)), 0, λ_max), with L_ret averaged over ranks

Every other step is a plain task step.
"""

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from craft_core.checkpoint import (
    check_same_run,
    last_checkpoint,
    load_checkpoint_state,
    pretrained_model_dir,
    save_checkpoint,
)
from craft_core.config import PolicySource, TrainConfig
from craft_core.distributed import all_reduce_gradients_, mean_across_ranks
from craft_core.dual import EpsilonSchedule, LagrangeMultiplier
from craft_core.metrics import MetricsLog, plot_training
from craft_core.surgery import apply_gradient_surgery, retention_gradients

ProgressFn = Callable[[int, int, dict], None]


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient; the run stopped."""


class RetentionSetupError(RuntimeError):
    """Retention is on but the anchor store cannot be used for this student (never falls back)."""


# --------------------------------------------------------------------------------------------
# Anchors: batches of (stored model inputs, teacher targets) and the loss that compares them.
# --------------------------------------------------------------------------------------------


class Anchors:
    """The anchor store as the training loop sees it.

    ``batches(start)`` yields ``(inputs, targets)`` forever from the store's training split in
    chunk-aware order, skipping the first ``start`` batches (resume) without reading them. Every
    rank draws the same global batch and keeps its own slice, so N ranks together see exactly the
    batch that one process with N times the anchor batch size sees. ``targets`` are the teacher's
    pooled hidden states ``[B, L, V, D]`` (``hidden_state``) or its label tokens (``token_level``).
    """

    def __init__(self, store_url: str, *, kind: str, layers: list[int], pooling: list[str], batch_size: int,
                 seed: int, rank: int, world_size: int, shuffle_window_chunks: int):
        from craft_core.store import AnchorDataset

        self.dataset = AnchorDataset(store_url, split="train", validate=False)  # validated by open_anchors
        self.kind = kind
        self.layers = layers
        self.pooling = pooling
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.sampler = self.dataset.sampler(batch_size * world_size, window_chunks=shuffle_window_chunks,
                                            shuffle=True, drop_last=True, seed=seed)
        if len(self.sampler) == 0:
            raise RetentionSetupError(
                f"anchor store {store_url} has {len(self.dataset)} training anchors, fewer than one batch of "
                f"train.retention.anchor_batch_size={batch_size} x {world_size} process(es); lower "
                "anchor_batch_size or build a larger cache (cache.n_anchors)"
            )

    def batches(self, start: int = 0) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        done, epoch = 0, 0
        while True:
            self.sampler.set_epoch(epoch)
            for positions in self.sampler:
                done += 1
                if done <= start:
                    continue
                mine = positions[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                batch = torch.utils.data.default_collate(self.dataset.__getitems__(mine))
                yield batch["inputs"], batch["teacher_hidden" if self.kind == "hidden_state" else "labels"]
            epoch += 1

    def loss(self, adapter, inputs: dict[str, Tensor], targets: Tensor, kind: str) -> Tensor:
        from craft_core.losses import retention_loss

        if self.kind == "token_level":
            # The policy's own loss on the teacher's label tokens (distillation of its outputs).
            return adapter.token_level_loss(inputs, targets)
        student = adapter.pooled(inputs, self.layers, self.pooling)
        return retention_loss(student, targets.to(student.device), kind)


def open_anchors(store_url: str, *, adapter, teacher: PolicySource, cfg: TrainConfig, rank: int,
                 world_size: int) -> Anchors:
    """Open and validate the anchor store for this student; refuse anything that does not fit."""
    from craft_core.store import AnchorStoreError, open_anchor_store

    try:
        # Checks completeness, schema, kind, policy type, depth, hidden size and the prefix inputs.
        store = open_anchor_store(store_url, student_adapter=adapter)
    except AnchorStoreError as exc:
        raise RetentionSetupError(
            f"retention is on but the anchor store cannot be used (craft never falls back to baseline "
            f"training): {exc}"
        ) from exc
    attrs = store.attrs
    problems = []
    if store.kind == "token_level" and not hasattr(adapter, "token_level_loss"):
        problems.append(f"it is a token_level cache but policy type {adapter.policy_type!r} has no token-level "
                        "loss; use a hidden_state cache")
    stored_teacher = attrs.get("teacher") or {}
    if not _same_policy_source(stored_teacher, teacher):
        problems.append(f"its teacher is {stored_teacher.get('path')!r} (revision {stored_teacher.get('revision')!r})"
                        f" but the student starts from {teacher.path!r} (revision {teacher.revision!r})")
    layers = list(attrs.get("layers") or [])
    if store.kind == "hidden_state":
        try:
            if adapter.resolve_layers(layers) != layers:
                problems.append(f"its layers {layers} are not absolute hidden-state indices of the student")
        except ValueError as exc:
            problems.append(f"its layers {layers} do not fit the student: {exc}")
    if problems:
        raise RetentionSetupError(
            f"anchor store {store_url} does not fit this run: " + "; ".join(problems)
            + ". Re-run the cache stage with this run's teacher or point train at the matching store; "
            "craft never falls back to baseline training."
        )
    return Anchors(store_url, kind=store.kind, layers=layers, pooling=list(attrs.get("pooling") or []),
                   batch_size=cfg.retention.anchor_batch_size, seed=cfg.seed, rank=rank,
                   world_size=world_size, shuffle_window_chunks=cfg.retention.shuffle_window_chunks)


def _same_policy_source(stored: dict, teacher: PolicySource) -> bool:
    def canonical(path) -> str:
        local = Path(str(path)).expanduser()
        return str(local.resolve()) if local.exists() else str(path)

    return canonical(stored.get("path")) == canonical(teacher.path) and stored.get("revision") == teacher.revision


# --------------------------------------------------------------------------------------------
# Set-up helpers (what lerobot_train.py does before its loop).
# --------------------------------------------------------------------------------------------


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {cfg.device!r} but no CUDA device is available; use 'cpu' or 'auto'")
    # As lerobot: the scheduler steps once per optimizer step whatever the world size, and
    # find_unused_parameters because VLA forwards skip parts of the model (e.g. the action expert).
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision=cfg.mixed_precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


class _OptimizerSettings:
    """The three fields ``make_optimizer_and_scheduler`` reads from lerobot's TrainPipelineConfig."""

    def __init__(self, cfg: TrainConfig, policy):
        from lerobot.optim.optimizers import AdamWConfig

        self.steps = cfg.steps
        self.use_policy_training_preset = cfg.use_policy_training_preset
        if cfg.use_policy_training_preset:
            self.optimizer = policy.config.get_optimizer_preset()
            self.scheduler = policy.config.get_scheduler_preset()
        else:
            self.optimizer = AdamWConfig(lr=cfg.lr or 1e-4, weight_decay=cfg.weight_decay or 0.0)
            self.scheduler = None
        if cfg.lr is not None:
            if self.scheduler is not None and hasattr(self.scheduler, "peak_lr"):
                # Keep the preset's decay ratio: its schedule is relative to its own peak.
                self.scheduler.decay_lr *= cfg.lr / self.scheduler.peak_lr
                self.scheduler.peak_lr = cfg.lr
            self.optimizer.lr = cfg.lr
        if cfg.weight_decay is not None:
            self.optimizer.weight_decay = cfg.weight_decay
        if cfg.grad_clip_norm is not None:
            self.optimizer.grad_clip_norm = cfg.grad_clip_norm


def _run_description(cfg: TrainConfig, teacher: PolicySource, store_url: str | None, retention: bool) -> dict:
    """What must match for a checkpoint in out_dir to be resumed by this call."""
    return {
        "config": cfg.model_dump(mode="json"),
        "teacher": teacher.model_dump(mode="json"),
        "store_url": store_url if retention else None,
        "retention": retention,
    }


def _all_finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


# --------------------------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    teacher: PolicySource,
    store_url: str | None,
    out_dir: Path,
    retention: bool = True,
    progress: ProgressFn | None = None,
) -> dict:
    """Fine-tune a student initialised from ``teacher`` on ``cfg.dataset``; CRaFT when ``retention``."""
    from lerobot.common.train_utils import get_step_checkpoint_dir, should_save_checkpoint
    from lerobot.datasets import EpisodeAwareSampler, compute_sampler_state
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.optim.factory import make_optimizer_and_scheduler
    from lerobot.utils.random_utils import set_seed
    from lerobot.utils.utils import cycle, has_method
    from tqdm import tqdm

    from craft_core.adapters import get_adapter
    from craft_core.policy_io import load_policy, make_processors

    wall_start = time.time()
    out_dir = Path(out_dir).absolute()
    use_retention = retention and cfg.retention.enabled
    if use_retention and not store_url:
        raise RetentionSetupError(
            "retention is on (train.retention.enabled) but no anchor store was given (store_url); run the "
            "cache stage first, or train with retention=False for the baseline. craft never falls back silently."
        )
    run = _run_description(cfg, teacher, store_url, use_retention)
    resume_from = last_checkpoint(out_dir)
    if resume_from is not None:
        check_same_run(resume_from, run)

    accelerator = _make_accelerator(cfg)
    is_main = accelerator.is_main_process
    set_seed(cfg.seed, accelerator=accelerator)

    # The student: the teacher's weights, or the last checkpoint's when resuming.
    ds = cfg.dataset
    ds_meta = LeRobotDatasetMetadata(ds.repo_id, root=ds.root, revision=ds.revision)
    source = PolicySource(path=str(pretrained_model_dir(resume_from))) if resume_from else teacher
    policy = load_policy(source, ds_meta=ds_meta, device=str(accelerator.device), trainable=True)
    # Fine-tuning normalises with the task dataset's statistics; a resumed run keeps its own.
    preprocessor, postprocessor = make_processors(
        policy, dataset_stats=None if resume_from else ds_meta.stats, pretrained_path=source.path
    )
    dataset = LeRobotDataset(ds.repo_id, root=ds.root, episodes=ds.episodes, revision=ds.revision,
                             delta_timestamps=resolve_delta_timestamps(policy.config, ds_meta),
                             video_backend=ds.video_backend)

    # Retention: validate the anchor store against the student before anything trains.
    adapter = get_adapter(policy) if use_retention else None
    anchors = None
    if use_retention:
        anchors = open_anchors(store_url, adapter=adapter, teacher=teacher, cfg=cfg,
                               rank=accelerator.process_index, world_size=accelerator.num_processes)
    cache_type = anchors.kind if anchors else None
    rcfg = cfg.retention
    lam = LagrangeMultiplier(rcfg.lambda_init, rcfg.lambda_lr, rcfg.lambda_max)
    epsilon = EpsilonSchedule(rcfg.eps_start, rcfg.eps_end, rcfg.eps_decay_steps, rcfg.eps_schedule,
                              total_steps=cfg.steps)

    optimizer_settings = _OptimizerSettings(cfg, policy)
    optimizer, lr_scheduler = make_optimizer_and_scheduler(optimizer_settings, policy)
    grad_clip_norm = optimizer_settings.optimizer.grad_clip_norm or 0.0

    # Data order is a pure function of (seed, epoch): lerobot's sampler, resumable to the sample.
    sampler = EpisodeAwareSampler(
        dataset.meta.episodes["dataset_from_index"],
        dataset.meta.episodes["dataset_to_index"],
        episode_indices_to_use=dataset.episodes,
        drop_n_last_frames=getattr(policy.config, "drop_n_last_frames", 0),
        shuffle=True,
        seed=cfg.seed,
        absolute_to_relative_idx=dataset.absolute_to_relative_idx,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=False,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating a loader iterator must not draw from the global RNG, or a
        # resumed run's random stream (dropout, flow-matching noise) would be shifted.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    policy, optimizer, dataloader, lr_scheduler = accelerator.prepare(policy, optimizer, dataloader, lr_scheduler)
    student = accelerator.unwrap_model(policy)
    params = [p for p in student.parameters() if p.requires_grad]

    step, skipped_nonfinite, anchor_batches_done = 0, 0, 0
    if resume_from is not None:
        step, state = load_checkpoint_state(resume_from, optimizer, lr_scheduler)
        lam.load_state_dict(state["lambda"])
        epsilon.load_state_dict(state["epsilon"])
        skipped_nonfinite = state["skipped_nonfinite"]
        anchor_batches_done = state["anchor_batches"]
        sampler.load_state_dict(compute_sampler_state(step, len(sampler), cfg.batch_size, accelerator.num_processes))
    last_checkpoint_dir = resume_from

    metrics_path = out_dir / "metrics.jsonl"
    metrics = None
    if is_main:
        metrics = MetricsLog(metrics_path, resume_step=step, wandb_project=cfg.wandb_project,
                             wandb_config=run, run_name=out_dir.name)
        print(f"[craft train] {'CRaFT' if use_retention else 'baseline'} run, cache_type={cache_type}, "
              f"steps {step}->{cfg.steps}, {accelerator.num_processes} process(es) on {accelerator.device}")
    progress_bar = tqdm(total=cfg.steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)

    data_iter = cycle(dataloader)
    anchor_iter = anchors.batches(start=anchor_batches_done) if anchors else None
    last_task_loss = float("nan")
    record: dict = {}
    policy.train()
    try:
        while step < cfg.steps:
            step_start = time.perf_counter()
            is_retention_step = anchors is not None and step % rcfg.every_k == 0
            eps_t = epsilon(step)
            lr = optimizer.param_groups[0]["lr"]

            # g_t: the policy's own loss on a task batch, backward through the (DDP) model.
            batch = preprocessor(next(data_iter))
            with accelerator.autocast():
                task_loss, _ = policy(batch)
            accelerator.backward(task_loss)
            task_loss_value = mean_across_ranks(task_loss.item())

            # g_r: retention loss on an anchor batch, on the unwrapped model, averaged over ranks.
            retention_loss_value, surgery = None, None
            if is_retention_step:
                anchor_inputs, anchor_targets = next(anchor_iter)
                anchor_batches_done += 1
                retention_loss = anchors.loss(adapter, anchor_inputs, anchor_targets, rcfg.loss)
                retention_grads = retention_gradients(retention_loss, params)
                all_reduce_gradients_(retention_grads, params)
                retention_loss_value = mean_across_ranks(retention_loss.item())
                if _all_finite(task_loss_value, retention_loss_value):
                    surgery = apply_gradient_surgery(params, retention_grads, lam=lam.value, merge=rcfg.merge,
                                                     conflict_threshold=rcfg.conflict_threshold)
                del retention_grads

            grad_norm = float(accelerator.clip_grad_norm_(params, grad_clip_norm if grad_clip_norm > 0 else float("inf")))
            good_step = _all_finite(task_loss_value, retention_loss_value, grad_norm)
            if good_step:
                optimizer.step()
                if is_retention_step:
                    lam.update(retention_loss_value, eps_t)
                last_task_loss = task_loss_value
            else:
                skipped_nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            if lr_scheduler is not None:  # None without the policy's training preset (constant lr)
                lr_scheduler.step()
            if has_method(student, "update"):
                student.update()
            step += 1

            step_time = time.perf_counter() - step_start
            record = {
                "step": step,
                "task_loss": task_loss_value,
                "retention_loss": retention_loss_value,
                "lambda": lam.value if anchors else None,
                "epsilon": eps_t if anchors else None,
                "grad_cosine": surgery.cosine if surgery else None,
                "projected": surgery.projected if surgery else None,
                "grad_norm": grad_norm,
                "lr": lr,
                "step_time_s": step_time,
                "samples_per_s": cfg.batch_size * accelerator.num_processes / step_time,
                "cache_type": cache_type,
                "retention_step": is_retention_step,
                "skipped_nonfinite": not good_step,
            }
            if is_main:
                metrics.log(record)
                progress_bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    progress_bar.set_postfix(task_loss=f"{task_loss_value:.4g}", lam=record["lambda"])
                    if progress is not None:
                        progress(step, cfg.steps, record)

            if skipped_nonfinite > cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{skipped_nonfinite} training steps had a non-finite loss or gradient (latest: step {step}, "
                    f"task loss {task_loss_value}, retention loss {retention_loss_value}, grad norm {grad_norm}), "
                    f"more than train.max_nonfinite_steps={cfg.max_nonfinite_steps}; stopping. Last good checkpoint: "
                    f"{last_checkpoint_dir or 'none written yet'}. Lower train.lr or check the data for NaNs."
                )

            if should_save_checkpoint(step, cfg.save_every, cfg.steps):
                accelerator.wait_for_everyone()
                if is_main:
                    save_checkpoint(
                        out_dir, step, cfg.steps,
                        policy=student, preprocessor=preprocessor, postprocessor=postprocessor,
                        optimizer=optimizer, scheduler=lr_scheduler,
                        craft_state={"step": step, "lambda": lam.state_dict(), "epsilon": epsilon.state_dict(),
                                     "skipped_nonfinite": skipped_nonfinite, "anchor_batches": anchor_batches_done,
                                     "cache_type": cache_type,
                                     # Informational: resume recomputes it from (step, batch size, world size).
                                     "task_data_position": compute_sampler_state(
                                         step, len(sampler), cfg.batch_size, accelerator.num_processes)},
                        run=run, num_processes=accelerator.num_processes, batch_size=cfg.batch_size,
                        policy_source_dir=Path(source.path) if Path(source.path).is_dir() else None,
                    )
                accelerator.wait_for_everyone()
                last_checkpoint_dir = get_step_checkpoint_dir(out_dir, cfg.steps, step)
    finally:
        progress_bar.close()
        if metrics is not None:
            metrics.close()

    if not math.isfinite(last_task_loss) and metrics_path.exists():
        # Resumed an already finished run: report the loss it logged.
        from craft_core.metrics import read_metrics

        logged = [r["task_loss"] for r in read_metrics(metrics_path) if isinstance(r.get("task_loss"), float)]
        last_task_loss = logged[-1] if logged else last_task_loss
    plot_path = out_dir / "training_plot.png"
    result = {
        "checkpoint": str(pretrained_model_dir(last_checkpoint_dir)),
        "steps": step,
        "final_task_loss": last_task_loss,
        "metrics": str(metrics_path),
        "plot": str(plot_path),
        "retention": use_retention,
        "cache_type": cache_type,
        "final_lambda": lam.value if anchors else None,
        "skipped_nonfinite_steps": skipped_nonfinite,
        "wall_time_s": time.time() - wall_start,
        "num_processes": accelerator.num_processes,
    }
    if is_main:
        plot_training(metrics_path, plot_path, title=f"{'CRaFT' if use_retention else 'baseline'} — {out_dir.name}")
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    return result
