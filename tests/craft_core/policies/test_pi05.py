"""Keystone tests of the pi05 adapter on a tiny real PI05Policy (the checks are pi0's)."""

import torch

from tests.craft_core.policies.test_pi0 import PI0FamilyAdapterChecks, anchor_inputs_before_and_after_a_state_shift


class TestPI05Adapter(PI0FamilyAdapterChecks):
    policy_type = "pi05"

    def test_state_reaches_the_prefix_through_the_prompt(self, loaded, tiny_pi0_dataset):
        """pi05's preprocessor discretises the state into the prompt: another state, other tokens."""
        adapter, a, b = anchor_inputs_before_and_after_a_state_shift(loaded, tiny_pi0_dataset)
        assert torch.equal(a["images"], b["images"])
        assert not torch.equal(a["lang_tokens"], b["lang_tokens"])
        with torch.no_grad():
            hidden_a = adapter.prefix_hidden_states(a, [-1]).hidden
            hidden_b = adapter.prefix_hidden_states(b, [-1]).hidden
        assert (hidden_a - hidden_b).abs().max() > 0
