"""Retention targets of every policy type on tiny real lerobot policies.

- Keystone per target: a student that is an exact copy of the teacher, fed the stored float32
  inputs and targets, has every target's loss <= 1e-6.
- Where the gradient goes: the prefix target has exactly zero gradient on the action path (the
  finding that motivates ``action_output``), the action_output target a non-zero one.
- The probes are the teacher's own: pi0_fast's greedy FAST tokens are what its decoder emits;
  the flow policies' stored states follow the Euler steps of the stored velocities and end at
  the action ``sample_actions`` returns for the same noise.
- One optimiser step on task data moves every target's loss off zero.
"""

import copy

import pytest
import torch

from craft_core.policies import get_adapter
from craft_core.policies.base import TargetRequest
from tests.craft_core.policies.adapter_checks import load_two_camera_setup
from tests.craft_core.policies.test_pi0 import load_tiny, raw_batch
from tests.fixtures.policies_pi0 import TINY_PI0_FRAMES_PER_EPISODE

TARGETS = ("prefix", "action_output")
POLICY_TYPES = ("pi0_fast", "smolvla", "pi0", "pi05")
# Where forgetting lives on the action path of each type (FACTS: "Where forgetting lives").
ACTION_PATH = {
    "pi0_fast": ["model.paligemma_with_expert.paligemma.lm_head.weight"],
    "smolvla": ["model.action_out_proj.weight", "model.action_in_proj.weight", "model.state_proj.weight"],
    "pi0": ["model.action_out_proj.weight", "model.action_in_proj.weight"],
    "pi05": ["model.action_out_proj.weight", "model.action_in_proj.weight"],
}


@pytest.fixture(scope="module", params=POLICY_TYPES)
def setup(request, policy_test_dataset, tiny_pi0_dataset):
    return _setup(request, policy_test_dataset, tiny_pi0_dataset)


@pytest.fixture(scope="module", params=["pi0_fast"])
def fast_setup(request, policy_test_dataset, tiny_pi0_dataset):
    return _setup(request, policy_test_dataset, tiny_pi0_dataset)


@pytest.fixture(scope="module", params=["smolvla", "pi0", "pi05"])
def flow_setup(request, policy_test_dataset, tiny_pi0_dataset):
    return _setup(request, policy_test_dataset, tiny_pi0_dataset)


def _setup(request, policy_test_dataset, tiny_pi0_dataset):
    """(policy type, teacher policy, preprocessed batch with actions, anchor inputs for both targets)."""
    torch.set_num_threads(1)
    policy_type = request.param
    if policy_type in ("pi0_fast", "smolvla"):
        folder = request.getfixturevalue(f"tiny_{policy_type}_two_cameras")
        policy, adapter, batch, _, _ = load_two_camera_setup(folder, policy_test_dataset)
    else:
        policy, preprocessor, _ = load_tiny(request.getfixturevalue(f"tiny_{policy_type}"))
        batch = preprocessor(raw_batch(policy, tiny_pi0_dataset, [1, TINY_PI0_FRAMES_PER_EPISODE + 2]))
        adapter = get_adapter(policy)
    inputs = adapter.anchor_inputs(batch, TARGETS)
    return policy_type, policy, batch, inputs


def request_for(adapter, targets=TARGETS) -> TargetRequest:
    return TargetRequest(targets=tuple(targets), layers=tuple(adapter.resolve_layers([-2, -1])),
                         pooling=("vision_token_mean", "text_token_last"), top_k=4, dtype="float32", noise_seed=7)


def teacher_targets(policy, inputs, targets=TARGETS):
    adapter = get_adapter(policy)
    with torch.no_grad():
        return adapter.teacher_targets(inputs, request_for(adapter, targets), anchor_ids=torch.tensor([3, 11]))


def test_every_policy_type_declares_both_targets(setup):
    policy_type, policy, _, inputs = setup
    adapter = get_adapter(policy)
    assert set(adapter.retention_targets) == set(TARGETS)
    assert set(inputs) == set(adapter.input_spec(TARGETS))
    if policy_type == "pi0":  # the action expert reads the state; the prefix does not
        assert "state" in adapter.input_spec(TARGETS) and "state" not in adapter.input_spec(["prefix"])


def test_target_arrays_follow_the_declared_layout(setup):
    _, policy, _, inputs = setup
    adapter = get_adapter(policy)
    targets = teacher_targets(policy, inputs)
    for target in TARGETS:
        spec, attrs = adapter.target_spec(target, request_for(adapter))
        assert set(targets[target]) == set(spec), target
        for name, array_spec in spec.items():
            assert tuple(targets[target][name].shape[1:]) == array_spec.shape, (target, name)
        assert attrs  # probe kind, k, steps, layers... describe every target


def test_keystone_a_copy_of_the_teacher_has_zero_loss_on_every_target(setup):
    _, policy, _, inputs = setup
    stored = teacher_targets(policy, inputs)
    student = copy.deepcopy(policy)
    adapter = get_adapter(student)
    with torch.no_grad():
        together = adapter.retention_losses(inputs, stored, request_for(adapter))
        alone = {t: adapter.retention_losses(inputs, stored, request_for(adapter, [t]))[t] for t in TARGETS}
    for target in TARGETS:
        assert float(together[target]) <= 1e-6, (target, float(together[target]))
        assert float(alone[target]) <= 1e-6, (target, float(alone[target]))


