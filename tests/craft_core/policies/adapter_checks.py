"""Keystone checks shared by the pi0_fast and smolvla adapter tests (two-camera tiny policies).

Each policy's test file keeps its own tests and calls these with what differs per policy: the
backbone modules hooked for the reference hidden states, the tokenizer, the image preparation.
"""

import copy
import json
from typing import Callable, Sequence

import numpy as np
import torch

from craft_core.policies import get_adapter
from craft_core.policy_io import load_policy, make_processors
from tests.fixtures.policies import policy_test_batch

LAYERS = [-2, -1]
STRATEGIES = ["vision_token_mean", "text_token_last", "text_token_mean", "prefix_mean"]


def load_two_camera_setup(folder, policy_test_dataset):
    """(policy, adapter, preprocessed batch of two prompts, its anchor inputs, craft_tiny.json)."""
    torch.manual_seed(0)
    policy = load_policy(folder, ds_meta=policy_test_dataset[2])
    preprocessor, _ = make_processors(policy, pretrained_path=folder)
    batch = preprocessor(policy_test_batch(policy_test_dataset, policy))
    adapter = get_adapter(policy)
    spec = json.loads((folder / "craft_tiny.json").read_text())
    return policy, adapter, batch, adapter.anchor_inputs(batch), spec


def hidden_states_of_own_forward(
    policy, batch, block_inputs: Sequence[torch.nn.Module], final_norm: torch.nn.Module, norm_output: Callable
) -> list[torch.Tensor]:
    """Hidden states (HF convention) during the policy's own training forward.

    Entry i is the input of ``block_inputs[i]`` (a decoder layer, or its ``input_layernorm``),
    the last entry ``norm_output`` of the final norm's output; the first call of each is kept.
    """
    captured = {}

    # Hooks must return None: a returned value would replace the module's input or output.
    def keep_first(key, value) -> None:
        captured.setdefault(key, value)

    handles = [
        module.register_forward_pre_hook(lambda m, args, i=i: keep_first(i, args[0]))
        for i, module in enumerate(block_inputs)
    ]
    handles.append(final_norm.register_forward_hook(lambda m, a, out: keep_first("norm", norm_output(out))))
    try:
        with torch.no_grad():
            policy.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(block_inputs))] + [captured["norm"]]


def pooled_by_teacher_and_its_copy(policy, adapter, inputs) -> torch.Tensor:
    """The teacher's pooled states, checked to equal those of a deep copy of the policy."""
    with torch.no_grad():
        teacher = adapter.pooled(inputs, LAYERS, STRATEGIES)
        student = get_adapter(copy.deepcopy(policy)).pooled(inputs, LAYERS, STRATEGIES)
    assert teacher.shape == (2, 2, len(STRATEGIES), adapter.hidden_size)
    assert (student - teacher).abs().max().item() <= 1e-6
    return teacher


def assert_pooled_equals_hand_pooled(teacher, adapter, states, n_image: int, lang_masks: torch.Tensor) -> None:
    """Pool ``states`` by hand (images first, then ``lang_masks``' positions) and compare with ``teacher``."""
    n_language = lang_masks.shape[1]
    for layer_slot, layer in enumerate(adapter.resolve_layers(LAYERS)):
        hidden = states[layer]
        for b in range(2):
            n_text = int(lang_masks[b].sum())
            text = hidden[b, n_image : n_image + n_language][lang_masks[b]]
            expected = {
                "vision_token_mean": hidden[b, :n_image].mean(0),
                "text_token_last": hidden[b, n_image + n_text - 1],
                "text_token_mean": text.mean(0),
                "prefix_mean": torch.cat([hidden[b, :n_image], text]).mean(0),
            }
            for v, strategy in enumerate(STRATEGIES):
                torch.testing.assert_close(teacher[b, layer_slot, v], expected[strategy], atol=1e-5, rtol=1e-5)


