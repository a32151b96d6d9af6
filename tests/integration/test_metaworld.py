"""MetaWorld as a craft sim: scripted-expert recordings and lerobot's own eval, rendered small and fast.

Everything is real: metaworld's simulator and expert policies under lerobot's ``MetaworldEnv``
(craft_core.evaluation.metaworld only sizes the rendering and caps the episode), LeRobotDataset
recordings, a tiny real smolvla / pi0_fast, and lerobot's ``eval_policy_all``.
"""

import numpy as np
import pytest

from craft_core.config import PolicySource, SimEvalConfig
from craft_core.evaluation.sim import wilson_interval

pytestmark = pytest.mark.integration
TASK = "button-press-v3"


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    from craft_core.demo.sim_datasets import record_dataset

    root = tmp_path_factory.mktemp("metaworld") / "button_press"
    meta = record_dataset("metaworld", TASK, repo_id="craft-tests/metaworld_button_press", root=root,
                          n_episodes=2, max_steps=120, image_size=32, seed=0)
    return root, meta


def test_expert_recording_is_what_lerobots_env_gives_the_policy(recording):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from craft_core.evaluation.metaworld import FastMetaworldEnv, task_description

    root, meta = recording
    assert meta.total_episodes == 2 and meta.features["observation.image"]["shape"] == (32, 32, 3)
    assert meta.features["observation.state"]["shape"] == (4,) and meta.features["action"]["shape"] == (4,)
    dataset = LeRobotDataset("craft-tests/metaworld_button_press", root=root, video_backend="pyav")
    assert dataset[0]["task"] == task_description(TASK) == "Press a button"
    # Episodes end at the expert's success (as lerobot's eval ends them).
    success = np.asarray(dataset.hf_dataset.with_format("numpy")["next.success"]).reshape(-1)
    ends = np.asarray(meta.episodes["dataset_to_index"]) - 1
    assert success[ends].all() and success.sum() == 2
    # The first frame is the env's own first observation for that seed (episodes pair by seed).
    env = FastMetaworldEnv(TASK, image_size=32, episode_length=120)
    obs, _ = env.reset(seed=0)
    env.close()
    first = (dataset[0]["observation.image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(first, obs["pixels"])
    np.testing.assert_allclose(dataset[0]["observation.state"].numpy(), obs["agent_pos"], rtol=1e-6)


@pytest.mark.parametrize("policy_type", ["smolvla", "pi0_fast"])
def test_lerobot_eval_runs_a_tiny_policy_paired_by_seed(policy_type, recording, tmp_path):
    from craft_core.demo.tiny import build_tiny_policy
    from craft_core.evaluation import load_checkpoint
    from craft_core.evaluation.sim import simulate
    from craft_core.policy_io import policy_loading_context

    _, meta = recording
    folder = build_tiny_policy(policy_type, tmp_path / "policy", ds_meta=meta, seed=0,
                               **({"image_size": 32} if policy_type == "smolvla" else {"image_size": 32,
                                                                                      "vision_patch_size": 8}))
    sim = SimEvalConfig(env="metaworld", task=TASK, n_episodes=2, max_episode_steps=8, n_videos=0, name="task_a")
    with policy_loading_context(folder):
        policy, pre, post = load_checkpoint(policy_type, PolicySource(path=str(folder)), "cpu")
        first = simulate(policy, pre, post, sim, checkpoint=str(folder), videos_dir=None)
        again = simulate(policy, pre, post, sim, checkpoint=str(folder), videos_dir=None)
    assert first["image_size"] == 32 and first["episode_length"] == 8 and first["n_episodes"] == 2
    assert [e["seed"] for e in first["episodes"]] == [sim.seed, sim.seed + 1]
    assert first["episodes"] == again["episodes"]  # same seeds, same policy: the same episodes
    low, high = first["success_ci95"]
    assert 0.0 <= low <= first["success_rate"] <= high <= 1.0
    if policy_type == "pi0_fast":  # decodes FAST tokens: every decoding is counted
        assert first["action_decodings"] >= 2 and 0 <= first["action_decode_failures"] <= first["action_decodings"]
    else:
        assert first["action_decodings"] is None and first["action_decode_failure_rate"] is None


def test_wilson_interval():
    assert wilson_interval(0, 20)[0] == 0.0 and 0.1 < wilson_interval(0, 20)[1] < 0.2
    low, high = wilson_interval(10, 20)
    assert low == pytest.approx(1 - high) and low < 0.5 < high
    assert wilson_interval(20, 20)[1] == 1.0


def test_assets_teacher_with_both_tasks_statistics_is_what_union_normalisation_gives(tmp_path):
    """assets.teacher_stats=both_tasks builds the teacher on lerobot's aggregate of both recordings'
    statistics: the same statistics train.normalization=union computes for a student, so the teacher
    already serves task B's state/action ranges (task B's gripper action is constant 1, task A's 0:
    under task A's statistics alone it would normalise to ~1e8)."""
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    from craft_core.config import AssetsConfig, DatasetSource
    from craft_core.demo.assets import build_demo_assets
    from craft_core.normalization import fine_tuning_stats

    cfg = AssetsConfig(policy_type="smolvla", env="metaworld", task_a=TASK, task_b="button-press-topdown-v3",
                       episodes_per_task=2, max_episode_steps=120, image_size=32, teacher_stats="both_tasks",
                       device="cpu")
    result = build_demo_assets(cfg, tmp_path / "assets")
    pre = PolicyProcessorPipeline.from_pretrained(result["teacher"], config_filename="policy_preprocessor.json")
    (normalizer,) = [step for step in pre.steps if isinstance(step, NormalizerProcessorStep)]
    sources = {key: DatasetSource(repo_id=d["repo_id"], root=d["root"]) for key, d in result["datasets"].items()}
    union = fine_tuning_stats("union", task_dataset=sources["task_b"], anchor_dataset=sources["task_a"])
    for feature in ("observation.state", "action"):
        for stat in ("mean", "std"):
            np.testing.assert_allclose(np.asarray(normalizer.stats[feature][stat]), np.asarray(union[feature][stat]),
                                       rtol=1e-6, err_msg=f"{feature} {stat}")
    gripper = np.asarray(union["action"]["mean"])[-1]
    assert 0.0 < gripper < 1.0  # covers task A's gripper action (0) and task B's (1)
