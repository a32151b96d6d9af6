"""pi0's prefix: every camera's SigLIP tokens, then the language prompt (state stays in the suffix).

lerobot's ``PI0Pytorch.embed_prefix(images, img_masks, lang_tokens, lang_masks)`` lays the prefix
out as the image tokens of each camera in turn (empty cameras included, masked out), then the
right-padded language tokens. The robot state is *not* in pi0's prefix: ``embed_suffix`` projects
it into the action expert's stream, so it is not an anchor input. (pi05, which subclasses this
adapter in ``craft_core.adapters.pi05``, discretises the state into the prompt instead.)

Stored per anchor (``input_spec``):

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

from craft_core.adapters.base import ArraySpec, PolicyAdapter, PrefixHiddenStates, register_adapter

LANGUAGE_TOKENS = "observation.language.tokens"  # lerobot.utils.constants.OBS_LANGUAGE_TOKENS
LANGUAGE_MASK = "observation.language.attention_mask"  # ...OBS_LANGUAGE_ATTENTION_MASK


@register_adapter
class PI0Adapter(PolicyAdapter):
    policy_type = "pi0"

    @property
    def _language_model(self):
        return self.policy.model.paligemma_with_expert.paligemma.model.language_model

    @property
    def depth(self) -> int:
        return int(self._language_model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self._language_model.config.hidden_size)

    def input_spec(self) -> dict[str, ArraySpec]:
        config = self.policy.config
        n_cameras = len(config.image_features)
        height, width = config.image_resolution
        n_tokens = int(config.tokenizer_max_length)
        return {
            "images": ArraySpec((n_cameras, 3, int(height), int(width)), "uint8"),
            "image_masks": ArraySpec((n_cameras,), "bool"),
            "lang_tokens": ArraySpec((n_tokens,), "int32"),
            "lang_masks": ArraySpec((n_tokens,), "bool"),
        }

    @torch.no_grad()
    def anchor_inputs(self, batch: dict) -> dict[str, Tensor]:
        for key in (LANGUAGE_TOKENS, LANGUAGE_MASK):
            if key not in batch:
                raise KeyError(
                    f"{self.policy_type} adapter: batch has no {key!r}; pass the output of the policy's "
                    f"preprocessor (it tokenises the task), got keys {sorted(batch)}"
                )
        images, image_masks = self.policy._preprocess_images(batch)
        pixels = torch.stack(images, dim=1)  # [B, n_cameras, 3, H, W] in [-1, 1]
        inputs = {
            "images": ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu(),
            "image_masks": torch.stack(image_masks, dim=1).to(torch.bool).cpu(),
            "lang_tokens": batch[LANGUAGE_TOKENS].to(torch.int32).cpu(),
            "lang_masks": batch[LANGUAGE_MASK].to(torch.bool).cpu(),
        }
        self._check_inputs(inputs)
        return inputs

    def _check_inputs(self, inputs: dict[str, Tensor]) -> None:
        for name, spec in self.input_spec().items():
            if name not in inputs:
                raise KeyError(f"{self.policy_type} adapter: inputs lack {name!r}; expected {sorted(self.input_spec())}")
            value = inputs[name]
            if tuple(value.shape[1:]) != spec.shape or str(value.dtype).removeprefix("torch.") != spec.dtype:
                raise ValueError(
                    f"{self.policy_type} adapter: input {name!r} is {str(value.dtype)}{list(value.shape)} but this "
                    f"policy needs {spec.dtype}[B, {', '.join(map(str, spec.shape))}] (image_resolution, cameras "
                    "and tokenizer_max_length of the policy config); were the inputs made for another policy?"
                )

    def model_inputs(self, inputs: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Stored arrays -> (images, img_masks, lang_tokens, lang_masks) as ``embed_prefix`` takes them."""
        self._check_inputs(inputs)
        device = self.device
        pixels = inputs["images"].to(device)
        # Positional stand-in keys: _preprocess_images only converts, the stored masks say which are real.
        as_batch = {key: pixels[:, i].to(torch.float32) / 255.0 for i, key in enumerate(self.policy.config.image_features)}
        images, _ = self.policy._preprocess_images(as_batch)
        image_masks = list(inputs["image_masks"].to(device).unbind(dim=1))
        tokens = inputs["lang_tokens"].to(device=device, dtype=torch.long)
        masks = inputs["lang_masks"].to(device=device, dtype=torch.bool)
        return images, image_masks, tokens, masks

    def prefix_hidden_states(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> PrefixHiddenStates:
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

        absolute = self.resolve_layers(layers)
        images, image_masks, tokens, masks = self.model_inputs(inputs)
        embeddings, pad_masks, att_masks = self.policy.model.embed_prefix(images, image_masks, tokens, masks)

        # The prefix pass of lerobot's sample_actions, keeping the hidden states.
        attention_4d = prepare_attention_masks_4d(make_att_2d_masks(pad_masks, att_masks))
        position_ids = torch.cumsum(pad_masks, dim=1) - 1
        language_model = self._language_model
        language_model.config._attn_implementation = "eager"  # noqa: SLF001 - as sample_actions sets it
        output = language_model.forward(
            inputs_embeds=embeddings,
            attention_mask=attention_4d,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
            adarms_cond=None,
            output_hidden_states=True,
        )
        hidden = torch.stack([output.hidden_states[i] for i in absolute], dim=1)

        # embed_prefix appends the language embeddings after all image tokens; pad_masks carries
        # the camera masks (empty cameras False) and the prompt's attention mask.
        n_positions, n_language = pad_masks.shape[1], tokens.shape[1]
        is_language = torch.arange(n_positions, device=pad_masks.device) >= n_positions - n_language
        return PrefixHiddenStates(
            hidden=hidden,
            image_mask=pad_masks & ~is_language,
            text_mask=pad_masks & is_language,
        )
