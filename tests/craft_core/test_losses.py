"""Retention losses against float64 hand computations, dtype handling and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft_core.losses import retention_loss

SHAPE = (3, 2, 2, 5)  # [B, L, V, D]


def _pair(seed: int, shape=SHAPE, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def _hand_per_sample(student, teacher, kind):
    """Per-sample losses from python floats, one element at a time."""
    s, t = student.tolist(), teacher.tolist()
    out = []
    for sb, tb in zip(s, t):
        terms = []
        for sl, tl in zip(sb, tb):
            for sv, tv in zip(sl, tl):
                if kind == "cosine":
                    dot = sum(a * b for a, b in zip(sv, tv))
                    ns = math.sqrt(sum(a * a for a in sv))
                    nt = math.sqrt(sum(b * b for b in tv))
                    terms.append(1.0 - dot / (ns * nt))
                elif kind == "mse":
                    terms.extend((a - b) ** 2 for a, b in zip(sv, tv))
                else:
                    terms.extend(abs(a - b) for a, b in zip(sv, tv))
        out.append(sum(terms) / len(terms))
    return out


@pytest.mark.parametrize("kind", ["mse", "cosine", "l1"])
def test_every_kind_and_reduction_matches_hand_computation(kind):
    student, teacher = _pair(0)
    per_sample = _hand_per_sample(student, teacher, kind)

    none = retention_loss(student, teacher, kind=kind, reduction="none")
    assert none.shape == (SHAPE[0],) and none.dtype == torch.float64
    assert none.tolist() == pytest.approx(per_sample, rel=1e-12, abs=1e-12)
    mean = retention_loss(student, teacher, kind=kind, reduction="mean")
    assert mean.dim() == 0 and mean.item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-12)
    total = retention_loss(student, teacher, kind=kind, reduction="sum")
    assert total.item() == pytest.approx(sum(per_sample), rel=1e-12)


def test_default_is_mse_mean_and_equals_elementwise_mean():
    student, teacher = _pair(1)
    expected = ((student - teacher) ** 2).mean().item()
    assert retention_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)


def test_cosine_is_per_pooled_vector_not_flattened():
    # Sample: two pooled vectors; one identical to the teacher's, one opposite but 100x larger.
    # Flattened across vectors the cosine would be dominated by the large one (~ -1 => loss ~2);
    # per vector it is the mean of 0 and 2 = 1.
    teacher = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # [1, 1, 2, 2]
    student = torch.tensor([[[[1.0, 0.0], [0.0, -100.0]]]], dtype=torch.float64)
    loss = retention_loss(student, teacher, kind="cosine")
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    flat = torch.nn.functional.cosine_similarity(student.flatten(), teacher.flatten(), dim=0)
    assert abs((1 - flat).item() - loss.item()) > 0.5


def test_cosine_is_scale_invariant_per_vector_and_mse_is_not():
    student, teacher = _pair(2)
    scaled = student * torch.tensor([2.0, 0.5, 7.0])[:, None, None, None]
    assert torch.allclose(
        retention_loss(scaled, teacher, "cosine", "none"), retention_loss(student, teacher, "cosine", "none")
    )
    assert not torch.allclose(retention_loss(scaled, teacher, "mse"), retention_loss(student, teacher, "mse"))


@settings(max_examples=50, deadline=None)
@given(
    shape=st.tuples(*(st.integers(1, 4) for _ in range(4))),
    kind=st.sampled_from(["mse", "cosine", "l1"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_identical_student_and_teacher_give_zero_loss(shape, kind, reduction, seed, dtype):
    hidden = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    loss = retention_loss(hidden, hidden.clone(), kind=kind, reduction=reduction)
    assert loss.dtype == torch.float32
    assert torch.all(loss.abs() <= 1e-6), loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mse", "cosine", "l1"])
def test_half_precision_inputs_give_float32_loss_of_the_upcast_values(dtype, kind):
    student, teacher = (x.to(dtype) for x in _pair(3, dtype=torch.float32))
    for reduction in ("mean", "sum", "none"):
        loss = retention_loss(student, teacher, kind=kind, reduction=reduction)
        assert loss.dtype == torch.float32
        reference = retention_loss(student.double(), teacher.double(), kind=kind, reduction=reduction)
        assert torch.allclose(loss.double(), reference, rtol=1e-6, atol=1e-7)


def test_mixed_dtypes_float16_teacher_bf16_student():
    student, teacher = _pair(4, dtype=torch.float32)
    loss = retention_loss(student.to(torch.bfloat16), teacher.to(torch.float16), kind="mse")
    assert loss.dtype == torch.float32
    expected = ((student.to(torch.bfloat16).double() - teacher.to(torch.float16).double()) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_float16_inputs_whose_squared_difference_overflows_float16():
    # (200 - (-200))^2 = 160000 > 65504, the float16 maximum: computed in float16 it would be inf.
    student = torch.full((1, 1, 1, 4), 200.0, dtype=torch.float16)
    teacher = torch.full((1, 1, 1, 4), -200.0, dtype=torch.float16)
    loss = retention_loss(student, teacher)
    assert loss.dtype == torch.float32 and loss.item() == 160000.0


def test_gradient_flows_to_student():
    student, teacher = _pair(5, dtype=torch.float32)
    student.requires_grad_(True)
    retention_loss(student, teacher, kind="mse").backward()
    expected = 2 * (student.detach() - teacher) / student.numel()
    assert torch.allclose(student.grad, expected, atol=1e-7)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as err:
        retention_loss(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 2, 8))
    assert "(2, 2, 1, 8)" in str(err.value) and "(2, 2, 2, 8)" in str(err.value)


def test_wrong_rank_unknown_kind_and_reduction_are_named():
    with pytest.raises(ValueError, match=r"\[B, L, V, D\].*\(4, 8\)"):
        retention_loss(torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="unknown kind 'kl'.*mse"):
        retention_loss(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), kind="kl")
    with pytest.raises(ValueError, match="unknown reduction 'max'.*none"):
        retention_loss(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), reduction="max")
    with pytest.raises(TypeError, match="teacher must be a floating tensor"):
        retention_loss(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2, dtype=torch.long))
