"""Tests of companion.causal_lm_loss against the float64 reference and transformers."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from companion import IGNORE_INDEX, reference
from companion.causal_lm_loss import (
    attention_mask_filter_loss,
    count_scored_targets,
    label_padding_loss,
    shift_and_slice_loss,
    token_losses,
    unshifted_token_loss,
)
from tests.shared import logits_and_labels


shapes = st.tuples(
    st.integers(min_value=1, max_value=4),  # B
    st.integers(min_value=2, max_value=8),  # T
    st.integers(min_value=2, max_value=11),  # V
)


seeds = st.integers(min_value=0, max_value=2**16)


dtypes = st.sampled_from([torch.float32, torch.float64])


def make_batch(
    batch: int,
    time: int,
    vocab: int,
    seed: int,
    *,
    dtype: torch.dtype = torch.float64,
    ignore_fraction: float = 0.3,
    scale: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits, labels with random -100s, and a right-padding mask."""
    generator = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)).to(
        dtype
    )
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    ignored = torch.rand(batch, time, generator=generator) < ignore_fraction
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    lengths = torch.randint(1, time + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(time)[None, :] < lengths[:, None]).long()
    return logits, labels, attention_mask


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}


def assert_loss_close(got: torch.Tensor, expected: float, dtype: torch.dtype) -> None:
    if math.isnan(expected):
        assert math.isnan(float(got))
    else:
        np.testing.assert_allclose(float(got), expected, **tolerance(dtype))


# --- the three formulations against the float64 reference -------------------


@given(shapes, seeds, dtypes)
def test_shift_and_slice_matches_reference(shape, seed, dtype):
    logits, labels, _ = make_batch(*shape, seed, dtype=dtype)
    expected = reference.causal_lm_loss(logits.double().numpy(), labels.numpy())
    got = shift_and_slice_loss(logits, labels)
    assert got.dtype == dtype and got.dim() == 0
    assert_loss_close(got, expected, dtype)


@given(shapes, seeds, dtypes)
def test_label_padding_matches_reference(shape, seed, dtype):
    logits, labels, _ = make_batch(*shape, seed, dtype=dtype)
    expected = reference.causal_lm_loss(logits.double().numpy(), labels.numpy())
    assert_loss_close(label_padding_loss(logits, labels), expected, dtype)


@given(shapes, seeds, dtypes, st.integers(min_value=1, max_value=50), st.booleans())
def test_label_padding_with_num_items_matches_reference(shape, seed, dtype, num_items, as_tensor):
    logits, labels, _ = make_batch(*shape, seed, dtype=dtype)
    expected = reference.causal_lm_loss(
        logits.double().numpy(), labels.numpy(), num_items_in_batch=num_items
    )
    count = torch.tensor(num_items) if as_tensor else num_items
    assert_loss_close(label_padding_loss(logits, labels, num_items_in_batch=count), expected, dtype)


@given(shapes, seeds, dtypes)
def test_label_padding_equals_shift_and_slice(shape, seed, dtype):
    logits, labels, _ = make_batch(*shape, seed, dtype=dtype)
    a = float(label_padding_loss(logits, labels))
    b = float(shift_and_slice_loss(logits, labels))
    assert_loss_close(torch.tensor(a, dtype=torch.float64), b, dtype)


@given(shapes, seeds, dtypes)
def test_attention_mask_filter_is_reference_with_padded_targets_ignored(shape, seed, dtype):
    logits, labels, attention_mask = make_batch(*shape, seed, dtype=dtype, ignore_fraction=0.1)
    # The legacy code drops pair (t, t+1) when the mask at t+1 is 0: the same
    # as relabelling that target -100.
    masked_labels = labels.clone()
    masked_labels[:, 1:] = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    expected = reference.causal_lm_loss(logits.double().numpy(), masked_labels.numpy())
    assert_loss_close(attention_mask_filter_loss(logits, labels, attention_mask), expected, dtype)


