"""The training stage on tiny real lerobot policies (pi0_fast, smolvla), offline, on CPU.

The tiny teachers are built for the recorded pusht datasets; a real Zarr anchor store holds the
teacher's targets on task B (``circle``, the one to retain: pooled prefix hidden states and action
outputs), then ``train`` fine-tunes on task A (``push_t``) for a few steps of CRaFT (retention every
2nd step, one constraint and one λ per target) and of the baseline (the same loop, retention off).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from craft_core.config import CacheConfig, DatasetSource, PolicySource, RetentionConfig, TrainConfig

POOLING = ["vision_token_mean", "text_token_last"]


# ----------------------------------------------------------------------------------------- helpers


TARGETS = ["prefix", "action_output"]


def make_anchor_store(teacher_dir: Path, repo_id: str, root: Path, store_url: Path, *, n_anchors: int = 12,
                      targets: list[str] = TARGETS) -> str:
    """A real Zarr anchor store of ``teacher_dir`` on the dataset, written by the cache stage."""
    from craft_core.extraction import extract_anchors

    cfg = CacheConfig(
        teacher=PolicySource(path=str(teacher_dir)),
        dataset=DatasetSource(repo_id=repo_id, root=str(root)),
        n_anchors=n_anchors, layers=[-2, -1], pooling=POOLING, dtype="float32", batch_size=4,
        device="cpu", heldout_fraction=0.0, seed=0, targets=targets,
    )
    extract_anchors(cfg, str(store_url))
    return str(store_url)


def train_config(repo_id: str, root: Path, **overrides) -> TrainConfig:
    retention = dict(every_k=2, anchor_batch_size=4, lambda_init=1.0, lambda_lr=0.5, lambda_max=10.0,
                     eps_start=0.02, eps_end=0.01, eps_schedule="linear")
    changes = overrides.pop("retention", {})
    retention.update(changes or {})
    base = dict(
        dataset=DatasetSource(repo_id=repo_id, root=str(root)), steps=4, batch_size=2, lr=1e-3,
        device="cpu", save_every=2, log_every=1, seed=0, num_workers=0,
        retention=None if changes is None else RetentionConfig(**retention),  # None: the baseline
    )
    base.update(overrides)
    return TrainConfig(**base)


def load_weights(pretrained_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(pretrained_dir) / "model.safetensors"))


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def task_dataset(pusht_datasets) -> tuple[str, Path]:
    """Task A, the new task the student is fine-tuned on."""
    return pusht_datasets["push_t"]["repo_id"], pusht_datasets["push_t"]["root"]


def retained_dataset(pusht_datasets) -> tuple[str, Path]:
    """Task B, the teacher's task whose hidden states the anchors keep."""
    return pusht_datasets["circle"]["repo_id"], pusht_datasets["circle"]["root"]


@pytest.fixture(scope="module")
def pi0_fast_store(tiny_pi0_fast, pusht_datasets, tmp_path_factory):
    return make_anchor_store(tiny_pi0_fast, *retained_dataset(pusht_datasets),
                             tmp_path_factory.mktemp("store") / "pi0_fast.zarr")


@pytest.fixture(scope="module")
def smolvla_store(tiny_smolvla, pusht_datasets, tmp_path_factory):
    return make_anchor_store(tiny_smolvla, *retained_dataset(pusht_datasets),
                             tmp_path_factory.mktemp("store") / "smolvla.zarr")


# ------------------------------------------------------------------------------------- CRaFT runs


