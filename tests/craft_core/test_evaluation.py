"""The eval stage's checks, drift arithmetic and report tables (no rollouts: see tests/integration)."""

import importlib.util
import json
import os
import shutil

import pytest
import torch

from craft_core.config import EvalConfig, PolicySource, SimEvalConfig
from craft_core.evaluation import (
    CheckpointError,
    DriftAccumulator,
    SimulatorUnavailableError,
    comparison_rows,
    evaluate,
    run_source,
    write_report,
)
from craft_core.evaluation.sim import ensure_headless_rendering

NO_SIM = EvalConfig(sim=[], drift=False, device="cpu")


# ---------------------------------------------------------------- checkpoints


def test_missing_checkpoint_names_the_run_and_folder(tmp_path):
    missing = tmp_path / "train" / "checkpoints" / "000010" / "pretrained_model"
    with pytest.raises(CheckpointError, match=r"run 'craft'.*does not exist.*pretrained_model") as error:
        evaluate(NO_SIM, runs={"craft": str(missing)}, teacher=None, store_url=None, out_dir=tmp_path / "eval")
    assert str(missing) in str(error.value)
    assert not (tmp_path / "eval" / "report.json").exists()


def test_folder_without_config_json_is_not_a_checkpoint(tmp_path):
    folder = tmp_path / "pretrained_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"has no config\.json.*model\.safetensors"):
        run_source("baseline", str(folder), None)


def test_checkpoint_with_corrupt_weights_does_not_load(tiny_pi0_fast, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pi0_fast, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"run 'craft': the policy in .*broken does not load") as error:
        evaluate(NO_SIM, runs={"craft": str(broken)}, teacher=None, store_url=None, out_dir=tmp_path / "eval")
    assert "re-run the stage that wrote it" in str(error.value)


def test_checkpoint_with_unknown_policy_type_does_not_load(tiny_pi0_fast, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pi0_fast, broken)
    config = json.loads((broken / "config.json").read_text())
    config["type"] = "not_a_policy"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not load.*not_a_policy"):
        evaluate(NO_SIM, runs={"craft": str(broken)}, teacher=None, store_url=None, out_dir=tmp_path / "eval")


def test_teacher_may_be_named_by_hub_id_without_a_local_folder():
    teacher = PolicySource(path="lerobot/pi0fast-base", revision="main")
    assert run_source("teacher", "lerobot/pi0fast-base", teacher) is teacher
    with pytest.raises(CheckpointError, match="does not exist"):
        run_source("craft", "lerobot/pi0fast-base-finetuned", teacher)


def test_empty_runs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'runs' is empty"):
        evaluate(NO_SIM, runs={}, teacher=None, store_url=None, out_dir=tmp_path)


# ---------------------------------------------------------------- environments


@pytest.mark.skipif(importlib.util.find_spec("libero") is not None, reason="LIBERO is installed here")
def test_libero_without_its_extra_says_how_to_install(tiny_pi0_fast, tmp_path):
    cfg = EvalConfig(sim=[SimEvalConfig(env="libero", task="libero_10")], drift=False, device="cpu")
    with pytest.raises(SimulatorUnavailableError, match=r"pip install 'lerobot\[libero\]==") as error:
        evaluate(cfg, runs={"craft": str(tiny_pi0_fast)}, teacher=None, store_url=None, out_dir=tmp_path)
    assert "'libero'" in str(error.value)


def test_policy_inputs_the_env_does_not_produce_are_named(tiny_pi0_fast, tmp_path):
    # tiny_pi0_fast is built for pusht (observation.image, 2-d state and action); aloha renders
    # observation.images.top. The mismatch is caught before the (slow) aloha env is built.
    cfg = EvalConfig(sim=[SimEvalConfig(env="aloha", max_episode_steps=2)], drift=False, device="cpu")
    with pytest.raises(ValueError, match=r"reads \['observation\.image'\], which env 'aloha'") as error:
        evaluate(cfg, runs={"craft": str(tiny_pi0_fast)}, teacher=None, store_url=None, out_dir=tmp_path)
    assert "'observation.images.top'" in str(error.value)  # what aloha does produce
    assert not (tmp_path / "report.json").exists()


def test_action_size_the_env_does_not_take_is_named(tiny_pi0_fast, tmp_path):
    from craft_core.evaluation.sim import check_policy_fits_env, make_env_cfg
    from craft_core.policy_io import load_policy_config
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.envs.factory import make_env_pre_post_processors

    policy_cfg = load_policy_config(str(tiny_pi0_fast))
    policy_cfg.output_features["action"] = PolicyFeature(type=FeatureType.ACTION, shape=(14,))
    env_cfg = make_env_cfg(SimEvalConfig(env="pusht"))
    env_pre, _ = make_env_pre_post_processors(env_cfg, policy_cfg)
    with pytest.raises(ValueError, match=r"actions of shape \(14,\) but env 'pusht' takes \(2,\)"):
        check_policy_fits_env(policy_cfg, env_cfg, env_pre, "ckpt")


def test_the_same_env_twice_is_refused(tmp_path):
    cfg = EvalConfig(sim=[SimEvalConfig(env="pusht"), SimEvalConfig(env="pusht", seed=5)], drift=False)
    with pytest.raises(ValueError, match="same env/task twice"):
        evaluate(cfg, runs={"craft": str(tmp_path)}, teacher=None, store_url=None, out_dir=tmp_path)


