"""lerobot's everyday training options in craft, on tiny real policies (CPU, offline).

- ``train.policy``: fields of the policy type's lerobot config, refused by name when unknown,
  of the wrong type or owned by craft; the cache stage refuses prefix anchoring with the VLM
  frozen (smolvla's ``train_expert_only``), train refuses it when no VLM parameter trains (LoRA on
  the action expert only).
- ``train.grad_accum_steps``: N micro-batches of b give the same optimizer step as one batch of
  N·b, for the baseline and for CRaFT (retention gradient and λ once per optimizer step).
- ``train.peft``: lerobot's LoRA wrapping; only adapter parameters train, the checkpoint is what
  lerobot saves for PEFT runs and loads back (merged for evaluation, as a PeftModel to resume).
- ``rename_map`` and ``image_transforms`` reach lerobot's processor and dataset.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

from craft_core.config import DatasetSource, PeftSettings, PolicySource, load_preset
from craft_core.policy_options import AnchoringError, PolicyOptionError, validate_policy_options
from tests.craft_core.test_train import make_anchor_store, retained_dataset, task_dataset, train_config


# ------------------------------------------------------------------------------- train.policy


def test_policy_options_are_checked_against_the_lerobot_config_class():
    assert validate_policy_options("smolvla", {"train_expert_only": False, "chunk_size": 10}) == {
        "train_expert_only": False, "chunk_size": 10}
    with pytest.raises(PolicyOptionError, match=r"train\.policy\.chunk_sise: .*has no field 'chunk_sise'"):
        validate_policy_options("smolvla", {"chunk_sise": 10})
    with pytest.raises(PolicyOptionError, match=r"train\.policy\.chunk_size: 'ten' is not a valid int"):
        validate_policy_options("pi0_fast", {"chunk_size": "ten"})
    with pytest.raises(PolicyOptionError, match=r"train\.policy\.train_expert_only: 1 is not a valid bool"):
        validate_policy_options("smolvla", {"train_expert_only": 1})
    with pytest.raises(PolicyOptionError, match=r"train\.policy\.device: not settable here \(set train\.device"):
        validate_policy_options("pi0_fast", {"device": "cuda"})
    # pi0_fast has no train_expert_only: a field of another type is unknown here
    with pytest.raises(PolicyOptionError, match="PI0FastConfig"):
        validate_policy_options("pi0_fast", {"train_expert_only": True})


def test_pipeline_config_refuses_a_bad_policy_option_before_any_stage():
    with pytest.raises(ValueError, match=r"train\.policy\.n_action_step: .*has no field"):
        load_preset("smoke", ["train.policy.n_action_step=2"])
    cfg = load_preset("smoke", ["train.policy.n_action_steps=2", "train.grad_accum_steps=2"])
    assert cfg.train.policy == {"n_action_steps": 2}


def test_image_transforms_are_lerobots_config():
    cfg = load_preset("smoke", ["train.image_transforms.enable=true", "train.image_transforms.max_num_transforms=1"])
    assert cfg.train.image_transforms["enable"] is True
    with pytest.raises(ValueError, match=r"train\.image_transforms\.max_transforms: not a field"):
        load_preset("smoke", ["train.image_transforms.max_transforms=1"])
    with pytest.raises(ValueError, match=r"train\.image_transforms\.tfs\.blur: Transform 'Blurr' is not valid"):
        load_preset("smoke", ['train.image_transforms.tfs={blur: {type: Blurr}}'])


def test_cache_refuses_prefix_anchoring_with_the_vlm_frozen(tiny_smolvla, pusht_datasets, tmp_path):
    from craft_core.config import CacheConfig
    from craft_core.extraction import extract_anchors

    repo_id, root = retained_dataset(pusht_datasets)
    cfg = CacheConfig(teacher=PolicySource(path=str(tiny_smolvla)), dataset=DatasetSource(repo_id=repo_id, root=str(root)),
                      n_anchors=4, dtype="float32", batch_size=4, device="cpu", targets=["prefix"])
    store = tmp_path / "anchors.zarr"
    with pytest.raises(AnchoringError, match=r"train_expert_only=true \(set by train\.policy\).*VLM is frozen.*zero by construction"):
        extract_anchors(cfg, str(store), policy_options={"train_expert_only": True})
    assert not store.exists()  # refused before anything was written
    # the action path still moves with the VLM frozen: anchoring it is allowed
    info = extract_anchors(cfg.model_copy(update={"targets": ["action_output"]}), str(store),
                           policy_options={"train_expert_only": True})
    assert info["n_anchors"] == 4


# ------------------------------------------------------------------------ gradient accumulation


class FixedNoise(torch.nn.Module):
    """The real smolvla policy, its flow-matching noise and time carried by each sample (so a sample's
    loss does not depend on which micro-batch drew it)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch):
        return self.policy.forward(batch, noise=batch["probe.noise"], time=batch["probe.time"])


