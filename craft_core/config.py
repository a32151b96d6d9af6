"""Configuration models of every craft stage and of the whole pipeline.

Every model forbids unknown keys, so a typo in a YAML preset or a Prefect run form is an error
that names the field instead of a silently ignored setting (the first CRaFT tool's config was
unreachable and CRaFT silently off). The pipeline model is the Prefect flow's parameter.

Paths may contain ``${assets}``: the pipeline replaces it by the directory of the ``assets``
stage (tiny teacher and local datasets built offline), so the demo presets need no hub.
"""

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PoolingStrategy = Literal["vision_token_mean", "text_token_last", "text_token_mean", "prefix_mean"]
RetentionLossKind = Literal["mse", "cosine", "l1"]
MergeMode = Literal["weighted", "equal", "task_priority"]
EpsilonScheduleKind = Literal["linear", "cosine", "exponential"]
RetentionTarget = Literal["prefix", "action_output"]
RETENTION_TARGETS: tuple[str, ...] = ("prefix", "action_output")
StageName = Literal["assets", "cache", "train", "eval"]
STAGES: tuple[str, ...] = ("assets", "cache", "train", "eval")

# Scripted tasks the offline demo can record (craft_core/demo/sim_datasets.py implements them);
# MetaWorld tasks are lerobot's own list (metaworld_config.json), each with a scripted expert.
SCRIPTED_TASKS: dict[str, tuple[str, ...]] = {
    "pusht": ("push_t", "circle", "corner"),
    "aloha": ("reach", "lift"),
}


@functools.cache
def metaworld_tasks() -> tuple[str, ...]:
    """MetaWorld task names lerobot's env knows, read from its config file (no simulator import)."""
    data = json.loads((resources.files("lerobot.envs") / "metaworld_config.json").read_text())
    return tuple(data["TASK_DESCRIPTIONS"])


# Settings that change how fast or where a stage's progress is shown, never what it computes:
# the one list every identity uses (stage fingerprints, the anchor store's fingerprint, the
# resume check of a training run), as dotted paths from the pipeline config's sections.
NON_SEMANTIC_SETTINGS = frozenset({
    "cache.batch_size",  # extraction batches never cross a block, so per-anchor values do not depend on it
    "cache.num_workers",
    "train.num_workers",
    "train.log_every",  # how often progress is reported; metrics.jsonl has every step regardless
    "train.wandb_project",
    # Scaling out: how many processes/machines write the same store (byte-identical whatever N) and
    # where torch's launcher finds its peers. train.num_processes is semantic (world size x batch).
    "cache.num_shards",
    "cache.shard_runner",
    "cache.shard_deployment",
    "train.num_machines",
    "train.machine_rank",
    "train.main_process_addr",
    "train.main_process_port",
})


