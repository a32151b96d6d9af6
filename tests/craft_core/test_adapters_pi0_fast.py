"""pi0_fast adapter on a tiny real PI0FastPolicy: stored prefix inputs, hidden states, masks, pooling."""

import copy
import json

import numpy as np
import pytest
import torch

from craft_core.adapters import get_adapter
from craft_core.policy_io import load_policy, make_processors
from tests.fixtures.policies import policy_test_batch, with_stored_images

LAYERS = [-2, -1]
STRATEGIES = ["vision_token_mean", "text_token_last", "text_token_mean", "prefix_mean"]


@pytest.fixture(scope="module")
def setup(tiny_pi0_fast_two_cameras, policy_test_dataset):
    torch.manual_seed(0)
    policy = load_policy(tiny_pi0_fast_two_cameras, ds_meta=policy_test_dataset[2])
    preprocessor, _ = make_processors(policy, pretrained_path=tiny_pi0_fast_two_cameras)
    batch = preprocessor(policy_test_batch(policy_test_dataset, policy))
    adapter = get_adapter(policy)
    spec = json.loads((tiny_pi0_fast_two_cameras / "craft_tiny.json").read_text())
    return policy, adapter, batch, adapter.anchor_inputs(batch), spec


def tokens_per_camera(spec) -> int:
    sizes = spec["sizes"]
    return (sizes["image_size"] // sizes["vision_patch_size"]) ** 2


def backbone_hidden_states_of_own_forward(policy, batch) -> list[torch.Tensor]:
    """Hidden states (HF convention) of the language model during the policy's own training forward."""
    language_model = policy.model.paligemma_with_expert.paligemma.model.language_model
    captured = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
        for i, layer in enumerate(language_model.layers)
    ]
    handles.append(language_model.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("norm", out[0])))
    try:
        with torch.no_grad():
            policy.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(language_model.layers))] + [captured["norm"]]


def test_input_spec_matches_anchor_inputs(setup):
    policy, adapter, _, inputs, spec = setup
    assert set(inputs) == set(adapter.input_spec())
    for name, array_spec in adapter.input_spec().items():
        assert tuple(inputs[name].shape[1:]) == array_spec.shape, name
        assert inputs[name].numpy().dtype == np.dtype(array_spec.dtype), name
    assert adapter.input_spec()["images"].shape == (2, 3, spec["sizes"]["image_size"], spec["sizes"]["image_size"])
    assert adapter.depth == spec["sizes"]["num_hidden_layers"] == 2
    assert adapter.hidden_size == spec["sizes"]["hidden_size"]


def test_copy_of_teacher_reproduces_pooled_states_and_they_match_the_policy_forward(setup):
    policy, adapter, batch, inputs, spec = setup
    with torch.no_grad():
        teacher = adapter.pooled(inputs, LAYERS, STRATEGIES)
        student = get_adapter(copy.deepcopy(policy)).pooled(inputs, LAYERS, STRATEGIES)
    assert teacher.shape == (2, 2, len(STRATEGIES), adapter.hidden_size)
    assert (student - teacher).abs().max().item() <= 1e-6

    # Hand pooling of the backbone's hidden states in the policy's own training forward, fed the
    # stored pixels, at positions derived from the tiny sizes (2 cameras, then the prompt).
    states = backbone_hidden_states_of_own_forward(policy, with_stored_images(batch, inputs, policy.config.image_features))
    n_image = 2 * tokens_per_camera(spec)
    lang_masks = inputs["lang_masks"]
    for layer_slot, layer in enumerate(adapter.resolve_layers(LAYERS)):
        hidden = states[layer]
        for b in range(2):
            n_text = int(lang_masks[b].sum())
            text = hidden[b, n_image : n_image + lang_masks.shape[1]][lang_masks[b]]
            expected = {
                "vision_token_mean": hidden[b, :n_image].mean(0),
                "text_token_last": hidden[b, n_image + n_text - 1],
                "text_token_mean": text.mean(0),
                "prefix_mean": torch.cat([hidden[b, :n_image], text]).mean(0),
            }
            for v, strategy in enumerate(STRATEGIES):
                torch.testing.assert_close(teacher[b, layer_slot, v], expected[strategy], atol=1e-5, rtol=1e-5)


def test_one_optimizer_step_on_task_data_moves_the_pooled_states(setup):
    policy, _, batch, inputs, _ = setup
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


