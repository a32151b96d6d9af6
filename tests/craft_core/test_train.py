"""The training stage on tiny real lerobot policies (pi0_fast, smolvla), offline, on CPU.

The tiny teachers are built for the recorded pusht datasets; a real Zarr anchor store holds the
teacher's pooled hidden states on task B (``circle``, the one to retain), then ``train`` fine-tunes
on task A (``push_t``) for a few steps of CRaFT (retention every 2nd step) and of the baseline
(the same loop, retention off).
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


def make_anchor_store(teacher_dir: Path, repo_id: str, root: Path, store_url: Path, *, n_anchors: int = 12) -> str:
    """A real Zarr anchor store of ``teacher_dir`` on the dataset, written by the cache stage."""
    from craft_core.extraction import extract_anchors

    cfg = CacheConfig(
        teacher=PolicySource(path=str(teacher_dir)),
        dataset=DatasetSource(repo_id=repo_id, root=str(root)),
        n_anchors=n_anchors, layers=[-2, -1], pooling=POOLING, dtype="float32", batch_size=4,
        device="cpu", heldout_fraction=0.0, seed=0,
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
        assert math.isfinite(r["task_loss"]) and r["cache_type"] == "hidden_state"
        assert r["lr"] > 0 and r["step_time_s"] > 0 and r["samples_per_s"] > 0 and math.isfinite(r["grad_norm"])
        if r["retention_step"]:
            assert r["retention_loss"] is not None and -1.0 <= r["grad_cosine"] <= 1.0
            assert isinstance(r["projected"], bool)
        else:
            assert r["retention_loss"] is None and r["grad_cosine"] is None
    # The student starts as an exact copy of the teacher: the keystone invariant L_ret ~ 0.
    assert records[0]["retention_loss"] <= 1e-6
    # After a task step the student has moved away from the teacher's hidden states.
    assert records[2]["retention_loss"] > records[0]["retention_loss"]
    # Dual ascent as DESIGN.md: λ <- clip(λ + η (L_ret - ε(t)), 0, λ_max), ε annealed linearly.
    lam = cfg.retention.lambda_init
    for r in records:
        if r["retention_step"]:
            lam = min(max(lam + cfg.retention.lambda_lr * (r["retention_loss"] - r["epsilon"]), 0.0), 10.0)
        assert r["lambda"] == pytest.approx(lam, abs=1e-12)
    assert records[0]["epsilon"] == 0.02 and records[2]["epsilon"] == pytest.approx(0.02 - 0.01 * 2 / 4)
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
    assert craft_state["lambda"]["value"] == pytest.approx(records[-1]["lambda"])
    assert result["checkpoint"] == str(checkpoints / "000004" / "pretrained_model")
    assert result["cache_type"] == "hidden_state" and result["steps"] == 4 and result["skipped_nonfinite_steps"] == 0
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
    assert all(r["retention_loss"] is None and r["lambda"] is None and r["cache_type"] is None for r in records)
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


def _widen_hidden(store: Path) -> None:
    group = zarr.open_group(str(store), mode="r+")
    values = group["teacher_hidden"][:]
    wider = np.concatenate([values, values[..., :1]], axis=-1)
    del group["teacher_hidden"]
    group.create_array("teacher_hidden", data=wider, chunks=(group.attrs["chunk_anchors"], *wider.shape[1:]))
    group.attrs.update(hidden_size=wider.shape[-1])


def _other_teacher(store: Path) -> None:
    group = zarr.open_group(str(store), mode="r+")
    group.attrs.update(teacher={**group.attrs["teacher"], "path": "/somewhere/else/teacher"})


def _unknown_layers(store: Path) -> None:
    group = zarr.open_group(str(store), mode="r+")
    group.attrs.update(layers=[layer + 10 for layer in group.attrs["layers"]])


BROKEN_STORES = {
    "missing": (None, "no Zarr v3 group"),
    "incomplete": (_set_attrs(complete=False), "incomplete"),
    "wrong kind": (_set_attrs(kind="logits"), "unknown kind"),
    "other teacher": (_other_teacher, "its teacher is '/somewhere/else/teacher'"),
    "layers": (_unknown_layers, "do not fit the student"),
    "hidden size": (_widen_hidden, r"teacher hidden size \d+ differs from the student.s \d+"),
}


@pytest.mark.parametrize("case", list(BROKEN_STORES))
def test_refuses_to_start_on_a_store_that_does_not_fit(case, tiny_pi0_fast, pi0_fast_store, pusht_datasets,
                                                       tmp_path):
    from craft_core.train import RetentionSetupError, train

    breaker, message = BROKEN_STORES[case]
    store = tmp_path / "store.zarr"
    if breaker is not None:
        breaker(_copy_store(pi0_fast_store, store))
    repo_id, root = task_dataset(pusht_datasets)
    out_dir = tmp_path / "run"
    with pytest.raises(RetentionSetupError, match=message) as info:
        train(train_config(repo_id, root, steps=1), teacher=PolicySource(path=str(tiny_pi0_fast)),
              store_url=str(store), out_dir=out_dir)
    assert "never falls back" in str(info.value)
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "checkpoints").exists()


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
    cfg = train_config(repo_id, root, steps=6, save_every=2, max_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=1") as info:
        train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=pi0_fast_store, out_dir=tmp_path)
    assert "2 training steps had a non-finite loss" in str(info.value)
    assert "000002" in str(info.value)

    records = read_metrics(tmp_path)
    assert [r["skipped_nonfinite"] for r in records] == [False, False, True, True]
    # A skipped retention step leaves λ alone (step 3 is a retention step).
    assert records[2]["retention_step"] and records[2]["lambda"] == records[1]["lambda"]
    # The last good checkpoint is intact and loads; nothing was saved after the NaNs.
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["000002", "last"]
    weights = load_weights(checkpoints / "last" / "pretrained_model")
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = json.loads((checkpoints / "last" / "training_state" / "craft_state.json").read_text())
    assert state["skipped_nonfinite"] == 0 and state["step"] == 2


# ------------------------------------------------------------------------------------ token level


def make_token_level_store(teacher_dir: Path, repo_id: str, root: Path, store_url: Path, *, n_anchors: int = 8) -> str:
    """A token_level store through the store's writer: stored prefix inputs + the teacher's greedy FAST tokens."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy, make_processors
    from craft_core.store import AnchorStoreWriter, StoreLayout

    meta = LeRobotDatasetMetadata(repo_id, root=root)
    teacher = load_policy(PolicySource(path=str(teacher_dir)), ds_meta=meta, device="cpu")
    preprocessor, _ = make_processors(teacher, pretrained_path=str(teacher_dir))
    dataset = LeRobotDataset(repo_id, root=root, video_backend="pyav")
    adapter = get_adapter(teacher)
    frames = torch.utils.data.default_collate([dataset[i] for i in range(n_anchors)])
    inputs = adapter.anchor_inputs(preprocessor(frames))
    labels = adapter.teacher_action_token_labels(inputs)
    layout = StoreLayout(
        kind="token_level", n_anchors=n_anchors, input_spec=adapter.input_spec(), labels_spec=adapter.label_spec(),
        attrs={"teacher": {"policy_type": adapter.policy_type, "path": str(teacher_dir), "revision": None},
               "depth": adapter.depth, "hidden_size": adapter.hidden_size, "fingerprint": "token-level-test"},
    )
    writer = AnchorStoreWriter(store_url, layout)
    arrays = {**{f"inputs/{k}": v.numpy() for k, v in inputs.items()},
              **{f"labels/{k}": v.numpy() for k, v in labels.items()},
              "provenance/episode_index": frames["episode_index"].numpy().astype(np.int64),
              "provenance/frame_index": frames["frame_index"].numpy().astype(np.int64),
              "provenance/task": np.array(frames["task"], dtype=object),
              "split/heldout": np.zeros(n_anchors, dtype=bool)}
    for block, (start, stop) in enumerate(writer.blocks):
        writer.write_block(block, {path: values[start:stop] for path, values in arrays.items()})
    writer.finalize()
    return str(store_url)