@given(shapes, seeds)
def test_attention_mask_filter_agrees_when_padding_is_labelled_minus_100(shape, seed):
    logits, labels, attention_mask = make_batch(*shape, seed)
    labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    a = float(attention_mask_filter_loss(logits, labels, attention_mask))
    b = float(label_padding_loss(logits, labels))
    assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


@given(shapes, seeds)
def test_attention_mask_filter_longer_mask_is_cropped_from_the_left(shape, seed):
    logits, labels, attention_mask = make_batch(*shape, seed)
    batch = shape[0]
    prefix = torch.zeros(batch, 3, dtype=torch.long)
    longer = torch.cat([prefix, attention_mask], dim=1)
    a = float(attention_mask_filter_loss(logits, labels, longer))
    b = float(attention_mask_filter_loss(logits, labels, attention_mask))
    assert (math.isnan(a) and math.isnan(b)) or a == b


def test_attention_mask_filter_differs_when_padding_carries_labels():
    logits, labels, _ = make_batch(2, 6, 5, seed=3, ignore_fraction=0.0)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    legacy = float(attention_mask_filter_loss(logits, labels, attention_mask))
    current = float(label_padding_loss(logits, labels))
    # 8 targets survive the mask; the current code scores all 10.
    masked = labels.clone()
    masked[1, 3:] = IGNORE_INDEX
    assert legacy == pytest.approx(reference.causal_lm_loss(logits.numpy(), masked.numpy()))
    assert current == pytest.approx(reference.causal_lm_loss(logits.numpy(), labels.numpy()))
    assert abs(legacy - current) > 1e-3


def test_attention_mask_none_is_shift_and_slice():
    logits, labels, _ = make_batch(2, 5, 4, seed=1)
    assert torch.equal(
        attention_mask_filter_loss(logits, labels, None), shift_and_slice_loss(logits, labels)
    )


def test_bool_attention_mask_is_accepted():
    logits, labels, attention_mask = make_batch(2, 5, 4, seed=2)
    assert torch.equal(
        attention_mask_filter_loss(logits, labels, attention_mask.bool()),
        attention_mask_filter_loss(logits, labels, attention_mask),
    )


@given(shapes, seeds)
def test_unshifted_loss_matches_reference_cross_entropy(shape, seed):
    logits, labels, _ = make_batch(*shape, seed)
    vocab = shape[2]
    expected = reference.cross_entropy(logits.numpy().reshape(-1, vocab), labels.numpy().reshape(-1))
    assert_loss_close(unshifted_token_loss(logits, labels), expected, torch.float64)


@given(shapes, seeds)
def test_count_scored_targets_counts_labels_after_position_zero(shape, seed):
    _, labels, _ = make_batch(*shape, seed)
    expected = sum(
        1 for row in labels.tolist() for label in row[1:] if label != IGNORE_INDEX
    )
    assert count_scored_targets(labels) == expected


def test_custom_ignore_index_is_honoured():
    logits, labels, _ = make_batch(2, 6, 5, seed=4, ignore_fraction=0.0)
    labels[0, 2] = 7  # out of [0, 5) but equal to the chosen ignore_index
    relabelled = labels.clone()
    relabelled[0, 2] = IGNORE_INDEX
    expected = reference.causal_lm_loss(logits.numpy(), relabelled.numpy())
    for loss in (shift_and_slice_loss, label_padding_loss):
        assert float(loss(logits, labels, ignore_index=7)) == pytest.approx(expected)


# --- reductions, nan and precision --------------------------------------------


def test_all_ignored_gives_nan_for_the_mean_and_zero_for_the_sum():
    logits, _, attention_mask = make_batch(2, 4, 3, seed=0)
    labels = torch.full((2, 4), IGNORE_INDEX)
    # mean = 0 / 0: no target enters the loss
    assert math.isnan(float(shift_and_slice_loss(logits, labels)))
    assert math.isnan(float(label_padding_loss(logits, labels)))
    assert math.isnan(float(attention_mask_filter_loss(logits, labels, attention_mask)))
    # sum / num_items_in_batch = 0 / n
    assert float(label_padding_loss(logits, labels, num_items_in_batch=5)) == 0.0


