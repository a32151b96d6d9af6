"""The train stage: one loop for CRaFT and for the baseline (the same loop, retention off).

Read it top to bottom. It is lerobot's own training recipe (``lerobot_train.py``): ``make_policy``
(through ``craft_core.policy_io``), the policy's pre/post processors, a ``LeRobotDataset`` with the
policy's delta timestamps, lerobot's episode-aware sampler, ``make_optimizer_and_scheduler`` with
the policy's presets, ``accelerate`` for devices / DDP / mixed precision, and lerobot's checkpoint
layout. CRaFT adds one thing: every K-th step is a *retention step* (docs/ARCHITECTURE.md, "The
method"), done by :func:`update_policy` like lerobot's own ``update_policy``:

    g_t   task gradient: policy.forward's loss on a task batch, backward through the (DDP) model
    g_r   retention gradient: the student against the teacher's cached targets on a batch of stored
          anchor inputs, ``autograd.grad`` on the *unwrapped* model (so DDP's hooks stay quiet),
          then averaged over ranks like DDP averages g_t
    .grad <- surgery(g_t, g_r): conflict test on the cosine, PCGrad, merge with λ
    λ     <- clip(λ + η (L_ret - ε(t)), 0, λ_max), with L_ret averaged over ranks

Every other step is a plain task step. ``cfg.retention`` is the one switch: ``None`` trains the
baseline.
"""

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from craft_core.checkpoint import (
    check_same_run,
    last_checkpoint,
    load_checkpoint_state,
    pretrained_model_dir,
    save_checkpoint,
)
from craft_core.config import DatasetSource, PeftSettings, PolicySource, TrainConfig, semantic
from craft_core.memory_plan import check_fits_device
from craft_core.policy_options import check_anchoring, check_trainable_prefix
from craft_core.devices import resolve_device
from craft_core.distributed import all_reduce_gradients_, mean_across_ranks
from craft_core.metrics import MetricsLog, plot_training
from craft_core.noise import progress_bars
from craft_core.normalization import check_task_fits_statistics, fine_tuning_stats
from craft_core.retention import Retention, RetentionSetupError, open_retention
from craft_core.surgery import SurgeryStats, apply_gradient_surgery, retention_gradients

ProgressFn = Callable[[int, int, dict], None]

__all__ = ["NonFiniteLossError", "RetentionSetupError", "StepStats", "train", "train_stage", "update_policy"]


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient; the run stopped."""


# --------------------------------------------------------------------------------------------
# One optimisation step.
# --------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    task_loss: float
    grad_norm: float
    retention_losses: dict[str, float] | None = None  # per target, on retention steps
    surgery: SurgeryStats | None = None
    good: bool = True  # False: a non-finite loss or gradient, the step was skipped

    @property
    def retention_loss(self) -> float | None:
        """The targets' losses summed (unweighted), for one curve; None on plain task steps."""
        return None if self.retention_losses is None else sum(self.retention_losses.values())


def _all_finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def retention_step(retention: Retention, params: list[torch.nn.Parameter],
                   task_loss: float) -> tuple[dict[str, float], SurgeryStats | None]:
    """g_r on the next anchor batch, merged into ``.grad`` (which holds g_t) by gradient surgery.

    Every target's loss comes from one forward; the retention gradient is one backward pass of
    ``Σ_t w_t L_t`` (``w_t`` = λ_t for the weighted merge), so surgery needs one gradient-sized
    buffer whatever the number of targets. Returns the rank-averaged loss of each target and the
    surgery statistics (None when a loss is not finite: the step will be skipped, nothing merged).
    """
    losses = retention.next_losses()
    combined = sum(retention.merge_weight(target) * losses[target] for target in retention.targets)
    grads = retention_gradients(combined, params)
    all_reduce_gradients_(grads, params)
    values = {target: mean_across_ranks(loss.item()) for target, loss in losses.items()}
    surgery = None
    if _all_finite(task_loss, *values.values()):
        # λ_t is already inside g_r: merge g_t + g_r (or ½(g_t + g_r) for the equal merge).
        merge = "equal" if retention.cfg.merge == "equal" else "weighted"
        surgery = apply_gradient_surgery(params, grads, lam=1.0, merge=merge,
                                         conflict_threshold=retention.cfg.conflict_threshold)
    del grads, combined, losses
    return values, surgery


