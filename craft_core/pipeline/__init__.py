"""The pipeline layer (no Prefect): stage graph, fingerprints and stage directories, process
isolation, pre-flight checks and a local runner. The Prefect flow (``flows/craft_flow.py``) and the
experiments (``experiments/``) both run stages through it.

Names are imported on first use (PEP 562), so ``craft_core.pipeline.preflight`` can check a config
from the command line without importing every stage's library code first.
"""

import importlib

_EXPORTS = {
    "IncompleteStageError": "craft_core.pipeline.fingerprint",
    "StageDir": "craft_core.pipeline.fingerprint",
    "STAGE_FUNCTIONS": "craft_core.pipeline.graph",
    "StagePlan": "craft_core.pipeline.graph",
    "StageRef": "craft_core.pipeline.graph",
    "plan_pipeline": "craft_core.pipeline.graph",
    "resolve_assets": "craft_core.pipeline.graph",
    "assets_dir": "craft_core.pipeline.runner",
    "execute_stage": "craft_core.pipeline.runner",
    "existing_ref": "craft_core.pipeline.runner",
    "isolate_stage": "craft_core.pipeline.runner",
    "run_pipeline": "craft_core.pipeline.runner",
    "PreflightError": "craft_core.pipeline.preflight",
    "preflight": "craft_core.pipeline.preflight",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'craft_core.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