def semantic(value: Any, path: str = "") -> Any:
    """``value`` (a model or JSON-able data) without the ``NON_SEMANTIC_SETTINGS`` under ``path``.

    ``path`` is where ``value`` sits in the pipeline config: ``semantic(train_cfg, "train")`` drops
    ``num_workers``, ``log_every`` and ``wandb_project``; ``semantic({"cache": ..., "train": ...})``
    drops them section by section.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if child not in NON_SEMANTIC_SETTINGS:
                kept[key] = semantic(item, child)
        return kept
    if isinstance(value, (list, tuple)):
        return [semantic(item, path) for item in value]
    return value



class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PolicySource(StrictModel):
    """A pretrained policy: a hub repo id (``lerobot/pi0fast-base``) or a local folder."""

    path: str = Field(description="Hub repo id or local folder holding config.json + model.safetensors")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit)")


class DatasetSource(StrictModel):
    """A LeRobotDataset: hub repo id, optionally materialised under a local root."""

    repo_id: str
    root: str | None = Field(default=None, description="Local dataset folder (offline use)")
    revision: str | None = None
    episodes: list[int] | None = Field(default=None, description="Restrict to these episodes")
    video_backend: str = "pyav"
    rename_map: dict[str, str] = Field(
        default_factory=dict,
        description="lerobot's rename_map: dataset observation keys -> the policy's (e.g. "
        "{observation.images.image: observation.images.base_0_rgb}), applied by the policy's preprocessor",
    )


class AssetsConfig(StrictModel):
    """Offline demo assets: a tiny real lerobot policy and scripted sim datasets."""

    policy_type: str = Field(default="pi0_fast", description="A policy type of craft_core.policies")
    env: Literal["pusht", "aloha", "metaworld"] = "pusht"
    episodes_per_task: int = Field(default=4, ge=1, description="Recorded episodes per task used for training")
    heldout_episodes_per_task: int = Field(
        default=0, ge=0,
        description="Further episodes per task, recorded after the training episodes (indices episodes_per_task "
        "onwards): the teacher never trains on them; select them by index in the configs (cache/train use "
        "the training episodes, eval the held-out ones)",
    )
    max_episode_steps: int = Field(default=60, ge=2)
    image_size: int = Field(default=96, ge=16, description="Recorded camera resolution (square)")
    task_a: str = Field(
        default="push_t", description="Task the teacher is pretrained on and anchors come from (what to retain)"
    )
    task_b: str = Field(default="corner", description="New task the student is fine-tuned on")
    teacher_pretrain_steps: int = Field(
        default=0, ge=0, description="Steps of training the tiny teacher on task A before caching"
    )
    teacher_pretrain_batch_size: int = Field(default=8, ge=1)
    teacher_pretrain_lr: float | None = Field(default=None, gt=0.0, description="None = the policy preset's")
    teacher_stats: Literal["task_a", "both_tasks"] = Field(
        default="task_a",
        description="Normalisation statistics the teacher is built and pretrained with: task_a = its own "
        "training data's; both_tasks = aggregated over the task A and task B recordings (lerobot's "
        "aggregate_stats), like a generalist whose statistics already cover the robot's whole workspace",
    )
    device: str = Field(default="auto", description="Device of the teacher pretraining")
    seed: int = 0

    @field_validator("policy_type")
    @classmethod
    def _known_policy_type(cls, policy_type: str) -> str:
        from craft_core.policies import POLICY_TYPES

        if policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type={policy_type!r} is not supported; choose one of {list(POLICY_TYPES)}")
        return policy_type

    @model_validator(mode="after")
    def _check_tasks(self) -> "AssetsConfig":
        known = metaworld_tasks() if self.env == "metaworld" else SCRIPTED_TASKS[self.env]
        for field in ("task_a", "task_b"):
            if getattr(self, field) not in known:
                raise ValueError(f"{field}={getattr(self, field)!r} is not a {self.env} task; choose one of {sorted(known)}")
        return self


class ActionOutputConfig(StrictModel):
    """How the ``action_output`` target probes the teacher's action path."""

    top_k: int = Field(
        default=8, ge=0,
        description="pi0_fast: the teacher's top-k next-token log-probabilities at each of its own greedy FAST "
        "tokens (KL target); 0 = the greedy tokens alone as hard labels (cross-entropy)",
    )
    flow_steps: int | None = Field(
        default=None, ge=1,
        description="pi0/pi05/smolvla: Euler steps of the teacher's own sampling from stored noise whose states "
        "and velocities are the probes; None = the policy's own inference steps",
    )


