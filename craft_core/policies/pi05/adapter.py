"""pi05's prefix: every camera's SigLIP tokens, then a prompt that carries the discretised state.

Same prefix construction as pi0 (``PI05Pytorch.embed_prefix`` is pi0's), so the adapter is pi0's:
see ``craft_core.policies.pi0``. The difference is in the preprocessor: pi05's
``Pi05PrepareStateTokenizerProcessorStep`` writes the normalised state, discretised into 256
bins, into the prompt (``Task: ..., State: 12 200 ...;\\nAction: ``) before tokenisation, so the
state reaches the backbone through ``lang_tokens`` and there is no separate state input to store.
Like pi0_fast's, these prompts depend on the state statistics of the dataset the anchors came
from, which is why the stored token ids (not the raw state) are the anchor inputs.
"""

from craft_core.policies.pi0.adapter import PI0Adapter


class PI05Adapter(PI0Adapter):
    policy_type = "pi05"
    state_in_suffix = False  # pi05's state is in the prompt; its embed_suffix takes no state

    def _denoise(self, inputs, prefix_pad_masks, past_key_values, x_t, time):
        return self.policy.model.denoise_step(prefix_pad_masks=prefix_pad_masks, past_key_values=past_key_values,
                                              x_t=x_t, timestep=time)
