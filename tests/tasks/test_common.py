"""What the Prefect UI and the command line show of a stage: rounded tables, readable progress,
cached stages marked, one console line per stage."""

import io

from craft_core.config import load_preset
from craft_core.evaluation.report import console_table, headline_rows
from craft_core.pipeline import StageRef, plan_pipeline
from tasks.common import StageConsole, progress_table, rounded_rows, summary_markdown


def test_table_rows_are_rounded_numbers():
    rows = rounded_rows([{"run": "baseline", "avg sum reward": 0.16161635587489692, "episodes": 3, "drift": None}])
    assert rows == [{"run": "baseline", "avg sum reward": 0.1616, "episodes": 3, "drift": None}]


def test_progress_is_a_small_table_without_none_or_internals():
    metrics = {"step": 30, "task_loss": 0.123456789, "retention_loss": None, "lambda/prefix": None,
               "grad_cosine": -0.25, "projected": False, "cache_type": None, "lr": 1e-4, "run": "craft"}
    table = progress_table("train_baseline", 30, 60, metrics)
    assert table.splitlines() == ["| | |", "|---|---|", "| stage | `train_baseline` |", "| progress | 30/60 |",
                                  "| task loss | 0.1235 |", "| grad cosine | -0.25 |", "| run | craft |"]
    assert "None" not in table
    pretraining = progress_table("assets", 3, 5, {"pretrain_step": 2, "pretrain_grad_norm": 5.3, "pretrain_task_loss": 1.6})
    assert pretraining.splitlines()[4:] == ["| pretrain task loss | 1.6 |"]


def test_a_reused_stage_says_cached_in_its_summary(tmp_path):
    plan = plan_pipeline(load_preset("smoke", [f"artifacts_root={tmp_path}"]))["cache"]
    ref = StageRef(stage="cache", fingerprint=plan.fingerprint, path=plan.path,
                   result={"n_anchors": 8, "loss": 0.16161635587489692, "absent": None})
    cached = summary_markdown(plan, ref, executed=False)
    assert cached.startswith("# craft stage `cache` (cached)") and "**cached: reused" in cached
    assert "| loss | 0.1616 |" in cached and "absent" not in cached
    executed = summary_markdown(plan, ref, executed=True)
    assert "(cached)" not in executed and "**executed**" in executed


def test_console_writes_one_line_per_stage_when_not_a_terminal():
    out = io.StringIO()
    console = StageConsole(out)
    console.start(1, 3, "assets")
    console.progress("assets", 1, 2, {"task_loss": 1.0})  # not a terminal: no redrawn line
    console.mark("assets", True)
    console.finish("assets")
    console.start(2, 3, "cache")
    console.mark("cache", False)
    console.finish("cache")
    console.start(3, 3, "report")  # Prefect served it from its cache: the task never ran
    console.finish("report")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("stage 1/3 assets: done in ")
    assert lines[1:] == ["stage 2/3 cache: complete already (reused)", "stage 3/3 report: cached (Prefect)"]


def test_console_table_has_the_headline_columns_only():
    sim = {"success_rate": 0.5, "successes": 1, "n_episodes": 2, "success_ci95": [0.1, 0.9], "avg_sum_reward": 3.0,
           "avg_max_reward": 1.0}
    report = {
        "runs": {"teacher": {}, "baseline": {}, "craft": {}},
        "sim": {run: {"task_a": sim} for run in ("teacher", "baseline", "craft")},
        "drift": {run: {"mse": 0.1234567, "cosine": 0.1, "targets": {"prefix": 0.1234567, "action_output": 0.002}}
                  for run in ("teacher", "baseline", "craft")},
        "train": {"baseline": {"final_task_loss": 1.5, "final_lambda": None},
                  "craft": {"final_task_loss": 1.6, "final_lambda": {"prefix": 0.5}}},
        "about": {"runs": {"baseline": {"constraints": {}},
                           "craft": {"constraints": {"prefix": {"loss": "mse", "eps_start": 0.05, "eps_end": 0.01}}}}},
    }
    assert list(headline_rows(report)[0]) == ["run", "task_a success %", "drift mse", "drift action_output",
                                              "final task loss", "final λ", "ε_end"]
    lines = console_table(report).splitlines()
    assert lines[0].split() == ["run", "task_a", "success", "%", "drift", "mse", "drift", "action_output", "final",
                                "task", "loss", "final", "λ", "ε_end"]
    assert lines[3].split() == ["craft", "50", "0.1235", "0.002", "1.6", "0.5", "0.01"]
