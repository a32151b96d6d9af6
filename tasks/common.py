"""What every stage task shares: the fingerprint cache key, progress artifacts, the stage summary.

Prefect's cache key of a stage task is the stage's content fingerprint (see
``craft_core.pipeline.graph``) and nothing else: no RUN_ID, no task source, no hashed inputs. So a
task is Cached exactly when its content-addressed output is, whether the flow runs as a script,
from a deployment or under ``serve()``; and the key can never collide across stages or artifact
roots.
"""

import base64
import logging
import time
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from craft_core.pipeline import StagePlan, StageRef

RETRY_DELAY_S = 10


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    return parameters["plan"].cache_key


def stage_task(fn: Callable) -> Callable:
    """A stage task: fingerprint-keyed cache, persisted (small) result; per-stage name and tags
    (``gpu`` for concurrency limits) are set with ``stage_task_options``."""
    return task(
        name="craft-stage",
        retries=1,
        retry_delay_seconds=RETRY_DELAY_S,
        cache_key_fn=stage_cache_key,
        persist_result=True,
    )(fn)


def stage_task_options(plan: StagePlan) -> dict:
    """Name, tags and cache behaviour of one stage's task run."""
    options = {
        "name": plan.stage,
        "task_run_name": plan.stage,
        "tags": ["craft", f"craft-{plan.section}"] + (["gpu"] if plan.gpu else []),
    }
    # A cached Prefect result is only trusted while the output it points to is complete; if the
    # directory was deleted or is partial, refresh the cache so the stage really runs.
    if not plan.stage_dir().is_complete():
        options["refresh_cache"] = True
    return options


def artifact_key(*parts: str) -> str:
    """Artifact keys allow only lowercase letters, digits and dashes."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text)


def run_logger():
    try:
        return get_run_logger()
    except Exception:  # outside a run (direct calls in tests)
        return logging.getLogger("craft.tasks")


class ProgressArtifact:
    """A craft_core ``progress(done, total, metrics)`` callback drawn as a Prefect progress artifact.

    Updates are throttled (the API is a network call) and never allowed to fail the stage.
    """

    def __init__(self, plan: StagePlan, min_interval_s: float = 2.0, name: str | None = None):
        self.plan = plan
        self.name = name or plan.stage  # a part of the stage (e.g. cache_shard_1) has its own artifact
        self.key = artifact_key("craft", self.name, "progress")
        self.min_interval_s = min_interval_s
        self.artifact_id = None
        self.last_update = 0.0
        self.last: tuple[int, int, dict] | None = None

    def _describe(self, done: int, total: int, metrics: dict) -> str:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        return f"{self.name} {done}/{total}" + (f": {shown}" if shown else "")

    def __call__(self, done: int, total: int, metrics: dict) -> None:
        self.last = (done, total, metrics)
        now = time.monotonic()
        if self.artifact_id is not None and done < total and now - self.last_update < self.min_interval_s:
            return
        self.last_update = now
        percent = 100.0 * done / total if total else 100.0
        try:
            description = self._describe(done, total, metrics)
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, key=self.key, description=description)
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:  # progress is for humans; the stage must not die of an API hiccup
            run_logger().warning("progress artifact update failed: %s", exc)


def summary_markdown(plan: StagePlan, ref: StageRef, executed: bool, extra: str = "") -> str:
    status = "executed" if executed else "reused (complete output already present)"
    lines = [
        f"# craft stage `{plan.stage}`",
        "",
        f"- status: {status}",
        f"- fingerprint: `{plan.fingerprint}` (code `{plan.code_version}`)",
        f"- output: `{ref.path}`",
    ]
    if plan.upstream:
        lines.append("- upstream: " + ", ".join(f"{k} `{v}`" for k, v in plan.upstream.items()))
    scalars = {k: v for k, v in ref.result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if scalars:
        lines += ["", "| result | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def image_markdown(path: str | Path, title: str) -> str:
    """A PNG inlined as a data URI, so the plot shows in the Prefect UI without a file server."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"### {title}\n\n![{title}](data:image/png;base64,{data})\n"


def publish_summary(plan: StagePlan, ref: StageRef, executed: bool, extra: str = "") -> None:
    create_markdown_artifact(
        summary_markdown(plan, ref, executed, extra),
        key=artifact_key("craft", plan.stage, "summary"),
        description=f"craft stage {plan.stage}",
    )