def assert_one_optimizer_step_moves_the_pooled_states(policy, batch, inputs) -> None:
    student = copy.deepcopy(policy)
    student.train()
    student.requires_grad_(True)
    with torch.no_grad():
        before = get_adapter(student).pooled(inputs, LAYERS, STRATEGIES)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss, _ = student.forward(batch)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = get_adapter(student).pooled(inputs, LAYERS, STRATEGIES)
    moved = (after - before).pow(2).mean(dim=(0, 3))  # [L, V]
    assert torch.all(moved > 0), moved


def image_mask_of_both_cameras_checked(adapter, inputs, per_camera: int):
    """The prefix of ``inputs``, its image mask checked to cover both cameras, then only the first
    once the second camera is masked out. Returned for the caller's policy-specific checks."""
    with torch.no_grad():
        prefix = adapter.prefix_hidden_states(inputs, [-1])
    assert prefix.image_mask[:, : 2 * per_camera].all()
    assert not prefix.image_mask[:, 2 * per_camera :].any()
    assert not (prefix.image_mask & prefix.text_mask).any()

    second_camera_missing = dict(inputs, image_masks=inputs["image_masks"].clone())
    second_camera_missing["image_masks"][:, 1] = False
    with torch.no_grad():
        masked = adapter.prefix_hidden_states(second_camera_missing, [-1])
    assert masked.image_mask[:, :per_camera].all()
    assert not masked.image_mask[:, per_camera:].any()
    return prefix


def assert_text_token_last_is_each_prompts_last_real_token(adapter, batch, inputs, tokenizer) -> None:
    """Against an independent count: ``tokenizer`` (the policy's own) on the prompts the preprocessor built."""
    lengths = inputs["lang_masks"].sum(1)
    assert lengths[0] != lengths[1], "the fixture must hold prompts of different lengths"
    expected_lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in batch["task"]]
    with torch.no_grad():
        prefix = adapter.prefix_hidden_states(inputs, LAYERS)
        pooled = adapter.pooled(inputs, LAYERS, ["text_token_last"])
    for b in range(2):
        positions = prefix.text_mask[b].nonzero().flatten()
        assert len(positions) == expected_lengths[b] == int(lengths[b])
        last = int(positions[-1])
        assert inputs["lang_tokens"][b, last - int(prefix.image_mask[b].sum())] != tokenizer.pad_token_id
        torch.testing.assert_close(pooled[b, :, 0], prefix.hidden[b, :, last].float(), atol=0, rtol=0)


def round_trip_through_numpy_checked(adapter, batch, inputs, prepare_images: Callable) -> dict[str, torch.Tensor]:
    """Inputs rebuilt from numpy copies give the same pooled states, and the stored images are
    ``prepare_images(batch)`` (the policy's own model-resolution images) up to uint8 rounding."""
    arrays = {name: tensor.numpy().copy() for name, tensor in inputs.items()}
    for name, array_spec in adapter.input_spec().items():
        assert arrays[name].dtype == np.dtype(array_spec.dtype) and arrays[name].shape[1:] == array_spec.shape
    rebuilt = {name: torch.from_numpy(array) for name, array in arrays.items()}
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.pooled(rebuilt, LAYERS, STRATEGIES), adapter.pooled(inputs, LAYERS, STRATEGIES), atol=0, rtol=0
        )
        images, _ = prepare_images(batch)
    for camera, image in enumerate(images):
        unit = (image.cpu() + 1.0) / 2.0
        assert (arrays["images"][:, camera] / 255.0 - unit.numpy()).max() <= 0.5 / 255 + 1e-6
    return rebuilt


def assert_inputs_match_input_spec(adapter, inputs) -> None:
    assert set(inputs) == set(adapter.input_spec())
    for name, array_spec in adapter.input_spec().items():
        assert tuple(inputs[name].shape[1:]) == array_spec.shape, name
        assert inputs[name].numpy().dtype == np.dtype(array_spec.dtype), name
