"""The pipeline's stage graph, written once: which stages a config has, what each consumes, and
every stage's fingerprint and output directory, all known before anything runs.

    assets ──▶ cache ──▶ train_<run> (runs that retain) ──┐
       │                                                  ├──▶ eval
       └──────▶ train_<run> (baseline runs: no cache) ────┘

Fingerprints depend only on configs and code, so the whole plan is known up front. That is what
lets the pipeline resolve ``${assets}`` before the assets exist, skip a stage whose output is
complete, and run a subset of stages against earlier outputs.

Each fine-tuning run of ``runs`` is its own stage ``train_<run>``, cached on exactly what it
depends on: a baseline run (retention off) ignores the anchor cache and the retention settings,
so tuning CRaFT never re-runs it.

A stage is a function of the library (``STAGE_FUNCTIONS``), called as
``fn(cfg=<its section>, <rest of its slice>, upstream={stage: result}, out_dir=..., progress=...)``
and returning a small JSON-able result (locations and headline numbers, never arrays). Its code
version is the import closure of the module that defines it.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from craft_core.config import (
    AssetsConfig,
    CacheConfig,
    DatasetSource,
    DriftSetConfig,
    EvalConfig,
    PipelineConfig,
    PolicySource,
    TrainConfig,
)
from craft_core.evaluation import eval_run_stage, report_stage
from craft_core.evaluation.report import pipeline_summary
from craft_core.extraction import cache_stage
from craft_core.pipeline.fingerprint import StageDir, code_version, stage_fingerprint
from craft_core.train import train_stage


def assets_stage(**kwargs) -> dict:
    """The offline demo's assets stage (``craft_core.demo.assets``), imported only when a config has an
    ``assets`` section, so planning a production pipeline loads no demo code."""
    from craft_core.demo.assets import assets_stage as build_assets

    return build_assets(**kwargs)


# The stage's code version is its real module's import closure, not this wrapper's (graph.py reaches
# every stage's code, so that would re-run the assets whenever any stage changed).
assets_stage.__module__ = "craft_core.demo.assets"

ASSETS_PLACEHOLDER = "${assets}"

# Kind of stage -> the library function that runs it, and the config section it belongs to (what
# `stages` selects).
STAGE_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "assets": assets_stage,
    "cache": cache_stage,
    "train": train_stage,
    "eval": eval_run_stage,
    "report": report_stage,
}
SECTION_OF_KIND = {"assets": "assets", "cache": "cache", "train": "train", "eval": "eval", "report": "eval"}
GPU_KINDS = frozenset({"cache", "train", "eval"})

# Keyword arguments of the stage functions -> their config model, to rebuild them from JSON.
SLICE_MODELS: dict[str, type[BaseModel]] = {
    "assets": AssetsConfig,
    "cache": CacheConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "teacher": PolicySource,
    "task_dataset": DatasetSource,
    "anchor_dataset": DatasetSource,
    "drift_sets": TypeAdapter(list[DriftSetConfig]),
}


class StagePlan(BaseModel):
    """One stage of a pipeline run: what identifies it, where its output goes, what it consumes."""

    stage: str  # unique name: assets, cache, train_<run>, eval_<policy>, report
    kind: str  # which stage function runs it (STAGE_FUNCTIONS)
    section: str  # the config section it belongs to (what `stages` selects)
    fingerprint: str
    code_version: str
    upstream: dict[str, str]  # consumed stage -> its fingerprint
    artifacts_root: str
    path: str
    config: dict[str, Any]  # the stage's config slice, JSON, ${assets} unresolved

    @property
    def cache_key(self) -> str:
        # The artifacts root is part of the key: the same fingerprint under another root is another
        # output, and a cached reference must never point into someone else's directory.
        root = hashlib.sha256(self.artifacts_root.encode()).hexdigest()[:8]
        return f"craft-{self.stage}-{self.fingerprint}-{root}"

    @property
    def gpu(self) -> bool:
        return self.kind in GPU_KINDS

    @property
    def function(self) -> Callable[..., dict]:
        return STAGE_FUNCTIONS[self.kind]

    def stage_dir(self) -> StageDir:
        return StageDir(self.artifacts_root, self.stage, self.fingerprint)

    def kwargs(self, assets_dir: str | None) -> dict[str, Any]:
        """The stage function's config arguments, ``${assets}`` resolved to ``assets_dir``: its own
        section as ``cfg``, the rest of its slice under their names."""
        resolved = {}
        for key, value in self.config.items():
            value = _resolve_json(value, assets_dir)
            if key in SLICE_MODELS and value is not None:
                value = _validate(SLICE_MODELS[key], value)
            resolved["cfg" if key == self.section else key] = value
        return resolved


class StageRef(BaseModel):
    """A complete stage output: where it is and its small result, never the data itself."""

    stage: str
    fingerprint: str
    path: str
    result: dict


def stage_slices(cfg: PipelineConfig) -> list[tuple[str, str, dict[str, Any], list[str]]]:
    """(stage, kind, config slice, consumed stages) of every stage of ``cfg``, in execution order.

    A stage whose slice mentions ``${assets}`` consumes the assets stage. Every evaluated policy
    (the teacher, each run, each reference run) is its own ``eval_<policy>`` stage, so a policy is
    evaluated again only when it or the evaluation changed (the teacher once, whatever the runs).
    """
    stages: list[tuple[str, str, dict[str, Any], list[str]]] = []

    def add(stage: str, kind: str, config: dict[str, Any], consumes: list[str]) -> None:
        if cfg.assets is not None and stage != "assets" and _uses_assets(config):
            consumes = ["assets", *consumes]
        stages.append((stage, kind, config, consumes))

    if cfg.assets is not None:
        add("assets", "assets", {"assets": cfg.assets}, [])
    # The anchors are normalised with the statistics the fine-tuned students are saved with.
    normalization = cfg.train.normalization
    union = normalization == "union"
    cache_slice = {"cache": cfg.cache, "normalization": normalization,
                   "task_dataset": cfg.train.dataset if union else None, "drift_sets": cfg.eval.drift_sets}
    if cfg.train.policy:  # the teacher is loaded with the student's lerobot options (only when set)
        cache_slice["policy_options"] = cfg.train.policy
    add("cache", "cache", cache_slice, [])
    teacher = cfg.cache.teacher
    for run in cfg.runs:
        train = cfg.run_train_config(run)
        add(f"train_{run}", "train",
            {"train": train, "teacher": teacher, "anchor_dataset": cfg.cache.dataset if union else None},
            ["cache"] if train.retention is not None else [])
    evaluation = cfg.eval.model_copy(update={"reference_runs": {}})  # each policy's stage names its own
    evaluated = ["teacher", *cfg.runs, *cfg.eval.reference_runs]
    for policy in evaluated:
        config = {"eval": evaluation, "teacher": teacher, "policy": policy}
        consumes = ["cache"]
        if policy in cfg.runs:
            consumes.append(f"train_{policy}")
        elif policy in cfg.eval.reference_runs:
            config["reference"] = cfg.eval.reference_runs[policy]
        add(f"eval_{policy}", "eval", config, consumes)
    add("report", "report", {"eval": evaluation, "teacher": teacher, "runs": list(cfg.runs), "evaluated": evaluated,
                             "about": pipeline_summary(cfg)},
        ["cache", *(f"train_{run}" for run in cfg.runs), *(f"eval_{policy}" for policy in evaluated)])
    return stages


def _uses_assets(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_uses_assets(v) for v in value.values())
    text = value.model_dump_json() if isinstance(value, BaseModel) else str(value)
    return ASSETS_PLACEHOLDER in text


def plan_pipeline(cfg: PipelineConfig) -> dict[str, StagePlan]:
    """Fingerprints and directories of every stage of ``cfg``, in execution order."""
    root = str(Path(cfg.artifacts_root).expanduser().resolve())
    plans: dict[str, StagePlan] = {}
    for stage, kind, config, consumes in stage_slices(cfg):
        config_json = {key: _to_json(value) for key, value in config.items()}
        code = code_version(STAGE_FUNCTIONS[kind].__module__)
        upstream = {name: plans[name].fingerprint for name in consumes}
        fingerprint = stage_fingerprint(stage, config_json, upstream, code)
        plans[stage] = StagePlan(
            stage=stage, kind=kind, section=SECTION_OF_KIND[kind], fingerprint=fingerprint, code_version=code,
            upstream=upstream, artifacts_root=root, path=str(Path(root) / stage / fingerprint), config=config_json,
        )
    return plans


def resolve_assets(section, assets_dir: str | None):
    """A copy of a config section with ``${assets}`` replaced by the assets stage's directory."""
    if not _uses_assets(section):
        return section
    if assets_dir is None:
        raise ValueError(f"{type(section).__name__} uses {ASSETS_PLACEHOLDER} but the pipeline has no 'assets' section")
    text = section.model_dump_json().replace(ASSETS_PLACEHOLDER, assets_dir)
    return type(section).model_validate_json(text)


def _to_json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    return value


def _resolve_json(value: Any, assets_dir: str | None) -> Any:
    """JSON config data with ``${assets}`` replaced by the assets stage's directory."""
    text = json.dumps(value)
    if ASSETS_PLACEHOLDER not in text:
        return value
    if assets_dir is None:
        raise ValueError(f"a config value uses {ASSETS_PLACEHOLDER} but the pipeline has no 'assets' section")
    return json.loads(text.replace(ASSETS_PLACEHOLDER, assets_dir))


def _validate(model, value: Any):
    return model.validate_python(value) if isinstance(model, TypeAdapter) else model.model_validate(value)
