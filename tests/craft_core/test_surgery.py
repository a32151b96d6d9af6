"""Gradient surgery against float64 hand computations, in-place behaviour and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft_core.surgery import SurgeryStats, apply_gradient_surgery, retention_gradients

SHAPES = [(4, 3), (3,), (2, 2, 2), (5,)]


def _params(task, dtype=torch.float64):
    """Parameters whose .grad is the given task gradient (None stays None)."""
    params = []
    for g in task:
        p = torch.nn.Parameter(torch.zeros(g.shape if g is not None else (1,), dtype=dtype))
        p.grad = None if g is None else g.clone().to(dtype)
        params.append(p)
    return params


def _random(shapes, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=dtype) for s in shapes]


def _hand(task, retention, shapes, lam, merge, threshold):
    """The method's formulas on python floats over the whole flattened vector (None = zeros)."""
    flat_t = [x for g, s in zip(task, shapes) for x in (g.flatten().tolist() if g is not None else [0.0] * math.prod(s))]
    flat_r = [x for g, s in zip(retention, shapes) for x in (g.flatten().tolist() if g is not None else [0.0] * math.prod(s))]
    dot = sum(a * b for a, b in zip(flat_t, flat_r))
    nt = math.sqrt(sum(a * a for a in flat_t))
    nr = math.sqrt(sum(b * b for b in flat_r))
    cosine = dot / (nt * nr) if nt * nr > 0 else 0.0
    projected = cosine < threshold and nr * nr > 1e-30
    if projected:
        flat_t = [a - dot / (nr * nr) * b for a, b in zip(flat_t, flat_r)]
    if merge == "weighted":
        merged = [a + lam * b for a, b in zip(flat_t, flat_r)]
    elif merge == "equal":
        merged = [0.5 * (a + b) for a, b in zip(flat_t, flat_r)]
    else:
        merged = [a + min(lam, 1.0) * b for a, b in zip(flat_t, flat_r)]
    out, offset = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(torch.tensor(merged[offset : offset + n], dtype=torch.float64).view(s))
        offset += n
    return out, SurgeryStats(dot=dot, cosine=cosine, task_norm=nt, retention_norm=nr, projected=projected)


def _check_against_hand(task, retention, lam, merge, threshold, shapes=SHAPES):
    params = _params([None if g is None else g for g in task])
    for p, s in zip(params, shapes):
        if p.grad is None:
            p.data = torch.zeros(s, dtype=torch.float64)
    expected, expected_stats = _hand(task, retention, shapes, lam, merge, threshold)
    stats = apply_gradient_surgery(
        params, [None if g is None else g.clone() for g in retention], lam=lam, merge=merge, conflict_threshold=threshold
    )
    assert stats.projected == expected_stats.projected
    for field in ("dot", "cosine", "task_norm", "retention_norm"):
        assert getattr(stats, field) == pytest.approx(getattr(expected_stats, field), rel=1e-12, abs=1e-12), field
    assert all(isinstance(getattr(stats, f), float) for f in ("dot", "cosine", "task_norm", "retention_norm"))
    assert isinstance(stats.projected, bool)
    for p, want, g_t, g_r in zip(params, expected, task, retention):
        if g_t is None and g_r is None:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, want, rtol=1e-12, atol=1e-12)
    return stats


@pytest.mark.parametrize("merge", ["weighted", "equal", "task_priority"])
@pytest.mark.parametrize("lam", [0.0, 0.4, 3.0])
def test_conflicting_gradients_are_projected_then_merged(merge, lam):
    task = _random(SHAPES, 0)
    retention = [-0.8 * t + 0.3 * n for t, n in zip(task, _random(SHAPES, 1))]
    stats = _check_against_hand(task, retention, lam, merge, -0.1)
    assert stats.projected and stats.cosine < -0.1


@pytest.mark.parametrize("merge", ["weighted", "equal", "task_priority"])
@pytest.mark.parametrize("lam", [0.0, 0.4, 3.0])
def test_agreeing_gradients_are_merged_without_projection(merge, lam):
    task = _random(SHAPES, 2)
    retention = [0.5 * t + 0.3 * n for t, n in zip(task, _random(SHAPES, 3))]
    stats = _check_against_hand(task, retention, lam, merge, -0.1)
    assert not stats.projected and stats.cosine > 0


