"""What craft needs from a lerobot VLA policy, and the registry of per-policy adapters.

An adapter knows one policy type's prefix (what the VLM backbone sees before any action
token): which tensors of a preprocessed batch are the exact prefix inputs worth storing per
anchor, and how to run the backbone over them to get hidden states plus the boolean masks of
image positions and of valid language positions, taken from the policy's own prefix
construction rather than from hard-coded token counts.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

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
    policy_type: ClassVar[str]

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
        """Resolve Hugging Face ``output_hidden_states`` indices (negatives from the end) to absolute ones."""
        n_states = self.depth + 1
        resolved = []
        for layer in layers:
            absolute = layer + n_states if layer < 0 else layer
            if not 0 <= absolute < n_states:
                raise ValueError(
                    f"layer {layer} is outside the backbone's hidden states: valid indices are "
                    f"{-n_states}..{n_states - 1} (depth {self.depth}, 0 = embeddings)"
                )
            resolved.append(absolute)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"layers {list(layers)} name the same hidden state twice ({resolved})")
        return resolved

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


_REGISTRY: dict[str, Callable[[torch.nn.Module], PolicyAdapter]] = {}


def register_adapter(cls: type[PolicyAdapter]) -> type[PolicyAdapter]:
    _REGISTRY[cls.policy_type] = cls
    return cls


def supported_policy_types() -> list[str]:
    _import_builtin_adapters()
    return sorted(_REGISTRY)


def get_adapter(policy: torch.nn.Module) -> PolicyAdapter:
    """The adapter for a lerobot policy instance, chosen by ``policy.config.type``."""
    policy_type = getattr(getattr(policy, "config", None), "type", None)
    return adapter_class(policy_type)(policy)


def adapter_class(policy_type: str | None) -> Callable[[torch.nn.Module], PolicyAdapter]:
    _import_builtin_adapters()
    if policy_type not in _REGISTRY:
        raise ValueError(
            f"craft has no adapter for policy type {policy_type!r}; supported: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[policy_type]


def _import_builtin_adapters() -> None:
    # Imported lazily so that `craft_core.adapters.base` stays cheap and import cycles impossible.
    import importlib

    for name in ("pi0_fast", "smolvla", "pi0", "pi05"):
        try:
            importlib.import_module(f"craft_core.adapters.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"craft_core.adapters.{name}":
                raise
