"""The MetaWorld experiment's interface, run for real at its smallest size through the CLI:
``experiments/retention.py --preset P --out DIR policies=[...] experiment.seeds=[...]`` writes
``DIR/results.json`` whose ``rows`` hold per-seed ``{policy, run, seed, task_a_success,
task_b_success}`` for the runs teacher, baseline, craft_prefix, craft_action and replay, with
success differences against the baseline paired by episode seed."""

import json

import pytest

from experiments.retention import load_experiment, main

RUNS = {"teacher", "baseline", "craft_prefix", "craft_action", "replay"}


def test_metaworld_preset_is_the_experiment_the_readme_reports():
    cfg = load_experiment("metaworld", None, [])
    assert cfg.experiment.policies == ["smolvla", "pi0_fast"] and cfg.experiment.seeds == [0, 1, 2]
    assert set(cfg.runs) == RUNS - {"teacher"}
    assert cfg.runs["craft_prefix"].targets == ["prefix"] and cfg.runs["craft_action"].targets is None
    assert cfg.cache.targets == ["prefix", "action_output"]
    assert cfg.runs["replay"].replay.fraction == pytest.approx(0.05) and not cfg.runs["replay"].retention
    sims = {sim.name: sim for sim in cfg.eval.sim}
    assert set(sims) == {"task_a", "task_b"}
    assert sims["task_a"].task == cfg.assets.task_a and sims["task_b"].task == cfg.assets.task_b
    assert all(sim.n_episodes >= 20 for sim in sims.values())
    # Every model is evaluated on the same episode seeds, whatever the experiment seed.
    assert all(cfg.pipeline_for("smolvla", seed).eval.sim == cfg.eval.sim for seed in (0, 7))


@pytest.mark.integration
def test_metaworld_experiment_cli_writes_rows_per_policy_run_and_seed(tmp_path, capsys):
    out = tmp_path / "results"
    main(["--preset", "metaworld_smoke", "--out", str(out), f"artifacts_root={tmp_path / 'artifacts'}",
          "policies=[smolvla]", "experiment.seeds=[3]"])
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert {(row["policy"], row["run"], row["seed"]) for row in rows} == {("smolvla", run, 3) for run in RUNS}
    for row in rows:
        for task in ("task_a", "task_b"):
            assert 0.0 <= row[f"{task}_success"] <= 1.0, (row["run"], task)
    differences = results["summary"]["smolvla"]["differences_vs_baseline"]
    assert set(differences) == {"craft_prefix", "craft_action", "replay"}
    paired = differences["craft_action"]["task_a_success"]
    assert paired["paired_by"] == "episodes" and paired["n_pairs"] == 2
    markdown = (out / "results.md").read_text()
    assert all(f"| {run} |" in markdown for run in RUNS)
    assert (out / "plots" / "smolvla.png").stat().st_size > 0
