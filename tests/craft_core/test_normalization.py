"""train.normalization: the statistics a fine-tuned checkpoint is saved (and deployed) with, and
the anchors made with the same ones."""

import numpy as np
import pytest

from craft_core.config import CacheConfig, DatasetSource, PolicySource
from craft_core.normalization import dataset_stats, fine_tuning_stats
from tests.craft_core.test_train import POOLING, read_metrics, retained_dataset, task_dataset, train_config


def saved_state_stats(pretrained_dir) -> dict:
    """observation.state statistics of a saved pipeline's normaliser, as the policy will use them."""
    from craft_core.policy_io import load_policy, make_processors

    policy = load_policy(PolicySource(path=str(pretrained_dir)))
    preprocessor, _ = make_processors(policy, pretrained_path=str(pretrained_dir))
    normalizer = next(step for step in preprocessor.steps if type(step).__name__ == "NormalizerProcessorStep")
    return {k: np.asarray(v) for k, v in normalizer.stats["observation.state"].items()}


@pytest.mark.parametrize("mode", ["task", "teacher", "union"])
def test_checkpoint_is_saved_with_the_chosen_statistics(mode, tiny_pi0_fast, pusht_datasets, tmp_path):
    from craft_core.train import train

    task_repo, task_root = task_dataset(pusht_datasets)
    anchor_repo, anchor_root = retained_dataset(pusht_datasets)
    task = DatasetSource(repo_id=task_repo, root=str(task_root))
    anchors = DatasetSource(repo_id=anchor_repo, root=str(anchor_root))
    cfg = train_config(task_repo, task_root, steps=1, save_every=1, retention=None, normalization=mode)
    result = train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=None, out_dir=tmp_path,
                   anchor_dataset=anchors)
    saved = saved_state_stats(result["checkpoint"])
    expected = {
        "task": dataset_stats(task)["observation.state"],
        "teacher": saved_state_stats(tiny_pi0_fast),
        "union": fine_tuning_stats("union", task_dataset=task, anchor_dataset=anchors)["observation.state"],
    }[mode]
    for key in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(saved[key], np.asarray(expected[key]), rtol=1e-6, err_msg=key)
    # The three choices really differ on these datasets (else the test would prove nothing).
    assert not np.allclose(dataset_stats(task)["observation.state"]["mean"], saved_state_stats(tiny_pi0_fast)["mean"])


def test_anchors_are_normalised_like_the_student_and_the_keystone_holds(tiny_pi0_fast, pusht_datasets, tmp_path):
    """Under union statistics the store records them, its prompts (pi0_fast puts the normalised state
    in the prompt) differ from the anchor dataset's, and a student saved with them starts at L_ret ~ 0."""
    from craft_core.extraction import extract_anchors
    from craft_core.store import open_anchor_store
    from craft_core.train import train

    task_repo, task_root = task_dataset(pusht_datasets)
    anchor_repo, anchor_root = retained_dataset(pusht_datasets)
    task = DatasetSource(repo_id=task_repo, root=str(task_root))
    cache = CacheConfig(teacher=PolicySource(path=str(tiny_pi0_fast)),
                        dataset=DatasetSource(repo_id=anchor_repo, root=str(anchor_root)), n_anchors=8,
                        layers=[-2, -1], pooling=POOLING, dtype="float32", batch_size=4, device="cpu",
                        heldout_fraction=0.0, targets=["prefix", "action_output"])
    union_url, plain_url = str(tmp_path / "union.zarr"), str(tmp_path / "plain.zarr")
    extract_anchors(cache, union_url, normalization="union", task_dataset=task)
    extract_anchors(cache, plain_url)
    union, plain = open_anchor_store(union_url), open_anchor_store(plain_url)
    assert union.attrs["normalization"]["statistics"] == "union"
    assert plain.attrs["normalization"]["statistics"] == "anchor_dataset"
    assert union.attrs["fingerprint"] != plain.attrs["fingerprint"]
    prompts = lambda store: store.read(0, 8, ["inputs/lang_tokens"])["inputs/lang_tokens"]  # noqa: E731
    assert not np.array_equal(prompts(union), prompts(plain))

    cfg = train_config(task_repo, task_root, steps=1, save_every=1, normalization="union")
    train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=union_url, out_dir=tmp_path / "run",
          anchor_dataset=cache.dataset)
    first = read_metrics(tmp_path / "run")[0]
    assert first["retention_loss/prefix"] <= 1e-6 and first["retention_loss/action_output"] <= 1e-6


def _normalizer(stats: dict, mode: str = "MEAN_STD"):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    step = NormalizerProcessorStep(
        features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        norm_map={FeatureType.ACTION: NormalizationMode(mode)}, stats=stats)
    return PolicyProcessorPipeline(steps=[step])


def test_statistics_that_cannot_represent_the_task_are_refused_by_feature_and_dimension():
    from craft_core.normalization import NormalizationMismatchError, check_task_fits_statistics, statistics_offsets

    # Task A's gripper action is constant 0 (std 0); task B's is constant 1.
    teacher = {"action": {"mean": [0.2, 0.0], "std": [0.5, 0.0], "min": [-1.0, 0.0], "max": [1.0, 0.0]}}
    task_b = {"action": {"mean": [0.7, 1.0], "std": [0.4, 0.0]}}
    offsets = statistics_offsets(_normalizer(teacher), task_b)
    assert offsets["action"][0] == pytest.approx(1.0) and offsets["action"][1] > 1e7
    with pytest.raises(NormalizationMismatchError, match=r"action\[1\].*union"):
        check_task_fits_statistics(_normalizer(teacher), task_b, "teacher")
    # Within reach: nothing refused; a feature 10+ scale units off is reported for a warning.
    assert check_task_fits_statistics(_normalizer(teacher), {"action": {"mean": [0.3, 0.0]}}, "teacher") == []
    far = check_task_fits_statistics(_normalizer(teacher), {"action": {"mean": [6.0, 0.0]}}, "teacher")
    assert far == ["action[0] at 11.6"]
    # MIN_MAX statistics are judged on their half-range.
    assert statistics_offsets(_normalizer(teacher, "MIN_MAX"), task_b)["action"][0] == pytest.approx(0.7)


def test_training_refuses_statistics_the_task_lies_outside_before_writing_anything(tiny_pi0_fast, pusht_datasets,
                                                                                 tmp_path):
    import json
    import shutil

    from craft_core.normalization import NormalizationMismatchError
    from craft_core.train import train

    task_repo, task_root = task_dataset(pusht_datasets)
    moved_root = tmp_path / "moved"
    shutil.copytree(task_root, moved_root)
    stats_file = moved_root / "meta" / "stats.json"
    stats = json.loads(stats_file.read_text())
    stats["action"]["mean"] = [value + 1e6 for value in stats["action"]["mean"]]  # far outside the teacher's
    stats_file.write_text(json.dumps(stats))
    cfg = train_config(task_repo, moved_root, steps=1, save_every=1, retention=None, normalization="teacher")
    with pytest.raises(NormalizationMismatchError, match=r"train.normalization='teacher'.*action\[0\]"):
        train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=None, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
