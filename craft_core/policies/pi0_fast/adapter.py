"""pi0_fast: PaliGemma prefix = [image tokens of every camera | prompt tokens (task + discretised state)].

Stored per anchor (``input_spec``; cameras and prompt are built by ``craft_core.policies.camera_prompt``,
shared with the other VLA adapters):

- ``images`` ``[n_cameras, 3, H, W]`` uint8 — each camera after the policy's own
  ``_preprocess_images`` (resize-with-pad to ``image_resolution``), quantised to uint8 with
  rounding; missing cameras are the policy's own padding image (uint8 0 = -1 after scaling).
- ``image_masks`` ``[n_cameras]`` bool — False for cameras the policy padded (empty cameras).
- ``lang_tokens`` ``[tokenizer_max_length]`` int32 and ``lang_masks`` bool — the right-padded
  prompt ``Task: ..., State: <256-bin state>;\\n`` tokenised by the policy's preprocessor. The
  state normalised with the *anchor* dataset's statistics is thus part of the stored inputs.

Turning stored arrays back into model inputs reuses ``_preprocess_images`` (uint8/255 is at
model resolution already, so only its [0,1] -> [-1,1] scaling applies), and the hidden states
come from the policy's own ``embed_prefix_fast`` run through the PaliGemma language model exactly
as ``PI0FastPytorch.forward`` runs it (4-D mask from ``prepare_attention_masks_4d``, position ids
``cumsum(pad) - 1``).
"""

from typing import Sequence

import torch
from torch import Tensor

from craft_core.policies.camera_prompt import PaliGemmaCameraPromptAdapter
from craft_core.policies.base import ArraySpec, PrefixHiddenStates

ACTION_TOKENS = "action.tokens"
ACTION_TOKEN_MASK = "action.token_mask"


class Pi0FastAdapter(PaliGemmaCameraPromptAdapter):
    policy_type = "pi0_fast"
    supports_token_labels = True

    # -- hidden states -------------------------------------------------------------------------
    def prefix_hidden_states(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> PrefixHiddenStates:
        from lerobot.policies.common.vla_utils import prepare_attention_masks_4d

        absolute = self.resolve_layers(layers)
        images, image_masks, tokens, masks = self.model_inputs(inputs)
        model = self.policy.model
        embs, pad_masks, att_masks, n_image_tokens, _ = model.embed_prefix_fast(images, image_masks, tokens, masks)
        if self._language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(dtype=torch.bfloat16)  # as PI0FastPytorch.forward does
        output = self._language_model(
            inputs_embeds=embs,
            attention_mask=prepare_attention_masks_4d(att_masks, dtype=embs.dtype),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1,
            use_cache=False,
            output_hidden_states=True,
        )
        hidden = torch.stack([output.hidden_states[layer] for layer in absolute], dim=1)

        n_language = tokens.shape[1]
        image_mask = torch.zeros_like(pad_masks, dtype=torch.bool)
        image_mask[:, :n_image_tokens] = pad_masks[:, :n_image_tokens]
        text_mask = torch.zeros_like(pad_masks, dtype=torch.bool)
        text_mask[:, n_image_tokens : n_image_tokens + n_language] = pad_masks[
            :, n_image_tokens : n_image_tokens + n_language
        ]
        return PrefixHiddenStates(hidden=hidden, image_mask=image_mask, text_mask=text_mask)

    # -- token-level caches --------------------------------------------------------------------
    def label_spec(self) -> dict[str, ArraySpec]:
        """Per-anchor FAST action-token labels (``token_level`` caches)."""
        length = int(self.policy.config.max_action_tokens)
        return {"action_tokens": ArraySpec((length,), "int32"), "action_token_mask": ArraySpec((length,), "bool")}

    @torch.no_grad()
    def anchor_labels(self, batch: dict) -> dict[str, Tensor]:
        """The FAST action tokens the policy's preprocessor made from a batch's actions."""
        if ACTION_TOKENS not in batch:
            raise KeyError(f"batch has no {ACTION_TOKENS!r}: run the policy's preprocessor on a batch with actions")
        return {
            "action_tokens": batch[ACTION_TOKENS].to(torch.int32).cpu(),
            "action_token_mask": batch[ACTION_TOKEN_MASK].bool().cpu(),
        }

    @torch.no_grad()
    def teacher_action_token_labels(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's own greedy FAST tokens on stored prefix inputs, laid out like the labels
        lerobot's ActionTokenizerProcessorStep makes (``<bos>`` first), valid up to and including the
        first end-of-action ``|``; CPU tensors matching ``label_spec``."""
        images, image_masks, tokens, masks = self.model_inputs(inputs)
        tokenizer = self.policy._paligemma_tokenizer
        length = int(self.policy.config.max_action_tokens)
        generated = self.policy.model.sample_actions_fast_kv_cache(
            images, image_masks, tokens, masks, max_decoding_steps=length - 1, temperature=0.0
        )
        bos = torch.full((generated.shape[0], 1), tokenizer.bos_token_id, dtype=generated.dtype, device=generated.device)
        labels = torch.cat([bos, generated], dim=1)
        is_end = labels == tokenizer.convert_tokens_to_ids("|")
        is_end[:, 0] = False
        # Valid through the first "|" (greedy decoding stops there and zero-fills the rest).
        after_end = (torch.cumsum(is_end.long(), dim=1) - is_end.long()) > 0
        valid = ~after_end
        return {
            "action_tokens": torch.where(valid, labels, torch.zeros_like(labels)).to(torch.int32).cpu(),
            "action_token_mask": valid.cpu(),
        }

    def token_level_loss(self, inputs: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        """The policy's own FAST cross-entropy on stored prefix inputs and stored action-token labels."""
        images, image_masks, tokens, masks = self.model_inputs(inputs)
        device = self.device
        return self.policy.model.forward(
            images,
            image_masks,
            tokens,
            masks,
            labels["action_tokens"].to(device).long(),
            labels["action_token_mask"].to(device).bool(),
        )["loss"]
