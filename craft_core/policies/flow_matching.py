"""The ``action_output`` target of flow-matching policies (pi0, pi05, smolvla).

Probe: noise drawn once per anchor (seeded by the anchor's index, so it never depends on the batch
an anchor lands in), integrated by the teacher's own sampler (lerobot's ``euler_integrate`` over the
policy's ``denoise_step``, ``flow_steps`` steps: its inference grid by default). Every step's input
``x_t`` and time are stored as probes and its output velocity as the target. The student's loss is
the mse between its velocity and the teacher's at those stored points, over the real action
dimensions (the padding up to ``max_action_dim`` is not an action).

One prefix pass serves both targets: it gives the pooled prefix hidden states (``prefix``) and the
key/value cache the action expert attends to, exactly as ``sample_actions`` builds it; each probe
point is then one ``denoise_step`` of the policy's own code. Gradient of this target reaches the
action expert, ``action_in_proj``/``action_out_proj``, the time MLP and (smolvla) ``state_proj``,
where prefix anchoring has exactly none.
"""

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from craft_core.policies.base import ArraySpec, PrefixHiddenStates, TargetRequest

NOISE_SEED_STRIDE = 1_000_003


class FlowMatchingTargets:
    """Mixin for adapters of flow-matching policies: ``action_output`` through the policy's own sampler."""

    retention_targets = ("prefix", "action_output")

    # -- what each policy type supplies --------------------------------------------------------
    @abstractmethod
    def _prefix_pass(self, inputs: dict[str, Tensor], layers: tuple[int, ...]) -> tuple[PrefixHiddenStates | None, Tensor, Any]:
        """(prefix hidden states of ``layers`` or None, prefix pad masks, past key values) of one prefix pass."""

    @abstractmethod
    def _denoise(self, inputs: dict[str, Tensor], prefix_pad_masks: Tensor, past_key_values: Any, x_t: Tensor,
                 time: Tensor) -> Tensor:
        """The policy's ``denoise_step`` at ``x_t [B, H, A]`` and ``time [B]``: the velocity ``[B, H, A]``."""

    @abstractmethod
    def _default_flow_steps(self) -> int:
        """The policy's own number of inference (Euler) steps."""

    # -- shapes ---------------------------------------------------------------------------------
    def _flow_shape(self) -> tuple[int, int, int]:
        """(chunk size, padded action dim the model works in, real action dim)."""
        config = self.policy.config
        return int(config.chunk_size), int(config.max_action_dim), int(config.action_feature.shape[0])

    def _steps(self, request: TargetRequest) -> int:
        return int(request.flow_steps or self._default_flow_steps())

    def action_target_spec(self, request: TargetRequest) -> tuple[dict[str, ArraySpec], dict]:
        steps = self._steps(request)
        horizon, padded, action_dim = self._flow_shape()
        arrays = {
            "x_t": ArraySpec((steps, horizon, padded), "float32"),
            "time": ArraySpec((steps,), "float32"),
            "velocity": ArraySpec((steps, horizon, action_dim), request.dtype),
        }
        return arrays, {"probe": "euler_trajectory", "steps": steps, "action_dim": action_dim, "loss": "velocity_mse"}

    def anchor_noise(self, anchor_ids: Tensor, noise_seed: int) -> Tensor:
        """Noise ``[B, H, A]`` of each anchor, from its own seeded generator."""
        horizon, padded, _ = self._flow_shape()
        draws = []
        for anchor in anchor_ids.tolist():
            generator = torch.Generator().manual_seed(noise_seed * NOISE_SEED_STRIDE + int(anchor))
            draws.append(torch.randn(horizon, padded, generator=generator, dtype=torch.float32))
        return torch.stack(draws)

    # -- the targets ----------------------------------------------------------------------------
    def teacher_targets(self, inputs: dict[str, Tensor], request: TargetRequest,
                        anchor_ids: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
        from lerobot.policies.common.flow_matching import euler_integrate

        from craft_core.pooling import pool_hidden_states

        self.check_targets(request.targets)
        layers = request.layers if "prefix" in request.targets else ()
        prefix, prefix_pad_masks, past_key_values = self._prefix_pass(inputs, layers)
        targets: dict[str, dict[str, Tensor]] = {}
        if prefix is not None:
            pooled = pool_hidden_states(prefix.hidden.float(), prefix.image_mask, prefix.text_mask, request.pooling)
            targets["prefix"] = {"hidden": pooled.cpu()}
        if "action_output" in request.targets:
            if anchor_ids is None:
                raise ValueError("flow-matching action_output targets need the anchors' ids (they seed the noise)")
            _, _, action_dim = self._flow_shape()
            points: list[tuple[Tensor, Tensor, Tensor]] = []

            def recorded_step(x_t: Tensor, time: Tensor) -> Tensor:
                velocity = self._denoise(inputs, prefix_pad_masks, past_key_values, x_t, time)
                points.append((x_t.detach().clone(), time.detach().clone(), velocity.detach().clone()))
                return velocity

            noise = self.anchor_noise(anchor_ids, request.noise_seed).to(self.device)
            euler_integrate(recorded_step, noise, self._steps(request))
            targets["action_output"] = {
                "x_t": torch.stack([x for x, _, _ in points], dim=1).float().cpu(),
                "time": torch.stack([t for _, t, _ in points], dim=1).float().cpu(),
                "velocity": torch.stack([v[..., :action_dim] for _, _, v in points], dim=1).float().cpu(),
            }
        return targets

    def retention_losses(self, inputs: dict[str, Tensor], stored: dict[str, dict[str, Tensor]],
                         request: TargetRequest) -> dict[str, Tensor]:
        from craft_core.losses import retention_loss, velocity_mse
        from craft_core.pooling import pool_hidden_states

        self.check_targets(request.targets)
        layers = request.layers if "prefix" in request.targets else ()
        prefix, prefix_pad_masks, past_key_values = self._prefix_pass(inputs, layers)
        losses: dict[str, Tensor] = {}
        if prefix is not None:
            pooled = pool_hidden_states(prefix.hidden.float(), prefix.image_mask, prefix.text_mask, request.pooling)
            losses["prefix"] = retention_loss(pooled, stored["prefix"]["hidden"].to(pooled.device), request.prefix_loss)
        if "action_output" in request.targets:
            action = stored["action_output"]
            _, _, action_dim = self._flow_shape()
            x_t, time = action["x_t"].to(self.device), action["time"].to(self.device)
            velocities = [
                self._denoise(inputs, prefix_pad_masks, past_key_values, x_t[:, step], time[:, step])[..., :action_dim]
                for step in range(x_t.shape[1])
            ]
            losses["action_output"] = velocity_mse(torch.stack(velocities, dim=1), action["velocity"].to(self.device))
        return losses