def update_policy(policy, batches: dict | list[dict], *, step: int, optimizer, lr_scheduler, accelerator,
                  params: list[torch.nn.Parameter], grad_clip_norm: float, retention: Retention | None) -> StepStats:
    """One optimizer step, as lerobot's ``update_policy`` plus CRaFT's retention step every K steps.

    ``batches`` is one batch or the ``train.grad_accum_steps`` micro-batches of this step: each
    micro-batch's loss is scaled by 1/N and backpropagated (gradients synchronised across ranks on
    the last one only), so ``.grad`` holds the mean task gradient over the micro-batches. The
    retention gradient is then computed once and merged with that accumulated gradient, and λ is
    updated once: accumulating N micro-batches of b is one step on a batch of N·b (exactly, for a
    loss that is a mean over equally sized micro-batches).
    """
    from lerobot.utils.utils import has_method

    batches = [batches] if isinstance(batches, dict) else list(batches)
    losses = []
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(policy):
            with accelerator.autocast():
                task_loss, _ = policy(batch)
            accelerator.backward(task_loss / len(batches))
        losses.append(task_loss.item())
        del task_loss
    stats = StepStats(task_loss=mean_across_ranks(sum(losses) / len(losses)), grad_norm=float("nan"))

    is_retention_step = retention is not None and retention.is_retention_step(step)
    if is_retention_step:
        stats.retention_losses, stats.surgery = retention_step(retention, params, stats.task_loss)

    stats.grad_norm = float(accelerator.clip_grad_norm_(params, grad_clip_norm if grad_clip_norm > 0 else float("inf")))
    stats.good = _all_finite(stats.task_loss, stats.retention_loss, stats.grad_norm)
    if stats.good:
        optimizer.step()
        if is_retention_step:
            retention.dual_step(stats.retention_losses, step)
    optimizer.zero_grad(set_to_none=True)
    if lr_scheduler is not None:  # None without the policy's training preset (constant lr)
        lr_scheduler.step()
    student = accelerator.unwrap_model(policy)
    if has_method(student, "update"):
        student.update()
    return stats


def target_metrics(retention: Retention | None, stats: StepStats, epsilons: dict[str, float]) -> dict:
    """Per-target columns of metrics.jsonl: ``retention_loss/<t>``, ``lambda/<t>``, ``epsilon/<t>``."""
    if retention is None:
        return {}
    losses = stats.retention_losses or {}
    lambdas = retention.lambdas()
    record = {}
    for target in retention.targets:
        record[f"retention_loss/{target}"] = losses.get(target)
        record[f"lambda/{target}"] = lambdas[target]
        record[f"epsilon/{target}"] = epsilons.get(target)
    return record


# --------------------------------------------------------------------------------------------
# Set-up helpers (what lerobot_train.py does before its loop).
# --------------------------------------------------------------------------------------------