@pytest.mark.parametrize("policy_type", ["pi0_fast", "smolvla"])
def test_craft_run_retention_steps_dual_ascent_checkpoints(policy_type, request, pusht_datasets, tmp_path):
    from craft_core.policy_io import load_policy
    from craft_core.train import train

    teacher_dir = request.getfixturevalue(f"tiny_{policy_type}")
    store_url = request.getfixturevalue(f"{policy_type}_store")
    repo_id, root = task_dataset(pusht_datasets)
    cfg = train_config(repo_id, root)
    progress_calls = []
    result = train(cfg, teacher=PolicySource(path=str(teacher_dir)), store_url=store_url, out_dir=tmp_path,
                   progress=lambda done, total, m: progress_calls.append((done, total)))

    # Every 2nd step (0-based 0, 2) is a retention step; the others are task steps.
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["retention_step"] for r in records] == [True, False, True, False]
    for r in records:
        assert math.isfinite(r["task_loss"]) and r["cache_type"] == "prefix+action_output"
        assert r["lr"] > 0 and r["step_time_s"] > 0 and r["samples_per_s"] > 0 and math.isfinite(r["grad_norm"])
        if r["retention_step"]:
            assert all(r[f"retention_loss/{t}"] is not None for t in TARGETS) and -1.0 <= r["grad_cosine"] <= 1.0
            assert r["retention_loss"] == pytest.approx(sum(r[f"retention_loss/{t}"] for t in TARGETS))
            assert isinstance(r["projected"], bool)
        else:
            assert r["retention_loss"] is None and r["grad_cosine"] is None
    for target in TARGETS:
        # The student starts as an exact copy of the teacher: the keystone invariant, per target.
        assert records[0][f"retention_loss/{target}"] <= 1e-6, target
        # After a task step the student has moved away from the teacher.
        assert records[2][f"retention_loss/{target}"] > records[0][f"retention_loss/{target}"], target
        # Dual ascent per target: λ_t <- clip(λ_t + η (L_t - ε_t(t)), 0, λ_max), ε annealed linearly.
        lam = cfg.retention.lambda_init
        for r in records:
            if r["retention_step"]:
                lam = min(max(lam + cfg.retention.lambda_lr * (r[f"retention_loss/{target}"] - r[f"epsilon/{target}"]),
                              0.0), 10.0)
            assert r[f"lambda/{target}"] == pytest.approx(lam, abs=1e-12)
        assert records[0][f"epsilon/{target}"] == 0.02
        assert records[2][f"epsilon/{target}"] == pytest.approx(0.02 - 0.01 * 2 / 4)
    assert progress_calls == [(1, 4), (2, 4), (3, 4), (4, 4)]

    # Checkpoints in lerobot's layout, `last` -> the final one, loadable with from_pretrained.
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["000002", "000004", "last"]
    assert (checkpoints / "last").resolve() == (checkpoints / "000004").resolve()
    state_dir = checkpoints / "000004" / "training_state"
    for name in ("optimizer_state.safetensors", "optimizer_param_groups.json", "scheduler_state.json",
                 "rng_state.safetensors", "training_step.json", "craft_state.json"):
        assert (state_dir / name).is_file(), name
    craft_state = json.loads((state_dir / "craft_state.json").read_text())
    assert craft_state["step"] == 4 and craft_state["anchor_batches"] == 2
    for target in TARGETS:
        assert craft_state["targets"][target]["lambda"]["value"] == pytest.approx(records[-1][f"lambda/{target}"])
    assert result["checkpoint"] == str(checkpoints / "000004" / "pretrained_model")
    assert result["targets"] == TARGETS and result["steps"] == 4 and result["skipped_nonfinite_steps"] == 0
    assert result["final_task_loss"] == pytest.approx(records[-1]["task_loss"])

    student = load_policy(PolicySource(path=result["checkpoint"]), device="cpu")
    trained = load_weights(result["checkpoint"])
    teacher = load_weights(teacher_dir)
    assert student.config.type == policy_type
    assert all(torch.equal(student.state_dict()[k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], teacher[k]) for k in teacher)
    # lerobot-eval needs the processors beside the weights (normalisation stats of the task dataset).
    from craft_core.policy_io import make_processors

    pre, post = make_processors(student, pretrained_path=result["checkpoint"])
    assert len(pre.steps) > 0 and len(post.steps) > 0
    assert (Path(result["checkpoint"]) / "policy_preprocessor.json").is_file()

    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 4


def test_baseline_is_the_same_loop_without_retention(tiny_pi0_fast, pusht_datasets, tmp_path):
    from craft_core.train import train

    repo_id, root = task_dataset(pusht_datasets)
    cfg = train_config(repo_id, root, steps=2, save_every=10)
    result = train(cfg.model_copy(update={"retention": None}), teacher=PolicySource(path=str(tiny_pi0_fast)),
                   store_url=None, out_dir=tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["retention_loss"] is None and r["cache_type"] is None for r in records)
    assert not any(key.startswith(("lambda/", "epsilon/")) for r in records for key in r)
    assert all(not r["retention_step"] for r in records)
    assert result["cache_type"] is None and result["retention"] is False
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["000002", "last"]


