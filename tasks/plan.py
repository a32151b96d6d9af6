"""The pipeline's stage graph: which stage consumes what, and every stage's fingerprint up front.

Fingerprints depend only on configs and code, so the whole plan (and every output directory) is
known before anything runs. That is what lets the flow resolve ``${assets}`` before the assets
exist, skip a stage whose output is complete, and run a subset of stages against earlier outputs.

Training is two units so that each is cached on exactly what it depends on:
``train_baseline`` (retention off) ignores the anchor cache and the retention settings, so
tuning CRaFT never re-runs the baseline; ``train_craft`` depends on the cache and on everything.
"""

import hashlib
from pathlib import Path

from pydantic import BaseModel

from craft_core.config import PipelineConfig
from craft_core.fingerprint import StageDir, code_version, stage_fingerprint

ASSETS_PLACEHOLDER = "${assets}"

# Stage unit -> (config stage it belongs to, craft_core module it runs).
UNITS: dict[str, tuple[str, str]] = {
    "assets": ("assets", "craft_core.assets"),
    "cache": ("cache", "craft_core.extraction"),
    "train_baseline": ("train", "craft_core.train"),
    "train_craft": ("train", "craft_core.train"),
    "eval": ("eval", "craft_core.evaluation"),
}


class StagePlan(BaseModel):
    """Where one stage unit's output goes and what identifies it."""

    stage: str
    group: str
    fingerprint: str
    code_version: str
    upstream: dict[str, str]
    artifacts_root: str
    path: str
    config: dict

    @property
    def cache_key(self) -> str:
        # The artifacts root is part of the key: the same fingerprint under another root is another
        # output, and a cached reference must never point into someone else's directory.
        root = hashlib.sha256(self.artifacts_root.encode()).hexdigest()[:8]
        return f"craft-{self.stage}-{self.fingerprint}-{root}"

    def stage_dir(self) -> StageDir:
        return StageDir(self.artifacts_root, self.stage, self.fingerprint)


class StageRef(BaseModel):
    """What a stage task returns: where its complete output is, never the data itself."""

    stage: str
    fingerprint: str
    path: str
    result: dict


def _uses_assets(section) -> bool:
    return section is not None and ASSETS_PLACEHOLDER in section.model_dump_json()


def plan_pipeline(cfg: PipelineConfig) -> dict[str, StagePlan]:
    """Fingerprints and directories of every stage unit of ``cfg``, in execution order."""
    root = str(Path(cfg.artifacts_root).expanduser().resolve())
    plans: dict[str, StagePlan] = {}

    def add(stage: str, config: dict, upstream: dict[str, str]) -> None:
        group, module = UNITS[stage]
        code = code_version(module)
        fingerprint = stage_fingerprint(stage, config, upstream, code)
        plans[stage] = StagePlan(
            stage=stage,
            group=group,
            fingerprint=fingerprint,
            code_version=code,
            upstream=upstream,
            artifacts_root=root,
            path=str(Path(root) / stage / fingerprint),
            config=config,
        )

    def fp(stage: str) -> dict[str, str]:
        return {stage: plans[stage].fingerprint}

    assets_up = {}
    if cfg.assets is not None:
        add("assets", {"assets": cfg.assets.model_dump(mode="json")}, {})
        assets_up = fp("assets")

    def needs_assets(*sections) -> dict[str, str]:
        return assets_up if any(_uses_assets(s) for s in sections) else {}

    teacher = cfg.cache.teacher.model_dump(mode="json")
    add("cache", {"cache": cfg.cache.model_dump(mode="json")}, needs_assets(cfg.cache))
    if cfg.train.compare_baseline:
        baseline = cfg.train.model_dump(mode="json", exclude={"retention", "compare_baseline"})
        add("train_baseline", {"train": baseline, "teacher": teacher}, needs_assets(cfg.train, cfg.cache.teacher))
    craft = cfg.train.model_dump(mode="json", exclude={"compare_baseline"})
    add("train_craft", {"train": craft}, {**fp("cache"), **needs_assets(cfg.train)})
    eval_up = {**fp("cache"), **fp("train_craft")}
    if "train_baseline" in plans:
        eval_up.update(fp("train_baseline"))
    add("eval", {"eval": cfg.eval.model_dump(mode="json"), "teacher": teacher}, {**eval_up, **needs_assets(cfg.eval)})
    return plans


def resolve_assets(section, assets_dir: str | None):
    """A copy of a config section with ``${assets}`` replaced by the assets stage's directory."""
    if not _uses_assets(section):
        return section
    if assets_dir is None:
        raise ValueError(f"{type(section).__name__} uses {ASSETS_PLACEHOLDER} but the pipeline has no 'assets' section")
    text = section.model_dump_json().replace(ASSETS_PLACEHOLDER, assets_dir)
    return type(section).model_validate_json(text)