def _split(batch: dict, n: int) -> list[dict]:
    size = batch["probe.time"].shape[0] // n
    return [{k: (v[i * size:(i + 1) * size] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
            for i in range(n)]


@pytest.mark.parametrize("with_retention", [False, True], ids=["baseline", "craft"])
def test_accumulating_n_micro_batches_is_one_step_on_their_union(with_retention, tiny_smolvla, pusht_datasets,
                                                                 tmp_path_factory):
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    from craft_core.config import RetentionConfig
    from craft_core.policies import get_adapter
    from craft_core.policy_io import load_policy, make_processors
    from craft_core.retention import open_retention
    from craft_core.train import _make_accelerator, update_policy

    torch.set_num_threads(1)
    repo_id, root = task_dataset(pusht_datasets)
    meta = LeRobotDatasetMetadata(repo_id, root=root)
    teacher = load_policy(tiny_smolvla, ds_meta=meta, trainable=True)
    preprocessor, _ = make_processors(teacher, pretrained_path=tiny_smolvla)
    dataset = LeRobotDataset(repo_id, root=root, delta_timestamps=resolve_delta_timestamps(teacher.config, meta),
                             video_backend="pyav")
    batch = preprocessor(torch.utils.data.default_collate([dataset[i] for i in (0, 5, 21, 26)]))
    # lerobot's loss divides by the valid (unpadded) action entries of the whole batch: with none padded, a
    # batch's loss is the mean of its equally sized micro-batches' losses, which accumulation reproduces.
    assert not batch["action_is_pad"].any()
    generator = torch.Generator().manual_seed(0)
    chunk = batch["action"].shape[:2]  # the model pads actions to max_action_dim; its noise is that shape
    batch["probe.noise"] = torch.randn(*chunk, teacher.config.max_action_dim, generator=generator)
    batch["probe.time"] = torch.rand(4, generator=generator) * 0.9 + 0.05
    store = None
    if with_retention:
        store = make_anchor_store(tiny_smolvla, *retained_dataset(pusht_datasets),
                                  tmp_path_factory.mktemp("accum") / "anchors.zarr", n_anchors=8)
    retention_cfg = RetentionConfig(every_k=1, anchor_batch_size=4, lambda_init=1.0, lambda_lr=5.0,
                                    eps_start=0.0, eps_end=0.0, conflict_threshold=1.0)  # always project

    # Start off the teacher (a copy of it has zero retention loss and gradient: nothing to merge).
    start = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in start.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    results = {}
    for n in (1, 2):
        student = copy.deepcopy(start)
        model = FixedNoise(student)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        accelerator = _make_accelerator(train_config(repo_id, root))
        retention = None
        if with_retention:
            retention = open_retention(retention_cfg, store, adapter=get_adapter(student),
                                       teacher=PolicySource(path=str(tiny_smolvla)), seed=0, total_steps=1)
        stats = update_policy(model, _split(batch, n), step=0, optimizer=optimizer, lr_scheduler=None,
                              accelerator=accelerator, params=params, grad_clip_norm=0.0, retention=retention)
        results[n] = (stats, {k: v.detach().clone() for k, v in student.named_parameters()},
                      retention.lambdas() if retention else None)

    (one, weights_one, lam_one), (acc, weights_acc, lam_acc) = results[1], results[2]
    assert one.good and acc.good
    assert acc.task_loss == pytest.approx(one.task_loss, rel=1e-5)
    moved = [k for k in weights_one if not torch.equal(weights_one[k], start.state_dict()[k])]
    assert len(moved) > 10  # the step did something
    for name in weights_one:
        torch.testing.assert_close(weights_acc[name], weights_one[name], rtol=1e-4, atol=1e-6, msg=name)
    if with_retention:
        assert acc.surgery.projected and one.surgery.projected
        assert acc.surgery.cosine == pytest.approx(one.surgery.cosine, abs=1e-4)
        assert acc.retention_losses == pytest.approx(one.retention_losses, rel=1e-5)
        assert lam_acc == pytest.approx(lam_one, rel=1e-6)  # one dual step per optimizer step
        assert lam_one["prefix"] != 1.0


# ----------------------------------------------------------------- LoRA, accumulation, transforms


def test_lora_run_trains_adapters_only_and_saves_a_lerobot_peft_checkpoint(tiny_smolvla, pusht_datasets, tmp_path):
    from safetensors.torch import load_file

    from craft_core.policy_io import load_policy, make_processors
    from craft_core.train import train

    store = make_anchor_store(tiny_smolvla, *retained_dataset(pusht_datasets), tmp_path / "anchors.zarr",
                              n_anchors=8, targets=["action_output"])
    cfg = train_config(*task_dataset(pusht_datasets), steps=2, save_every=2, grad_accum_steps=2,
                       peft=PeftSettings(rank=4, alpha=8), retention={"every_k": 1},
                       image_transforms={"enable": True, "max_num_transforms": 2})
    result = train(cfg, teacher=PolicySource(path=str(tiny_smolvla)), store_url=store, out_dir=tmp_path / "run")
    checkpoint = Path(result["checkpoint"])

    # lerobot's PEFT layout: adapters + the policy config that says use_peft
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert json.loads((checkpoint / "config.json").read_text())["use_peft"] is True
    adapter_cfg = json.loads((checkpoint / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == Path(tiny_smolvla).absolute()
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    assert all("lora_" in key for key in load_file(str(checkpoint / "adapter_model.safetensors")))

    # the retention buffer is adapter-sized: the plan counts only adapter parameters as trainable
    plan = result["memory_plan_bytes"]
    assert 0 < plan["trainable_params"] < plan["total_params"] / 20
    assert plan["retention_buffer"] == plan["gradients"] == plan["trainable_params"] * 4

    # one anchor batch per optimizer step (not per micro-batch)
    state = json.loads((checkpoint.parent / "training_state" / "craft_state.json").read_text())
    assert state["anchor_batches"] == 2
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["retention_step"] for m in metrics] == [True, True]

    # evaluation loads base + adapters merged: the teacher's weights plus the LoRA delta on targeted modules only
    merged = load_policy(checkpoint)
    teacher = load_policy(tiny_smolvla)
    teacher_weights = dict(teacher.named_parameters())
    changed = {k for k, v in merged.named_parameters() if not torch.equal(v, teacher_weights[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k or "_proj" in k or "time_mlp" in k) and "vlm." not in k
                           for k in changed), sorted(changed)
    make_processors(merged, pretrained_path=checkpoint)
    resumed = load_policy(checkpoint, trainable=True)
    assert type(resumed).__name__ == "PeftModel"
    assert sum(p.numel() for p in resumed.parameters() if p.requires_grad) == plan["trainable_params"]


def test_lora_on_the_action_expert_cannot_carry_prefix_anchoring(tiny_smolvla, pusht_datasets, tmp_path):
    from craft_core.train import train

    store = make_anchor_store(tiny_smolvla, *retained_dataset(pusht_datasets), tmp_path / "anchors.zarr",
                              n_anchors=8, targets=["prefix"])
    cfg = train_config(*task_dataset(pusht_datasets), steps=1, peft=PeftSettings(rank=4), retention={})
    with pytest.raises(AnchoringError, match="no trainable parameter .* in its VLM"):
        train(cfg, teacher=PolicySource(path=str(tiny_smolvla)), store_url=store, out_dir=tmp_path / "run")


def test_rename_map_reaches_lerobots_preprocessor(tiny_pi0_fast, pusht_datasets):
    from craft_core.policy_io import load_policy, make_processors

    policy = load_policy(tiny_pi0_fast)
    preprocessor, _ = make_processors(policy, pretrained_path=tiny_pi0_fast,
                                      rename_map={"observation.images.front": "observation.image"})
    step = next(s for s in preprocessor.steps if type(s).__name__ == "RenameObservationsProcessorStep")
    assert step.rename_map == {"observation.images.front": "observation.image"}


# ------------------------------------------------------------------------------ real presets


@pytest.mark.parametrize("name", ["pi0fast_libero", "pi0fast_libero_lora"])
def test_libero_presets_pass_what_can_be_checked_offline(name, tiny_pi0_fast):
    """The hub teacher cannot be read here: its options are checked against PI0FastConfig directly, the LoRA
    target regex against the module names of a real (tiny) pi0_fast, and the header states the memory needed."""
    import re

    from craft_core.config import PRESETS_DIR
    from craft_core.policy_io import load_policy

    cfg = load_preset(name)
    header = (PRESETS_DIR / f"{name}.yaml").read_text().split("\nname:")[0]
    assert re.search(r"= \d+(\.\d+)? GiB before activations", header) and "GiB" in header
    validate_policy_options("pi0_fast", cfg.train.policy)
    cameras = {"observation.images.image": "observation.images.base_0_rgb",
               "observation.images.image2": "observation.images.left_wrist_0_rgb"}
    assert cfg.cache.dataset.rename_map == cameras == cfg.train.dataset.rename_map
    assert cfg.cache.dataset.repo_id != cfg.train.dataset.repo_id  # fine-tuned on data the teacher does not know
    if cfg.train.peft is not None:
        policy = load_policy(tiny_pi0_fast)
        names = [n for n, m in policy.named_modules()
                 if isinstance(m, torch.nn.Linear) and re.fullmatch(cfg.train.peft.target_modules, n)]
        assert any("language_model.layers.0.self_attn.q_proj" in n for n in names)
        assert any(n.endswith("paligemma.lm_head") for n in names)
        assert not any("vision_tower" in n for n in names)


# ------------------------------------------------------------------------------ memory plan


def tensor_peak(policy, batch, precision):
    """Peak bytes of tensor storages alone during one training step (the plan's tracker, no RSS)."""
    from craft_core.memory_plan import _LiveTensorBytes

    existing = [*policy.parameters(), *policy.buffers(), *(v for v in batch.values() if isinstance(v, torch.Tensor))]
    with _LiveTensorBytes(existing) as tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, _ = policy(batch)
        loss.backward()
        del loss
    policy.zero_grad(set_to_none=True)
    return tracker.peak


def test_memory_plan_counts_what_training_holds(tiny_pi0_fast, pusht_datasets):
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    from craft_core.memory_plan import measure_step_peak, plan_memory
    from craft_core.policy_io import load_policy, make_processors
    from craft_core.train import wrap_with_peft

    torch.set_num_threads(1)
    repo_id, root = task_dataset(pusht_datasets)
    meta = LeRobotDatasetMetadata(repo_id, root=root)
    policy = load_policy(tiny_pi0_fast, ds_meta=meta, trainable=True)
    preprocessor, _ = make_processors(policy, pretrained_path=tiny_pi0_fast)
    dataset = LeRobotDataset(repo_id, root=root, delta_timestamps=resolve_delta_timestamps(policy.config, meta),
                             video_backend="pyav")
    batch = {n: preprocessor(torch.utils.data.default_collate([dataset[i] for i in range(n)])) for n in (2, 4)}

    plan = plan_memory(policy, batch_size=4, precision="no", retention=True, batch=batch[2])
    n_params = sum(p.numel() for p in policy.parameters())
    assert plan.weights == 4 * n_params + sum(b.numel() * b.element_size() for b in policy.buffers())
    assert plan.gradients == 4 * n_params and plan.optimizer == 2 * plan.gradients
    assert plan.retention_buffer == plan.gradients
    assert plan_memory(policy, batch_size=4, retention=False, batch=batch[2]).retention_buffer == 0
    assert plan.total == plan.weights + plan.gradients + plan.optimizer + plan.retention_buffer + plan.activations
    # a CUDA run planned from here (or from a meta-device model): AdamW's foreach step holds one more
    # trainable-sized intermediate, and nothing else changes
    on_cuda = plan_memory(policy, batch_size=4, retention=True, tokens_per_sample=8, device="cuda")
    on_cpu = plan_memory(policy, batch_size=4, retention=True, tokens_per_sample=8)
    assert on_cuda.optimizer - on_cpu.optimizer == plan.gradients
    assert on_cuda.total - on_cpu.total == plan.gradients
    # the line through the step's peak on 1 and 2 samples predicts the peak measured on 4
    direct = measure_step_peak(policy, batch[4])
    assert plan.activations == pytest.approx(direct, rel=0.15)
    assert plan_memory(policy, batch_size=8, retention=True, batch=batch[2]).activations > 1.5 * plan.activations
    # under autocast the probe runs under autocast too: the bf16 step holds fewer tensor bytes
    bf16_tensors, fp32_tensors = (tensor_peak(policy, batch[4], precision) for precision in ("bf16", "no"))
    assert bf16_tensors < fp32_tensors
    assert all(p.grad is None for p in policy.parameters())  # the probe leaves nothing behind

    # LoRA: the estimate before wrapping is exactly what lerobot's wrapping makes trainable
    peft = PeftSettings(rank=4, target_modules=["q_proj", "v_proj"])
    estimate = plan_memory(policy, batch_size=4, peft=peft, retention=True, batch=batch[2])
    wrapped = wrap_with_peft(policy, peft, PolicySource(path=str(tiny_pi0_fast)))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert estimate.trainable_params == trainable
    assert estimate.retention_buffer == estimate.gradients == 4 * trainable
    assert plan_memory(wrapped.get_base_model(), batch_size=4, peft=peft, retention=True,
                       batch=batch[2]).gradients == 4 * trainable
