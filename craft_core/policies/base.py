"""What craft needs from a lerobot VLA policy: the adapter contract every policy type implements.

An adapter knows one policy type's anchor inputs and retention targets: which tensors of a
preprocessed batch are the exact model inputs worth storing per anchor, how to run the backbone
over them to get prefix hidden states plus the boolean masks of image positions and of valid
language positions (taken from the policy's own prefix construction rather than from hard-coded
token counts), and, where the policy type supports it, the teacher's outputs on the action path.
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


class ActionDecodingMonitor:
    """Counts action decodings during a rollout (``with monitor: ...``); policies whose actions are
    not decoded from tokens count nothing (``decoded`` stays None)."""

    decoded: int | None = None
    failed: int | None = None

    def __enter__(self) -> "ActionDecodingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    @property
    def failure_rate(self) -> float | None:
        if not self.decoded:
            return None
        return self.failed / self.decoded


@dataclass(frozen=True)
class TargetRequest:
    """Which retention targets to compute on a batch of anchors, and how.

    ``layers`` (absolute) and ``pooling`` define the ``prefix`` target; ``prefix_loss`` its distance
    (mse / cosine / l1); ``top_k`` and ``flow_steps`` the ``action_output`` probes (see
    ``craft_core.config.ActionOutputConfig``). ``anchor_ids`` (extraction only) seed the per-anchor
    noise of flow-matching probes, so a probe depends on the anchor, never on the batch it is in.
    """

    targets: tuple[str, ...]
    layers: tuple[int, ...] = ()
    pooling: tuple[str, ...] = ()
    prefix_loss: str = "mse"
    top_k: int = 8
    flow_steps: int | None = None
    dtype: str = "float32"
    noise_seed: int = 0


class PolicyAdapter(ABC):
    """One lerobot policy type as craft sees it: its anchor inputs and its retention targets.

    Retention targets (``retention_targets`` declares which this type can produce and compare):

    - ``prefix``: pooled hidden states of the VLM prefix (what the backbone sees before any action
      token), every adapter;
    - ``action_output``: the teacher's outputs on the action path on stored probes (pi0_fast: its
      next-token distributions at its own greedy FAST tokens; pi0/pi05/smolvla: its velocity on its
      own sampling trajectory from stored noise).

    ``teacher_targets`` computes the stored arrays of the requested targets (extraction) and
    ``retention_losses`` the student's differentiable loss per target (training), both from one
    forward over the anchor batch where the policy allows it.
    """

    policy_type: ClassVar[str]
    retention_targets: ClassVar[tuple[str, ...]] = ("prefix",)

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

    @classmethod
    def config_depth(cls, config: dict, tiny_sizes: dict | None = None) -> int | None:
        """The backbone depth a saved policy will have, from its ``config.json`` (and the sizes of a
        tiny offline folder), without building the model: what the pre-flight checks ``cache.layers``
        against. None = not known without building it (the cache stage checks it then)."""
        return None

    @abstractmethod
    def input_spec(self, targets: Sequence[str] = ("prefix",)) -> dict[str, ArraySpec]:
        """Per-anchor arrays that reproduce the model inputs the ``targets`` need exactly."""

    @abstractmethod
    def anchor_inputs(self, batch: dict, targets: Sequence[str] = ("prefix",)) -> dict[str, Tensor]:
        """Exact model inputs of a preprocessed batch, as CPU tensors matching ``input_spec(targets)``."""

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

    def action_decoding_monitor(self) -> ActionDecodingMonitor:
        """A monitor of failed action decodings during a rollout (policies that decode tokens override it)."""
        return ActionDecodingMonitor()

    def check_targets(self, targets: Sequence[str]) -> None:
        unknown = [t for t in targets if t not in self.retention_targets]
        if unknown:
            raise ValueError(
                f"{self.policy_type} cannot produce the retention target(s) {unknown}; it supports "
                f"{list(self.retention_targets)}"
            )

    # -- retention targets -----------------------------------------------------------------------
    def target_spec(self, target: str, request: TargetRequest) -> tuple[dict[str, ArraySpec], dict]:
        """Per-anchor arrays of one target (name -> spec) and its descriptive attributes."""
        self.check_targets([target])
        if target == "prefix":
            shape = (len(request.layers), len(request.pooling), self.hidden_size)
            return {"hidden": ArraySpec(shape, request.dtype)}, {"layers": list(request.layers),
                                                                 "pooling": list(request.pooling)}
        return self.action_target_spec(request)

    def action_target_spec(self, request: TargetRequest) -> tuple[dict[str, ArraySpec], dict]:
        raise NotImplementedError(f"{self.policy_type} has no action_output target")

    def teacher_targets(self, inputs: dict[str, Tensor], request: TargetRequest,
                        anchor_ids: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
        """The stored arrays of every requested target (CPU tensors, ``target_spec`` layouts)."""
        self.check_targets(request.targets)
        pooled = self.pooled(inputs, request.layers, request.pooling)
        return {"prefix": {"hidden": pooled.detach().cpu()}}

    def retention_losses(self, inputs: dict[str, Tensor], stored: dict[str, dict[str, Tensor]],
                         request: TargetRequest) -> dict[str, Tensor]:
        """The student's loss per requested target against the stored arrays (differentiable)."""
        from craft_core.losses import retention_loss

        self.check_targets(request.targets)
        pooled = self.pooled(inputs, request.layers, request.pooling)
        return {"prefix": retention_loss(pooled, stored["prefix"]["hidden"].to(pooled.device), request.prefix_loss)}


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
