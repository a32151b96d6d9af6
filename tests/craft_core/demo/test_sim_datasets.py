"""Scripted sim recordings: real LeRobotDatasets that reload, match lerobot's env features, and differ per task."""

import numpy as np
import pytest
import torch

from craft_core.demo.sim_datasets import ALOHA_TASKS, PUSHT_TASKS, record_dataset
from tests.fixtures.data import FIXTURE_PUSHT_TASKS


def _columns(root, *keys) -> dict[str, np.ndarray]:
    """Columns as stored in the dataset's parquet files, one row per frame (images as PNG bytes)."""
    import pandas as pd

    frames = pd.concat([pd.read_parquet(f, columns=list(keys)) for f in sorted((root / "data").rglob("*.parquet"))])
    columns = {}
    for key in keys:
        values = frames[key].tolist()
        columns[key] = np.array([v["bytes"] for v in values]) if isinstance(values[0], dict) else np.stack(values)
    return columns


def _episode_actions(entry) -> np.ndarray:
    """Actions as [episodes, steps, action_dim]."""
    cols = _columns(entry["root"], "action", "episode_index")
    episodes = np.unique(cols["episode_index"])
    return np.stack([cols["action"][cols["episode_index"] == e] for e in episodes])


def test_pusht_datasets_reload_with_delta_timestamps_and_pyav(pusht_datasets):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    assert set(pusht_datasets) == set(FIXTURE_PUSHT_TASKS)
    for task, entry in pusht_datasets.items():
        meta = entry["meta"]
        assert meta.total_episodes == 3 and meta.total_frames == 60
        assert meta.fps == 10
        assert meta.camera_keys == ["observation.image"]
        assert meta.features["observation.image"]["shape"] == (96, 96, 3)
        assert set(meta.stats) >= {"observation.image", "observation.state", "action"}

        horizon = [i / meta.fps for i in range(5)]
        ds = LeRobotDataset(
            entry["repo_id"],
            root=entry["root"],
            delta_timestamps={"action": horizon, "observation.state": [-1 / meta.fps, 0.0]},
            video_backend="pyav",
        )
        assert len(ds) == 60
        item = ds[18]  # near an episode end: the action horizon runs past it and is padded
        assert item["observation.image"].shape == (3, 96, 96)
        assert item["observation.image"].dtype == torch.float32
        assert 0.0 <= item["observation.image"].min() and item["observation.image"].max() <= 1.0
        assert item["observation.image"].std() > 0.01  # a real render, not a blank frame
        assert item["observation.state"].shape == (2, 2) and item["observation.state"].dtype == torch.float32
        assert item["action"].shape == (5, 2) and item["action"].dtype == torch.float32
        assert item["action_is_pad"].tolist() == [False, False, True, True, True]
        assert item["task"] == PUSHT_TASKS[task]


def test_pusht_features_are_what_lerobot_env_processing_produces(pusht_datasets):
    """The recorded names/shapes match lerobot's PushtEnv observations after preprocess_observation."""
    import gymnasium as gym
    from lerobot.envs.configs import PushtEnv
    from lerobot.envs.utils import preprocess_observation

    import gym_pusht  # noqa: F401

    env_cfg = PushtEnv()
    env = gym.make(f"gym_pusht/{env_cfg.task}", **env_cfg.gym_kwargs)
    obs, _ = env.reset(seed=0)
    env.close()
    batch = preprocess_observation(obs)
    features = next(iter(pusht_datasets.values()))["meta"].features
    for key, value in batch.items():
        assert key in features, f"{key} missing from recorded features"
        recorded = features[key]["shape"]
        expected = tuple(value.shape[1:]) if value.ndim == 2 else (value.shape[2], value.shape[3], value.shape[1])
        assert tuple(recorded) == expected, key
    assert tuple(features["action"]["shape"]) == env_cfg.features["action"].shape


def test_pusht_tasks_have_different_actions(pusht_datasets):
    # Same seed => both tasks start every episode from the same state; only the controller differs.
    task_a, task_b = FIXTURE_PUSHT_TASKS
    actions_a = _episode_actions(pusht_datasets[task_a])
    actions_b = _episode_actions(pusht_datasets[task_b])
    assert actions_a.shape == actions_b.shape == (3, 20, 2)
    gap = np.linalg.norm(actions_a.mean(0) - actions_b.mean(0), axis=-1).mean()
    assert gap > 30.0, f"mean action trajectories of {task_a} and {task_b} differ by only {gap:.1f} px"
    # Seeded noise makes episodes differ within a task too.
    assert not np.allclose(actions_a[0], actions_a[1])


