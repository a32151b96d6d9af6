"""Pooling strategies against a naive per-sample loop, masks, padding sides, dtypes and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft_core.pooling import POOLING_STRATEGIES, pool_hidden_states


def _naive(hidden, image_mask, text_mask, strategies):
    """One sample, one layer, one strategy at a time, in float64."""
    batch, layers, positions, _ = hidden.shape
    out = []
    for b in range(batch):
        per_layer = []
        for layer in range(layers):
            vectors = []
            for strategy in strategies:
                if strategy == "vision_token_mean":
                    idx = [t for t in range(positions) if image_mask[b, t]]
                elif strategy == "text_token_mean":
                    idx = [t for t in range(positions) if text_mask[b, t]]
                elif strategy == "prefix_mean":
                    idx = [t for t in range(positions) if image_mask[b, t] or text_mask[b, t]]
                else:
                    idx = [max(t for t in range(positions) if text_mask[b, t])]
                rows = [hidden[b, layer, t].double() for t in idx]
                vectors.append(sum(rows) / len(rows))
            per_layer.append(torch.stack(vectors))
        out.append(torch.stack(per_layer))
    return torch.stack(out)


@st.composite
def prefixes(draw):
    """Hidden states of prefixes laid out like the VLA adapters produce: images, then language padded
    on the left or on the right (per batch, as a tokenizer does), sometimes a trailing state token."""
    batch = draw(st.integers(1, 4))
    layers = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 4))
    n_image = draw(st.integers(1, 4))
    text_slots = draw(st.integers(1, 6))
    trailing = draw(st.integers(0, 1))  # e.g. smolvla's state token after the language
    positions = n_image + text_slots + trailing
    pad_left = draw(st.booleans())
    image_mask = torch.zeros(batch, positions, dtype=torch.bool)
    text_mask = torch.zeros(batch, positions, dtype=torch.bool)
    image_mask[:, :n_image] = True
    for b in range(batch):
        valid = draw(st.integers(1, text_slots))
        if pad_left:
            text_mask[b, n_image + text_slots - valid : n_image + text_slots] = True
        else:
            text_mask[b, n_image : n_image + valid] = True
    seed = draw(st.integers(0, 2**31 - 1))
    hidden = torch.randn(batch, layers, positions, dim, generator=torch.Generator().manual_seed(seed))
    strategies = draw(st.permutations(POOLING_STRATEGIES).flatmap(lambda p: st.integers(1, 4).map(lambda n: p[:n])))
    return hidden, image_mask, text_mask, list(strategies)


@settings(max_examples=50, deadline=None)
@given(prefixes())
def test_pooling_equals_naive_loop_left_and_right_padding(case):
    hidden, image_mask, text_mask, strategies = case
    pooled = pool_hidden_states(hidden, image_mask, text_mask, strategies)
    assert pooled.shape == (hidden.shape[0], hidden.shape[1], len(strategies), hidden.shape[3])
    assert pooled.dtype == torch.float32
    assert torch.allclose(pooled.double(), _naive(hidden, image_mask, text_mask, strategies), atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 4),
    positions=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_pooling_equals_naive_loop_on_arbitrary_masks(batch, positions, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 2, positions, 3, generator=generator, dtype=torch.float64)
    image_mask = torch.rand(batch, positions, generator=generator) < 0.5
    text_mask = torch.rand(batch, positions, generator=generator) < 0.5
    # Every sample needs at least one position of each kind for all four strategies.
    image_mask[:, 0] = True
    text_mask[torch.arange(batch), torch.randint(0, positions, (batch,), generator=generator)] = True
    strategies = list(POOLING_STRATEGIES)
    pooled = pool_hidden_states(hidden, image_mask, text_mask, strategies)
    assert pooled.dtype == torch.float64
    assert torch.allclose(pooled, _naive(hidden, image_mask, text_mask, strategies), atol=1e-12)


def test_text_token_last_skips_padding_on_either_side():
    hidden = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1).repeat(2, 1, 1, 1)
    image = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2, dtype=torch.bool)
    text = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)  # right, left padded
    pooled = pool_hidden_states(hidden, image, text, ["text_token_last", "text_token_mean", "prefix_mean"])
    assert pooled[:, 0, 0, 0].tolist() == [3.0, 5.0]
    assert pooled[:, 0, 1, 0].tolist() == [2.5, 4.5]
    assert pooled[:, 0, 2, 0].tolist() == [1.5, (0 + 1 + 4 + 5) / 4]


def test_output_follows_the_order_of_strategies():
    hidden = torch.randn(2, 2, 5, 3)
    image = torch.tensor([[1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    text = torch.tensor([[0, 0, 1, 1, 1]] * 2, dtype=torch.bool)
    forward = pool_hidden_states(hidden, image, text, list(POOLING_STRATEGIES))
    backward = pool_hidden_states(hidden, image, text, list(reversed(POOLING_STRATEGIES)))
    assert torch.equal(forward, backward.flip(2))


def test_non_finite_values_at_padding_do_not_leak():
    hidden = torch.randn(1, 1, 5, 2)
    hidden[0, 0, 4] = float("nan")
    hidden[0, 0, 3] = float("inf")
    image = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    text = torch.tensor([[0, 0, 1, 0, 0]], dtype=torch.bool)
    pooled = pool_hidden_states(hidden, image, text, list(POOLING_STRATEGIES))
    assert torch.isfinite(pooled).all()


def test_differentiable_and_gradient_ignores_unselected_positions():
    hidden = torch.randn(2, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    image = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    text = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    strategies = list(POOLING_STRATEGIES)
    weights = torch.randn(2, 2, len(strategies), 3, dtype=torch.float64)
    (pool_hidden_states(hidden, image, text, strategies) * weights).sum().backward()
    vectorised = hidden.grad.clone()
    hidden.grad = None
    (_naive(hidden, image, text, strategies) * weights).sum().backward()
    assert torch.allclose(vectorised, hidden.grad, atol=1e-12)
    unused = ~(image | text)
    assert torch.all(hidden.grad.permute(0, 2, 1, 3)[unused] == 0)
    assert torch.all(hidden.grad.permute(0, 2, 1, 3)[~unused] != 0)


def test_bf16_hidden_gives_float32_means_of_the_bf16_values():
    hidden = (torch.randn(1, 1, 300, 4) * 10).to(torch.bfloat16)
    image = torch.zeros(1, 300, dtype=torch.bool)
    image[0, :256] = True
    text = ~image
    pooled = pool_hidden_states(hidden, image, text, ["vision_token_mean"])
    assert pooled.dtype == torch.float32
    expected = hidden.double()[0, 0, :256].mean(0)
    assert torch.allclose(pooled[0, 0, 0].double(), expected, atol=1e-5)


def test_sample_without_positions_names_index_and_strategy():
    hidden = torch.randn(3, 1, 4, 2)
    image = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    text = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"sample 2 has no image positions .*'vision_token_mean'"):
        pool_hidden_states(hidden, image, text, ["vision_token_mean"])
    with pytest.raises(ValueError, match=r"sample 1 has no valid language positions .*'text_token_last'"):
        pool_hidden_states(hidden, image, text, ["text_token_last"])
    with pytest.raises(ValueError, match=r"sample 1 .*'text_token_mean'"):
        pool_hidden_states(hidden, image, text, ["text_token_mean"])
    # prefix_mean only needs one of the two kinds per sample.
    assert pool_hidden_states(hidden, image, text, ["prefix_mean"]).shape == (3, 1, 1, 2)


def test_bad_arguments_are_named():
    hidden = torch.randn(2, 1, 4, 2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown strategy 'cls_token'.*vision_token_mean"):
        pool_hidden_states(hidden, mask, mask, ["cls_token"])
    with pytest.raises(ValueError, match="strategies is empty"):
        pool_hidden_states(hidden, mask, mask, [])
    with pytest.raises(TypeError, match="sequence of names"):
        pool_hidden_states(hidden, mask, mask, "prefix_mean")
    with pytest.raises(TypeError, match="image_mask must be a bool"):
        pool_hidden_states(hidden, mask.long(), mask, ["prefix_mean"])
    with pytest.raises(ValueError, match=r"text_mask has shape \(2, 5\).*\(2, 4\)"):
        pool_hidden_states(hidden, mask, torch.ones(2, 5, dtype=torch.bool), ["prefix_mean"])
    with pytest.raises(ValueError, match=r"hidden must be a floating tensor \[B, L, T, D\]"):
        pool_hidden_states(torch.randn(2, 4, 2), mask, mask, ["prefix_mean"])