def test_image_mask_covers_both_cameras_and_only_real_images(setup):
    _, adapter, _, inputs, spec = setup
    per_camera = tokens_per_camera(spec)
    with torch.no_grad():
        prefix = adapter.prefix_hidden_states(inputs, [-1])
    assert prefix.image_mask.shape == prefix.text_mask.shape == prefix.hidden.shape[:1] + prefix.hidden.shape[2:3]
    assert prefix.image_mask[:, : 2 * per_camera].all()
    assert not prefix.image_mask[:, 2 * per_camera :].any()
    assert not (prefix.image_mask & prefix.text_mask).any()

    second_camera_missing = dict(inputs, image_masks=inputs["image_masks"].clone())
    second_camera_missing["image_masks"][:, 1] = False
    with torch.no_grad():
        masked = adapter.prefix_hidden_states(second_camera_missing, [-1])
    assert masked.image_mask[:, :per_camera].all()
    assert not masked.image_mask[:, per_camera:].any()


def test_text_token_last_is_each_prompts_last_real_token(setup):
    policy, adapter, batch, inputs, _ = setup
    lengths = inputs["lang_masks"].sum(1)
    assert lengths[0] != lengths[1], "the fixture must hold prompts of different lengths"
    # Independent count: the policy's text tokenizer, loaded as lerobot's TokenizerProcessorStep
    # loads it, on the prompts the preprocessor built.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy.config.text_tokenizer_name)
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


def test_stored_inputs_round_trip_through_numpy(setup):
    policy, adapter, batch, inputs, _ = setup
    arrays = {name: tensor.numpy().copy() for name, tensor in inputs.items()}
    for name, array_spec in adapter.input_spec().items():
        assert arrays[name].dtype == np.dtype(array_spec.dtype) and arrays[name].shape[1:] == array_spec.shape
    rebuilt = {name: torch.from_numpy(array) for name, array in arrays.items()}
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.pooled(rebuilt, LAYERS, STRATEGIES), adapter.pooled(inputs, LAYERS, STRATEGIES), atol=0, rtol=0
        )
        # The stored images are the policy's own model-resolution images, up to uint8 rounding.
        images, _ = policy._preprocess_images(batch)
    for camera, image in enumerate(images):
        unit = (image.cpu() + 1.0) / 2.0
        assert (arrays["images"][:, camera] / 255.0 - unit.numpy()).max() <= 0.5 / 255 + 1e-6
    assert torch.equal(rebuilt["lang_tokens"].long(), batch["observation.language.tokens"].cpu())


def test_token_level_loss_is_the_policys_own_fast_loss(setup):
    policy, adapter, batch, inputs, _ = setup
    labels = adapter.anchor_labels(batch)
    assert set(labels) == set(adapter.label_spec())
    with torch.no_grad():
        own, _ = policy.forward(with_stored_images(batch, inputs, policy.config.image_features))
        ours = adapter.token_level_loss(inputs, labels)
    torch.testing.assert_close(ours, own, atol=1e-6, rtol=1e-6)


def test_layers_outside_the_backbone_are_rejected(setup):
    _, adapter, _, inputs, _ = setup
    with pytest.raises(ValueError, match="outside the backbone"):
        adapter.prefix_hidden_states(inputs, [adapter.depth + 1])


def test_teacher_greedy_labels_minimise_the_teachers_own_token_loss(setup):
    policy, adapter, _, inputs, _ = setup
    labels = adapter.teacher_action_token_labels(inputs)
    for name, array_spec in adapter.label_spec().items():
        assert tuple(labels[name].shape[1:]) == array_spec.shape
    mask = labels["action_token_mask"]
    assert mask[:, :2].all()  # <bos> and at least one generated token
    # Greedy tokens are the argmax of the teacher-forced logits at every position: any other
    # tokens under the same mask cost the teacher more.
    other = dict(labels, action_tokens=labels["action_tokens"].clone())
    vocab = policy.model.paligemma_with_expert.paligemma.config.text_config.vocab_size
    other["action_tokens"][:, 1:] = (other["action_tokens"][:, 1:] + 1) % vocab
    with torch.no_grad():
        own = adapter.token_level_loss(inputs, labels)
        worse = adapter.token_level_loss(inputs, other)
    assert own < worse
