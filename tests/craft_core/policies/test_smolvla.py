"""smolvla adapter on a tiny real SmolVLAPolicy: stored prefix inputs, hidden states, masks, pooling.

The checks shared with pi0_fast live in ``tests.craft_core.policies.adapter_checks``.
"""

import copy

import pytest
import torch

from craft_core.policies import get_adapter
from tests.craft_core.policies import adapter_checks as checks
from tests.fixtures.policies import with_stored_images


@pytest.fixture(scope="module")
def setup(tiny_smolvla_two_cameras, policy_test_dataset):
    return checks.load_two_camera_setup(tiny_smolvla_two_cameras, policy_test_dataset)


def tokens_per_camera(spec) -> int:
    sizes = spec["sizes"]
    return (sizes["image_size"] // sizes["vision_patch_size"]) ** 2 // sizes["scale_factor"] ** 2


def text_model_hidden_states_of_own_forward(policy, batch) -> list[torch.Tensor]:
    """SmolVLM text-model hidden states (HF convention) during the policy's own training forward
    (prefix and action expert together, no cache: the other code path than the adapter's)."""
    text_model = policy.model.vlm_with_expert.get_vlm_model().text_model
    layer_norms = [layer.input_layernorm for layer in text_model.layers]
    return checks.hidden_states_of_own_forward(policy, batch, layer_norms, text_model.norm, norm_output=lambda out: out)


def test_input_spec_matches_anchor_inputs(setup):
    policy, adapter, batch, inputs, spec = setup
    checks.assert_inputs_match_input_spec(adapter, inputs)
    assert adapter.depth == spec["sizes"]["num_hidden_layers"] == 2
    assert adapter.hidden_size == spec["sizes"]["hidden_size"]
    # The stored state is the normalised, padded state the prefix embeds as its state token.
    torch.testing.assert_close(inputs["state"], policy.prepare_state(batch).cpu())


def test_copy_of_teacher_reproduces_pooled_states_and_they_match_the_policy_forward(setup):
    policy, adapter, batch, inputs, spec = setup
    teacher = checks.pooled_by_teacher_and_its_copy(policy, adapter, inputs)

    # The policy's own forward on the stored pixels; its language is padded to the batch's longest
    # prompt (the store pads to tokenizer_max_length): positions from the tiny sizes.
    states = text_model_hidden_states_of_own_forward(policy, with_stored_images(batch, inputs, policy.config.image_features))
    n_image = 2 * tokens_per_camera(spec)
    lang_masks = batch["observation.language.attention_mask"].cpu().bool()
    assert states[0].shape[1] == n_image + lang_masks.shape[1] + 1  # images, language, one state token
    checks.assert_pooled_equals_hand_pooled(teacher, adapter, states, n_image, lang_masks)


def test_one_optimizer_step_on_task_data_moves_the_pooled_states(setup):
    policy, _, batch, inputs, _ = setup
    checks.assert_one_optimizer_step_moves_the_pooled_states(policy, batch, inputs)


def test_pooled_states_are_differentiable_for_the_student(setup):
    policy, _, _, inputs, _ = setup
    student = copy.deepcopy(policy)
    student.requires_grad_(True)
    get_adapter(student).pooled(inputs, checks.LAYERS, checks.STRATEGIES).pow(2).mean().backward()
    text_model = student.model.vlm_with_expert.get_vlm_model().text_model
    assert text_model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_image_mask_covers_both_cameras_and_only_real_images(setup):
    _, adapter, _, inputs, spec = setup
    prefix = checks.image_mask_of_both_cameras_checked(adapter, inputs, tokens_per_camera(spec))
    # The state token (last position) is neither image nor language.
    assert not prefix.image_mask[:, -1].any() and not prefix.text_mask[:, -1].any()


def test_text_token_last_is_each_prompts_last_real_token(setup):
    policy, adapter, batch, inputs, _ = setup
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy.config.vlm_model_name)
    checks.assert_text_token_last_is_each_prompts_last_real_token(adapter, batch, inputs, tokenizer)


def test_stored_inputs_round_trip_through_numpy(setup):
    policy, adapter, batch, inputs, _ = setup
    checks.round_trip_through_numpy_checked(adapter, batch, inputs, policy.prepare_images)
