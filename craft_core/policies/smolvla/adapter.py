"""smolvla: SmolVLM prefix = [image tokens of every camera | language tokens | state token].

Retention targets: ``prefix`` and ``action_output`` (the velocity of the action expert on the
teacher's own sampling trajectory, ``craft_core.policies.flow_matching``), from one prefix pass.

Stored per anchor (``input_spec``; cameras and prompt are built by ``craft_core.policies.camera_prompt``,
shared with the other VLA adapters):

- ``images`` ``[n_cameras, 3, H, W]`` uint8 — each camera after the policy's own
  ``prepare_images`` (resize-with-pad to ``resize_imgs_with_padding``), quantised with rounding.
- ``image_masks`` ``[n_cameras]`` bool — False for cameras the policy padded.
- ``lang_tokens`` ``[tokenizer_max_length]`` int32 and ``lang_masks`` bool — the task tokens of the
  policy's preprocessor, right-padded to ``tokenizer_max_length`` (smolvla pads to the longest
  prompt of a batch; padding is masked out of attention and position ids, so it does not change
  the valid positions).
- ``state`` ``[max_state_dim]`` float32 — the normalised state after ``prepare_state`` (padded),
  which the prefix embeds as its last token.

Hidden states are those of the SmolVLM text model while lerobot's ``SmolVLMWithExpertModel``
runs the prefix exactly as ``VLAFlowMatching.sample_actions`` does (``embed_prefix``,
``make_att_2d_masks``, ``cumsum(pad) - 1`` positions, ``use_cache=True`` prefill, needed in
cross-attention mode). That model runs its decoder layers inline rather than through
``layer.forward``, so they are read with hooks: the input of layer ``i``'s ``input_layernorm`` is
hidden state ``i`` (0 = embeddings), the output of the text model's final ``norm`` is the last.
The number of image tokens per camera is read from the ``connector``'s output during the same
call, never computed from sizes.
"""

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from craft_core.policies.base import ArraySpec, PrefixHiddenStates
from craft_core.policies.camera_prompt import CameraPromptAdapter
from craft_core.policies.flow_matching import FlowMatchingTargets


