"""The pipeline layer (no Prefect): stage graph, fingerprints and stage directories, process
isolation and a local runner. The Prefect flow (``flows/craft_flow.py``) and the experiments
(``experiments/``) both run stages through it.
"""

from craft_core.pipeline.fingerprint import IncompleteStageError, StageDir
from craft_core.pipeline.graph import STAGE_FUNCTIONS, StagePlan, StageRef, plan_pipeline, resolve_assets
from craft_core.pipeline.runner import assets_dir, execute_stage, existing_ref, isolate_stage, run_pipeline

__all__ = [
    "STAGE_FUNCTIONS",
    "IncompleteStageError",
    "StageDir",
    "StagePlan",
    "StageRef",
    "assets_dir",
    "execute_stage",
    "existing_ref",
    "isolate_stage",
    "plan_pipeline",
    "resolve_assets",
    "run_pipeline",
]
