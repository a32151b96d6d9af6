"""Stored prefix inputs shared by pi0, pi05, pi0_fast and smolvla: cameras and the tokenised prompt.

All four prefixes start from the same per-anchor arrays:

- ``images`` ``[n_cameras, 3, H, W]`` uint8: each camera after the policy's own resize-with-pad
  to model resolution (``_preprocess_images`` for the PaliGemma policies, ``prepare_images`` for
  smolvla), mapped from the model's [-1, 1] back to [0, 255] with rounding; a camera the policy
  padded is its -1 padding image, stored as 0.
- ``image_masks`` ``[n_cameras]`` bool: real camera (True) or the policy's empty-camera padding.
- ``lang_tokens`` ``[tokenizer_max_length]`` int32 and ``lang_masks`` bool: the preprocessor's
  tokenised prompt and its attention mask, right-padded to ``tokenizer_max_length``.

Rebuilding model inputs turns the uint8 images into [0, 1] floats the way lerobot's datasets do
(``/ 255``) and hands them to the policy's own image preparation again, so the [-1, 1] scaling is
the policy's. Subclasses name that preparation and the model resolution, and add what else their
prefix embeds (smolvla's state token).
"""

from abc import abstractmethod
from typing import Sequence

import torch
from torch import Tensor

from craft_core.policies.base import ArraySpec, PolicyAdapter

OBS_LANGUAGE_TOKENS = "observation.language.tokens"  # lerobot.utils.constants.OBS_LANGUAGE_TOKENS
OBS_LANGUAGE_ATTENTION_MASK = "observation.language.attention_mask"  # ...OBS_LANGUAGE_ATTENTION_MASK