def _release_accelerator_state(mixed_precision: str, *, cpu: bool) -> None:
    """Let this run configure accelerate afresh when an earlier one in the same process chose
    another precision or device.

    accelerate keeps one ``AcceleratorState`` per process and refuses a second ``Accelerator`` with
    other settings ("restart your runtime"), which in-process stages, the experiment runner or a
    notebook running two configs would hit. A single-process state is released, and only when it
    conflicts (a run with the same settings in another thread keeps sharing it); a distributed
    process, which runs one training, keeps its state and process group.
    """
    from accelerate.state import AcceleratorState, PartialState

    if not AcceleratorState._shared_state or PartialState().num_processes > 1:
        return
    existing = AcceleratorState()
    if existing.mixed_precision != mixed_precision or (cpu and existing.device.type != "cpu"):
        AcceleratorState._reset_state()  # accelerate's own reset (its tests use it); PartialState stays


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    device = resolve_device(cfg.device, field="train.device")
    _release_accelerator_state(cfg.mixed_precision, cpu=device.type == "cpu")
    # As lerobot: the scheduler steps once per optimizer step whatever the world size, and
    # find_unused_parameters because VLA forwards skip parts of the model (e.g. the action expert).
    return Accelerator(
        cpu=device.type == "cpu",
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


def _run_description(cfg: TrainConfig, teacher: PolicySource, store_url: str | None) -> dict:
    """What must match for a checkpoint in out_dir to be resumed by this call."""
    return {
        "config": semantic(cfg, "train"),
        "teacher": teacher.model_dump(mode="json"),
        "store_url": store_url if cfg.retention is not None else None,
        "retention": cfg.retention is not None,
    }


def _task_dataloader(cfg: TrainConfig, dataset, policy, *, pin_memory: bool, replay_dataset=None):
    """lerobot's episode-aware sampler: data order is a pure function of (seed, epoch), resumable.

    With ``replay_dataset`` a share ``cfg.replay.fraction`` of the samples are its frames instead
    (``craft_core.replay``).
    """
    from lerobot.datasets import EpisodeAwareSampler

    sampler = EpisodeAwareSampler(
        dataset.meta.episodes["dataset_from_index"],
        dataset.meta.episodes["dataset_to_index"],
        episode_indices_to_use=dataset.episodes,
        drop_n_last_frames=getattr(policy.config, "drop_n_last_frames", 0),
        shuffle=True,
        seed=cfg.seed,
        absolute_to_relative_idx=dataset.absolute_to_relative_idx,
    )
    if replay_dataset is not None:
        from craft_core.replay import ReplaySampler

        sampler = ReplaySampler(sampler, len(dataset), len(replay_dataset), cfg.replay.fraction, cfg.seed)
        dataset = torch.utils.data.ConcatDataset([dataset, replay_dataset])
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=False,
        pin_memory=pin_memory,
        # Its own generator: creating a loader iterator must not draw from the global RNG, or a
        # resumed run's random stream (dropout, flow-matching noise) would be shifted.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return sampler, dataloader


def base_policy(policy):
    """The lerobot policy inside a PEFT wrapper (adapters injected in place), or ``policy`` itself."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") and hasattr(policy, "peft_config") else policy


def wrap_with_peft(policy, peft: PeftSettings, teacher: PolicySource):
    """lerobot's own ``wrap_with_peft`` (its per-policy default targets), the base recorded as the teacher's
    source (hub id and revision, or folder) so lerobot's loaders find it again."""
    model = policy.wrap_with_peft(peft_cli_overrides=peft.lerobot_overrides())
    for adapter_cfg in model.peft_config.values():
        local = Path(teacher.path).expanduser()
        adapter_cfg.base_model_name_or_path = str(local.absolute()) if local.exists() else teacher.path
        adapter_cfg.revision = teacher.revision
    return model


def _image_transforms(cfg: TrainConfig):
    from lerobot.transforms.transforms import ImageTransforms

    from craft_core.policy_options import image_transforms_config

    settings = image_transforms_config(cfg.image_transforms)
    return ImageTransforms(settings) if settings is not None and settings.enable else None


def _memory_plan(cfg: TrainConfig, policy, dataset, preprocessor, *, retention: bool):
    """The run's memory plan, its training step probed on the first task frames (RNG state left as it was)."""
    from craft_core.memory_plan import plan_memory

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        # One micro-batch of real frames: its padded token lengths are the ones training sees (the
        # probe steps run on its first samples, never on more than the micro-batch).
        probe = preprocessor(torch.utils.data.default_collate(
            [dataset[i] for i in range(min(cfg.batch_size, len(dataset)))]))
        anchors = cfg.retention.anchor_batch_size if cfg.retention is not None else None
        plan = plan_memory(base_policy(policy), batch_size=cfg.batch_size, precision=cfg.mixed_precision,
                           peft=cfg.peft, retention=retention, batch=probe, anchor_batch_size=anchors)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return plan


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    teacher: PolicySource,
    store_url: str | None,
    out_dir: Path,
    progress: ProgressFn | None = None,
    role: str | None = None,
    anchor_dataset: DatasetSource | None = None,
) -> dict:
    """Fine-tune a student initialised from ``teacher`` on ``cfg.dataset``; CRaFT unless ``cfg.retention`` is None.

    ``role`` only names the run in its log line and plot (default: CRaFT / baseline);
    ``anchor_dataset`` is needed for ``train.normalization: union`` (statistics of both datasets).
    """
    from lerobot.common.train_utils import get_step_checkpoint_dir, should_save_checkpoint
    from lerobot.datasets import compute_sampler_state
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.optim.factory import make_optimizer_and_scheduler
    from lerobot.utils.random_utils import set_seed
    from lerobot.utils.utils import cycle
    from tqdm import tqdm

    from craft_core.lerobot_cli import eval_command
    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy, make_processors

    wall_start = time.time()
    out_dir = Path(out_dir).absolute()
    role = role or ("CRaFT" if cfg.retention is not None else "baseline")
    if cfg.retention is not None and not store_url:
        raise RetentionSetupError(
            "retention is on (train.retention is set) but no anchor store was given (store_url); run the cache "
            "stage first, or set train.retention to null for plain fine-tuning. craft never falls back silently."
        )
    run = _run_description(cfg, teacher, store_url)
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
    # Under torchrun on CPU accelerate's device is "cpu:0", which lerobot's config refuses when the
    # checkpoint is loaded again (resume, eval): the saved config must say "cpu".
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    policy = load_policy(source, ds_meta=ds_meta, device=device, trainable=True,
                         options=cfg.policy if not resume_from else None, rename_map=ds.rename_map)
    if cfg.peft is not None and not resume_from:
        policy = wrap_with_peft(policy, cfg.peft, teacher)
    # The statistics the checkpoint will be deployed with (train.normalization); a resumed run keeps its own.
    stats = None if resume_from else fine_tuning_stats(cfg.normalization, task_dataset=ds, anchor_dataset=anchor_dataset)
    preprocessor, postprocessor = make_processors(policy, dataset_stats=stats, pretrained_path=source.path,
                                                  rename_map=ds.rename_map)
    if not resume_from:
        far = check_task_fits_statistics(preprocessor, ds_meta.stats, cfg.normalization)
        if far and is_main:
            print(f"[craft train] {role}: the task's data lies far from the normalisation statistics "
                  f"({', '.join(far[:4])} scale units; train.normalization={cfg.normalization})", flush=True)
    dataset = LeRobotDataset(ds.repo_id, root=ds.root, episodes=ds.episodes, revision=ds.revision,
                             delta_timestamps=resolve_delta_timestamps(policy.config, ds_meta),
                             image_transforms=_image_transforms(cfg), video_backend=ds.video_backend)
    replay_dataset = None
    if cfg.replay is not None:  # old frames mixed into the task batches (a reference that uses old data)
        from craft_core.replay import check_compatible

        old = cfg.replay.dataset
        old_meta = LeRobotDatasetMetadata(old.repo_id, root=old.root, revision=old.revision)
        replay_dataset = LeRobotDataset(old.repo_id, root=old.root, episodes=old.episodes, revision=old.revision,
                                        delta_timestamps=resolve_delta_timestamps(policy.config, old_meta),
                                        video_backend=old.video_backend)
        check_compatible(dataset, replay_dataset, "train.replay.dataset")

    # Retention: validate the anchor store against the student before anything trains.
    retention = None
    if cfg.retention is not None:
        retention = open_retention(cfg.retention, store_url, adapter=get_adapter(base_policy(policy)), teacher=teacher,
                                   seed=cfg.seed, total_steps=cfg.steps, rank=accelerator.process_index,
                                   world_size=accelerator.num_processes)
        check_anchoring(base_policy(policy).config, retention.targets, options=cfg.policy)
        check_trainable_prefix(base_policy(policy), retention.targets)
    cache_type = retention.cache_type if retention else None

    memory = None
    if cfg.check_memory:
        memory = _memory_plan(cfg, policy, dataset, preprocessor, retention=retention is not None)
        if is_main:
            print(f"[craft train] {role}: {memory.summary()}", flush=True)
        check_fits_device(memory, accelerator.device)

    optimizer_settings = _OptimizerSettings(cfg, policy)
    optimizer, lr_scheduler = make_optimizer_and_scheduler(optimizer_settings, policy)
    grad_clip_norm = optimizer_settings.optimizer.grad_clip_norm or 0.0
    sampler, dataloader = _task_dataloader(cfg, dataset, policy, pin_memory=accelerator.device.type == "cuda",
                                           replay_dataset=replay_dataset)
    policy, optimizer, dataloader, lr_scheduler = accelerator.prepare(policy, optimizer, dataloader, lr_scheduler)
    student = accelerator.unwrap_model(policy)
    params = [p for p in student.parameters() if p.requires_grad]

    step, skipped_nonfinite = 0, 0
    if resume_from is not None:
        step, state = load_checkpoint_state(resume_from, optimizer, lr_scheduler)
        if retention is not None:
            retention.load_state_dict(state)
        skipped_nonfinite = state["skipped_nonfinite"]
        sampler.load_state_dict(compute_sampler_state(step, len(sampler), cfg.batch_size, accelerator.num_processes))
    last_checkpoint_dir = resume_from

    metrics_path = out_dir / "metrics.jsonl"
    metrics = None
    if is_main:
        metrics = MetricsLog(metrics_path, resume_step=step, wandb_project=cfg.wandb_project,
                             wandb_config=run, run_name=out_dir.name)
        print(f"[craft train] {role}{f', cache_type={cache_type}' if cache_type else ''}: steps {step}->{cfg.steps}, "
              f"{accelerator.num_processes} process(es) on {accelerator.device}")
    progress_bar = tqdm(total=cfg.steps, initial=step, disable=not is_main or not progress_bars(), desc=role,
                        dynamic_ncols=True)

    data_iter = cycle(dataloader)
    last_task_loss = float("nan")
    policy.train()
    try:
        while step < cfg.steps:
            step_start = time.perf_counter()
            epsilons = retention.epsilons(step) if retention else {}
            lr = optimizer.param_groups[0]["lr"]
            batches = [preprocessor(next(data_iter)) for _ in range(cfg.grad_accum_steps)]
            stats = update_policy(policy, batches, step=step, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                  accelerator=accelerator, params=params, grad_clip_norm=grad_clip_norm,
                                  retention=retention)
            if stats.good:
                last_task_loss = stats.task_loss
            else:
                skipped_nonfinite += 1
            step += 1

            step_time = time.perf_counter() - step_start
            record = {
                "step": step,
                "task_loss": stats.task_loss,
                "retention_loss": stats.retention_loss,
                **target_metrics(retention, stats, epsilons),
                "grad_cosine": stats.surgery.cosine if stats.surgery else None,
                "projected": stats.surgery.projected if stats.surgery else None,
                "grad_norm": stats.grad_norm,
                "lr": lr,
                "step_time_s": step_time,
                "samples_per_s": cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes / step_time,
                "cache_type": cache_type,
                "retention_step": stats.retention_loss is not None,
                "skipped_nonfinite": not stats.good,
            }
            if is_main:
                metrics.log(record)
                progress_bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    progress_bar.set_postfix(task_loss=f"{stats.task_loss:.4g}",
                                             **({"lam": ",".join(f"{v:.3g}" for v in retention.lambdas().values())}
                                                if retention else {}))
                    if progress is not None:
                        progress(step, cfg.steps, record)

            if skipped_nonfinite > cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{skipped_nonfinite} training steps had a non-finite loss or gradient (latest: step {step}, "
                    f"task loss {stats.task_loss}, retention loss {stats.retention_loss}, grad norm "
                    f"{stats.grad_norm}), more than train.max_nonfinite_steps={cfg.max_nonfinite_steps}; stopping. "
                    f"Last good checkpoint: {last_checkpoint_dir or 'none written yet'}. Lower train.lr or check "
                    "the data for NaNs."
                )

            if should_save_checkpoint(step, cfg.save_every, cfg.steps):
                accelerator.wait_for_everyone()
                if is_main:
                    craft_state = {"step": step, "skipped_nonfinite": skipped_nonfinite, "cache_type": cache_type,
                                   **(retention.state_dict() if retention else {}),
                                   # Informational: resume recomputes it from (step, batch size, world size).
                                   "task_data_position": compute_sampler_state(
                                       step, len(sampler), cfg.batch_size, accelerator.num_processes)}
                    save_checkpoint(
                        out_dir, step, cfg.steps,
                        policy=student, preprocessor=preprocessor, postprocessor=postprocessor,
                        optimizer=optimizer, scheduler=lr_scheduler, craft_state=craft_state,
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
    checkpoints = sorted(p for p in (out_dir / "checkpoints").glob("[0-9]*") if p.is_dir())
    result = {
        "checkpoint": str(pretrained_model_dir(last_checkpoint_dir)),
        "checkpoints": {str(int(c.name)): str(pretrained_model_dir(c)) for c in checkpoints},
        "steps": step,
        "final_task_loss": last_task_loss,
        "metrics": str(metrics_path),
        "plot": str(plot_path),
        "retention": retention is not None,
        "cache_type": cache_type,
        "final_lambda": retention.lambdas() if retention else None,
        "targets": retention.targets if retention else None,
        "skipped_nonfinite_steps": skipped_nonfinite,
        "wall_time_s": time.time() - wall_start,
        "num_processes": accelerator.num_processes,
        "grad_accum_steps": cfg.grad_accum_steps,
        "peft": cfg.peft.method if cfg.peft is not None else None,
        "memory_plan": memory.summary() if memory is not None else None,
        "memory_plan_bytes": memory.as_dict() if memory is not None else None,
    }
    # lerobot's own CLI on the final checkpoint (through craft's loading context where the policy
    # folder needs one: the tiny offline policies).
    result["lerobot_eval"] = eval_command(result["checkpoint"], "--env.type=<env>", "--eval.n_episodes=<n>")
    if is_main:
        print(f"[craft train] {role}: evaluate the checkpoint with lerobot's CLI: {result['lerobot_eval']}", flush=True)
        plot_training(metrics_path, plot_path, title=role)
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    return result


def train_stage(cfg: TrainConfig, *, teacher: PolicySource, anchor_dataset: DatasetSource | None,
                upstream: dict[str, dict], out_dir: Path, progress: ProgressFn | None = None) -> dict:
    """The pipeline's train stage (one run): the anchor store comes from the cache stage's result."""
    store_url = upstream["cache"]["store_url"] if cfg.retention is not None else None
    if cfg.num_processes > 1:  # data-parallel processes through torch's launcher (craft_core.launch)
        from craft_core.launch import launch_train

        return launch_train(cfg, teacher=teacher, store_url=store_url, out_dir=out_dir, progress=progress,
                            anchor_dataset=anchor_dataset)
    return train(cfg, teacher=teacher, store_url=store_url, out_dir=out_dir, progress=progress,
                 anchor_dataset=anchor_dataset)