class CacheConfig(StrictModel):
    """Stage 1: the frozen teacher's retention targets (pooled hidden states, action outputs) on anchors."""

    teacher: PolicySource
    dataset: DatasetSource
    targets: list[RetentionTarget] = Field(
        default_factory=lambda: ["prefix"], min_length=1,
        description="prefix: pooled prefix hidden states (the seed's hidden-state anchoring); action_output: the "
        "teacher's outputs on the action path (FAST-token distributions, flow velocities)",
    )
    action_output: ActionOutputConfig = Field(default_factory=ActionOutputConfig)
    n_anchors: int = Field(default=256, ge=1)
    seed: int = 0
    frame_stride: int = Field(default=1, ge=1)
    prompts: list[str] | None = Field(
        default=None, description="Use these prompts (cycled) instead of the dataset's task strings"
    )
    layers: list[int] = Field(default_factory=lambda: [-2, -1], min_length=1)
    pooling: list[PoolingStrategy] = Field(
        default_factory=lambda: ["vision_token_mean", "text_token_last"], min_length=1
    )
    dtype: Literal["float16", "float32"] = "float16"
    autocast: Literal["auto", "no", "bf16"] = Field(
        default="auto",
        description="Autocast of the teacher's forward: auto = bf16 on CUDA, none on CPU. The store records it "
        "and the student's retention forward runs under the same",
    )
    batch_size: int = Field(default=16, ge=1)
    device: str = "auto"
    chunk_anchors: int | None = Field(
        default=None, ge=1, description="Anchors per Zarr chunk; default targets ~16 MB chunks"
    )
    shard_chunks: int | None = Field(default=None, ge=1, description="Chunks per Zarr shard (None = no sharding)")
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    num_workers: int = Field(default=0, ge=0)
    num_shards: int = Field(
        default=1, ge=1,
        description="Extract with this many shard processes, each writing its own contiguous range of store "
        "blocks (one Prefect task run each, tagged gpu), then one finalize; the store is byte-identical "
        "whatever the number. Needs at least as many blocks (chunk_anchors x shard_chunks anchors each)",
    )
    shard_runner: Literal["tasks", "deployment"] = Field(
        default="tasks",
        description="tasks: shards are task runs of this flow run, each in its own process on this machine; "
        "deployment: each shard is a run of the shard deployment (shard_deployment) on whatever workers "
        "serve its pool, possibly other machines (needs store_root on storage they all reach)",
    )
    shard_deployment: str = Field(
        default="craft/extract-shard", description="Deployment (flow/deployment name) that runs one extraction shard"
    )
    store_root: str | None = Field(
        default=None,
        description="Where the anchor store lives: <store_root>/<cache fingerprint>/anchors.zarr, any fsspec URL "
        "(s3://bucket/prefix with credentials from the environment) or local folder; None = in the cache stage's "
        "own directory",
    )

    @model_validator(mode="after")
    def _check_shards(self) -> "CacheConfig":
        if self.num_shards > self.n_anchors:
            raise ValueError(f"num_shards={self.num_shards} is larger than n_anchors={self.n_anchors}: every shard "
                             "needs at least one block of anchors; lower cache.num_shards")
        if self.num_shards > 1 and self.chunk_anchors is not None:
            block = min(self.chunk_anchors, self.n_anchors) * (self.shard_chunks or 1)
            n_blocks = -(-self.n_anchors // block)
            if self.num_shards > n_blocks:
                raise ValueError(
                    f"num_shards={self.num_shards} is larger than the store's {n_blocks} block(s) ({self.n_anchors} "
                    f"anchors, {block} per block = chunk_anchors x shard_chunks); lower cache.num_shards to at most "
                    f"{n_blocks} or make blocks smaller (cache.chunk_anchors)"
                )
        if self.shard_runner == "deployment" and self.store_root is None:
            raise ValueError("shard_runner='deployment' runs shards on other workers, possibly other machines: set "
                             "cache.store_root to storage they all reach (e.g. s3://bucket/craft)")
        return self

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers}")
        return layers

    @field_validator("pooling")
    @classmethod
    def _distinct_pooling(cls, pooling: list[str]) -> list[str]:
        if len(set(pooling)) != len(pooling):
            raise ValueError(f"pooling strategies must be distinct, got {pooling}")
        return pooling

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: list[str]) -> list[str]:
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets must be distinct, got {targets}")
        return targets


CONSTRAINT_FIELDS = ("lambda_init", "lambda_lr", "lambda_max", "eps_start", "eps_end", "eps_decay_steps", "eps_schedule")


class TargetConstraint(StrictModel):
    """One target's constraint ``L_t <= eps_t(t)``; a field left null inherits ``train.retention``'s."""

    loss: RetentionLossKind | None = Field(default=None, description="prefix only: the distance of pooled states")
    lambda_init: float | None = Field(default=None, ge=0.0)
    lambda_lr: float | None = Field(default=None, ge=0.0)
    lambda_max: float | None = Field(default=None, gt=0.0)
    eps_start: float | None = Field(default=None, ge=0.0)
    eps_end: float | None = Field(default=None, ge=0.0)
    eps_decay_steps: int | None = Field(default=None, ge=0)
    eps_schedule: EpsilonScheduleKind | None = None