def test_without_the_policy_preset_lr_is_constant_and_checkpoints_resume(tiny_pi0_fast, pusht_datasets, tmp_path):
    """use_policy_training_preset=False: plain AdamW at train.lr, no scheduler, and resume still works."""
    from craft_core.train import train

    repo_id, root = task_dataset(pusht_datasets)
    teacher = PolicySource(path=str(tiny_pi0_fast))
    cfg = train_config(repo_id, root, steps=2, save_every=1, lr=3e-4, use_policy_training_preset=False,
                       retention=None)
    train(cfg, teacher=teacher, store_url=None, out_dir=tmp_path)
    longer = cfg.model_copy(update={"steps": 3})
    with pytest.raises(Exception, match="steps"):  # a changed config is refused on resume, naming the field
        train(longer, teacher=teacher, store_url=None, out_dir=tmp_path)
    records = read_metrics(tmp_path)
    assert [r["lr"] for r in records] == [3e-4, 3e-4]
    assert not (tmp_path / "checkpoints" / "000002" / "training_state" / "scheduler_state.json").exists()


# ---------------------------------------------------------------------------------- start-up checks


def _copy_store(store_url: str, dest: Path) -> Path:
    import shutil

    shutil.copytree(store_url, dest)
    return dest


def _set_attrs(**attrs):
    def apply(store: Path) -> None:
        zarr.open_group(str(store), mode="r+").attrs.update(attrs)

    return apply


def _drop_a_chunk(store: Path) -> None:
    """A chunk file of the teacher's prefix targets deleted (Zarr alone would read fill values)."""
    chunk = next(p for p in (store / "targets" / "prefix" / "hidden").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()


BROKEN_STORES = {
    "missing": (None, {}, "no Zarr v3 group"),
    "incomplete": (_set_attrs(complete=False), {}, "incomplete"),
    "identity attributes edited": (_set_attrs(layers=[0, 1]), {}, "attribute layers was changed after the store was written"),
    "a target chunk missing": (_drop_a_chunk, {}, "targets/prefix/hidden block 0: its content does not match"),
    "target the store lacks": (None, {"store": "prefix_only", "retention": {"targets": {"action_output": {}}}},
                               r"holds the targets \['prefix'\] but \['action_output'\] were requested"),
    "other teacher": (None, {"teacher": "copy"}, "its teacher is .* but the student starts from"),
}


@pytest.mark.parametrize("case", list(BROKEN_STORES))
def test_refuses_to_start_on_a_store_that_does_not_fit(case, tiny_pi0_fast, pi0_fast_store, pusht_datasets,
                                                       tmp_path):
    import shutil

    from craft_core.train import RetentionSetupError, train

    breaker, options, message = BROKEN_STORES[case]
    store = tmp_path / "store.zarr"
    if breaker is not None:
        breaker(_copy_store(pi0_fast_store, store))
    elif options.get("store") == "prefix_only":
        make_anchor_store(tiny_pi0_fast, *retained_dataset(pusht_datasets), store, targets=["prefix"])
    elif options:
        _copy_store(pi0_fast_store, store)
    teacher = tiny_pi0_fast
    if options.get("teacher") == "copy":  # the same weights, but not the teacher the store was made with
        teacher = tmp_path / "another_teacher"
        shutil.copytree(tiny_pi0_fast, teacher)
    repo_id, root = task_dataset(pusht_datasets)
    out_dir = tmp_path / "run"
    with pytest.raises(RetentionSetupError, match=message) as info:
        train(train_config(repo_id, root, steps=1, retention=options.get("retention", {})),
              teacher=PolicySource(path=str(teacher)), store_url=str(store), out_dir=out_dir)
    assert "never falls back" in str(info.value)
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "checkpoints").exists()


def test_runs_with_other_precisions_follow_each_other_in_one_process(pusht_datasets):
    """accelerate's per-process state would refuse the second precision ("restart your runtime")."""
    from craft_core.train import _make_accelerator

    repo_id, root = task_dataset(pusht_datasets)
    for precision in ("no", "bf16", "bf16", "no"):
        accelerator = _make_accelerator(train_config(repo_id, root, steps=1, mixed_precision=precision))
        assert accelerator.mixed_precision == precision
        with accelerator.autocast():  # the precision it computes in, not only the one it reports
            dtype = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype
        assert dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_refuses_retention_without_a_store(tiny_pi0_fast, pusht_datasets, tmp_path):
    from craft_core.train import RetentionSetupError, train

    repo_id, root = task_dataset(pusht_datasets)
    with pytest.raises(RetentionSetupError, match="no anchor store was given"):
        train(train_config(repo_id, root, steps=1), teacher=PolicySource(path=str(tiny_pi0_fast)),
              store_url=None, out_dir=tmp_path)


