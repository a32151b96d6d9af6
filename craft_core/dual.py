"""Dual ascent on the retention constraint and the annealed bound ε(t).

CRaFT solves ``min L_task  s.t.  L_ret <= ε(t)``. The Lagrange multiplier λ grows while the
constraint is violated and shrinks (never below 0) while it holds:
``λ <- clip(λ + η (L_ret - ε), 0, λ_max)``. ``L_ret`` must be the same on every rank (average
it with :func:`craft_core.distributed.mean_across_ranks`) so the ranks' λ never diverge.

Both classes have ``state_dict()`` / ``load_state_dict()`` so a resumed run continues with the
same λ and the same schedule.
"""

import math
from typing import Any

EPSILON_SCHEDULE_KINDS: tuple[str, ...] = ("linear", "cosine", "exponential")

# e^(-5p) is what DESIGN.md specifies for the exponential schedule: at p = 1 it is still
# e^-5 ≈ 0.0067 of the way from ε_end to ε_start.
_EXPONENTIAL_RATE = 5.0


def _finite(name: str, value: Any) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


class LagrangeMultiplier:
    """λ of the retention constraint, updated by projected dual ascent."""

    def __init__(self, init: float, lr: float, max: float) -> None:
        self.lr = _finite("LagrangeMultiplier lr", lr)
        self.max = _finite("LagrangeMultiplier max", max)
        init = _finite("LagrangeMultiplier init", init)
        if self.lr < 0:
            raise ValueError(f"LagrangeMultiplier lr must be >= 0, got {self.lr}")
        if self.max <= 0:
            raise ValueError(f"LagrangeMultiplier max must be > 0, got {self.max}")
        if not 0.0 <= init <= self.max:
            raise ValueError(f"LagrangeMultiplier init must lie in [0, max={self.max}], got {init}")
        self.value = init

    def update(self, retention_loss: float, epsilon: float) -> float:
        """One dual step; returns the new λ. ``retention_loss`` may be +inf (λ jumps to max), not NaN."""
        retention_loss = float(retention_loss)
        epsilon = _finite("LagrangeMultiplier.update epsilon", epsilon)
        if math.isnan(retention_loss):
            raise ValueError(
                "LagrangeMultiplier.update: retention_loss is NaN; skip the dual update on a non-finite step"
            )
        if self.lr > 0:
            proposal = self.value + self.lr * (retention_loss - epsilon)
            self.value = min(max(proposal, 0.0), self.max)
        return self.value

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"LagrangeMultiplier(value={self.value}, lr={self.lr}, max={self.max})"

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "lr": self.lr, "max": self.max}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore λ. η and λ_max stay those of the current config (a resumed run may change them)."""
        if "value" not in state:
            raise KeyError(f"LagrangeMultiplier.load_state_dict: no 'value' in state with keys {sorted(state)}")
        value = _finite("LagrangeMultiplier state 'value'", state["value"])
        if not 0.0 <= value <= self.max:
            raise ValueError(
                f"LagrangeMultiplier.load_state_dict: saved λ={value} is outside [0, max={self.max}]; "
                "raise lambda_max to at least the saved value or start a fresh run"
            )
        self.value = value


class EpsilonSchedule:
    """ε(step), annealed from ``start`` to ``end`` over ``decay_steps`` steps.

    With progress ``p = step / decay_steps``:

    - ``linear``:      ε_end + (ε_start − ε_end)(1 − p)
    - ``cosine``:      ε_end + (ε_start − ε_end)(1 + cos πp)/2
    - ``exponential``: ε_end + (ε_start − ε_end)e^(−5p)

    End values are exact by definition: step 0 returns ``start`` and every step ``>= decay_steps``
    returns ``end``. For ``linear`` and ``cosine`` that is the formula's own limit. For
    ``exponential`` the formula is used unchanged before ``decay_steps`` (it stops at
    ε_end + 0.0067(ε_start − ε_end) on the last decaying step) and the value then drops to exactly
    ε_end: a step of e^-5 of the range, chosen over rescaling the curve so that every decaying step
    matches the formula in DESIGN.md. The schedule never increases.

    ``decay_steps=0`` means "anneal over the whole run": pass ``total_steps``.
    """

    def __init__(
        self, start: float, end: float, decay_steps: int, kind: str = "cosine", total_steps: int | None = None
    ) -> None:
        if kind not in EPSILON_SCHEDULE_KINDS:
            raise ValueError(f"EpsilonSchedule: unknown kind '{kind}'; choose one of {list(EPSILON_SCHEDULE_KINDS)}")
        start = _finite("EpsilonSchedule start", start)
        end = _finite("EpsilonSchedule end", end)
        if start < end:
            raise ValueError(f"EpsilonSchedule: start ({start}) must be >= end ({end}); ε anneals downwards")
        if int(decay_steps) != decay_steps or decay_steps < 0:
            raise ValueError(f"EpsilonSchedule: decay_steps must be an integer >= 0, got {decay_steps}")
        if decay_steps == 0:
            if total_steps is None or int(total_steps) != total_steps or total_steps < 1:
                raise ValueError(
                    f"EpsilonSchedule: decay_steps=0 means 'all training steps', so total_steps must be an "
                    f"integer >= 1, got {total_steps}"
                )
            decay_steps = total_steps
        self.start = start
        self.end = end
        self.decay_steps = int(decay_steps)
        self.kind = kind

    def _shape(self, progress: float) -> float:
        """Fraction of (start − end) still left at progress in [0, 1)."""
        if self.kind == "linear":
            return 1.0 - progress
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return math.exp(-_EXPONENTIAL_RATE * progress)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"EpsilonSchedule: step must be >= 0, got {step}")
        if step == 0:
            return self.start
        if step >= self.decay_steps:
            return self.end
        value = self.end + (self.start - self.end) * self._shape(step / self.decay_steps)
        # Rounding of end + (start - end) * f could step an ulp outside [end, start].
        return min(max(value, self.end), self.start)

    def __repr__(self) -> str:
        return (
            f"EpsilonSchedule(start={self.start}, end={self.end}, decay_steps={self.decay_steps}, "
            f"kind='{self.kind}')"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "decay_steps": self.decay_steps, "kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"start", "end", "decay_steps", "kind"} - set(state)
        if missing:
            raise KeyError(f"EpsilonSchedule.load_state_dict: missing keys {sorted(missing)}")
        restored = EpsilonSchedule(state["start"], state["end"], state["decay_steps"], state["kind"])
        self.start, self.end = restored.start, restored.end
        self.decay_steps, self.kind = restored.decay_steps, restored.kind
