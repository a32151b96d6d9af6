"""The demo assets stage builds real local datasets and a tiny real teacher that was trained on task A."""

import torch
from safetensors.torch import load_file

from craft_core.demo.assets import build_demo_assets
from craft_core.config import AssetsConfig
from craft_core.demo.sim_datasets import PUSHT_TASKS


def test_build_demo_assets_with_teacher_pretraining(tmp_path):
    cfg = AssetsConfig(episodes_per_task=1, max_episode_steps=6, image_size=32, teacher_pretrain_steps=1,
                       teacher_pretrain_batch_size=2, device="cpu")
    calls = []
    result = build_demo_assets(cfg, tmp_path, progress=lambda done, total, metrics: calls.append((done, total)))

    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    for key, task in (("task_a", "push_t"), ("task_b", "corner")):
        entry = result["datasets"][key]
        meta = LeRobotDatasetMetadata(entry["repo_id"], root=entry["root"])
        assert meta.total_episodes == 1 and meta.total_frames == 6 == entry["frames"]
        assert list(meta.tasks.index) == [PUSHT_TASKS[task]]

    from craft_core.policy_io import load_policy

    teacher = tmp_path / "teacher"
    assert result["teacher"] == str(teacher) and (teacher / "craft_tiny.json").is_file()
    policy = load_policy(result["teacher"])
    assert policy.config.type == "pi0_fast"

    # The teacher is the pretrained one, not the random initialisation.
    init = load_file(tmp_path / "teacher_init" / "model.safetensors")
    trained = load_file(teacher / "model.safetensors")
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    assert result["pretrain"]["steps"] == 1

    assert calls[-1][0] == calls[-1][1] == 2 + 1 + 1
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
