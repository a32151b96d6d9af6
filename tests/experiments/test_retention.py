"""Smoke test of the retention experiment (experiments/retention.py) at its minimal size.

Runs every stage for real (scripted gym-pusht recordings, tiny pi0_fast teacher pretraining,
anchor extraction, baseline and CRaFT fine-tuning, held-out measurements) with 1 seed and a few
steps, then checks what the README table is built from.
"""

import json
import math
from pathlib import Path

import pytest

from experiments.retention import METRICS, RUNS, load_experiment_config, run_experiment

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "experiments" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    cfg = load_experiment_config(SMOKE)
    results = run_experiment(cfg, out, tmp_path_factory.mktemp("work"), log=lambda message: None)
    return cfg, out, results


def test_results_files_and_table(smoke_results):
    cfg, out, results = smoke_results
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == results["schema"]
    assert list(on_disk["policies"]) == ["pi0_fast"]
    summary = on_disk["policies"]["pi0_fast"]["summary"]
    for run in ("teacher", *RUNS):
        for metric, _ in METRICS:
            assert math.isfinite(summary[run][metric]["mean"]), (run, metric)
            assert math.isfinite(summary[run][metric]["std"]), (run, metric)
    for run in RUNS:
        assert summary[run]["task_a_loss"]["n"] == len(cfg.seeds)
    markdown = (out / "results.md").read_text()
    for run in ("teacher", *RUNS):
        assert f"| pi0_fast | {run} |" in markdown
    assert (out / "plots" / "pi0_fast.png").stat().st_size > 0
    assert set(summary["targets"]) >= {"craft_drift_le_eps_end", "drift_ratio_ge_3", "craft_task_a_closer_to_teacher",
                                       "craft_task_b_within_10pct"}


def test_teacher_has_no_drift_and_fine_tuning_moves_it(smoke_results):
    _, _, results = smoke_results
    policy = results["policies"]["pi0_fast"]
    # Keystone: the teacher measured against its own float32 anchors drifts by rounding only.
    assert policy["teacher"]["drift_anchors"] < 1e-8
    assert policy["teacher"]["drift_episodes"] < 1e-8
    for run in RUNS:
        assert policy["summary"][run]["drift_anchors"]["mean"] > 1e-6, run


def test_curves_and_dual_variables_logged(smoke_results):
    cfg, _, results = smoke_results
    policy = results["policies"]["pi0_fast"]
    expected_steps = list(range(cfg.finetune.checkpoint_every, cfg.finetune.steps + 1, cfg.finetune.checkpoint_every))
    for run in RUNS:
        (seed_run,) = policy["runs"][run]
        assert [point["step"] for point in seed_run["curve"]] == expected_steps
        lambdas = [r["lambda"] for r in seed_run["train_log"]]
        if run == "craft":
            assert all(v is not None and v >= 0 for v in lambdas)
            assert any(r["retention_loss"] is not None for r in seed_run["train_log"])
        else:
            assert all(v is None for v in lambdas)


def test_heldout_episodes_never_anchored(smoke_results):
    from craft_core.store import open_anchor_store

    _, _, results = smoke_results
    policy = results["policies"]["pi0_fast"]
    heldout = set(policy["heldout"]["episodes"])
    assert heldout
    train_store = open_anchor_store(policy["stores"]["train"])
    assert heldout.isdisjoint(set(train_store.provenance()["episode_index"].tolist()))
    eval_store = open_anchor_store(policy["stores"]["heldout_episodes"])
    assert set(eval_store.provenance()["episode_index"].tolist()) <= heldout