def quantise_unit_images(images: Tensor) -> Tensor:
    """[0, 1] float images -> uint8 with rounding (what the anchor store keeps)."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


class CameraPromptAdapter(PolicyAdapter):
    """An adapter whose stored inputs are model-resolution cameras plus the tokenised prompt."""

    @abstractmethod
    def _prepare_images(self, batch: dict) -> tuple[list[Tensor], list[Tensor]]:
        """The policy's own camera preparation: per camera, [-1, 1] images at model resolution and masks."""

    @abstractmethod
    def _image_hw(self) -> tuple[int, int]:
        """Model resolution (height, width) of the prepared images."""

    @property
    def _camera_keys(self) -> list[str]:
        return list(self.policy.config.image_features)

    def input_spec(self, targets: Sequence[str] = ("prefix",)) -> dict[str, ArraySpec]:
        height, width = self._image_hw()
        n_cameras = len(self._camera_keys)
        length = int(self.policy.config.tokenizer_max_length)
        return {
            "images": ArraySpec((n_cameras, 3, height, width), "uint8"),
            "image_masks": ArraySpec((n_cameras,), "bool"),
            "lang_tokens": ArraySpec((length,), "int32"),
            "lang_masks": ArraySpec((length,), "bool"),
        }

    @torch.no_grad()
    def _camera_prompt_inputs(self, batch: dict) -> dict[str, Tensor]:
        """``images``, ``image_masks``, ``lang_tokens`` and ``lang_masks`` of a preprocessed batch (CPU)."""
        for key in (OBS_LANGUAGE_TOKENS, OBS_LANGUAGE_ATTENTION_MASK):
            if key not in batch:
                raise KeyError(
                    f"{self.policy_type} anchor inputs need {key!r} in the batch: pass the output of the "
                    f"policy's preprocessor (make_processors; it tokenises the task), not a raw dataset batch; "
                    f"got keys {sorted(batch)}"
                )
        images, image_masks = self._prepare_images(batch)  # the policy's own resize-with-pad, [-1, 1]
        keys = self._camera_keys
        if len(images) != len(keys):
            raise ValueError(
                f"{self.policy_type} prepared {len(images)} camera images but the policy has {len(keys)} image "
                f"features {keys}: every camera (or a configured empty camera) must be in the batch"
            )
        # Back to [0, 1] at model resolution; the policies' own scaling is x * 2 - 1.
        images = torch.stack([quantise_unit_images((image + 1.0) / 2.0) for image in images], dim=1)
        tokens = batch[OBS_LANGUAGE_TOKENS]
        masks = batch[OBS_LANGUAGE_ATTENTION_MASK].bool()
        # smolvla's preprocessor pads to the batch's longest prompt, the PaliGemma ones to
        # tokenizer_max_length already; padding is masked out of attention and position ids.
        length = int(self.policy.config.tokenizer_max_length)
        if tokens.shape[1] > length:
            raise ValueError(
                f"{self.policy_type}: language tokens are {tokens.shape[1]} long, more than "
                f"tokenizer_max_length={length}"
            )
        pad = length - tokens.shape[1]
        return {
            "images": images.cpu(),
            "image_masks": torch.stack(image_masks, dim=1).bool().cpu(),
            "lang_tokens": torch.nn.functional.pad(tokens, (0, pad)).to(torch.int32).cpu(),
            "lang_masks": torch.nn.functional.pad(masks, (0, pad)).cpu(),
        }

    def _check_inputs(self, inputs: dict[str, Tensor], targets: Sequence[str] = ("prefix",)) -> None:
        """Every field of ``input_spec`` is there with its shape and dtype, or an error names it."""
        spec = self.input_spec(targets)
        for name, array_spec in spec.items():
            if name not in inputs:
                raise KeyError(f"{self.policy_type} adapter: inputs lack {name!r}; expected {sorted(spec)}")
            value = inputs[name]
            if tuple(value.shape[1:]) != array_spec.shape or str(value.dtype).removeprefix("torch.") != array_spec.dtype:
                raise ValueError(
                    f"{self.policy_type} adapter: input {name!r} is {str(value.dtype)}{list(value.shape)} but this "
                    f"policy needs {array_spec.dtype}[B, {', '.join(map(str, array_spec.shape))}] (image "
                    "resolution, cameras and tokenizer_max_length of the policy config); were the inputs made "
                    "for another policy?"
                )

    def _camera_prompt_model_inputs(self, inputs: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Stored arrays -> (images, img_masks, lang_tokens, lang_masks) as the policy's prefix takes them."""
        self._check_inputs(inputs)
        device = self.device
        stored = inputs["images"].to(device)
        # Positional stand-in keys: preparation only converts, the stored masks say which are real.
        unit = {key: stored[:, i].to(torch.float32) / 255.0 for i, key in enumerate(self._camera_keys)}
        images, _ = self._prepare_images(unit)
        image_masks = list(inputs["image_masks"].to(device).bool().unbind(dim=1))
        tokens = inputs["lang_tokens"].to(device).long()
        masks = inputs["lang_masks"].to(device).bool()
        return images, image_masks, tokens, masks


class PaliGemmaCameraPromptAdapter(CameraPromptAdapter):
    """pi0, pi05 and pi0_fast: a PaliGemma backbone whose cameras the policy's ``_preprocess_images`` prepares."""

    @property
    def _language_model(self):
        return self.policy.model.paligemma_with_expert.paligemma.model.language_model

    @property
    def depth(self) -> int:
        return int(self._language_model.config.num_hidden_layers)

    # lerobot's get_gemma_config (pi0/pi05/pi0_fast modeling): the PaliGemma language model's depth.
    PALIGEMMA_DEPTHS = {"gemma_300m": 18, "gemma_2b": 18}

    @classmethod
    def config_depth(cls, config: dict, tiny_sizes: dict | None = None) -> int | None:
        if tiny_sizes:  # the tiny builders' size name: pi0_fast "num_hidden_layers", pi0/pi05 "depth"
            depth = tiny_sizes.get("num_hidden_layers", tiny_sizes.get("depth"))
            return int(depth) if depth is not None else None
        return cls.PALIGEMMA_DEPTHS.get(config.get("paligemma_variant", "gemma_2b"))

    @property
    def hidden_size(self) -> int:
        return int(self._language_model.config.hidden_size)

    def _prepare_images(self, batch: dict) -> tuple[list[Tensor], list[Tensor]]:
        return self.policy._preprocess_images(batch)

    def _image_hw(self) -> tuple[int, int]:
        height, width = self.policy.config.image_resolution
        return int(height), int(width)

    def anchor_inputs(self, batch: dict, targets: Sequence[str] = ("prefix",)) -> dict[str, Tensor]:
        inputs = self._camera_prompt_inputs(batch)
        self._check_inputs(inputs)
        return inputs

    def model_inputs(self, inputs: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Stored arrays -> (images, img_masks, lang_tokens, lang_masks) as the policy's ``embed_prefix*`` takes them."""
        return self._camera_prompt_model_inputs(inputs)
