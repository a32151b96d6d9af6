"""pi0_fast adapter on a tiny real PI0FastPolicy: stored prefix inputs, hidden states, masks, pooling.

The checks shared with smolvla live in ``tests.craft_core.policies.adapter_checks``.
"""

import pytest
import torch

from craft_core.policies.base import TargetRequest
from tests.craft_core.policies import adapter_checks as checks
from tests.fixtures.policies import with_stored_images


@pytest.fixture(scope="module")
def setup(tiny_pi0_fast_two_cameras, policy_test_dataset):
    return checks.load_two_camera_setup(tiny_pi0_fast_two_cameras, policy_test_dataset)


def tokens_per_camera(spec) -> int:
    sizes = spec["sizes"]
    return (sizes["image_size"] // sizes["vision_patch_size"]) ** 2


def backbone_hidden_states_of_own_forward(policy, batch) -> list[torch.Tensor]:
    """Hidden states (HF convention) of the language model during the policy's own training forward."""
    language_model = policy.model.paligemma_with_expert.paligemma.model.language_model
    return checks.hidden_states_of_own_forward(
        policy, batch, language_model.layers, language_model.norm, norm_output=lambda out: out[0]
    )


def test_input_spec_matches_anchor_inputs(setup):
    policy, adapter, _, inputs, spec = setup
    checks.assert_inputs_match_input_spec(adapter, inputs)
    assert adapter.input_spec()["images"].shape == (2, 3, spec["sizes"]["image_size"], spec["sizes"]["image_size"])
    assert adapter.depth == spec["sizes"]["num_hidden_layers"] == 2
    assert adapter.hidden_size == spec["sizes"]["hidden_size"]


def test_copy_of_teacher_reproduces_pooled_states_and_they_match_the_policy_forward(setup):
    policy, adapter, batch, inputs, spec = setup
    teacher = checks.pooled_by_teacher_and_its_copy(policy, adapter, inputs)

    # Hand pooling of the backbone's hidden states in the policy's own training forward, fed the
    # stored pixels, at positions derived from the tiny sizes (2 cameras, then the prompt).
    states = backbone_hidden_states_of_own_forward(policy, with_stored_images(batch, inputs, policy.config.image_features))
    checks.assert_pooled_equals_hand_pooled(teacher, adapter, states, 2 * tokens_per_camera(spec), inputs["lang_masks"])


def test_one_optimizer_step_on_task_data_moves_the_pooled_states(setup):
    policy, _, batch, inputs, _ = setup
    checks.assert_one_optimizer_step_moves_the_pooled_states(policy, batch, inputs)


def test_image_mask_covers_both_cameras_and_only_real_images(setup):
    _, adapter, _, inputs, spec = setup
    prefix = checks.image_mask_of_both_cameras_checked(adapter, inputs, tokens_per_camera(spec))
    assert prefix.image_mask.shape == prefix.text_mask.shape == prefix.hidden.shape[:1] + prefix.hidden.shape[2:3]


def test_text_token_last_is_each_prompts_last_real_token(setup):
    policy, adapter, batch, inputs, _ = setup
    # The policy's text tokenizer, loaded as lerobot's TokenizerProcessorStep loads it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy.config.text_tokenizer_name)
    checks.assert_text_token_last_is_each_prompts_last_real_token(adapter, batch, inputs, tokenizer)


def test_stored_inputs_round_trip_through_numpy(setup):
    policy, adapter, batch, inputs, _ = setup
    rebuilt = checks.round_trip_through_numpy_checked(adapter, batch, inputs, policy._preprocess_images)
    assert torch.equal(rebuilt["lang_tokens"].long(), batch["observation.language.tokens"].cpu())


def hard_label_loss(adapter, inputs, tokens, mask):
    request = TargetRequest(targets=("action_output",), top_k=0)
    stored = {"action_output": {"tokens": tokens, "token_mask": mask}}
    return adapter.retention_losses(inputs, stored, request)["action_output"]


def test_hard_label_loss_is_the_policys_own_fast_loss(setup):
    """action_output with top_k 0 on the dataset's own FAST tokens = the policy's training loss."""
    policy, adapter, batch, inputs, _ = setup
    tokens, mask = batch["action.tokens"].cpu(), batch["action.token_mask"].cpu().bool()
    with torch.no_grad():
        own, _ = policy.forward(with_stored_images(batch, inputs, policy.config.image_features))
        ours = hard_label_loss(adapter, inputs, tokens, mask)
    torch.testing.assert_close(ours, own, atol=1e-6, rtol=1e-6)


def test_layers_outside_the_backbone_are_rejected(setup):
    _, adapter, _, inputs, _ = setup
    with pytest.raises(ValueError, match="outside the backbone"):
        adapter.prefix_hidden_states(inputs, [adapter.depth + 1])


def test_teacher_greedy_tokens_cost_the_teacher_less_than_other_tokens(setup):
    policy, adapter, _, inputs, _ = setup
    tokens, mask = adapter.greedy_fast_tokens(inputs)
    spec, _ = adapter.target_spec("action_output", TargetRequest(targets=("action_output",), top_k=0))
    assert tuple(tokens.shape[1:]) == spec["tokens"].shape and tuple(mask.shape[1:]) == spec["token_mask"].shape
    assert mask[:, :2].all()  # <bos> and at least one generated token
    # Greedy tokens are the teacher's most likely ones: shifting them costs the teacher more.
    vocab = policy.model.paligemma_with_expert.paligemma.config.text_config.vocab_size
    other = tokens.clone()
    other[:, 1:] = (other[:, 1:] + 1) % vocab
    with torch.no_grad():
        own = hard_label_loss(adapter, inputs, tokens, mask)
        worse = hard_label_loss(adapter, inputs, other, mask)
    assert own < worse
