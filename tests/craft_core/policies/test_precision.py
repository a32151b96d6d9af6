"""The keystone invariant under mixed precision, for every policy type (CPU bf16 autocast).

Targets extracted under bf16 autocast are reproduced by a student copy whose retention forward runs
under the same autocast (L_t <= 1e-6 relative to the teacher vectors' scale); an fp32 retention
forward against bf16 targets does not reproduce them (what the train loop did before it ran the
retention forward under the store's recorded autocast). Through the store: ``cache.autocast: bf16``
is recorded and the training-side ``Retention`` runs its forward under it.
"""

import copy

import pytest
import torch

from craft_core.policies import get_adapter
from tests.craft_core.policies.test_targets import TARGETS, request_for, setup, teacher_targets  # noqa: F401


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _scale(arrays: dict) -> float:
    """Mean square of a target's floating arrays (the teacher vectors' scale), at least 1."""
    values = [v.float().pow(2).mean() for v in arrays.values() if v.is_floating_point()]
    return max(1.0, float(torch.stack(values).mean())) if values else 1.0


def test_keystone_holds_under_bf16_autocast_when_the_student_uses_the_same(setup):  # noqa: F811
    _, policy, _, inputs = setup
    with _bf16():
        stored = teacher_targets(policy, inputs)
    student = copy.deepcopy(policy)
    adapter = get_adapter(student)
    with torch.no_grad(), _bf16():
        same = adapter.retention_losses(inputs, stored, request_for(adapter))
    with torch.no_grad():
        fp32 = adapter.retention_losses(inputs, stored, request_for(adapter))
    for target in TARGETS:
        tolerance = 1e-6 * _scale(stored[target])
        assert float(same[target]) <= tolerance, (target, float(same[target]), tolerance)
    # The mismatch the autocast removes: an fp32 student against bf16 targets does not reproduce them.
    assert float(fp32["prefix"]) > float(same["prefix"]), (float(fp32["prefix"]), float(same["prefix"]))


def test_store_records_the_autocast_and_retention_runs_under_it(tiny_pi0_fast, pusht_datasets, tmp_path):
    from craft_core.config import CacheConfig, DatasetSource, PolicySource, RetentionConfig
    from craft_core.extraction import extract_anchors
    from craft_core.policy_io import load_policy
    from craft_core.retention import open_retention
    from craft_core.store import open_anchor_store
    from tests.craft_core.test_train import retained_dataset

    repo_id, root = retained_dataset(pusht_datasets)
    cfg = CacheConfig(teacher=PolicySource(path=str(tiny_pi0_fast)), dataset=DatasetSource(repo_id=repo_id, root=str(root)),
                      n_anchors=8, dtype="float32", batch_size=4, device="cpu", autocast="bf16",
                      heldout_fraction=0.0, targets=list(TARGETS))
    url = str(tmp_path / "anchors.zarr")
    extract_anchors(cfg, url)
    assert open_anchor_store(url).attrs["compute"]["autocast"] == "bfloat16"

    student = load_policy(tiny_pi0_fast, trainable=True)
    retention = open_retention(RetentionConfig(anchor_batch_size=4), url, adapter=get_adapter(student),
                               teacher=cfg.teacher, seed=0, total_steps=1)
    assert retention.autocast == "bfloat16"
    losses = retention.next_losses()
    for target in TARGETS:
        assert float(losses[target]) <= 1e-6 * 10, (target, float(losses[target]))
    # The same store read by an fp32 retention forward (the old behaviour) misses the invariant.
    retention.autocast = None
    assert float(retention.next_losses()["prefix"]) > 1e-6

    # Drift repeats the recorded autocast too (on CPU as well): the teacher has drifted by nothing from itself.
    from craft_core.evaluation.drift import open_heldout

    anchors = open_heldout(url, split="train")
    teacher = load_policy(tiny_pi0_fast)
    drift = anchors.drift(teacher, anchors.for_policy(teacher), batch_size=4)
    assert drift["teacher_compute"]["autocast"] == "bfloat16"
    assert drift["mse"] <= 1e-10 and drift["cosine"] <= 1e-6, drift
    for target in TARGETS:
        if target != "prefix":
            assert drift["targets"][target] <= 1e-6 * 10, (target, drift["targets"][target])
    anchors.compute["autocast"] = None  # as drift measured before: fp32 against bf16-computed targets
    assert anchors.drift(teacher, anchors.for_policy(teacher), batch_size=4)["mse"] > 1e-10