def test_push_t_controller_moves_the_block_towards_the_goal(tmp_path):
    """The push heuristic reduces the block-goal distance (it does not control the block's angle)."""
    import gymnasium as gym

    import gym_pusht  # noqa: F401
    from craft_core.demo import sim_datasets as sd

    env = gym.make("gym_pusht/PushT-v0", obs_type="state", render_mode="rgb_array")
    start, end = [], []
    for seed in range(4):
        env.reset(seed=seed)
        sim = env.unwrapped
        start.append(np.linalg.norm(sd._block_centre(sim) - sd._goal_centre(sim)))
        for step in range(100):
            env.step(sd._pusht_action(sim, sd._pusht_controller("push_t", sim), step, rng=None))
        end.append(np.linalg.norm(sd._block_centre(sim) - sd._goal_centre(sim)))
    env.close()
    assert np.mean(end) < 0.6 * np.mean(start), (start, end)


def test_same_seed_same_dataset_other_seed_other_dataset(tmp_path):
    def record(name, seed):
        meta = record_dataset(
            "pusht", "corner", repo_id=f"local/{name}", root=tmp_path / name,
            n_episodes=2, max_steps=6, image_size=32, seed=seed,
        )
        return _columns(tmp_path / name, "action", "observation.state", "observation.image")

    first, again, other = record("a", 7), record("b", 7), record("c", 8)
    # Including the rendered frames (pusht's pygame renders are deterministic).
    assert first["observation.image"].shape == (12,)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
        assert not np.array_equal(first[key], other[key]), key


def test_video_storage_decodes_with_pyav(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    meta = record_dataset(
        "pusht", "circle", repo_id="local/video", root=tmp_path / "video",
        n_episodes=1, max_steps=4, image_size=32, seed=0, use_videos=True,
    )
    assert meta.video_keys == ["observation.image"]
    ds = LeRobotDataset("local/video", root=tmp_path / "video", video_backend="pyav")
    frame = ds[3]["observation.image"]
    assert frame.shape == (3, 32, 32) and frame.std() > 0.01


def test_bad_arguments_are_rejected_with_the_offending_field(tmp_path):
    with pytest.raises(ValueError, match="task='stack'"):
        record_dataset("pusht", "stack", repo_id="x/y", root=tmp_path / "a", n_episodes=1, max_steps=5)
    with pytest.raises(ValueError, match="env='libero'"):
        record_dataset("libero", "push_t", repo_id="x/y", root=tmp_path / "a", n_episodes=1, max_steps=5)
    with pytest.raises(ValueError, match="n_episodes=0"):
        record_dataset("pusht", "push_t", repo_id="x/y", root=tmp_path / "a", n_episodes=0, max_steps=5)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        record_dataset("pusht", "push_t", repo_id="x/y", root=tmp_path / "taken", n_episodes=1, max_steps=5)


def test_aloha_recording_in_mujoco_sim(aloha_dataset):
    """gym-aloha (MuJoCo, EGL rendering): one scripted episode recorded and reloaded."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot.envs.configs import AlohaEnv

    meta = aloha_dataset["meta"]
    assert meta.total_episodes == 1 and meta.total_frames == 10 and meta.fps == 50
    # The names lerobot's AlohaEnv observations get in eval (features_map) are the recorded ones.
    env_cfg = AlohaEnv()
    for env_key, feature in env_cfg.features.items():
        name = env_cfg.features_map[env_key]
        assert name in meta.features, name
        if name != "observation.images.top":  # the camera is recorded smaller than the eval render
            assert tuple(meta.features[name]["shape"]) == feature.shape, name
    assert meta.camera_keys == ["observation.images.top"]
    ds = LeRobotDataset(
        aloha_dataset["repo_id"],
        root=aloha_dataset["root"],
        delta_timestamps={"action": [i / meta.fps for i in range(3)]},
        video_backend="pyav",
    )
    item = ds[0]
    assert item["observation.images.top"].shape == (3, 96, 128)
    assert item["observation.images.top"].std() > 0.01
    assert item["observation.state"].shape == (14,)
    assert item["action"].shape == (3, 14)
    assert item["task"] == ALOHA_TASKS["reach"]
    cols = _columns(aloha_dataset["root"], "observation.state")
    # The scripted reach moves the joints (state is read back from the simulator, not the script).
    assert np.abs(cols["observation.state"][-1] - cols["observation.state"][0]).max() > 0.02


def test_aloha_lift_task_has_its_own_action_pattern(aloha_dataset, tmp_path):
    """The second aloha task is recorded in the same sim and moves the arms another way than `reach`."""
    meta = record_dataset(
        "aloha", "lift", repo_id="local/aloha_lift", root=tmp_path / "lift",
        n_episodes=1, max_steps=6, image_size=32, seed=0,
    )
    assert list(meta.tasks.index) == [ALOHA_TASKS["lift"]]
    lift = _columns(tmp_path / "lift", "action")["action"]
    reach = _columns(aloha_dataset["root"], "action")["action"][:6]
    assert lift.shape == reach.shape == (6, 14)
    assert np.abs(lift - reach).mean(0).max() > 0.2
