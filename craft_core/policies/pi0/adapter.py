"""pi0's prefix: every camera's SigLIP tokens, then the language prompt (state stays in the suffix).

lerobot's ``PI0Pytorch.embed_prefix(images, img_masks, lang_tokens, lang_masks)`` lays the prefix
out as the image tokens of each camera in turn (empty cameras included, masked out), then the
right-padded language tokens. The robot state is *not* in pi0's prefix: ``embed_suffix`` projects
it into the action expert's stream, so it is an anchor input (``state``) only for the ``action_output``
target, whose denoising steps need it. (pi05, which subclasses this
adapter in ``craft_core.policies.pi05``, discretises the state into the prompt instead.)

Stored per anchor (``input_spec``; cameras and prompt are built by ``craft_core.policies.camera_prompt``,
shared with the other VLA adapters):

- ``images`` ``[n_cameras, 3, H, W]`` uint8: each camera after the policy's own
  ``_preprocess_images`` (resize-with-pad to ``image_resolution``), mapped from the model's
  [-1, 1] back to [0, 255]; cameras missing from the batch are lerobot's -1 padding (stored 0).
  The order is the one ``_preprocess_images`` returns: cameras present in the batch, then missing.
- ``image_masks`` ``[n_cameras]`` bool: real camera (True) or lerobot's empty-camera padding.
- ``lang_tokens`` ``[tokenizer_max_length]`` int32 and ``lang_masks`` bool: the preprocessor's
  tokenised prompt and its attention mask.

Rebuilding turns the uint8 images into [0, 1] floats the way lerobot's datasets do (``/ 255``) and
hands them to ``_preprocess_images`` again, so the [-1, 1] conversion is the policy's own.

Hidden states come from the prefix-only pass of lerobot's own inference (``sample_actions``
prefills the KV cache with ``paligemma.model.language_model.forward`` over ``embed_prefix``'s
embeddings, its 2D attention mask made 4D and ``cumsum(pad_masks) - 1`` positions, eager
attention); here the same call also returns ``output_hidden_states``: entry 0 is the embeddings,
entry i the output of block i, the last entry the output after the final norm.
"""

from typing import Sequence

import torch
from torch import Tensor

from craft_core.policies.base import ArraySpec, PrefixHiddenStates
from craft_core.policies.camera_prompt import PaliGemmaCameraPromptAdapter
from craft_core.policies.flow_matching import FlowMatchingTargets


class PI0Adapter(FlowMatchingTargets, PaliGemmaCameraPromptAdapter):
    policy_type = "pi0"

    # The action expert reads the state (pi0's embed_suffix); the prefix does not.
    state_in_suffix = True

    def input_spec(self, targets: Sequence[str] = ("prefix",)) -> dict[str, ArraySpec]:
        spec = super().input_spec(targets)
        if self.state_in_suffix and "action_output" in targets:
            spec["state"] = ArraySpec((int(self.policy.config.max_state_dim),), "float32")
        return spec

    @torch.no_grad()
    def anchor_inputs(self, batch: dict, targets: Sequence[str] = ("prefix",)) -> dict[str, Tensor]:
        inputs = super().anchor_inputs(batch, targets)
        if self.state_in_suffix and "action_output" in targets:
            inputs["state"] = self.policy.prepare_state(batch).to(torch.float32).cpu()
        return inputs

    def _prefix_pass(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> tuple[PrefixHiddenStates | None, Tensor, object]:
        """The prefix pass of lerobot's ``sample_actions`` (``embed_prefix``, its 2D mask made 4D,
        ``cumsum(pad) - 1`` positions, eager attention, cache filled), keeping the hidden states."""
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

        absolute = self.resolve_layers(layers) if layers else []
        images, image_masks, tokens, masks = self.model_inputs(inputs)
        embeddings, pad_masks, att_masks = self.policy.model.embed_prefix(images, image_masks, tokens, masks)
        attention_4d = prepare_attention_masks_4d(make_att_2d_masks(pad_masks, att_masks))
        position_ids = torch.cumsum(pad_masks, dim=1) - 1
        language_model = self._language_model
        language_model.config._attn_implementation = "eager"  # noqa: SLF001 - as sample_actions sets it
        output = language_model.forward(
            inputs_embeds=embeddings,
            attention_mask=attention_4d,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=True,
            adarms_cond=None,
            output_hidden_states=bool(absolute),
        )
        prefix = None
        if absolute:
            hidden = torch.stack([output.hidden_states[i] for i in absolute], dim=1)
            # embed_prefix appends the language embeddings after all image tokens; pad_masks carries
            # the camera masks (empty cameras False) and the prompt's attention mask.
            n_positions, n_language = pad_masks.shape[1], tokens.shape[1]
            is_language = torch.arange(n_positions, device=pad_masks.device) >= n_positions - n_language
            prefix = PrefixHiddenStates(hidden=hidden, image_mask=pad_masks & ~is_language,
                                        text_mask=pad_masks & is_language)
        return prefix, pad_masks, output.past_key_values

    def prefix_hidden_states(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> PrefixHiddenStates:
        return self._prefix_pass(inputs, layers)[0]

    def _denoise(self, inputs, prefix_pad_masks, past_key_values, x_t, time):
        state = inputs["state"].to(device=self.device, dtype=torch.float32)
        return self.policy.model.denoise_step(state=state, prefix_pad_masks=prefix_pad_masks,
                                              past_key_values=past_key_values, x_t=x_t, timestep=time)

    def _default_flow_steps(self) -> int:
        return int(self.policy.config.num_inference_steps)
