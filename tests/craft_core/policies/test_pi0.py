"""Keystone tests of the pi0 adapter on a tiny real PI0Policy (pi05 reuses them, see test_adapters_pi05).

The reference for every hidden state is lerobot's own code: forward-pre-hooks on the PaliGemma
decoder layers' ``input_layernorm`` and a forward hook on the final norm capture the prefix stream
of ``policy.forward`` (training: prefix and action tokens run through ``compute_layer_complete``
together) and of ``policy.predict_action_chunk`` (inference: ``sample_actions``' prefix-only
pass). Image/language positions are counted from the tiny model's vision geometry, independently
of the adapter's masks.
"""

import copy
import functools
import io

import numpy as np
import pytest
import torch

from craft_core.policies import get_adapter
from craft_core.policies.camera_prompt import OBS_LANGUAGE_TOKENS as LANGUAGE_TOKENS
from craft_core.pooling import POOLING_STRATEGIES
from tests.fixtures.policies_pi0 import TINY_PI0_CAMERAS, TINY_PI0_FRAMES_PER_EPISODE

ALL_STRATEGIES = list(POOLING_STRATEGIES)


def load_tiny(folder):
    """Policy (eval mode), preprocessor and tiny spec of a tiny folder, loaded through craft's policy_io."""
    from craft_core.policy_io import load_policy, make_processors, policy_loading_context

    # The processors load the PaliGemma tokenizer by hub name: inside the tiny context it is local.
    with policy_loading_context(folder) as spec:
        policy = load_policy(folder)
        preprocessor, _ = make_processors(policy, pretrained_path=folder)
    return policy, preprocessor, spec


@functools.lru_cache(maxsize=4)
def _frames(repo_id: str, root: str, chunk_size: int):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    fps = LeRobotDatasetMetadata(repo_id, root=root).fps
    return LeRobotDataset(
        repo_id, root=root, delta_timestamps={"action": [i / fps for i in range(chunk_size)]}, video_backend="pyav"
    )


def raw_batch(policy, dataset, indices):
    """Collated dataset frames with the action chunk the policy trains on (before preprocessing)."""
    from torch.utils.data import default_collate

    frames = _frames(dataset.repo_id, str(dataset.root), policy.config.chunk_size)
    return default_collate([frames[i] for i in indices])


def backbone_hidden_states(policy, run) -> list[torch.Tensor]:
    """hidden_states[0..depth] of the prefix stream, captured while lerobot's own ``run()`` executes.

    The input of each PaliGemma decoder layer's ``input_layernorm`` is the hidden state entering
    that block; the final norm's output is the last entry. Only the first call is kept: in
    ``predict_action_chunk`` that is the prefix pass (the denoising steps run the expert only).
    """
    language_model = policy.model.paligemma_with_expert.paligemma.model.language_model
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(language_model.layers):
        handles.append(
            layer.input_layernorm.register_forward_pre_hook(
                lambda module, args, i=i: captured.setdefault(i, args[0].detach().clone())
            )
        )
    depth = len(language_model.layers)
    handles.append(
        language_model.norm.register_forward_hook(
            lambda module, args, output: captured.setdefault(depth, output[0].detach().clone())
        )
    )
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(captured) == list(range(depth + 1)), "hooks did not see every block of the prefix pass"
    return [captured[i] for i in range(depth + 1)]


