"""Configuration models of every craft stage and of the whole pipeline.

Every model forbids unknown keys, so a typo in a YAML preset or a Prefect run form is an error
that names the field instead of a silently ignored setting (the first CRaFT tool's config was
unreachable and CRaFT silently off). The pipeline model is the Prefect flow's parameter.

Paths may contain ``${assets}``: the flow replaces it by the directory of the ``assets`` stage
(tiny teacher and local datasets built offline), so the demo presets need no hub.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PoolingStrategy = Literal["vision_token_mean", "text_token_last", "text_token_mean", "prefix_mean"]
RetentionLossKind = Literal["mse", "cosine", "l1"]
MergeMode = Literal["weighted", "equal", "task_priority"]
EpsilonScheduleKind = Literal["linear", "cosine", "exponential"]
StageName = Literal["assets", "cache", "train", "eval"]
STAGES: tuple[str, ...] = ("assets", "cache", "train", "eval")


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


class AssetsConfig(StrictModel):
    """Offline demo assets: a tiny real lerobot policy and scripted sim datasets."""

    policy_type: Literal["pi0_fast", "smolvla", "pi0", "pi05"] = "pi0_fast"
    env: Literal["pusht", "aloha"] = "pusht"
    episodes_per_task: int = Field(default=4, ge=1)
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
    device: str = Field(default="auto", description="Device of the teacher pretraining")
    seed: int = 0

    @model_validator(mode="after")
    def _check_tasks(self) -> "AssetsConfig":
        from craft_core.sim_datasets import ALOHA_TASKS, PUSHT_TASKS

        known = PUSHT_TASKS if self.env == "pusht" else ALOHA_TASKS
        for field in ("task_a", "task_b"):
            if getattr(self, field) not in known:
                raise ValueError(f"{field}={getattr(self, field)!r} is not a {self.env} task; choose one of {sorted(known)}")
        return self


class CacheConfig(StrictModel):
    """Stage 1: the frozen teacher's pooled hidden states on anchor samples."""

    teacher: PolicySource
    dataset: DatasetSource
    kind: Literal["hidden_state", "token_level"] = Field(
        default="hidden_state",
        description="hidden_state: pooled hidden states (hidden-state anchoring); token_level: the teacher's "
        "greedy action tokens (token-level distillation, policies whose adapter can decode them)",
    )
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
    batch_size: int = Field(default=16, ge=1)
    device: str = "auto"
    chunk_anchors: int | None = Field(
        default=None, ge=1, description="Anchors per Zarr chunk; default targets ~16 MB chunks"
    )
    shard_chunks: int | None = Field(default=None, ge=1, description="Chunks per Zarr shard (None = no sharding)")
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    num_workers: int = Field(default=0, ge=0)

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


class RetentionConfig(StrictModel):
    """CRaFT's constrained objective: min L_task s.t. L_ret <= eps(t)."""

    enabled: bool = True
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
    anchor_batch_size: int = Field(default=8, ge=1)
    shuffle_window_chunks: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "RetentionConfig":
        if self.eps_start < self.eps_end:
            raise ValueError(f"eps_start ({self.eps_start}) must be >= eps_end ({self.eps_end})")
        if self.lambda_init > self.lambda_max:
            raise ValueError(f"lambda_init ({self.lambda_init}) must be <= lambda_max ({self.lambda_max})")
        return self


class TrainConfig(StrictModel):
    """Stage 2: fine-tune the student (initialised from the teacher) on the new task."""

    dataset: DatasetSource
    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=8, ge=1)
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
    wandb_project: str | None = None
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    compare_baseline: bool = Field(
        default=True, description="Also train the same loop with retention off, for the comparison table"
    )


class SimEvalConfig(StrictModel):
    env: Literal["pusht", "aloha", "libero"]
    task: str | None = Field(default=None, description="Env task, e.g. AlohaTransferCube-v0 or libero_10")
    n_episodes: int = Field(default=2, ge=1)
    batch_size: int = Field(default=1, ge=1)
    seed: int = 1000
    max_episode_steps: int | None = Field(default=None, ge=1)
    n_videos: int = Field(default=1, ge=0)


class EvalConfig(StrictModel):
    """Stage 3: simulation through lerobot's eval and drift on held-out anchors."""

    sim: list[SimEvalConfig] = Field(default_factory=list)
    drift: bool = True
    drift_batch_size: int = Field(default=16, ge=1)
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
    eval: EvalConfig = Field(default_factory=EvalConfig)

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
        return self


def _set_dotted(data: dict, dotted: str, raw_value: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}={raw_value}: '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw_value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline YAML and apply ``a.b=c`` overrides (values parsed as YAML)."""
    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like section.field=value")
        dotted, raw_value = item.split("=", 1)
        _set_dotted(data, dotted.strip(), raw_value)
    return PipelineConfig.model_validate(data)


PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_preset(name: str, overrides: list[str] | None = None) -> PipelineConfig:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset '{name}' in {PRESETS_DIR}; known presets: {known}")
    return load_config(path, overrides)