# ------------------------------------------------------------------------------------- non-finite


def test_nonfinite_steps_are_skipped_then_the_run_stops(tiny_pi0_fast, pi0_fast_store, pusht_datasets,
                                                         tmp_path, monkeypatch):
    from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPolicy

    from craft_core.train import NonFiniteLossError, train

    # Fault injection: the policy's own forward, with its loss turned into NaN on calls 3 and 4.
    real_forward = PI0FastPolicy.forward
    calls = {"n": 0}

    def forward_with_nan(self, batch, *args, **kwargs):
        loss, out = real_forward(self, batch, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), out) if calls["n"] in (3, 4) else (loss, out)

    monkeypatch.setattr(PI0FastPolicy, "forward", forward_with_nan)
    repo_id, root = task_dataset(pusht_datasets)
    # No memory plan: its activation probe is one more policy forward, which would shift the injected NaNs.
    cfg = train_config(repo_id, root, steps=6, save_every=2, max_nonfinite_steps=1, check_memory=False)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=1") as info:
        train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=pi0_fast_store, out_dir=tmp_path)
    assert "2 training steps had a non-finite loss" in str(info.value)
    assert "000002" in str(info.value)

    records = read_metrics(tmp_path)
    assert [r["skipped_nonfinite"] for r in records] == [False, False, True, True]
    # A skipped retention step leaves λ alone (step 3 is a retention step).
    assert records[2]["retention_step"]
    assert all(records[2][f"lambda/{t}"] == records[1][f"lambda/{t}"] for t in TARGETS)
    # The last good checkpoint is intact and loads; nothing was saved after the NaNs.
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["000002", "last"]
    weights = load_weights(checkpoints / "last" / "pretrained_model")
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = json.loads((checkpoints / "last" / "training_state" / "craft_state.json").read_text())
    assert state["skipped_nonfinite"] == 0 and state["step"] == 2


# ------------------------------------------------------------------------------------ hard labels


def test_hard_label_action_output_uses_the_policys_own_loss_on_teacher_tokens(tiny_pi0_fast, pusht_datasets,
                                                                                tmp_path):
    """action_output with top_k 0 (the former token-level cache): the retention loss is pi0_fast's own
    FAST cross-entropy on the teacher's greedy tokens, and one λ constrains it."""
    from craft_core.extraction import extract_anchors
    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy
    from craft_core.retention import Anchors
    from craft_core.store import open_anchor_store
    from craft_core.train import train

    repo_id, root = retained_dataset(pusht_datasets)
    store = str(tmp_path / "tokens.zarr")
    extract_anchors(CacheConfig(
        teacher=PolicySource(path=str(tiny_pi0_fast)), dataset=DatasetSource(repo_id=repo_id, root=str(root)),
        n_anchors=8, targets=["action_output"], action_output={"top_k": 0}, dtype="float32", batch_size=4,
        device="cpu", heldout_fraction=0.0, seed=0,
    ), store)
    repo_id, root = task_dataset(pusht_datasets)
    cfg = train_config(repo_id, root, steps=2, save_every=10, retention={"every_k": 1})
    result = train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=store, out_dir=tmp_path / "run")
    assert result["cache_type"] == "action_output"
    records = read_metrics(tmp_path / "run")
    assert all(r["cache_type"] == "action_output" and r["retention_step"] for r in records)

    # Step 1's retention loss is the (still untouched) student's, i.e. the teacher's, own FAST
    # cross-entropy on the first anchor batch's stored inputs and greedy tokens.
    teacher = load_policy(PolicySource(path=str(tiny_pi0_fast)), device="cpu")
    anchors = Anchors(store, targets=["action_output"], batch_size=4, seed=cfg.seed, rank=0, world_size=1,
                      shuffle_window_chunks=cfg.retention.shuffle_window_chunks)
    inputs, targets = next(anchors.batches())
    images, image_masks, lang, lang_masks = get_adapter(teacher).model_inputs(inputs)
    action = targets["action_output"]
    with torch.no_grad():
        expected = teacher.model.forward(images, image_masks, lang, lang_masks, action["tokens"].long(),
                                         action["token_mask"].bool())["loss"].item()
    assert records[0]["retention_loss/action_output"] == pytest.approx(expected, rel=1e-5)
    assert records[0]["retention_loss/action_output"] > 0
    assert open_anchor_store(store).request().top_k == 0