def test_threshold_compares_the_cosine_not_the_dot_product():
    # Tiny gradients: the dot product (-1e-8) is above -0.1 but the cosine (-1) is below it.
    task = [torch.full((3,), 1e-4, dtype=torch.float64)]
    retention = [torch.full((3,), -1e-4, dtype=torch.float64) / 3]
    stats = _check_against_hand(task, retention, 0.0, "weighted", -0.1, shapes=[(3,)])
    assert stats.dot > -0.1 and stats.cosine == pytest.approx(-1.0) and stats.projected


@pytest.mark.parametrize("merge", ["weighted", "equal", "task_priority"])
@pytest.mark.parametrize("conflict", [True, False])
def test_missing_gradients_count_as_zeros(merge, conflict):
    task = _random(SHAPES, 4)
    retention = [(-0.9 if conflict else 0.9) * t + 0.2 * n for t, n in zip(task, _random(SHAPES, 5))]
    task[1] = None  # only the retention loss reaches param 1
    retention[2] = None  # only the task loss reaches param 2
    task[3] = retention[3] = None  # neither
    stats = _check_against_hand(task, retention, 0.7, merge, -0.1)
    assert stats.projected == conflict


def test_retention_only_gradient_is_reused_and_task_grads_updated_in_place():
    task = _random(SHAPES[:2], 6)
    retention = [-t for t in _random(SHAPES[:2], 7)]
    params = _params([task[0], None])
    params[1].data = torch.zeros(SHAPES[1], dtype=torch.float64)
    grad_before = params[0].grad
    pointer_before = grad_before.data_ptr()
    apply_gradient_surgery(params, retention, lam=0.5)
    assert params[0].grad is grad_before and params[0].grad.data_ptr() == pointer_before
    assert params[1].grad is retention[1]  # the retention tensor itself became .grad, no copy


def _bits(t):
    return t.view(torch.int64) if t.dtype == torch.float64 else t.view(torch.int32)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mix=st.floats(0.0, 3.0), lam=st.floats(0.0, 5.0))
def test_without_conflict_the_task_gradient_is_untouched_bit_for_bit(seed, mix, lam):
    """No conflict => g_t is not modified before the merge: with weighted λ=0 the .grad tensors are
    not written at all (same bits, signed zeros included); with λ>0, .grad is exactly g_t + λ g_r
    computed from the original g_t."""
    task = _random(SHAPES, seed, torch.float32)
    task[0][0, 0] = -0.0
    retention = [mix * t + n for t, n in zip(task, _random(SHAPES, seed + 1, torch.float32))]
    params = _params(task, torch.float32)
    stats = apply_gradient_surgery(params, [r.clone() for r in retention], lam=0.0, conflict_threshold=-1.0)
    assert not stats.projected
    for p, g_t in zip(params, task):
        assert torch.equal(_bits(p.grad), _bits(g_t))
    if stats.cosine >= -0.1:
        params = _params(task, torch.float32)
        stats = apply_gradient_surgery(params, [r.clone() for r in retention], lam=lam)
        assert not stats.projected
        for p, g_t, g_r in zip(params, task, retention):
            merged = g_t if lam == 0 else g_t.clone().add_(g_r, alpha=lam)
            assert torch.equal(_bits(p.grad), _bits(merged))


@st.composite
def gradient_pairs(draw):
    n_params = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))) for _ in range(n_params)]
    seed = draw(st.integers(0, 2**31 - 1))
    mix = draw(st.floats(-3.0, 3.0))
    scale_r = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    task = _random(shapes, seed, torch.float32)
    retention = [scale_r * (mix * t + n) for t, n in zip(task, _random(shapes, seed + 1, torch.float32))]
    return task, retention


