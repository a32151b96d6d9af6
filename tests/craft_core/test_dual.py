"""Dual ascent on λ and the ε schedules: formulas, bounds, monotonicity, checkpoints, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft_core.dual import EpsilonSchedule, LagrangeMultiplier


def test_dual_update_formula():
    lam = LagrangeMultiplier(init=1.0, lr=0.5, max=3.0)
    assert lam.update(0.3, 0.1) == pytest.approx(1.0 + 0.5 * 0.2, abs=1e-15)  # violated: grows
    assert lam.update(0.0, 0.1) == pytest.approx(1.1 - 0.05, abs=1e-15)  # satisfied: shrinks
    assert lam.update(100.0, 0.1) == 3.0  # clipped at max
    assert lam.update(-100.0, 0.1) == 0.0  # clipped at 0
    assert lam.update(torch.tensor(0.5), 0.1) == pytest.approx(0.2)  # accepts a 0-d tensor
    assert float(lam) == lam.value


@settings(max_examples=50, deadline=None)
@given(
    init_fraction=st.floats(0.0, 1.0),
    lr=st.floats(0.0, 1e6),
    lam_max=st.floats(1e-6, 1e6),
    steps=st.lists(
        st.tuples(
            st.floats(allow_nan=False, allow_infinity=True, min_value=-1e300),
            st.floats(0.0, 1e6),
        ),
        max_size=30,
    ),
)
def test_lambda_stays_in_bounds_for_any_loss_sequence(init_fraction, lr, lam_max, steps):
    lam = LagrangeMultiplier(init=init_fraction * lam_max, lr=lr, max=lam_max)
    for loss, eps in steps:
        before = lam.value
        after = lam.update(loss, eps)
        assert 0.0 <= after <= lam_max and after == lam.value
        # dual ascent moves towards the violated side only
        if loss > eps:
            assert after >= before
        elif loss < eps:
            assert after <= before


def test_lambda_state_dict_round_trip_and_errors():
    lam = LagrangeMultiplier(init=0.5, lr=0.1, max=2.0)
    lam.update(3.0, 0.0)
    restored = LagrangeMultiplier(init=0.0, lr=0.1, max=2.0)
    restored.load_state_dict(lam.state_dict())
    assert restored.value == lam.value == 0.8
    assert restored.update(1.0, 0.5) == lam.update(1.0, 0.5)
    with pytest.raises(ValueError, match=r"saved λ=0.85\d* is outside \[0, max=0.5\].*lambda_max"):
        LagrangeMultiplier(0.0, 0.1, 0.5).load_state_dict(lam.state_dict())
    with pytest.raises(KeyError, match="no 'value'"):
        restored.load_state_dict({})


def test_lambda_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"init must lie in \[0, max=1.0\], got 2.0"):
        LagrangeMultiplier(2.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        LagrangeMultiplier(0.0, -0.1, 1.0)
    with pytest.raises(ValueError, match="max must be > 0"):
        LagrangeMultiplier(0.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="retention_loss is NaN"):
        LagrangeMultiplier(0.0, 0.1, 1.0).update(float("nan"), 0.1)
    with pytest.raises(ValueError, match="epsilon must be a finite number"):
        LagrangeMultiplier(0.0, 0.1, 1.0).update(0.1, float("inf"))


def _hand_epsilon(kind, start, end, decay, step):
    p = min(step / decay, 1.0)
    if kind == "linear":
        shape = 1.0 - p
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        shape = math.exp(-5.0 * p)
    return end + (start - end) * shape


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_epsilon_formulas(kind):
    schedule = EpsilonSchedule(0.05, 0.01, 100, kind)
    for step in (1, 10, 37, 50, 99):
        assert schedule(step) == pytest.approx(_hand_epsilon(kind, 0.05, 0.01, 100, step), rel=1e-12)
    assert schedule(0) == 0.05
    assert schedule(100) == 0.01 and schedule(10_000) == 0.01


def test_epsilon_known_points():
    assert EpsilonSchedule(1.0, 0.0, 10, "linear")(5) == pytest.approx(0.5)
    assert EpsilonSchedule(1.0, 0.0, 10, "cosine")(5) == pytest.approx(0.5)
    assert EpsilonSchedule(1.0, 0.0, 10, "exponential")(2) == pytest.approx(math.exp(-1.0))
    # exponential: the formula before decay_steps, exactly ε_end from decay_steps on (documented jump)
    exponential = EpsilonSchedule(1.0, 0.0, 10, "exponential")
    assert exponential(9) == pytest.approx(math.exp(-4.5)) and exponential(10) == 0.0


def test_decay_steps_zero_means_all_training_steps():
    schedule = EpsilonSchedule(0.05, 0.01, 0, "linear", total_steps=200)
    assert schedule.decay_steps == 200
    assert schedule(100) == pytest.approx(0.03) and schedule(200) == 0.01
    with pytest.raises(ValueError, match="decay_steps=0 means 'all training steps'.*total_steps"):
        EpsilonSchedule(0.05, 0.01, 0, "linear")


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(["linear", "cosine", "exponential"]),
    end=st.floats(0.0, 10.0),
    span=st.floats(0.0, 10.0),
    decay=st.integers(1, 500),
)
def test_epsilon_is_monotone_with_exact_end_values(kind, end, span, decay):
    start = end + span
    schedule = EpsilonSchedule(start, end, decay, kind)
    values = [schedule(step) for step in range(decay + 3)]
    assert values[0] == start
    assert values[decay] == end and values[-1] == end
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(end <= v <= start for v in values)


def test_epsilon_state_dict_round_trip_and_errors():
    schedule = EpsilonSchedule(0.05, 0.01, 0, "exponential", total_steps=300)
    restored = EpsilonSchedule(1.0, 0.0, 5, "linear")
    restored.load_state_dict(schedule.state_dict())
    assert [restored(s) for s in range(0, 320, 7)] == [schedule(s) for s in range(0, 320, 7)]
    with pytest.raises(KeyError, match=r"missing keys \['kind'\]"):
        restored.load_state_dict({"start": 1.0, "end": 0.0, "decay_steps": 3})
    with pytest.raises(ValueError, match="unknown kind 'step'.*exponential"):
        EpsilonSchedule(0.05, 0.01, 10, "step")
    with pytest.raises(ValueError, match=r"start \(0.01\) must be >= end \(0.05\)"):
        EpsilonSchedule(0.01, 0.05, 10, "linear")
    with pytest.raises(ValueError, match="decay_steps must be an integer >= 0, got -1"):
        EpsilonSchedule(0.05, 0.01, -1, "linear")
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        schedule(-1)