class SmolVLAAdapter(FlowMatchingTargets, CameraPromptAdapter):
    policy_type = "smolvla"

    # -- backbone ------------------------------------------------------------------------------
    @property
    def _vlm_with_expert(self):
        return self.policy.model.vlm_with_expert

    @property
    def _text_model(self):
        return self._vlm_with_expert.get_vlm_model().text_model

    @property
    def depth(self) -> int:
        return int(self._vlm_with_expert.num_vlm_layers)

    @classmethod
    def config_depth(cls, config: dict, tiny_sizes: dict | None = None) -> int | None:
        # lerobot keeps the VLM's first num_vlm_layers blocks (all when <= 0: unknown without the VLM's
        # config); the tiny builder writes its size there too.
        layers = config.get("num_vlm_layers")
        return int(layers) if isinstance(layers, int) and layers > 0 else None

    @property
    def hidden_size(self) -> int:
        return int(self._vlm_with_expert.config.text_config.hidden_size)

    # -- stored inputs (cameras and prompt: craft_core.policies.camera_prompt) ----------------
    def _prepare_images(self, batch: dict) -> tuple[list[Tensor], list[Tensor]]:
        return self.policy.prepare_images(batch)

    def _image_hw(self) -> tuple[int, int]:
        cfg = self.policy.config
        if cfg.resize_imgs_with_padding is not None:
            width, height = cfg.resize_imgs_with_padding  # smolvla stores (width, height)
            return int(height), int(width)
        shape = next(iter(cfg.image_features.values())).shape
        return int(shape[-2]), int(shape[-1])

    def input_spec(self, targets: Sequence[str] = ("prefix",)) -> dict[str, ArraySpec]:
        return {**super().input_spec(targets), "state": ArraySpec((int(self.policy.config.max_state_dim),), "float32")}

    @torch.no_grad()
    def anchor_inputs(self, batch: dict, targets: Sequence[str] = ("prefix",)) -> dict[str, Tensor]:
        inputs = self._camera_prompt_inputs(batch)
        inputs["state"] = self.policy.prepare_state(batch).to(torch.float32).cpu()
        return inputs

    def model_inputs(self, inputs: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]:
        """Stored arrays -> (images, img_masks, lang_tokens, lang_masks, state) for ``embed_prefix``."""
        images, image_masks, tokens, masks = self._camera_prompt_model_inputs(inputs)
        dtype = self.policy.model.state_proj.weight.dtype
        state = inputs["state"].to(device=self.device, dtype=dtype)
        return images, image_masks, tokens, masks, state

    # -- hidden states -------------------------------------------------------------------------
    @contextmanager
    def _recording(self, layers: Sequence[int]) -> Iterator[tuple[dict[int, Tensor], list[int]]]:
        """Hooks that record the requested hidden states and the image-token count per camera."""
        hidden: dict[int, Tensor] = {}
        image_token_counts: list[int] = []
        handles = []
        text_model = self._text_model

        def layer_input(index):
            def hook(module, args):
                hidden[index] = args[0]

            return hook

        def final_norm(module, args, output):
            hidden[self.depth] = output

        def connector(module, args, output):
            image_token_counts.append(int(output.shape[1]))

        try:
            for index in layers:
                if index < self.depth:
                    handles.append(text_model.layers[index].input_layernorm.register_forward_pre_hook(layer_input(index)))
            if self.depth in layers:
                handles.append(text_model.norm.register_forward_hook(final_norm))
            handles.append(self._vlm_with_expert.get_vlm_model().connector.register_forward_hook(connector))
            yield hidden, image_token_counts
        finally:
            for handle in handles:
                handle.remove()

    def _prefix_pass(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> tuple[PrefixHiddenStates | None, Tensor, object]:
        """The prefix pass of ``VLAFlowMatching.sample_actions``: hidden states of ``layers`` (hooks),
        prefix pad masks and the key/value cache the action expert attends to."""
        from lerobot.policies.smolvla.modeling_smolvla import make_att_2d_masks

        absolute = self.resolve_layers(layers) if layers else []
        images, image_masks, tokens, masks, state = self.model_inputs(inputs)
        model = self.policy.model
        with self._recording(absolute) as (hidden, image_token_counts):
            embs, pad_masks, att_masks = model.embed_prefix(images, image_masks, tokens, masks, state=state)
            _, past_key_values = model.vlm_with_expert.forward(
                attention_mask=make_att_2d_masks(pad_masks, att_masks),
                position_ids=torch.cumsum(pad_masks, dim=1) - 1,
                past_key_values=None,
                inputs_embeds=[embs, None],
                use_cache=True,  # prefill; in cross-attention mode the layers need the cache
            )
        prefix = None
        if absolute:
            stacked = torch.stack([hidden[layer] for layer in absolute], dim=1)
            image_mask, text_mask = self._position_masks(pad_masks, image_token_counts, tokens.shape[1])
            prefix = PrefixHiddenStates(hidden=stacked, image_mask=image_mask, text_mask=text_mask)
        return prefix, pad_masks, past_key_values

    def prefix_hidden_states(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> PrefixHiddenStates:
        return self._prefix_pass(inputs, layers)[0]

    # -- action_output (craft_core.policies.flow_matching) ---------------------------------------
    def _denoise(self, inputs, prefix_pad_masks, past_key_values, x_t, time):
        return self.policy.model.denoise_step(prefix_pad_masks=prefix_pad_masks, past_key_values=past_key_values,
                                              x_t=x_t, timestep=time)

    def _default_flow_steps(self) -> int:
        return int(self.policy.config.num_steps)

    def check_targets(self, targets: Sequence[str]) -> None:
        super().check_targets(targets)
        if "action_output" in targets and not self.policy.config.use_cache:
            raise ValueError(
                "smolvla action_output targets run the policy's own denoise_step on the prefix's key/value cache; "
                "this policy has use_cache=False (set it to true in the policy config)"
            )

    def _position_masks(self, pad_masks: Tensor, image_token_counts: list[int], n_language: int) -> tuple[Tensor, Tensor]:
        """Image / valid-language positions in ``embed_prefix``'s layout (cameras, language, state)."""
        model = self.policy.model
        n_start = len(model.global_image_start_token) if model.add_image_special_tokens else 0
        n_end = len(model.image_end_token) if model.add_image_special_tokens else 0
        image_mask = torch.zeros_like(pad_masks, dtype=torch.bool)
        position = 0
        for count in image_token_counts:
            position += n_start
            image_mask[:, position : position + count] = pad_masks[:, position : position + count]
            position += count + n_end
        text_mask = torch.zeros_like(pad_masks, dtype=torch.bool)
        text_mask[:, position : position + n_language] = pad_masks[:, position : position + n_language]
        n_state = pad_masks.shape[1] - position - n_language
        if n_state < 1 and model.prefix_length <= 0:
            raise RuntimeError(
                f"smolvla prefix layout mismatch: {pad_masks.shape[1]} positions, {position} for images and "
                f"{n_language} for language leave no state token; lerobot's embed_prefix changed"
            )
        return image_mask, text_mask
