"""What craft needs from a lerobot VLA policy: the adapter contract every policy type implements.

An adapter knows one policy type's prefix (what the VLM backbone sees before any action
token): which tensors of a preprocessed batch are the exact prefix inputs worth storing per
anchor, and how to run the backbone over them to get hidden states plus the boolean masks of
image positions and of valid language positions, taken from the policy's own prefix
construction rather than from hard-coded token counts.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ArraySpec:
    """Shape (without the anchor/batch axis) and numpy dtype of one stored anchor input."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> "ArraySpec":
        return cls(shape=tuple(int(s) for s in data["shape"]), dtype=str(np.dtype(data["dtype"])))


@dataclass
class PrefixHiddenStates:
    hidden: Tensor  # [B, L, T, D] for the requested (absolute) layers, in order
    image_mask: Tensor  # [B, T] bool: positions holding image tokens (all cameras, real images)
    text_mask: Tensor  # [B, T] bool: positions holding valid (non-padding) language tokens


class PolicyAdapter(ABC):
    """One lerobot policy type as craft sees it: its prefix inputs and hidden states.

    Optional capabilities are declared here, not discovered with ``hasattr``: an adapter that
    can decode its teacher's own action tokens sets ``supports_token_labels`` and implements
    ``label_spec``, ``teacher_action_token_labels`` and ``token_level_loss``.
    """

    policy_type: ClassVar[str]
    supports_token_labels: ClassVar[bool] = False

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy

    @property
    @abstractmethod
    def depth(self) -> int:
        """Number of transformer blocks of the VLM backbone (hidden_states has depth + 1 entries)."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the backbone's hidden states."""

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        """Absolute hidden-state indices of ``layers`` for this backbone (see :func:`resolve_layers`)."""
        return resolve_layers(layers, self.depth)

    @abstractmethod
    def input_spec(self) -> dict[str, ArraySpec]:
        """Per-anchor arrays that reproduce the prefix exactly."""

    @abstractmethod
    def anchor_inputs(self, batch: dict) -> dict[str, Tensor]:
        """Exact prefix inputs of a preprocessed batch, as CPU tensors matching ``input_spec``."""

    @abstractmethod
    def prefix_hidden_states(self, inputs: dict[str, Tensor], layers: Sequence[int]) -> PrefixHiddenStates:
        """Run the backbone over the stored prefix inputs; ``layers`` may be negative."""

    def pooled(self, inputs: dict[str, Tensor], layers: Sequence[int], strategies: Sequence[str]) -> Tensor:
        """Pooled hidden states ``[B, L, V, D]`` in float32 (differentiable when grad is enabled)."""
        from craft_core.pooling import pool_hidden_states

        prefix = self.prefix_hidden_states(inputs, layers)
        return pool_hidden_states(prefix.hidden.float(), prefix.image_mask, prefix.text_mask, strategies)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # -- optional: token-level targets (``supports_token_labels``) -------------------------------
    def label_spec(self) -> dict[str, ArraySpec]:
        """Per-anchor label arrays of a token-level cache."""
        raise NotImplementedError(f"{self.policy_type} has no token-level labels")

    def teacher_action_token_labels(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The teacher's own greedy action tokens on stored inputs, laid out like ``label_spec``."""
        raise NotImplementedError(f"{self.policy_type} cannot decode its own action tokens")

    def token_level_loss(self, inputs: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        """The policy's own loss on stored inputs and stored label tokens."""
        raise NotImplementedError(f"{self.policy_type} has no token-level loss")


def resolve_layers(layers: Sequence[int], depth: int) -> list[int]:
    """Hugging Face ``output_hidden_states`` indices (negatives from the end) -> absolute ones.

    The one place layer indices are resolved: a backbone of ``depth`` blocks has ``depth + 1``
    hidden states (0 = embeddings, ``depth`` = after the final norm). Raises ``ValueError`` for an
    index outside them or two indices naming the same state.
    """
    n_states = depth + 1
    resolved = []
    for layer in layers:
        absolute = layer + n_states if layer < 0 else layer
        if not 0 <= absolute < n_states:
            raise ValueError(
                f"layer {layer} is outside the backbone's hidden states: valid indices are "
                f"{-n_states}..{n_states - 1} (depth {depth}, 0 = embeddings)"
            )
        resolved.append(absolute)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers {list(layers)} name the same hidden state twice ({resolved})")
    return resolved
