"""pi0_fast: PaliGemma prefix = [image tokens of every camera | prompt tokens (task + discretised state)].

Retention targets: ``prefix`` (pooled prefix hidden states) and ``action_output``: the teacher's
greedy FAST tokens on the stored inputs (what lerobot's KV-cache decoding emits) are the probe
(stored), and the target is the teacher's top-k next-token log-probabilities, over the whole
vocabulary with the rest of the mass as one bin, at every probe position (``top_k: 0`` keeps the
greedy tokens alone as hard labels). Both come out of one pass of the language model over [prefix
| probe tokens] in the layout of lerobot's training forward (``PI0FastPytorch.forward``: ``<bos>``
and the FAST tokens causal after the prefix): the prefix does not attend to the FAST tokens, so
its hidden states are the prefix-only pass's, and the FAST logits are ``lm_head`` of the last
hidden state. (lerobot's decoding lets the prefix attend to ``<bos>``; the training layout is the
one the task loss and this target share, and for a trained teacher its top-1 is the decoded token.) The action-token rows of ``lm_head`` and of the embedding table,
where fine-tuning forgets this policy's behaviour, get gradient only from this target.

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

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from craft_core.policies.base import ActionDecodingMonitor, ArraySpec, PrefixHiddenStates, TargetRequest
from craft_core.policies.camera_prompt import PaliGemmaCameraPromptAdapter



@dataclass
class _FastPass:
    """One pass of the PaliGemma LM over [prefix | probe FAST tokens], as ``PI0FastPytorch.forward`` runs it."""

    prefix: PrefixHiddenStates | None  # hidden states of the requested layers, prefix positions
    logits: Tensor | None  # [B, T, V]: row i is the distribution of probe token i (row 0 unused)


class FastDecodingMonitor(ActionDecodingMonitor, logging.Filter):
    """Counts the FAST sequences pi0_fast decodes into actions and those it fails to decode.

    lerobot's ``decode_actions_with_fast`` catches a failed decoding, logs "Error decoding tokens"
    (then the tokens) on the root logger and substitutes an all-zero action chunk. Inside the
    monitor every sequence passed to the policy's ``detokenize_actions`` is counted and those log
    records are counted and dropped (the report carries the rate instead of a page of tensors).
    """

    def __init__(self, policy):
        logging.Filter.__init__(self)
        self.policy = policy
        self.decoded, self.failed = 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Error decoding tokens"):
            self.failed += 1
            return False
        return not message.startswith("Tokens: ")

    def __enter__(self) -> "FastDecodingMonitor":
        original = type(self.policy).detokenize_actions

        def counted(tokens, action_horizon, action_dim):
            self.decoded += 1 if tokens.dim() == 1 else int(tokens.shape[0])
            return original(self.policy, tokens, action_horizon, action_dim)

        self.policy.detokenize_actions = counted  # instance attribute: this policy only, removed on exit
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeFilter(self)
        self.policy.__dict__.pop("detokenize_actions", None)


class Pi0FastAdapter(PaliGemmaCameraPromptAdapter):
    policy_type = "pi0_fast"
    retention_targets = ("prefix", "action_output")

    def action_decoding_monitor(self) -> FastDecodingMonitor:
        return FastDecodingMonitor(self.policy)

    # -- one pass over the prefix and (optionally) probe tokens ----------------------------------
    def _forward(self, inputs: dict[str, Tensor], layers: Sequence[int], probe: tuple[Tensor, Tensor] | None) -> _FastPass:
        """The language model over the prefix and, with ``probe=(tokens, mask)``, the FAST tokens after it.

        The prefix never attends to the FAST tokens (``embed_prefix_fast``'s mask), so the prefix
        hidden states are those of a prefix-only pass; the last hidden state (after the final norm)
        through ``lm_head`` gives the FAST logits exactly as ``PI0FastPytorch.forward`` computes them.
        """
        from lerobot.policies.common.vla_utils import prepare_attention_masks_4d

        absolute = self.resolve_layers(layers) if layers else []
        images, image_masks, tokens, masks = self.model_inputs(inputs)
        model = self.policy.model
        fast_tokens, fast_masks = (None, None) if probe is None else (probe[0].to(self.device).long(), probe[1].to(self.device).bool())
        embs, pad_masks, att_masks, n_image_tokens, n_fast = model.embed_prefix_fast(
            images, image_masks, tokens, masks, fast_action_tokens=fast_tokens, fast_action_masks=fast_masks
        )
        if self._language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(dtype=torch.bfloat16)  # as PI0FastPytorch.forward does
        output = self._language_model(
            inputs_embeds=embs,
            attention_mask=prepare_attention_masks_4d(att_masks, dtype=embs.dtype),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1,
            use_cache=False,
            output_hidden_states=True,
        )
        prefix = None
        if absolute:
            n_prefix = pad_masks.shape[1] - n_fast
            hidden = torch.stack([output.hidden_states[layer][:, :n_prefix] for layer in absolute], dim=1)
            n_language = tokens.shape[1]
            prefix_pad = pad_masks[:, :n_prefix]
            image_mask = torch.zeros_like(prefix_pad, dtype=torch.bool)
            image_mask[:, :n_image_tokens] = prefix_pad[:, :n_image_tokens]
            text_mask = torch.zeros_like(prefix_pad, dtype=torch.bool)
            text_mask[:, n_image_tokens : n_image_tokens + n_language] = prefix_pad[:, n_image_tokens : n_image_tokens + n_language]
            prefix = PrefixHiddenStates(hidden=hidden, image_mask=image_mask, text_mask=text_mask)
        logits = None
        if probe is not None:
            lm_head = self.policy.model.paligemma_with_expert.paligemma.lm_head
            predictions = lm_head(output.hidden_states[-1][:, -n_fast:])  # row i predicts token i + 1
            # Shift by one so that row i is the distribution of token i (row 0, the given <bos>, unused).
            logits = torch.cat([torch.zeros_like(predictions[:, :1]), predictions[:, :-1]], dim=1)
        return _FastPass(prefix=prefix, logits=logits)

    def prefix_hidden_states(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> PrefixHiddenStates:
        return self._forward(inputs, layers, probe=None).prefix

    # -- action_output: the teacher's next-token distributions at its own greedy FAST tokens -----
    def action_target_spec(self, request: TargetRequest) -> tuple[dict[str, ArraySpec], dict]:
        length = int(self.policy.config.max_action_tokens)
        arrays = {"tokens": ArraySpec((length,), "int32"), "token_mask": ArraySpec((length,), "bool")}
        if request.top_k > 0:
            arrays["topk_ids"] = ArraySpec((length, request.top_k), "int32")
            arrays["topk_logprobs"] = ArraySpec((length, request.top_k), request.dtype)
        attrs = {"probe": "greedy_fast_tokens", "top_k": request.top_k,
                 "loss": "token_distribution_kl" if request.top_k > 0 else "hard_token_cross_entropy"}
        return arrays, attrs

    @torch.no_grad()
    def greedy_fast_tokens(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The teacher's own greedy FAST tokens on stored inputs, laid out like the labels lerobot's
        ActionTokenizerProcessorStep makes (``<bos>`` first), valid up to and including the first
        end-of-action ``|``: (tokens [B, T] int32, mask [B, T] bool) on the CPU."""
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
        return torch.where(valid, labels, torch.zeros_like(labels)).to(torch.int32).cpu(), valid.cpu()

    def teacher_targets(self, inputs: dict[str, Tensor], request: TargetRequest,
                        anchor_ids: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
        from craft_core.pooling import pool_hidden_states

        self.check_targets(request.targets)
        probe = self.greedy_fast_tokens(inputs) if "action_output" in request.targets else None
        layers = request.layers if "prefix" in request.targets else ()
        out = self._forward(inputs, layers, probe)
        targets: dict[str, dict[str, Tensor]] = {}
        if "prefix" in request.targets:
            pooled = pool_hidden_states(out.prefix.hidden.float(), out.prefix.image_mask, out.prefix.text_mask, request.pooling)
            targets["prefix"] = {"hidden": pooled.cpu()}
        if probe is not None:
            tokens, mask = probe
            arrays = {"tokens": tokens, "token_mask": mask}
            if request.top_k > 0:
                logprobs = torch.log_softmax(out.logits.float(), dim=-1)
                top = logprobs.topk(request.top_k, dim=-1)
                arrays["topk_ids"] = top.indices.to(torch.int32).cpu()
                arrays["topk_logprobs"] = top.values.cpu()
            targets["action_output"] = arrays
        return targets

    def retention_losses(self, inputs: dict[str, Tensor], stored: dict[str, dict[str, Tensor]],
                         request: TargetRequest) -> dict[str, Tensor]:
        from craft_core.losses import hard_token_cross_entropy, retention_loss, token_distribution_kl
        from craft_core.pooling import pool_hidden_states

        self.check_targets(request.targets)
        action = stored.get("action_output") if "action_output" in request.targets else None
        probe = None if action is None else (action["tokens"], action["token_mask"])
        out = self._forward(inputs, request.layers if "prefix" in request.targets else (), probe)
        losses: dict[str, Tensor] = {}
        if "prefix" in request.targets:
            pooled = pool_hidden_states(out.prefix.hidden.float(), out.prefix.image_mask, out.prefix.text_mask, request.pooling)
            losses["prefix"] = retention_loss(pooled, stored["prefix"]["hidden"].to(pooled.device), request.prefix_loss)
        if action is not None:
            device = out.logits.device
            mask = action["token_mask"].to(device).bool().clone()
            mask[:, 0] = False  # <bos> is given, not predicted
            if "topk_ids" in action:
                losses["action_output"] = token_distribution_kl(
                    out.logits, action["topk_ids"].to(device), action["topk_logprobs"].to(device), mask)
            else:
                losses["action_output"] = hard_token_cross_entropy(out.logits, action["tokens"].to(device), mask)
        return losses
