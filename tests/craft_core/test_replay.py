"""Replay of old frames (the experiment's reference run): the sampler and a training run with it."""

import numpy as np
import pytest
from lerobot.datasets import EpisodeAwareSampler

from craft_core.config import DatasetSource, PolicySource, ReplayConfig
from craft_core.replay import ReplaySampler
from tests.craft_core.test_train import read_metrics, retained_dataset, task_dataset, train_config


def make_sampler(n_task=100, n_replay=30, fraction=0.05, seed=3) -> ReplaySampler:
    task = EpisodeAwareSampler([0, 40], [40, n_task], shuffle=True, seed=seed)
    return ReplaySampler(task, n_task, n_replay, fraction, seed)


def test_a_fixed_share_of_each_epoch_replays_old_frames():
    sampler = make_sampler()
    epoch = list(sampler)
    assert len(epoch) == len(sampler) == 100
    replayed = [i for i in epoch if i >= 100]
    assert len(replayed) == 5  # 5 % of the positions, spread evenly
    assert len(set(replayed)) == 5 and all(100 <= i < 130 for i in replayed)
    task = [i for i in epoch if i < 100]
    assert len(set(task)) == 95  # the other positions are the task sampler's frames, none repeated
    second = list(sampler)
    assert second != epoch and len([i for i in second if i >= 100]) == 5  # the next epoch reshuffles both


def test_resume_continues_the_same_stream():
    from lerobot.datasets import compute_sampler_state

    whole = make_sampler()
    stream = list(whole) + list(whole)
    resumed = make_sampler()
    resumed.load_state_dict(compute_sampler_state(step=7, num_frames=100, batch_size=10, num_processes=1))
    assert list(resumed) == stream[70:100] and list(resumed) == stream[100:200]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_fraction_outside_the_open_interval_is_refused(fraction):
    with pytest.raises(ValueError):
        ReplayConfig(fraction=fraction)


def test_training_with_replay_runs_and_refuses_incompatible_data(tiny_pi0_fast, pusht_datasets, policy_test_dataset,
                                                                  tmp_path):
    from craft_core.train import train

    repo_id, root = task_dataset(pusht_datasets)
    old_repo, old_root = retained_dataset(pusht_datasets)
    cfg = train_config(repo_id, root, steps=2, save_every=2, retention=None,
                       replay=ReplayConfig(fraction=0.25, dataset=DatasetSource(repo_id=old_repo, root=str(old_root))))
    result = train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=None, out_dir=tmp_path / "run")
    assert result["steps"] == 2 and np.isfinite(result["final_task_loss"])
    assert len(read_metrics(tmp_path / "run")) == 2

    other_repo, other_root, _ = policy_test_dataset  # two cameras: not the pusht frames
    bad = cfg.model_copy(update={"replay": ReplayConfig(fraction=0.25, dataset=DatasetSource(
        repo_id=other_repo, root=str(other_root)))})
    with pytest.raises(ValueError, match="train.replay.dataset: the replay dataset's features differ"):
        train(bad, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=None, out_dir=tmp_path / "bad")
