"""Pool a VLM prefix's hidden states into a few vectors per layer.

``hidden`` is ``[B, L, T, D]`` (batch, selected layers, prefix positions, hidden size);
``image_mask`` and ``text_mask`` are boolean ``[B, T]``: image-token positions and *valid*
(non-padding) language positions, as the policy adapter takes them from the policy's own prefix
construction. Language may be left- or right-padded: only the masks say where it is.

Strategies (the output's V axis follows the order given):

- ``vision_token_mean``: mean over image positions.
- ``text_token_last``:   the last valid language position (never padding, whatever the side).
- ``text_token_mean``:   mean over valid language positions.
- ``prefix_mean``:       mean over image ∪ valid language positions.

The result is computed and returned in float32 (float64 input stays float64): a mean over
hundreds of bf16 tokens would otherwise be rounded in bf16. Everything is batched tensor algebra
(no loop over samples) and differentiable with respect to ``hidden``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

POOLING_STRATEGIES: tuple[str, ...] = ("vision_token_mean", "text_token_last", "text_token_mean", "prefix_mean")

_WHICH_POSITIONS = {
    "vision_token_mean": "image",
    "text_token_last": "valid language",
    "text_token_mean": "valid language",
    "prefix_mean": "image or valid language",
}


def _check_inputs(hidden: Tensor, image_mask: Tensor, text_mask: Tensor, strategies: Sequence[str]) -> None:
    if isinstance(strategies, str):
        raise TypeError(f"pool_hidden_states: strategies must be a sequence of names, got the string '{strategies}'")
    if len(strategies) == 0:
        raise ValueError(f"pool_hidden_states: strategies is empty; choose from {list(POOLING_STRATEGIES)}")
    for strategy in strategies:
        if strategy not in POOLING_STRATEGIES:
            raise ValueError(
                f"pool_hidden_states: unknown strategy '{strategy}'; choose from {list(POOLING_STRATEGIES)}"
            )
    if hidden.dim() != 4 or not hidden.is_floating_point():
        raise ValueError(
            f"pool_hidden_states: hidden must be a floating tensor [B, L, T, D], got shape "
            f"{tuple(hidden.shape)} dtype {hidden.dtype}"
        )
    batch, _, positions, _ = hidden.shape
    for name, mask in (("image_mask", image_mask), ("text_mask", text_mask)):
        if mask.dtype != torch.bool:
            raise TypeError(f"pool_hidden_states: {name} must be a bool tensor [B, T], got dtype {mask.dtype}")
        if tuple(mask.shape) != (batch, positions):
            raise ValueError(
                f"pool_hidden_states: {name} has shape {tuple(mask.shape)} but hidden {tuple(hidden.shape)} "
                f"needs [B, T] = {(batch, positions)}"
            )


def _require_positions(mask: Tensor, strategy: str) -> Tensor:
    """Number of selected positions per sample; a sample with none is an error, not a NaN."""
    counts = mask.sum(dim=1)
    empty = (counts == 0).nonzero()
    if empty.numel() > 0:
        first = int(empty[0, 0])
        raise ValueError(
            f"pool_hidden_states: sample {first} has no {_WHICH_POSITIONS[strategy]} positions for "
            f"strategy '{strategy}' ({empty.numel()} such sample(s) in the batch); check the adapter's "
            "masks or drop that strategy"
        )
    return counts


def _masked_mean(hidden: Tensor, mask: Tensor, strategy: str) -> Tensor:
    counts = _require_positions(mask, strategy)
    # masked_fill rather than multiplying by the mask: padding positions may hold non-finite values
    # and 0 * inf = NaN would leak into the mean.
    kept = hidden.masked_fill(~mask[:, None, :, None], 0.0)
    return kept.sum(dim=2) / counts.to(hidden.dtype)[:, None, None]


def _last_position(hidden: Tensor, mask: Tensor, strategy: str) -> Tensor:
    _require_positions(mask, strategy)
    positions = torch.arange(mask.shape[1], device=mask.device)
    # Highest valid index per sample: invalid positions score -1, so padding on either side loses.
    last = torch.where(mask, positions, -1).amax(dim=1)
    batch, layers, _, dim = hidden.shape
    index = last.view(batch, 1, 1, 1).expand(batch, layers, 1, dim)
    return hidden.gather(2, index).squeeze(2)


def pool_hidden_states(
    hidden: Tensor, image_mask: Tensor, text_mask: Tensor, strategies: Sequence[str]
) -> Tensor:
    """Pool ``hidden [B, L, T, D]`` into ``[B, L, V, D]`` with V = ``len(strategies)`` in that order."""
    _check_inputs(hidden, image_mask, text_mask, strategies)
    image_mask = image_mask.to(hidden.device)
    text_mask = text_mask.to(hidden.device)
    hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))

    pooled = []
    for strategy in strategies:
        if strategy == "vision_token_mean":
            pooled.append(_masked_mean(hidden, image_mask, strategy))
        elif strategy == "text_token_mean":
            pooled.append(_masked_mean(hidden, text_mask, strategy))
        elif strategy == "prefix_mean":
            pooled.append(_masked_mean(hidden, image_mask | text_mask, strategy))
        else:
            pooled.append(_last_position(hidden, text_mask, strategy))
    return torch.stack(pooled, dim=2)
