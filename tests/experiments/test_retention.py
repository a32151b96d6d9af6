"""Smoke test of the retention experiment (experiments/retention.py) at its minimal size.

Runs every stage for real through the pipeline's stage machinery (scripted gym-pusht recordings,
tiny pi0_fast teacher pretraining, anchor extraction, baseline and CRaFT fine-tuning, held-out
measurements) with 1 seed and a few steps, then checks what the README table is built from.
"""

import json
import math
from pathlib import Path

import pytest

from experiments.retention import load_experiment, run_experiment

METRICS = ("task_a_loss", "task_b_loss", "drift_anchors", "drift_episodes")
RUNS = ("baseline", "craft")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    artifacts = tmp_path_factory.mktemp("artifacts")
    cfg = load_experiment("smoke", None, [f"artifacts_root={artifacts}"])
    results = run_experiment(cfg, out, log=lambda message: None)
    return cfg, out, results


def test_results_files_and_table(smoke_results):
    cfg, out, results = smoke_results
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == results["schema"]
    assert {(row["policy"], row["run"], row["seed"]) for row in on_disk["rows"]} == {
        ("pi0_fast", run, 0) for run in ("teacher", *RUNS, "teacher_init")
    }
    summary = on_disk["summary"]["pi0_fast"]["runs"]
    for run in ("teacher", *RUNS):
        for metric in METRICS:
            assert math.isfinite(summary[run][metric]["mean"]), (run, metric)
            assert math.isfinite(summary[run][metric]["std"]), (run, metric)
            assert summary[run][metric]["n"] == len(cfg.experiment.seeds)
    assert math.isfinite(summary["teacher_init"]["task_a_loss"]["mean"])  # the untrained build, for reference
    difference = on_disk["summary"]["pi0_fast"]["differences_vs_baseline"]["craft"]["drift_anchors"]
    assert difference["n_pairs"] == 1 and difference["paired_by"] == "seeds"
    markdown = (out / "results.md").read_text()
    for run in ("teacher", *RUNS):
        assert f"| {run} |" in markdown
    assert (out / "plots" / "pi0_fast.png").stat().st_size > 0


def test_teacher_has_no_drift_and_fine_tuning_moves_it(smoke_results):
    _, _, results = smoke_results
    runs = results["summary"]["pi0_fast"]["runs"]
    # Keystone: the teacher measured against its own float32 anchors drifts by rounding only.
    assert runs["teacher"]["drift_anchors"]["mean"] < 1e-8
    assert runs["teacher"]["drift_episodes"]["mean"] < 1e-8
    for run in RUNS:
        assert runs[run]["drift_anchors"]["mean"] > 1e-6, run


def test_curves_and_dual_variables_logged(smoke_results):
    cfg, _, results = smoke_results
    (seed_result,) = results["per_seed"]
    expected_steps = list(range(cfg.train.save_every, cfg.train.steps + 1, cfg.train.save_every))
    for run in RUNS:
        assert [point["step"] for point in seed_result["curves"][run]] == expected_steps
        log = seed_result["train_logs"][run]
        if run == "craft":
            assert all(r["lambda/prefix"] is not None and r["lambda/prefix"] >= 0 for r in log)
            assert any(r["retention_loss/prefix"] is not None for r in log)
        else:
            assert not any(key.startswith("lambda/") for r in log for key in r)


def test_heldout_episodes_are_never_trained_on_or_anchored(smoke_results):
    """Training, teacher pretraining and anchors use the training episodes; the held-out measurements
    read only the held-out episodes."""
    from craft_core.store import open_anchor_store

    cfg, _, results = smoke_results
    heldout = set(range(cfg.assets.episodes_per_task, cfg.assets.episodes_per_task + cfg.assets.heldout_episodes_per_task))
    assert heldout
    assert heldout.isdisjoint(cfg.cache.dataset.episodes) and heldout.isdisjoint(cfg.train.dataset.episodes)
    assert all(set(loss.dataset.episodes) == heldout for loss in cfg.eval.action_loss)
    stages = results["compute"]["stages"]
    cache = next(path for path in stages if "/cache/" in path)
    anchored = set(open_anchor_store(Path(cache) / "anchors.zarr").provenance()["episode_index"].tolist())
    assert anchored and anchored.isdisjoint(heldout)
    drift_set = open_anchor_store(Path(cache) / "drift_sets" / "episodes.zarr")
    assert set(drift_set.provenance()["episode_index"].tolist()) <= heldout
    (seed_result,) = results["per_seed"]
    assert seed_result["heldout"]["drift_sets"] == {"episodes": 4}