def image_tokens_per_camera(spec) -> int:
    sizes = spec["sizes"]
    return (sizes["image_size"] // sizes["vision_patch_size"]) ** 2


def hand_pool(hidden: torch.Tensor, n_image_positions: int, lang_masks: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, 4, D] in ALL_STRATEGIES order, with explicit per-sample loops."""
    pooled = []
    for b in range(hidden.shape[0]):
        n_valid = int(lang_masks[b].sum())
        assert bool(lang_masks[b, :n_valid].all()) and not bool(lang_masks[b, n_valid:].any()), "not right-padded"
        image = hidden[b, :n_image_positions]
        text = hidden[b, n_image_positions : n_image_positions + n_valid]
        pooled.append(
            torch.stack(
                [image.mean(0), text[-1], text.mean(0), torch.cat([image, text]).mean(0)],
            )
        )
    return torch.stack(pooled)


def stored_as_batch(policy, batch, inputs):
    """``batch`` with each camera replaced by its stored (uint8, model-resolution) image as [0, 1] floats."""
    rebuilt = dict(batch)
    for i, key in enumerate(policy.config.image_features):
        rebuilt[key] = inputs["images"][:, i].to(torch.float32) / 255.0
    return rebuilt


def anchor_inputs_before_and_after_a_state_shift(loaded, dataset):
    """(adapter, inputs of one frame, inputs of the same frame with its state moved by 3)."""
    policy, preprocessor, _, _ = loaded
    adapter = get_adapter(policy)
    frames = raw_batch(policy, dataset, [0])
    shifted = dict(frames, **{"observation.state": frames["observation.state"] + 3.0})
    return adapter, adapter.anchor_inputs(preprocessor(frames)), adapter.anchor_inputs(preprocessor(shifted))


class PI0FamilyAdapterChecks:
    """Keystone checks shared by pi0 and pi05 (subclasses set ``policy_type``)."""

    policy_type: str

    @pytest.fixture(scope="class")
    @classmethod
    def loaded(cls, request, tiny_pi0_dataset):
        torch.set_num_threads(1)
        folder = request.getfixturevalue(f"tiny_{cls.policy_type}")
        policy, preprocessor, spec = load_tiny(folder)
        # One frame of each episode: the two prompts differ in length.
        batch = preprocessor(raw_batch(policy, tiny_pi0_dataset, [1, TINY_PI0_FRAMES_PER_EPISODE + 2]))
        return policy, preprocessor, spec, batch

    def test_copy_of_teacher_matches_and_equals_hand_pooled_policy_forward(self, loaded):
        policy, _, spec, batch = loaded
        adapter = get_adapter(policy)
        assert adapter.policy_type == self.policy_type
        inputs = adapter.anchor_inputs(batch)
        layers = list(range(adapter.depth + 1))

        with torch.no_grad():
            teacher = adapter.pooled(inputs, layers, ALL_STRATEGIES)
            student = get_adapter(copy.deepcopy(policy)).pooled(inputs, layers, ALL_STRATEGIES)
        assert teacher.shape == (2, adapter.depth + 1, len(ALL_STRATEGIES), adapter.hidden_size)
        assert teacher.dtype == torch.float32
        assert (student - teacher).abs().max().item() <= 1e-6

        # lerobot's training forward (prefix and action tokens together) and its inference path
        # (sample_actions' prefix-only pass) on the stored inputs.
        stored = stored_as_batch(policy, batch, inputs)
        n_image_positions = len(TINY_PI0_CAMERAS) * image_tokens_per_camera(spec)
        for run in (lambda: policy.forward(stored), lambda: policy.predict_action_chunk(stored)):
            reference = backbone_hidden_states(policy, run)
            for layer in layers:
                expected = hand_pool(reference[layer], n_image_positions, inputs["lang_masks"])
                torch.testing.assert_close(teacher[:, layer], expected, rtol=0, atol=1e-6)
        # Layers are distinct blocks: the last two hidden states differ.
        assert (teacher[:, -1] - teacher[:, -2]).abs().max() > 1e-3

    def test_negative_layers_resolve_against_backbone_depth(self, loaded):
        policy, _, _, batch = loaded
        adapter = get_adapter(policy)
        inputs = adapter.anchor_inputs(batch)
        with torch.no_grad():
            negative = adapter.prefix_hidden_states(inputs, [-2, -1]).hidden
            absolute = adapter.prefix_hidden_states(inputs, [adapter.depth - 1, adapter.depth]).hidden
        assert torch.equal(negative, absolute)
        with pytest.raises(ValueError, match="outside the backbone's hidden states"):
            adapter.resolve_layers([adapter.depth + 1])

    def test_one_optimiser_step_on_task_data_moves_the_student(self, loaded):
        policy, _, _, batch = loaded
        adapter = get_adapter(policy)
        inputs = adapter.anchor_inputs(batch)
        with torch.no_grad():
            teacher = adapter.pooled(inputs, [-2, -1], ALL_STRATEGIES)

        student = copy.deepcopy(policy).train().requires_grad_(True)
        optimiser = torch.optim.AdamW(student.parameters(), lr=1e-3)
        loss, _ = student.forward(batch)
        loss.backward()
        optimiser.step()
        student.eval()
        with torch.no_grad():
            moved = get_adapter(student).pooled(inputs, [-2, -1], ALL_STRATEGIES)
        assert torch.isfinite(loss)
        assert (moved - teacher).abs().max().item() > 0

    def test_image_mask_covers_both_cameras_and_only_real_ones(self, loaded, tiny_pi0_dataset):
        policy, preprocessor, spec, batch = loaded
        adapter = get_adapter(policy)
        per_camera = image_tokens_per_camera(spec)
        n_cameras = len(TINY_PI0_CAMERAS)
        assert len(policy.config.image_features) == n_cameras

        with torch.no_grad():
            prefix = adapter.prefix_hidden_states(adapter.anchor_inputs(batch), [-1])
        expected_images = torch.zeros_like(prefix.image_mask)
        expected_images[:, : n_cameras * per_camera] = True
        assert torch.equal(prefix.image_mask, expected_images)
        assert not (prefix.image_mask & prefix.text_mask).any()
        assert prefix.hidden.shape[2] == n_cameras * per_camera + policy.config.tokenizer_max_length

        # A camera missing from the batch becomes lerobot's empty-camera padding: not an image position.
        one_camera = raw_batch(policy, tiny_pi0_dataset, [0])
        del one_camera["observation.images.wrist"]
        inputs = adapter.anchor_inputs(preprocessor(one_camera))
        assert inputs["image_masks"].tolist() == [[True, False]]
        assert int(inputs["images"][0, 1].max()) == 0  # -1 padding, stored as 0
        with torch.no_grad():
            prefix = adapter.prefix_hidden_states(inputs, [-1])
        assert prefix.image_mask[0].nonzero().flatten().tolist() == list(range(per_camera))

    def test_text_token_last_hits_each_prompts_last_token(self, loaded):
        policy, _, spec, batch = loaded
        adapter = get_adapter(policy)
        inputs = adapter.anchor_inputs(batch)
        lengths = inputs["lang_masks"].sum(dim=1).tolist()
        assert lengths[0] != lengths[1], "the two prompts should tokenize to different lengths"
        assert max(lengths) < policy.config.tokenizer_max_length, "prompts are truncated: no padding to skip"

        with torch.no_grad():
            prefix = adapter.prefix_hidden_states(inputs, [-2, -1])
            pooled = adapter.pooled(inputs, [-2, -1], ["text_token_last"])
        n_image_positions = len(TINY_PI0_CAMERAS) * image_tokens_per_camera(spec)
        for b, length in enumerate(lengths):
            last = n_image_positions + length - 1
            assert prefix.text_mask[b].nonzero().max().item() == last
            assert torch.equal(pooled[b, :, 0], prefix.hidden[b, :, last].float())
            assert not torch.equal(pooled[b, :, 0], prefix.hidden[b, :, last + 1].float())

    def test_stored_inputs_round_trip_through_numpy(self, loaded, tiny_pi0_dataset):
        policy, _, _, batch = loaded
        adapter = get_adapter(policy)
        inputs = adapter.anchor_inputs(batch)
        spec = adapter.input_spec()
        assert sorted(inputs) == sorted(spec)
        for name, array_spec in spec.items():
            assert tuple(inputs[name].shape) == (2, *array_spec.shape), name
            assert np.dtype(str(inputs[name].dtype).removeprefix("torch.")) == np.dtype(array_spec.dtype), name

        buffer = io.BytesIO()
        np.savez(buffer, **{name: tensor.numpy() for name, tensor in inputs.items()})
        buffer.seek(0)
        with np.load(buffer) as stored:
            rebuilt = {name: torch.from_numpy(stored[name]) for name in stored.files}

        with torch.no_grad():
            original = adapter.prefix_hidden_states(inputs, [0, -2, -1])
            again = adapter.prefix_hidden_states(rebuilt, [0, -2, -1])
        assert torch.equal(original.hidden, again.hidden)
        assert torch.equal(original.image_mask, again.image_mask)
        assert torch.equal(original.text_mask, again.text_mask)

        # The camera recorded at model resolution is stored losslessly; the other is the policy's
        # own resize-with-pad, within one uint8 step.
        frames = raw_batch(policy, tiny_pi0_dataset, [1, TINY_PI0_FRAMES_PER_EPISODE + 2])
        top = (frames["observation.images.top"] * 255).round().to(torch.uint8)
        assert torch.equal(inputs["images"][:, 0], top)
        policy_images, _ = policy._preprocess_images(batch)
        wrist_model_range = inputs["images"][:, 1].float() / 255 * 2 - 1
        assert (wrist_model_range - policy_images[1]).abs().max().item() <= 1 / 255 + 1e-6

    def test_bad_inputs_are_rejected_with_the_field_named(self, loaded):
        policy, _, _, batch = loaded
        adapter = get_adapter(policy)
        with pytest.raises(KeyError, match=LANGUAGE_TOKENS):
            adapter.anchor_inputs({k: v for k, v in batch.items() if k != LANGUAGE_TOKENS})
        inputs = adapter.anchor_inputs(batch)
        with pytest.raises(ValueError, match="'images'"):
            adapter.prefix_hidden_states({**inputs, "images": inputs["images"][..., :32]}, [-1])
        with pytest.raises(KeyError, match="lang_masks"):
            adapter.prefix_hidden_states({k: v for k, v in inputs.items() if k != "lang_masks"}, [-1])


class TestPI0Adapter(PI0FamilyAdapterChecks):
    policy_type = "pi0"

    def test_state_is_not_a_prefix_input(self, loaded, tiny_pi0_dataset):
        """pi0 feeds the state to the action expert (suffix): changing it leaves the prefix unchanged."""
        _, a, b = anchor_inputs_before_and_after_a_state_shift(loaded, tiny_pi0_dataset)
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_tiny_patches_act_only_inside_the_context(tiny_pi0):
    """Inside tiny_lerobot_models: tiny Gemma sizes and the local PaliGemma tokenizer; outside: lerobot as is."""
    from huggingface_hub import constants
    from lerobot.policies.pi0 import modeling_pi0
    from transformers import AutoTokenizer

    from craft_core.demo.tiny import read_tiny_spec, tiny_lerobot_models
    from craft_core.policies.pi0.tiny import PALIGEMMA_TOKENIZER_REPO, tiny_hub_cache_dir

    spec = read_tiny_spec(tiny_pi0)
    real_cache = constants.HF_HUB_CACHE
    with tiny_lerobot_models(spec):
        assert modeling_pi0.get_gemma_config("gemma_2b").width == spec["sizes"]["vlm_width"]
        assert modeling_pi0.get_gemma_config("gemma_300m").width == spec["sizes"]["expert_width"]
        assert constants.HF_HUB_CACHE == str(tiny_hub_cache_dir())
        tokenizer = AutoTokenizer.from_pretrained(PALIGEMMA_TOKENIZER_REPO)
        ids = tokenizer("push the red block\n").input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert len(tokenizer) <= spec["sizes"]["vocab_size"]
    assert modeling_pi0.get_gemma_config("gemma_2b").width == 2048
    assert constants.HF_HUB_CACHE == real_cache


def test_tiny_build_rejects_sizes_lerobot_cannot_run(tiny_pi0_dataset, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from craft_core.demo.tiny import build_tiny_policy

    meta = LeRobotDatasetMetadata(tiny_pi0_dataset.repo_id, root=tiny_pi0_dataset.root)
    with pytest.raises(ValueError, match="num_heads=4 but must be 8"):
        build_tiny_policy("pi0", tmp_path / "heads", ds_meta=meta, num_heads=4)
    with pytest.raises(ValueError, match="unknown tiny pi05 override 'colour'"):
        build_tiny_policy("pi05", tmp_path / "typo", ds_meta=meta, colour="red")
    assert not (tmp_path / "heads").exists() and not (tmp_path / "typo").exists()