def test_mujoco_gets_egl_only_without_display_or_user_choice(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    ensure_headless_rendering("aloha")
    assert "MUJOCO_GL" not in os.environ
    monkeypatch.delenv("DISPLAY")
    ensure_headless_rendering("pusht")  # pygame, not MuJoCo
    assert "MUJOCO_GL" not in os.environ
    ensure_headless_rendering("aloha")
    assert os.environ["MUJOCO_GL"] == "egl"
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    ensure_headless_rendering("aloha")
    assert os.environ["MUJOCO_GL"] == "osmesa"


# ---------------------------------------------------------------- drift arithmetic


def test_drift_of_identical_vectors_is_zero_and_of_changed_vectors_is_exact():
    torch.manual_seed(0)
    teacher = torch.randn(5, 2, 3, 16)
    same = DriftAccumulator([1, 2], ["vision_token_mean", "text_token_last", "prefix_mean"])
    same.add(teacher.clone(), teacher)
    result = same.result()
    assert result["n_anchors"] == 5 and len(result["per_vector"]) == 6
    assert result["mse"] == 0.0 and result["cosine"] <= 1e-12

    shifted = DriftAccumulator([1, 2], ["a", "b", "c"])
    # Two batches of different sizes: the result is the mean over anchors, not over batches.
    shifted.add(teacher[:2] + 0.5, teacher[:2])
    shifted.add(teacher[2:] + 0.5, teacher[2:])
    assert shifted.result()["mse"] == pytest.approx(0.25)

    flipped = DriftAccumulator([0], ["a"])
    flipped.add(-teacher[:, :1, :1], teacher[:, :1, :1])  # opposite direction: cosine distance 2
    assert flipped.result()["cosine"] == pytest.approx(2.0)
    assert flipped.result()["per_vector"][0] == {
        "layer": 0, "pooling": "a", "mse": pytest.approx(float((2 * teacher[:, :1, :1]).pow(2).mean())),
        "cosine": pytest.approx(2.0),
    }


def test_drift_shape_mismatch_and_empty_split_are_errors():
    accumulator = DriftAccumulator([1], ["a"])
    with pytest.raises(ValueError, match=r"shape \(2, 1, 1, 8\).*\(2, 1, 1, 4\)"):
        accumulator.add(torch.zeros(2, 1, 1, 8), torch.zeros(2, 1, 1, 4))
    with pytest.raises(ValueError, match="no held-out anchors"):
        accumulator.result()


# ---------------------------------------------------------------- report


def _report(**overrides) -> dict:
    sim = {
        "success_rate": 0.5, "avg_sum_reward": 3.0, "avg_max_reward": float("nan"), "n_episodes": 2,
        "episode_length": 10, "seed": 0, "s_per_episode": 0.1, "videos": [],
        "episodes": [{"episode": 0, "success": True}, {"episode": 1, "success": False}],
    }
    report = {
        "created": "now", "craft_version": "0", "store": "anchors.zarr",
        "runs": {name: {"policy_type": "pi0_fast", "checkpoint": f"/{name}"} for name in ("teacher", "craft")},
        "sim": {"teacher": {"pusht": sim}, "craft": {"pusht": dict(sim, success_rate=1.0)}},
        "drift": {"teacher": {"mse": 0.0, "cosine": 0.0, "n_anchors": 1, "per_vector": []},
                  "craft": {"mse": 0.2, "cosine": 0.1, "n_anchors": 1, "per_vector": []}},
        "train": {"craft": {"final_task_loss": 1.5}},
        "fingerprints": {"train": "abc123"},
        "timings": {"total_s": 1.0},
    }
    report.update(overrides)
    return report


def test_comparison_rows_one_per_run_with_gaps_as_none():
    rows = comparison_rows(_report())
    assert [row["run"] for row in rows] == ["teacher", "craft"]
    assert list(rows[0]) == [
        "run", "pusht success %", "pusht avg sum reward", "pusht avg max reward", "drift mse", "drift cosine",
        "final task loss",
    ]
    assert rows[1]["pusht success %"] == 100.0 and rows[1]["drift mse"] == 0.2
    assert rows[0]["final task loss"] is None and rows[1]["final task loss"] == 1.5

    without_drift = comparison_rows(_report(drift={}, train={}))
    assert "drift mse" not in without_drift[0] and "final task loss" not in without_drift[0]


def test_report_files_are_strict_json_and_markdown(tmp_path):
    written = write_report(_report(), tmp_path)
    loaded = json.loads((tmp_path / "report.json").read_text())  # NaN would not parse as strict JSON
    assert loaded == written and loaded["sim"]["teacher"]["pusht"]["avg_max_reward"] is None
    markdown = (tmp_path / "report.md").read_text()
    assert "| teacher | 50 | 3 | – | 0 | 0 | – |" in markdown
    assert "| craft | 100 | 3 | – | 0.2 | 0.1 | 1.5 |" in markdown
    assert "`abc123`" in markdown


def test_report_shows_success_intervals_and_warns_when_decoding_mostly_failed(tmp_path):
    def sim(rate, failure_rate):
        return {"success_rate": rate, "success_ci95": [0.3, 0.9], "successes": 1, "n_episodes": 2,
                "episode_length": 10, "seed": 1000, "s_per_episode": 0.5, "avg_sum_reward": 1.0,
                "avg_max_reward": 1.0, "episodes": [], "videos": [], "action_decodings": 20,
                "action_decode_failures": int(20 * failure_rate), "action_decode_failure_rate": failure_rate}

    report = _report(sim={"teacher": {"task_a": sim(0.5, 0.05)}, "craft": {"task_a": sim(0.5, 0.9)}})
    rows = {row["run"]: row for row in comparison_rows(report)}
    assert rows["teacher"]["task_a success 95% CI"] == "30–90"
    assert rows["craft"]["task_a decode failures %"] == 90.0
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    warnings = markdown.split("## Action decoding")[1].split("##")[0]
    assert "craft on task_a was not really evaluated" in warnings and "teacher" not in warnings
    assert "18 of 20 action decodings failed" in markdown