class ResolvedConstraint(StrictModel):
    """A target's constraint with every field set (inherited settings filled in)."""

    loss: RetentionLossKind
    lambda_init: float
    lambda_lr: float
    lambda_max: float
    eps_start: float
    eps_end: float
    eps_decay_steps: int
    eps_schedule: EpsilonScheduleKind

    @model_validator(mode="after")
    def _check(self) -> "ResolvedConstraint":
        if self.eps_start < self.eps_end:
            raise ValueError(f"eps_start ({self.eps_start}) must be >= eps_end ({self.eps_end})")
        if self.lambda_init > self.lambda_max:
            raise ValueError(f"lambda_init ({self.lambda_init}) must be <= lambda_max ({self.lambda_max})")
        return self


class RetentionConfig(StrictModel):
    """CRaFT's constrained objective: min L_task s.t. L_t <= eps_t(t) for every retention target t.

    The top-level ``loss``, ``lambda_*`` and ``eps_*`` are the settings of every target (the
    seed's single prefix constraint keeps exactly these); ``targets`` chooses which of the anchor
    store's targets this run constrains and may override any setting per target.
    """

    every_k: int = Field(default=5, ge=1, description="A retention step every K steps")
    loss: RetentionLossKind = "mse"
    conflict_threshold: float = Field(default=-0.1, ge=-1.0, le=1.0)
    merge: MergeMode = "weighted"
    lambda_init: float = Field(default=1.0, ge=0.0)
    lambda_lr: float = Field(default=0.1, ge=0.0)
    lambda_max: float = Field(default=10.0, gt=0.0)
    eps_start: float = Field(default=0.05, ge=0.0)
    eps_end: float = Field(default=0.01, ge=0.0)
    eps_decay_steps: int = Field(default=0, ge=0, description="0 = anneal over all training steps")
    eps_schedule: EpsilonScheduleKind = "cosine"
    targets: dict[RetentionTarget, TargetConstraint] | None = Field(
        default=None,
        description="The anchor store's targets this run constrains, each with its own λ and ε; null = all of them",
    )
    anchor_batch_size: int = Field(default=8, ge=1)
    shuffle_window_chunks: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "RetentionConfig":
        if self.targets is not None and not self.targets:
            raise ValueError("targets is empty: name at least one target, or null for all of the store's")
        for target in [None, *(self.targets or {})]:
            try:
                self.constraint(target)
            except ValueError as exc:
                where = f"targets.{target}: " if target else ""
                raise ValueError(f"{where}{exc}") from None
        return self

    def constraint(self, target: str | None) -> ResolvedConstraint:
        """The constraint settings of ``target``: its own overrides on top of the top-level ones."""
        values = {field: getattr(self, field) for field in ("loss", *CONSTRAINT_FIELDS)}
        override = (self.targets or {}).get(target) if target else None
        if override is not None:
            values.update({k: v for k, v in override.model_dump().items() if v is not None})
        return ResolvedConstraint.model_validate(values)


class ReplayConfig(StrictModel):
    """Replay of old data: a fraction of every task batch drawn from another dataset's frames."""

    fraction: float = Field(gt=0.0, lt=1.0, description="Share of the samples drawn from `dataset`, e.g. 0.05")
    dataset: DatasetSource | None = Field(
        default=None, description="Frames to replay; default the anchor dataset (cache.dataset: the retained task)"
    )


class PeftSettings(StrictModel):
    """LoRA/PEFT through lerobot's own ``wrap_with_peft`` (lerobot-train's ``--peft.*`` options)."""

    method: str = Field(default="lora", description="A PEFT method type (lora, miss, ...), as lerobot's method_type")
    rank: int = Field(default=16, ge=1, description="Adapter rank r")
    alpha: int | None = Field(default=None, ge=1, description="lora_alpha; None = PEFT's default")
    target_modules: list[str] | str | None = Field(
        default=None, description="Module names/suffixes or a regex; None = lerobot's per-policy defaults")
    full_training_modules: list[str] | None = Field(
        default=None, description="Modules trained in full beside the adapters (PEFT's modules_to_save); None = "
        "lerobot's per-policy default")
    init_type: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from peft import PeftType

        if method.upper() not in PeftType.__members__:
            raise ValueError(f"method={method!r} is not a PEFT method; choose one of "
                             f"{sorted(m.lower() for m in PeftType.__members__)}")
        return method.lower()

    def lerobot_overrides(self) -> dict:
        """The ``peft_cli_overrides`` lerobot's ``wrap_with_peft`` takes (its PeftConfig field names)."""
        return {"method_type": self.method, "r": self.rank, "lora_alpha": self.alpha,
                "target_modules": self.target_modules, "full_training_modules": self.full_training_modules,
                "init_type": self.init_type}