def test_token_level_cache_uses_the_policys_own_loss_on_teacher_labels(tiny_pi0_fast, pusht_datasets, tmp_path):
    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy
    from craft_core.retention import Anchors
    from craft_core.train import train

    store = make_token_level_store(tiny_pi0_fast, *retained_dataset(pusht_datasets), tmp_path / "tokens.zarr")
    repo_id, root = task_dataset(pusht_datasets)
    cfg = train_config(repo_id, root, steps=2, save_every=10, retention={"every_k": 1})
    result = train(cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=store, out_dir=tmp_path / "run")
    assert result["cache_type"] == "token_level"
    records = read_metrics(tmp_path / "run")
    assert all(r["cache_type"] == "token_level" and r["retention_step"] for r in records)

    # Step 1's retention loss is pi0_fast's own FAST cross-entropy of the (still untouched) student,
    # i.e. of the teacher, on the first anchor batch's stored inputs and teacher tokens.
    teacher = load_policy(PolicySource(path=str(tiny_pi0_fast)), device="cpu")
    anchors = Anchors(store, kind="token_level", layers=[], pooling=[], batch_size=4, seed=cfg.seed, rank=0,
                      world_size=1, shuffle_window_chunks=cfg.retention.shuffle_window_chunks)
    inputs, labels = next(anchors.batches())
    with torch.no_grad():
        expected = get_adapter(teacher).token_level_loss(inputs, labels).item()
    assert records[0]["retention_loss"] == pytest.approx(expected, rel=1e-5)
    assert records[0]["retention_loss"] > 0
    assert records[1]["lambda"] == pytest.approx(
        min(max(records[0]["lambda"] + 0.5 * (records[1]["retention_loss"] - records[1]["epsilon"]), 0), 10))