def test_prefix_gradient_misses_the_action_path_and_action_output_reaches_it(setup):
    policy_type, policy, _, inputs = setup
    stored = teacher_targets(policy, inputs)
    student = copy.deepcopy(policy)
    student.requires_grad_(True)
    # Move the student off the teacher so that both losses have a gradient.
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    adapter = get_adapter(student)
    names = ACTION_PATH[policy_type]
    parameters = dict(student.named_parameters())
    grads = {}
    for target in TARGETS:
        loss = adapter.retention_losses(inputs, stored, request_for(adapter, [target]))[target]
        gradient = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
        grads[target] = {n: 0.0 if g is None else float(g.abs().sum()) for n, g in zip(names, gradient, strict=True)}
    assert all(value == 0.0 for value in grads["prefix"].values()), grads["prefix"]
    assert all(value > 0.0 for value in grads["action_output"].values()), grads["action_output"]


def test_one_optimizer_step_on_task_data_moves_every_target(setup):
    _, policy, batch, inputs = setup
    stored = teacher_targets(policy, inputs)
    student = copy.deepcopy(policy)
    student.train()
    student.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    loss, _ = student.forward(batch)
    loss.backward()
    optimizer.step()
    adapter = get_adapter(student)
    student.eval()
    with torch.no_grad():
        losses = adapter.retention_losses(inputs, stored, request_for(adapter))
    for target in TARGETS:
        assert float(losses[target]) > 1e-6, target


def test_pi0_fast_probe_and_distributions_are_lerobots_own(fast_setup):
    """Probe = the tokens lerobot's greedy KV-cache decoding emits; target = the next-token
    distributions of lerobot's training forward on them (its cross-entropy on the probe equals
    the cross-entropy of the stored top-k logits' source)."""
    from craft_core.losses import hard_token_cross_entropy

    _, policy, _, inputs = fast_setup
    adapter = get_adapter(policy)
    stored = teacher_targets(policy, inputs)["action_output"]
    tokens, mask = stored["tokens"], stored["token_mask"]
    images, image_masks, lang, lang_masks = adapter.model_inputs(inputs)
    with torch.no_grad():
        generated = policy.model.sample_actions_fast_kv_cache(
            images, image_masks, lang, lang_masks, max_decoding_steps=tokens.shape[1] - 1, temperature=0.0)
        assert torch.equal(tokens[:, 1:][mask[:, 1:]], generated.to(torch.int32)[mask[:, 1:]])
        own = policy.model.forward(images, image_masks, lang, lang_masks, tokens.long(), mask)["loss"]
        logits = adapter._forward(inputs, (), (tokens, mask)).logits
    predicted = mask.clone()
    predicted[:, 0] = False
    torch.testing.assert_close(hard_token_cross_entropy(logits, tokens, predicted), own, atol=1e-5, rtol=1e-5)
    # The stored top-k are those logits' largest log-probabilities, sorted, a (sub-)distribution.
    top = torch.log_softmax(logits, dim=-1).topk(4, dim=-1)
    assert torch.equal(stored["topk_ids"][predicted], top.indices.to(torch.int32)[predicted])
    logprobs = stored["topk_logprobs"]
    assert torch.all(logprobs[..., :-1] >= logprobs[..., 1:])
    assert torch.all(logprobs.exp().sum(-1) <= 1.0 + 1e-5)


def test_flow_probes_are_the_teachers_own_sampling_trajectory(flow_setup):
    policy_type, policy, _, inputs = flow_setup
    adapter = get_adapter(policy)
    stored = teacher_targets(policy, inputs)["action_output"]
    x_t, time, velocity = stored["x_t"], stored["time"], stored["velocity"]
    steps = x_t.shape[1]
    dt = -1.0 / steps
    torch.testing.assert_close(time[0], torch.tensor([1.0 + s * dt for s in range(steps)]))
    action_dim = velocity.shape[-1]
    for s in range(steps - 1):  # Euler: x_{s+1} = x_s + dt v_s, on the real action dimensions
        torch.testing.assert_close(x_t[:, s + 1, :, :action_dim], x_t[:, s, :, :action_dim] + dt * velocity[:, s],
                                   atol=1e-5, rtol=1e-5)
    # The noise is the anchor's own (seeded by its id), and integrating it is the policy's sample_actions.
    noise = adapter.anchor_noise(torch.tensor([3, 11]), 7)
    torch.testing.assert_close(x_t[:, 0], noise)
    final = x_t[:, -1, :, :action_dim] + dt * velocity[:, -1]
    with torch.no_grad():
        sampled = _sample_actions(policy_type, policy, adapter, inputs, noise)
    torch.testing.assert_close(final, sampled[..., :action_dim], atol=1e-5, rtol=1e-5)
    again = adapter.anchor_noise(torch.tensor([11]), 7)  # another batch composition: the same noise
    torch.testing.assert_close(again[0], noise[1])


def _sample_actions(policy_type, policy, adapter, inputs, noise):
    model = policy.model
    if policy_type == "smolvla":
        images, masks, tokens, lang_masks, state = adapter.model_inputs(inputs)
        return model.sample_actions(images, masks, tokens, lang_masks, state, noise=noise)
    images, masks, tokens, lang_masks = adapter.model_inputs(inputs)
    if policy_type == "pi05":  # the state is in the prompt
        return model.sample_actions(images, masks, tokens, lang_masks, noise=noise)
    return model.sample_actions(images, masks, tokens, lang_masks, inputs["state"].float(), noise=noise)


def test_unsupported_targets_are_refused_with_the_name(setup):
    _, policy, _, inputs = setup
    adapter = get_adapter(policy)
    with pytest.raises(ValueError, match="action_hidden"):
        adapter.check_targets(["prefix", "action_hidden"])
