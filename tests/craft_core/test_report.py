"""What a researcher reads: the report's setup and verdict lines, relative paths, embedded videos,
and the comparison figure of the training runs (no rollouts: the report is rendered from data)."""

import json

from PIL import Image

from craft_core.config import load_preset
from craft_core.evaluation.report import comparison_rows, headline_rows, pipeline_summary, write_report
from craft_core.metrics import comparison_panels, plot_comparison


def _sim(successes: int, n: int = 10, videos=()) -> dict:
    return {"success_rate": successes / n, "successes": successes, "n_episodes": n, "episode_length": 100,
            "seed": 1000, "s_per_episode": 1.0, "avg_sum_reward": 1.0, "avg_max_reward": 1.0, "episodes": [],
            "videos": list(videos)}


def _report(root) -> dict:
    cfg = load_preset("smoke", [
        "assets.env=metaworld", "assets.task_a=button-press-v3", "assets.task_b=button-press-topdown-v3",
        "assets.policy_type=smolvla",
        'eval.sim=[{name: task_a, env: metaworld, task: button-press-v3}, '
        '{name: task_b, env: metaworld, task: button-press-topdown-v3}]',
        "runs={baseline: {retention: false}, craft_prefix: {targets: [prefix]}, craft: {}}",
    ])
    about = pipeline_summary(cfg)
    about["anchors"].update({"resolved_layers": [1, 2], "depth": 2, "n_heldout": 2})
    video = root / "eval_craft" / "fp" / "videos" / "craft" / "task_a" / "eval_episode_0.mp4"
    drift = {"teacher": 0.0, "baseline": 0.5, "craft_prefix": 0.004, "craft": 0.02}
    return {
        "created": "now", "craft_version": "0", "store": str(root / "cache" / "fp" / "anchors.zarr"),
        "artifacts_root": str(root), "about": about,
        "teacher": {"path": str(root / "assets" / "fp" / "teacher"), "revision": None},
        "runs": {name: {"policy_type": "smolvla", "checkpoint": str(root / f"train_{name}" / "fp" / "pretrained_model"),
                        "n_parameters": 2_000_000} for name in ("teacher", *cfg.runs)},
        "sim": {"teacher": {"task_a": _sim(10), "task_b": _sim(0)},
                "baseline": {"task_a": _sim(0), "task_b": _sim(10)},
                "craft_prefix": {"task_a": _sim(0), "task_b": _sim(9)},
                "craft": {"task_a": _sim(10, videos=[video]), "task_b": _sim(9)}},
        "drift": {run: {"mse": value, "cosine": value / 2, "n_anchors": 2, "per_vector": [],
                        "targets": {"prefix": value, "action_output": value / 10}} for run, value in drift.items()},
        "train": {"baseline": {"final_task_loss": 0.1, "final_lambda": None},
                  "craft_prefix": {"final_task_loss": 0.11, "final_lambda": {"prefix": 0.9}},
                  "craft": {"final_task_loss": 0.12, "final_lambda": {"prefix": 0.8, "action_output": 1.7}}},
        "fingerprints": {}, "timings": {},
    }


def test_report_says_what_was_compared_and_judges_each_craft_run(tmp_path):
    out = tmp_path / "report" / "fp"
    write_report(_report(tmp_path), out)
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# craft report: craft-smoke")
    # tasks A and B with lerobot's own task descriptions, teacher identity, layers configured and resolved
    assert "**Task A" in markdown and "`button-press-v3`" in markdown and "**Task B" in markdown
    assert "`button-press-topdown-v3`" in markdown
    assert "**Teacher**: `assets/fp/teacher` (smolvla, 2 M parameters)" in markdown
    assert "layers [-2, -1] → 1, 2 of 2 blocks" in markdown
    # paths relative to the artifacts root, nowhere absolute
    assert str(tmp_path) not in markdown
    assert "`train_craft/fp/pretrained_model`" in markdown
    # the video is embedded, linked relative to report.md's own directory
    assert '<video src="../../eval_craft/fp/videos/craft/task_a/eval_episode_0.mp4"' in markdown

    verdicts = markdown.split("## Verdict")[1].split("##")[0]
    craft = next(line for line in verdicts.splitlines() if line.startswith("- **craft vs baseline**"))
    # craft: prefix 0.02 > ε_end 0.01 but action_output 0.002 <= 0.01 -> partly
    assert "drift within ε: **partly**" in craft and "prefix 0.02 > ε_end 0.01" in craft
    assert "action_output 0.002 ≤ ε_end 0.01" in craft
    assert "task_b success 9/10 vs baseline 10/10" in craft
    assert "task_a success 10/10 vs baseline 0/10 (teacher 10/10): **more kept than the baseline**" in craft
    assert "final λ prefix 0.8, action_output 1.7" in craft
    prefix_only = next(line for line in verdicts.splitlines() if line.startswith("- **craft_prefix vs baseline**"))
    assert "drift within ε: **yes** (prefix 0.004 ≤ ε_end 0.01, baseline 0.5 (125× more))" in prefix_only
    assert "**no better than the baseline**" in prefix_only and "action_output" not in prefix_only.split("task-B")[0]
    assert not any(line.startswith("- **baseline") for line in verdicts.splitlines())