@settings(max_examples=50, deadline=None)
@given(pair=gradient_pairs(), threshold=st.floats(-1.0, 1.0))
def test_after_projection_no_conflict_remains(pair, threshold):
    task, retention = pair
    params = _params(task, torch.float32)
    stats = apply_gradient_surgery(params, [r.clone() for r in retention], lam=0.0, conflict_threshold=threshold)
    flat_t = torch.cat([p.grad.double().flatten() for p in params])
    flat_r = torch.cat([r.double().flatten() for r in retention])
    if stats.projected:
        assert stats.cosine < threshold
        # measured against the norms of the original gradients, as the method states it
        assert torch.dot(flat_t, flat_r) >= -1e-6 * stats.task_norm * stats.retention_norm
    else:
        assert stats.cosine >= threshold
        assert torch.equal(flat_t, torch.cat([t.double().flatten() for t in task]))


def test_zero_retention_gradient_is_never_projected():
    task = _random(SHAPES, 8)
    retention = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    params = _params(task)
    stats = apply_gradient_surgery(params, retention, lam=1.0, conflict_threshold=1.0)
    assert stats == SurgeryStats(dot=0.0, cosine=0.0, task_norm=pytest.approx(stats.task_norm), retention_norm=0.0,
                                 projected=False)
    for p, g in zip(params, task):
        assert torch.equal(p.grad, g)


def test_bf16_gradients_use_float32_accumulation():
    shapes = [(512, 64), (64,)]
    task32 = _random(shapes, 9, torch.float32)
    retention32 = [-0.5 * t + n for t, n in zip(task32, _random(shapes, 10, torch.float32))]
    task = [t.to(torch.bfloat16) for t in task32]
    retention = [r.to(torch.bfloat16) for r in retention32]
    _, expected = _hand([t.double() for t in task], [r.double() for r in retention], shapes, 0.0, "weighted", -0.1)
    params = _params(task, torch.bfloat16)
    stats = apply_gradient_surgery(params, retention, lam=0.0)
    # bf16 sums of 32k products would be off by ~1e-2 relative; float32 accumulation is ~1e-6.
    assert stats.dot == pytest.approx(expected.dot, rel=1e-5)
    assert stats.task_norm == pytest.approx(expected.task_norm, rel=1e-5)
    assert stats.retention_norm == pytest.approx(expected.retention_norm, rel=1e-5)
    assert stats.projected and all(p.grad.dtype == torch.bfloat16 for p in params)


def test_retention_gradients_match_autograd_and_leave_grad_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    unused = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    params = list(model.parameters()) + [unused, frozen]
    x = torch.randn(5, 3)
    model(x).square().mean().backward()
    task_grads = [p.grad.clone() for p in model.parameters()]

    loss = model(x).abs().sum()
    grads = retention_gradients(loss, params)
    expected = torch.autograd.grad(model(x).abs().sum(), list(model.parameters()))
    assert grads[-2] is None and grads[-1] is None
    for g, want in zip(grads, expected):
        assert torch.equal(g, want)
    for p, g_t in zip(model.parameters(), task_grads):
        assert torch.equal(p.grad, g_t)


def test_bad_arguments_are_named():
    params = _params(_random(SHAPES[:2], 11))
    retention = _random(SHAPES[:2], 12)
    with pytest.raises(ValueError, match="2 params but 1 retention gradients"):
        apply_gradient_surgery(params, retention[:1], lam=1.0)
    with pytest.raises(ValueError, match=r"retention gradient 1 has shape \(4, 3\) but its parameter has shape \(3,\)"):
        apply_gradient_surgery(params, [retention[0], retention[0]], lam=1.0)
    with pytest.raises(ValueError, match="unknown merge 'mean'.*task_priority"):
        apply_gradient_surgery(params, retention, lam=1.0, merge="mean")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0, got -1"):
        apply_gradient_surgery(params, retention, lam=-1.0)
    with pytest.raises(ValueError, match="parameter 0 has a torch.float64 .grad but a torch.float32"):
        apply_gradient_surgery(params, [retention[0].float(), retention[1]], lam=1.0)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        retention_gradients(torch.ones(2, requires_grad=True) * 2, params)
    with pytest.raises(ValueError, match="does not require grad"):
        retention_gradients(torch.tensor(1.0), params)