class TrainConfig(StrictModel):
    """Stage 2: fine-tune the student (initialised from the teacher) on the new task."""

    dataset: DatasetSource
    steps: int = Field(default=1000, ge=1, description="Optimizer steps")
    batch_size: int = Field(default=8, ge=1, description="Samples per micro-batch (per process)")
    grad_accum_steps: int = Field(
        default=1, ge=1,
        description="Micro-batches per optimizer step (effective batch = batch_size x grad_accum_steps x processes); "
        "the retention step, λ and the lr schedule act once per optimizer step",
    )
    policy: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields of the lerobot policy config (e.g. freeze_vision_encoder, train_expert_only, chunk_size, "
        "n_action_steps, gradient_checkpointing, empty_cameras), checked against the policy type's config class; "
        "the teacher is loaded with them too, so anchors and student agree",
    )
    peft: PeftSettings | None = Field(
        default=None, description="LoRA/PEFT adapters through lerobot's PEFT support; retention then acts on the "
        "adapter parameters only")
    image_transforms: dict[str, Any] | None = Field(
        default=None, description="lerobot's ImageTransformsConfig (enable, max_num_transforms, random_order, tfs) "
        "for the task frames; anchors are never augmented")
    check_memory: bool = Field(
        default=True, description="Plan memory at start-up (weights, gradients, optimizer, retention buffer, "
        "activations) and on CUDA refuse a run that cannot fit the device")
    lr: float | None = Field(default=None, gt=0.0, description="Override the policy preset's learning rate")
    weight_decay: float | None = Field(default=None, ge=0.0)
    grad_clip_norm: float | None = Field(default=None, gt=0.0)
    use_policy_training_preset: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(default=0, ge=0)
    save_every: int = Field(default=500, ge=1)
    log_every: int = Field(default=10, ge=1)
    max_nonfinite_steps: int = Field(default=10, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_processes: int = Field(
        default=1, ge=1,
        description="Data-parallel processes in all (accelerate's meaning), started by torch's launcher (torchrun), "
        "one device each (NCCL on GPUs, gloo on CPU); batch_size is per process",
    )
    num_machines: int = Field(default=1, ge=1, description="Machines the processes are spread over (torchrun --nnodes)")
    machine_rank: int = Field(default=0, ge=0, description="This machine's rank among num_machines (torchrun --node_rank)")
    main_process_addr: str | None = Field(
        default=None, description="Address of machine 0 for multi-machine runs (torchrun --master_addr)"
    )
    main_process_port: int | None = Field(
        default=None, ge=1, le=65535, description="Port on machine 0 (torchrun --master_port); None = a free port"
    )
    normalization: Literal["task", "teacher", "union"] = Field(
        default="teacher",
        description="Statistics the fine-tuned checkpoint normalises with: task (the new dataset's, as "
        "lerobot-train), teacher (the teacher's own, unchanged) or union (anchor and task datasets together). "
        "The anchor store is made with the same statistics",
    )
    wandb_project: str | None = None
    replay: ReplayConfig | None = Field(
        default=None, description="Mix frames of an old dataset into the task batches (a reference that uses old data)"
    )
    retention: RetentionConfig | None = Field(
        default_factory=RetentionConfig,
        description="CRaFT's retention settings; null = plain fine-tuning (the baseline): the one retention switch",
    )

    @field_validator("image_transforms")
    @classmethod
    def _lerobot_image_transforms(cls, value: dict | None) -> dict | None:
        from craft_core.policy_options import image_transforms_config

        image_transforms_config(value)  # raises naming the field
        return value

    @model_validator(mode="after")
    def _check_processes(self) -> "TrainConfig":
        if self.num_processes % self.num_machines:
            raise ValueError(f"num_processes={self.num_processes} (all machines together) is not a multiple of "
                             f"num_machines={self.num_machines}; every machine runs the same number of processes")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank={self.machine_rank} must be < num_machines={self.num_machines}")
        if self.num_machines > 1 and (self.main_process_addr is None or self.main_process_port is None):
            raise ValueError(f"num_machines={self.num_machines}: set train.main_process_addr and train.main_process_port "
                             "(machine 0's address and a port every machine can reach)")
        return self

    @property
    def processes_per_machine(self) -> int:
        return self.num_processes // self.num_machines


RUN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED_RUN_NAMES = ("teacher",)


class RunSpec(StrictModel):
    """One fine-tuning run of the comparison: ``train`` as configured, with these differences."""

    retention: bool = Field(default=True, description="false = plain fine-tuning with the same loop (baseline)")
    targets: list[RetentionTarget] | None = Field(
        default=None, description="Constrain only these of the anchor store's targets (default: train.retention's)"
    )
    replay: ReplayConfig | None = Field(
        default=None, description="Replay old frames in this run (e.g. {fraction: 0.05}: 5 % of task-A frames)"
    )

    @model_validator(mode="after")
    def _check(self) -> "RunSpec":
        if self.targets is not None and not self.retention:
            raise ValueError("targets are set but retention is false")
        if self.targets is not None and (not self.targets or len(set(self.targets)) != len(self.targets)):
            raise ValueError(f"targets must be a non-empty list of distinct targets, got {self.targets}")
        return self


def default_runs() -> dict[str, RunSpec]:
    return {"baseline": RunSpec(retention=False), "craft": RunSpec()}


class SimEvalConfig(StrictModel):
    name: str | None = Field(default=None, description="Name in the report (e.g. task_a); default env[/task]")
    env: Literal["pusht", "aloha", "libero", "metaworld"]
    task: str | None = Field(
        default=None, description="Env task, e.g. AlohaTransferCube-v0, libero_10 or button-press-v3 (metaworld)"
    )
    image_size: int | None = Field(
        default=None, ge=16, description="metaworld: rendered image size; default the policy's image feature size"
    )
    fast_render: bool = Field(
        default=True, description="metaworld: no shadows, reflections or multisampling, a small offscreen buffer"
    )
    n_episodes: int = Field(default=2, ge=1)
    batch_size: int = Field(default=1, ge=1)
    seed: int = 1000
    max_episode_steps: int | None = Field(default=None, ge=1)
    n_videos: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "SimEvalConfig":
        if self.env == "metaworld":
            if self.task is None:
                raise ValueError("a metaworld entry needs a task (a MetaWorld task name, e.g. button-press-v3)")
            unknown = [t for t in self.task.split(",") if t.strip() not in metaworld_tasks()
                       and t.strip() not in ("easy", "medium", "hard", "very_hard")]
            if unknown:
                raise ValueError(f"task {unknown} is not a MetaWorld task lerobot knows")
        elif self.image_size is not None:
            raise ValueError(f"image_size applies to metaworld only (env {self.env!r} renders its own size)")
        return self


class ActionLossConfig(StrictModel):
    """Forgetting measured in loss: each policy's own loss on a dataset's frames (held-out episodes)."""

    name: str = Field(description="Column name in the report, e.g. task_a")
    dataset: DatasetSource


class DriftSetConfig(StrictModel):
    """Drift on frames of another dataset (e.g. held-out episodes): the teacher's targets are
    extracted there by the eval stage with the cache's layers and pooling."""

    name: str
    dataset: DatasetSource
    n_anchors: int = Field(default=32, ge=1)


class EvalConfig(StrictModel):
    """Stage 3: simulation through lerobot's eval, drift on held-out anchors, held-out losses."""

    sim: list[SimEvalConfig] = Field(default_factory=list)
    drift: bool = True
    drift_batch_size: int = Field(default=16, ge=1)
    drift_sets: list[DriftSetConfig] = Field(default_factory=list)
    action_loss: list[ActionLossConfig] = Field(default_factory=list)
    loss_batch_size: int = Field(default=16, ge=1)
    loss_seed: int = Field(default=1234, description="RNG seed before each loss measurement (flow-matching noise)")
    every_checkpoint: bool = Field(
        default=False, description="Also measure losses and drift at every saved checkpoint (curves; sim only at the last)"
    )
    reference_runs: dict[str, str] = Field(
        default_factory=dict, description="Further checkpoints to evaluate by name (pretrained_model folders)"
    )
    device: str = "auto"


class PipelineConfig(StrictModel):
    """The whole craft pipeline: the Prefect flow `craft`'s one parameter."""

    name: str = "craft"
    artifacts_root: str = Field(default="artifacts", description="Content-addressed stage outputs live here")
    stages: list[StageName] = Field(
        default_factory=lambda: list(STAGES),
        description="Stages to run; a stage left out must already have a complete output for its config",
    )
    isolation: Literal["auto", "process", "inline"] = Field(
        default="auto",
        description="Run each stage in its own process so its (GPU) memory is freed; auto = only on CUDA",
    )
    assets: AssetsConfig | None = Field(default=None, description="Build offline demo assets (tiny policy, local datasets)")
    cache: CacheConfig
    train: TrainConfig
    runs: dict[str, RunSpec] = Field(
        default_factory=default_runs,
        description="The fine-tuning runs to compare, by name; each is `train` with its differences",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    concurrent_stages: bool = Field(
        default=False,
        description="Submit stages that do not depend on each other together (the fine-tuning runs, the evaluation "
        "of each policy), each in its own process; the `gpu` tag's concurrency limit decides how many run at once. "
        "Off: one stage after the other (the default: on a 2-core CPU concurrent stages share the cores and each "
        "pays its own process start-up; benchmarks/bench_parallel_stages.py measures both)",
    )

    @field_validator("runs")
    @classmethod
    def _check_runs(cls, runs: dict[str, RunSpec]) -> dict[str, RunSpec]:
        if not runs:
            raise ValueError("runs is empty: name at least one fine-tuning run, e.g. {craft: {}}")
        for name in runs:
            if not RUN_NAME.match(name) or name in RESERVED_RUN_NAMES:
                raise ValueError(
                    f"run name {name!r} must be lowercase letters, digits and '_' (starting with a letter) "
                    f"and not one of {RESERVED_RUN_NAMES}"
                )
        return runs

    @field_validator("stages")
    @classmethod
    def _distinct_stages(cls, stages: list[str]) -> list[str]:
        if len(set(stages)) != len(stages):
            raise ValueError(f"stages must be distinct, got {stages}")
        return stages

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        uses_assets = "${assets}" in self.model_dump_json()
        if uses_assets and self.assets is None:
            raise ValueError("paths use ${assets} but the 'assets' section is missing")
        if self.train.retention is None and any(run.retention for run in self.runs.values()):
            retaining = [name for name, run in self.runs.items() if run.retention]
            raise ValueError(f"runs {retaining} use retention but train.retention is null; configure it "
                             "or set retention: false for those runs")
        self._check_policy_options()
        cached = set(self.cache.targets)
        retention_targets = (self.train.retention.targets or {}) if self.train.retention else {}
        wanted = {"train.retention.targets": list(retention_targets)}
        wanted.update({f"runs.{name}.targets": run.targets or [] for name, run in self.runs.items()})
        for field, targets in wanted.items():
            missing = [t for t in targets if t not in cached]
            if missing:
                raise ValueError(f"{field} names {missing}, which cache.targets {sorted(cached)} does not hold; "
                                 f"add them to cache.targets")
        return self

    def _check_policy_options(self) -> None:
        """``train.policy`` against the teacher's lerobot config class, when its type is known offline
        (the assets' policy type or a local folder); a hub teacher's are checked when it is loaded."""
        if not self.train.policy:
            return
        from craft_core.policy_options import PolicyOptionError, validate_policy_options

        policy_type = None
        teacher = self.cache.teacher.path
        if teacher.startswith("${assets}") and self.assets is not None:
            policy_type = self.assets.policy_type
        elif (Path(teacher).expanduser() / "config.json").is_file():
            policy_type = json.loads((Path(teacher).expanduser() / "config.json").read_text()).get("type")
        if policy_type is not None:
            try:
                validate_policy_options(policy_type, self.train.policy)
            except PolicyOptionError as exc:
                raise ValueError(str(exc)) from None

    def run_train_config(self, run: str) -> TrainConfig:
        """``train`` as run ``run`` trains: retention off for a baseline run, its own targets otherwise,
        and its replay (old frames: the anchor dataset unless it names another)."""
        spec = self.runs[run]
        train = self.train
        if spec.replay is not None:
            replay = spec.replay.model_copy(update={"dataset": spec.replay.dataset or self.cache.dataset})
            train = train.model_copy(update={"replay": replay})
        if not spec.retention:
            return train.model_copy(update={"retention": None})
        if spec.targets is None:
            return train
        current = self.train.retention.targets or {}
        targets = {name: current.get(name, TargetConstraint()) for name in spec.targets}
        retention = self.train.retention.model_copy(update={"targets": targets})
        return train.model_copy(update={"retention": retention})


class ExperimentSection(StrictModel):
    """What an experiment repeats the pipeline over: policy types and seeds."""

    policies: list[str] = Field(default_factory=lambda: ["pi0_fast", "smolvla"], min_length=1,
                                description="assets.policy_type of each repetition")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="train.seed of each repetition (teacher and anchors are shared)")
    per_policy: dict[str, dict] = Field(
        default_factory=dict,
        description="Per-policy changes of the pipeline sections, nested like the YAML, e.g. "
        "{smolvla: {train: {lr: 3.0e-4}}}",
    )

    @field_validator("policies")
    @classmethod
    def _known_policies(cls, policies: list[str]) -> list[str]:
        from craft_core.policies import POLICY_TYPES

        unknown = [p for p in policies if p not in POLICY_TYPES]
        if unknown:
            raise ValueError(f"unknown policy types {unknown}; choose from {list(POLICY_TYPES)}")
        return policies


class ExperimentConfig(PipelineConfig):
    """A pipeline config plus the ``experiment`` section: the pipeline repeated per policy and seed."""

    experiment: ExperimentSection = Field(default_factory=ExperimentSection)

    def pipeline_for(self, policy_type: str, seed: int) -> PipelineConfig:
        """The pipeline run of one (policy type, seed) repetition."""
        data = self.model_dump(mode="json", exclude={"experiment"})
        merge_nested(data, self.experiment.per_policy.get(policy_type, {}))
        if data.get("assets") is not None:
            data["assets"]["policy_type"] = policy_type
        data["train"]["seed"] = seed
        data["name"] = f"{self.name}-{policy_type}-s{seed}"
        return PipelineConfig.model_validate(data)


class ConfigError(ValueError):
    """A config file or override that cannot be read; the message names the file or field."""


def merge_nested(base: dict, changes: dict) -> None:
    """Merge ``changes`` into ``base`` in place, section by section."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_nested(base[key], value)
        else:
            base[key] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a config mapping, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        dotted, raw_value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:  # a section left out (or null) in the file: the override creates it
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item}: '{'.'.join(keys[: depth + 1])}' is not a section")
            node = child
        try:
            node[keys[-1]] = yaml.safe_load(raw_value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item}: the value is not valid YAML ({exc})") from None
    return data


def read_config_file(path: str | Path) -> dict:
    """A config YAML file as a mapping; refuses anything else with the file named."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of sections (assets, cache, train, runs, "
            f"eval, ...), not a {type(data).__name__}"
        )
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[PipelineConfig] = PipelineConfig) -> PipelineConfig:
    """Load a pipeline YAML and apply ``a.b=c`` overrides (values parsed as YAML)."""
    data = read_config_file(path) if path is not None else {}
    return model.model_validate(apply_overrides(data, overrides))


PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset_path(name: str, directory: Path = PRESETS_DIR) -> Path:
    path = directory / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise FileNotFoundError(f"no preset '{name}' in {directory}; known presets: {known}")
    return path


def load_preset(name: str, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(preset_path(name), overrides)