def test_comparison_table_has_final_lambda_and_eps_end_per_run(tmp_path):
    rows = {row["run"]: row for row in comparison_rows(_report(tmp_path))}
    assert rows["craft"]["final λ"] == "prefix 0.8, action_output 1.7"
    assert rows["craft"]["ε_end"] == "0.01"  # the same for every target: said once
    assert rows["craft_prefix"]["final λ"] == "0.9" and rows["baseline"]["final λ"] is None
    headline = headline_rows(_report(tmp_path))[0]
    # task B is measured in simulation: the last training batch's loss is left to the full table
    assert list(headline) == ["run", "task_a success %", "task_b success %", "drift mse", "drift action_output",
                              "final λ", "ε_end"]


def test_pipeline_summary_of_the_smoke_preset():
    about = pipeline_summary(load_preset("smoke"))
    assert about["tasks"]["task_a"]["instruction"] == "push the T-shaped block onto the green target"
    assert about["sim_roles"] == {"pusht": "task_a"}  # gym-pusht is the push-T task: task A here
    assert about["runs"]["baseline"]["constraints"] == {}
    assert set(about["runs"]["craft"]["constraints"]) == {"prefix", "action_output"}
    assert about["anchors"]["layers"] == [-2, -1]
    json.dumps(about)  # part of the report stage's config: JSON


def _metrics(path, retention: bool, steps: int = 6):
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            record = {"step": step, "task_loss": 1.0 / step}
            if retention:
                retained = step % 2 == 0
                record.update({"retention_loss/prefix": 0.02 / step if retained else None,
                               "epsilon/prefix": 0.05 - 0.005 * step, "lambda/prefix": 1.0 + 0.01 * step,
                               "grad_cosine": -0.3 if retained else None, "projected": retained and step == 4})
            f.write(json.dumps(record) + "\n")
    return path


def test_comparison_figure_has_retention_panels_only_when_a_run_retains(tmp_path):
    baseline = _metrics(tmp_path / "baseline.jsonl", retention=False)
    craft = _metrics(tmp_path / "craft.jsonl", retention=True)
    assert comparison_panels([]) == ["task_loss"]
    assert comparison_panels(["craft"]) == ["task_loss", "retention", "lambda", "grad_cosine"]
    both = plot_comparison({"baseline": baseline, "craft": craft}, tmp_path / "both.png", retaining=["craft"],
                           title="demo: baseline vs craft")
    alone = plot_comparison({"baseline": baseline}, tmp_path / "alone.png", retaining=[], title="demo: baseline")
    # 2.5 inches per panel + 0.6 for the title, at 100 dpi: one panel for the baseline alone, four with CRaFT
    assert Image.open(alone).size[1] == 310 and Image.open(both).size[1] == 1060


def test_the_report_stage_is_planned_with_the_pipeline_summary(tmp_path):
    from craft_core.pipeline import plan_pipeline

    plans = plan_pipeline(load_preset("smoke", [f"artifacts_root={tmp_path}"]))
    about = plans["report"].config["about"]
    assert about["name"] == "craft-smoke" and about["anchors"]["layers"] == [-2, -1]
    assert plans["report"].kwargs(str(tmp_path / "assets"))["about"] == about  # handed to report_stage as is
