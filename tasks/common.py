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


def retry_transient(task, task_run, state) -> bool:
    """Retry a failed stage only for a transient cause: a config or input error fails the same way
    again, so it is reported at once instead of after a retry (craft_core.pipeline.preflight)."""
    from craft_core.pipeline.preflight import is_input_error

    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is None or not is_input_error(exc)


def stage_task(fn: Callable) -> Callable:
    """A stage task: fingerprint-keyed cache, persisted (small) result; per-stage name and tags
    (``gpu`` for concurrency limits) are set with ``stage_task_options``; retried once, for
    transient failures only."""
    return task(
        name="craft-stage",
        retries=1,
        retry_delay_seconds=RETRY_DELAY_S,
        retry_condition_fn=retry_transient,
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


class StageConsole:
    """The command line's view of a run: one line per stage, ``stage k/N <name>``.

    On a terminal the line of the running stage is redrawn in place with its progress; in a log
    (not a TTY) each stage writes one line when it ends. Writes to the real stdout, never through
    ``print``, so Prefect's print-to-log does not turn it into log records. Stages that Prefect
    served from its cache never run their task: they are reported as cached.
    """

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started: dict[str, tuple[int, int, float]] = {}
        self.executed: dict[str, bool] = {}
        self.last_draw = 0.0

    def _write(self, text: str, newline: bool) -> None:
        prefix = "\r\033[K" if self.tty else ""
        self.stream.write(prefix + text + ("\n" if newline else ""))
        self.stream.flush()

    def start(self, index: int, total: int, stage: str) -> None:
        self.started[stage] = (index, total, time.monotonic())
        if self.tty:
            self._write(f"stage {index}/{total} {stage} ...", newline=False)

    def progress(self, stage: str, done: int, total: int, metrics: dict) -> None:
        if not self.tty or stage not in self.started or time.monotonic() - self.last_draw < 0.5:
            return
        self.last_draw = time.monotonic()
        index, n, _ = self.started[stage]
        shown = progress_fields(metrics, limit=3)
        self._write(f"stage {index}/{n} {stage} {done}/{total}" + (f"  {shown}" if shown else ""), newline=False)

    def mark(self, stage: str, executed: bool) -> None:
        self.executed[stage] = executed

    def finish(self, stage: str) -> None:
        index, total, started = self.started.get(stage, (0, 0, time.monotonic()))
        executed = self.executed.get(stage)
        status = (f"done in {time.monotonic() - started:.1f} s" if executed
                  else "complete already (reused)" if executed is False else "cached (Prefect)")
        self._write(f"stage {index}/{total} {stage}: {status}", newline=True)


# The console of the command line, when the flow runs from it (flows/craft_flow.py main); None in
# a deployment, where the Prefect UI is the view.
CONSOLE: StageConsole | None = None


def progress_fields(metrics: dict, limit: int | None = None) -> str:
    """The readable part of a progress update: numbers rounded, None and internals left out."""
    shown = []
    for key, value in metrics.items():
        if value is None or isinstance(value, (dict, list)) or _hidden(key):
            continue
        if isinstance(value, bool):
            continue
        shown.append(f"{key} {_round(value)}")
    return ", ".join(shown[:limit] if limit else shown)


# Progress metrics that say nothing to a person watching (constant per run or internal).
HIDDEN_PROGRESS_KEYS = frozenset({"step", "cache_type", "lr", "samples_per_s", "step_time_s", "grad_norm"})


def progress_table(stage: str, done: int, total: int, metrics: dict) -> str:
    """A progress artifact's description: a small markdown table of the stage's position and each
    metric that has a value, rounded (no ``lambda=None`` of a baseline, no internals)."""
    rows = [("stage", f"`{stage}`"), ("progress", f"{done}/{total}")]
    for key, value in metrics.items():
        if value is None or isinstance(value, (bool, dict, list)) or _hidden(key):
            continue
        rows.append((key.replace("_", " "), _round(value)))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _hidden(key: str) -> bool:
    return key in HIDDEN_PROGRESS_KEYS or key.removeprefix("pretrain_") in HIDDEN_PROGRESS_KEYS  # assets' pretraining


def _round(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
        return progress_table(self.name, done, total, metrics)

    def __call__(self, done: int, total: int, metrics: dict) -> None:
        self.last = (done, total, metrics)
        if CONSOLE is not None:
            CONSOLE.progress(self.plan.stage, done, total, metrics)
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


def rounded(value, digits: int = 4):
    """A float rounded to ``digits`` significant digits (still a number, so tables sort); other values as is."""
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return float(f"{value:.{digits}g}")
    return value


def rounded_rows(rows: list[dict]) -> list[dict]:
    """Table-artifact rows with every float rounded (the UI shows floats with all their digits)."""
    return [{key: rounded(value) for key, value in row.items()} for row in rows]


def summary_markdown(plan: StagePlan, ref: StageRef, executed: bool, extra: str = "") -> str:
    status = "executed" if executed else "cached: reused its complete output, nothing re-ran"
    lines = [
        f"# craft stage `{plan.stage}`" + ("" if executed else " (cached)"),
        "",
        f"- status: **{status}**",
        f"- fingerprint: `{plan.fingerprint}` (code `{plan.code_version}`)",
        f"- output: `{ref.path}`",
    ]
    if plan.upstream:
        lines.append("- upstream: " + ", ".join(f"{k} `{v}`" for k, v in plan.upstream.items()))
    scalars = {k: v for k, v in ref.result.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if scalars:
        lines += ["", "| result | value |", "|---|---|"]
        lines += [f"| {k} | {_round(v)} |" for k, v in scalars.items() if v is not None]
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
        description=f"craft stage {plan.stage}" + ("" if executed else " (cached: output reused)"),
    )