def test_nan_loss_has_zero_gradient():
    logits, _, _ = make_batch(1, 4, 3, seed=0)
    logits.requires_grad_(True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    loss = label_padding_loss(logits, labels)
    loss.backward()
    assert math.isnan(float(loss.detach()))
    assert torch.count_nonzero(logits.grad) == 0


def test_micro_batches_sharing_num_items_give_the_full_batch_mean():
    logits, labels, _ = make_batch(4, 7, 6, seed=11, ignore_fraction=0.0)
    labels[:2, 1:5] = IGNORE_INDEX  # first half: 2 targets per row; second half: 6
    full = float(label_padding_loss(logits, labels))
    total = count_scored_targets(labels)
    halves = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    shared = sum(float(label_padding_loss(x, y, num_items_in_batch=total)) for x, y in halves)
    mean_of_means = sum(float(label_padding_loss(x, y)) for x, y in halves) / 2
    assert shared == pytest.approx(full, rel=1e-12)
    assert abs(mean_of_means - full) > 1e-3


def test_half_precision_is_upcast_to_float32():
    logits, labels, _ = make_batch(2, 5, 4, seed=5, dtype=torch.float32)
    got = label_padding_loss(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    expected = reference.causal_lm_loss(logits.bfloat16().double().numpy(), labels.numpy())
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_float64_stays_float64_while_dot_float_casts_it_down():
    logits, labels, _ = make_batch(2, 5, 4, seed=6, dtype=torch.float64)
    assert label_padding_loss(logits, labels).dtype == torch.float64
    # transformers' logits.float() casts every dtype to float32
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert logits.to(dtype).float().dtype == torch.float32


def test_printed_sources_fit_in_79_columns():
    from companion.experiments.source import source_of

    for function in (shift_and_slice_loss, label_padding_loss,
                     attention_mask_filter_loss):
        lines = source_of(function).splitlines()
        assert max(len(line) for line in lines) <= 79, function.__name__


# --- the library behaviours the chapter states --------------------------------


def test_cross_entropy_loss_defaults_are_the_ones_the_chapter_states():
    loss = nn.CrossEntropyLoss()
    assert loss.reduction == "mean"
    assert loss.ignore_index == -100
    assert loss.weight is None
    assert loss.label_smoothing == 0.0


def test_cross_entropy_is_log_softmax_then_nll():
    logits, labels, _ = make_batch(3, 5, 7, seed=6, dtype=torch.float32)
    x, y = logits.view(-1, 7), labels.view(-1)
    assert torch.equal(nn.CrossEntropyLoss()(x, y), nn.NLLLoss()(nn.LogSoftmax(dim=-1)(x), y))


def test_pinned_transformers_version():
    import transformers

    assert transformers.__version__ == "5.23.0"


def test_for_causal_lm_loss_source_has_the_quoted_lines():
    from transformers.loss import loss_utils

    source = inspect.getsource(loss_utils.ForCausalLMLoss)
    for line in (
        "logits = logits.float()",
        "labels = nn.functional.pad(labels, (0, 1), value=ignore_index)",
        "shift_labels = labels[..., 1:].contiguous()",
        "logits = logits.view(-1, vocab_size)",
        "loss = fixed_cross_entropy(logits, shift_labels, num_items_in_batch, ignore_index, **kwargs)",
    ):
        assert line in source
    reduction = inspect.getsource(loss_utils.fixed_cross_entropy)
    assert 'reduction = "sum" if num_items_in_batch is not None else "mean"' in reduction
    assert "loss = loss / num_items_in_batch" in reduction
    assert loss_utils.LOSS_MAPPING["ForConditionalGeneration"] is loss_utils.ForCausalLMLoss


@given(shapes, seeds, st.one_of(st.none(), st.integers(min_value=1, max_value=40)))
def test_transformers_for_causal_lm_loss_equals_label_padding(shape, seed, num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels, _ = make_batch(*shape, seed, dtype=torch.float32)
    expected = ForCausalLMLoss(logits, labels, vocab_size=shape[2], num_items_in_batch=num_items)
    got = label_padding_loss(logits, labels, num_items_in_batch=num_items)
    if math.isnan(float(expected)):
        assert math.isnan(float(got))
    else:
        assert float(got) == float(expected)


# --- argument checks ------------------------------------------------------------

LOSSES = [shift_and_slice_loss, label_padding_loss, unshifted_token_loss, token_losses]


@pytest.mark.parametrize("loss", LOSSES)
def test_logits_not_3d_is_rejected(loss):
    with pytest.raises(ValueError, match=r"logits must be a 3-D tensor \(B, T, V\)"):
        loss(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("loss", LOSSES)
def test_labels_shape_must_match_logits(loss):
    with pytest.raises(ValueError, match=r"labels must have shape \(B, T\) matching"):
        loss(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bad", [3, -1, -99])
def test_labels_out_of_range_are_rejected(loss, bad):
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss(torch.zeros(2, 5, 3), labels)


@pytest.mark.parametrize("loss", LOSSES)
def test_float_labels_are_rejected(loss):
    with pytest.raises(TypeError, match="labels must hold integer class indices"):
        loss(torch.zeros(2, 5, 3), torch.zeros(2, 5))


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_logits_are_rejected(loss):
    with pytest.raises(TypeError, match="logits must have a floating-point dtype"):
        loss(torch.zeros(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("loss", LOSSES)
def test_non_tensor_is_rejected(loss):
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        loss(np.zeros((2, 5, 3)), torch.zeros(2, 5, dtype=torch.long))


def test_single_position_has_no_pair_and_gives_nan_as_transformers_does():
    # T = 1: no next-token target.  transformers' ForCausalLMLoss (and the
    # eager shift and slice) give the mean over no pair, nan; the sum over
    # num_items_in_batch is 0.  Every formulation agrees
    # (tests/test_bad_inputs.py checks the chunked ones too).
    logits = torch.zeros(2, 1, 3)
    labels = torch.zeros(2, 1, dtype=torch.long)
    for loss in (shift_and_slice_loss, label_padding_loss):
        assert math.isnan(float(loss(logits, labels)))
    assert math.isnan(float(attention_mask_filter_loss(
        logits, labels, torch.ones(2, 1, dtype=torch.long))))
    assert float(label_padding_loss(logits, labels, num_items_in_batch=3)) == 0.0
    with pytest.raises(ValueError, match="T >= 1"):
        shift_and_slice_loss(torch.zeros(2, 0, 3), torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize(
    ("count", "error", "message"),
    [
        (0, ValueError, "num_items_in_batch must be >= 1"),
        (2.0, TypeError, "num_items_in_batch must be an int"),
        (torch.tensor([3]), ValueError, "num_items_in_batch must be a 0-D tensor"),
        (torch.tensor(3.0), TypeError, "num_items_in_batch must hold integer"),
        (torch.tensor(0), ValueError, "num_items_in_batch must be >= 1"),
    ],
)
def test_bad_num_items_in_batch_is_rejected(count, error, message):
    with pytest.raises(error, match=message):
        label_padding_loss(torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long),
                           num_items_in_batch=count)


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (torch.ones(2, 5), TypeError, "attention_mask must hold integers or booleans"),
        (torch.ones(5, dtype=torch.long), ValueError, "attention_mask must be a 2-D tensor"),
        (torch.ones(3, 5, dtype=torch.long), ValueError, "attention_mask must have shape"),
        (torch.ones(2, 3, dtype=torch.long), ValueError, "at least T-1=4 columns"),
        ([[1] * 5] * 2, TypeError, "attention_mask must be a torch.Tensor"),
    ],
)
def test_bad_attention_mask_is_rejected(mask, error, message):
    with pytest.raises(error, match=message):
        attention_mask_filter_loss(torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long), mask)


def test_bad_ignore_index_is_rejected():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        shift_and_slice_loss(torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long),
                             ignore_index=-100.0)


def test_bad_ignore_index_is_rejected_by_the_unshifted_loss():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        unshifted_token_loss(
            torch.zeros(2, 5, 3), torch.zeros(2, 5, dtype=torch.long),
            ignore_index=True,
        )


def test_count_scored_targets_checks_its_argument():
    with pytest.raises(ValueError, match=r"labels must be a 2-D tensor \(B, T\)"):
        count_scored_targets(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must hold integer"):
        count_scored_targets(torch.zeros(2, 5))



# ---------------------------------------------------------------------------
# The summed loss, the count and the per-token losses against the reference
# ---------------------------------------------------------------------------


@given(logits_and_labels())
def test_count_scored_targets_counts_shifted_labels(pair):
    _, labels = pair
    assert count_scored_targets(labels) == int(np.sum(labels.numpy()[:, 1:] != -100))


@given(logits_and_labels())
def test_summed_loss_matches_reference(pair):
    """``num_items_in_batch=1`` divides by one: the summed loss of a batch."""
    logits, labels = pair
    expected = reference.causal_lm_loss(logits.numpy(), labels.numpy(), num_items_in_batch=1)
    got = label_padding_loss(logits, labels, num_items_in_batch=1)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(logits_and_labels())
def test_token_losses_match_reference_per_position(pair):
    logits, labels = pair
    batch, time, vocab = logits.shape
    got = token_losses(logits, labels)
    assert got.shape == (batch, time - 1)
    expected = reference.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).numpy(), labels[:, 1:].reshape(-1).numpy(), reduction="none"
    ).reshape(batch, time - 1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    summed = float(label_padding_loss(logits, labels, num_items_in_batch=1))
    assert float(got.sum()) == pytest.approx(summed, rel=1e-12, abs=1e-12)


def test_token_losses_follow_the_rules_of_every_loss():
    logits = torch.randn(2, 1, 5, dtype=torch.float16)
    assert token_losses(logits, torch.zeros(2, 1, dtype=torch.long)).shape == (2, 0)
    labels = torch.tensor([[1, 2, 3], [4, -1, 0]])
    got = token_losses(torch.randn(2, 3, 5, dtype=torch.bfloat16), labels, ignore_index=-1)
    assert got.dtype == torch.float32 and got[1, 0] == 0.0


def test_summed_loss_without_targets_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 3), -100)
    total = label_padding_loss(logits, labels, num_items_in_batch=1)
    total.backward()
    assert total.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_summed_loss_errors():
    with pytest.raises(TypeError, match="labels must hold integer"):
        label_padding_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2), num_items_in_batch=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        label_padding_loss(torch.zeros(1, 2, 3), torch.tensor([[0, 5]]), num_items_in_batch=1)
    with pytest.raises(ValueError, match="logits must be a 3-D"):
        label_padding_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), num_items_in_batch=1)


def test_shift_and_slice_takes_num_items_in_batch_as_label_padding_does():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3], [0, -100, -100, 4]])
    for count in (1, 7, torch.tensor(7)):
        sliced = shift_and_slice_loss(logits, labels, num_items_in_batch=count)
        padded = label_padding_loss(logits, labels, num_items_in_batch=count)
        assert sliced.item() == pytest.approx(padded.item(), rel=1e-12)
    one_position = shift_and_slice_loss(logits[:, :1], labels[:, :1], num_items_in_batch=3)
    assert one_position.item() == 0.0
