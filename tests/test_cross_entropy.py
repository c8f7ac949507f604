"""Tests of companion.cross_entropy.

Every function is checked against the float64 NumPy reference over random
shapes, magnitudes, ignore patterns, weights and dtypes, and against
PyTorch; the PyTorch behaviour that the from-scratch code follows and the
chapter states is pinned, so an upgrade that changes it fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import IGNORE_INDEX, reference
from companion import cross_entropy as ce
from tests.shared import DTYPES, as_torch, assert_close, cross_entropy_cases, tolerance


# ---------------------------------------------------------------------------
# From scratch against the reference
# ---------------------------------------------------------------------------


@given(cross_entropy_cases(with_weight=False))
def test_log_softmax_matches_reference(case):
    logits, _, _, _, dtype_name = case
    ours = ce.log_softmax(torch.from_numpy(logits))
    assert ours.dtype == DTYPES[dtype_name][0]
    assert torch.isfinite(ours).all()
    assert_close(ours, reference.log_softmax(logits), tolerance(logits, dtype_name))


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_cross_entropy_matches_reference(case, reduction):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    ours = ce.cross_entropy(x, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    expected = reference.cross_entropy(
        logits, targets, weight=weight, ignore_index=ignore_index, reduction=reduction
    )
    assert ours.dtype == x.dtype
    assert_close(ours, expected, tolerance(logits, dtype_name))


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_nll_loss_matches_torch(case, reduction):
    logits, targets, weight, ignore_index, _ = case
    x, y, w = as_torch(logits, targets, weight)
    log_probs = torch.log_softmax(x, dim=1)
    ours = ce.nll_loss(log_probs, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    theirs = F.nll_loss(log_probs, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    # Same arithmetic on the same log-probabilities: only the summation order may differ.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, equal_nan=True)


@given(
    cross_entropy_cases(),
    st.sampled_from(ce.REDUCTIONS),
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_label_smoothing_matches_reference_and_torch(case, reduction, label_smoothing):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    options = dict(weight=w, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing)
    ours = ce.cross_entropy(x, y, **options)
    theirs = F.cross_entropy(x, y, **options)
    expected = reference.label_smoothed_cross_entropy(
        logits, targets, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )
    atol = tolerance(logits, dtype_name)
    assert_close(ours, expected, atol)
    assert_close(theirs, expected, atol)


# ---------------------------------------------------------------------------
# PyTorch behaviour the chapter states
# ---------------------------------------------------------------------------


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_torch_cross_entropy_is_nll_of_log_softmax_bit_for_bit(case, reduction):
    logits, targets, weight, ignore_index, _ = case
    x, y, w = as_torch(logits, targets, weight)
    fused = torch.nn.CrossEntropyLoss(weight=w, ignore_index=ignore_index, reduction=reduction)(x, y)
    composed = torch.nn.NLLLoss(weight=w, ignore_index=ignore_index, reduction=reduction)(
        torch.nn.LogSoftmax(dim=1)(x), y
    )
    assert torch.equal(fused, composed) or (fused.isnan().all() and composed.isnan().all())


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_torch_cross_entropy_matches_reference(case, reduction):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    theirs = F.cross_entropy(x, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    expected = reference.cross_entropy(logits, targets, weight=weight, ignore_index=ignore_index,
                                       reduction=reduction)
    assert_close(theirs, expected, tolerance(logits, dtype_name))


def test_torch_weighted_mean_divides_by_the_sum_of_target_weights():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2, IGNORE_INDEX])
    weight = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    per_row = F.cross_entropy(logits, targets, weight=weight, reduction="none")
    mean = F.cross_entropy(logits, targets, weight=weight)
    assert mean.item() == pytest.approx(per_row.sum().item() / 3.5, abs=1e-15)
    assert mean.item() != pytest.approx(per_row.sum().item() / 2, abs=1e-3)


def test_torch_all_ignored_gives_nan_mean_zero_sum_and_zero_gradient():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.full((4,), IGNORE_INDEX)
    mean = F.cross_entropy(logits, targets)
    assert torch.isnan(mean)
    assert F.cross_entropy(logits, targets, reduction="sum").item() == 0.0
    mean.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))
    assert torch.isnan(ce.cross_entropy(logits.detach(), targets))
    assert ce.cross_entropy(logits.detach(), targets, reduction="sum").item() == 0.0
    assert torch.equal(ce.cross_entropy_grad(logits.detach(), targets), torch.zeros(4, 3))


@settings(max_examples=30)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_torch_class_second_layout_equals_the_flattened_one(batch, num_classes, time, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, time, generator=gen)
    targets = torch.randint(0, num_classes, (batch, time), generator=gen)
    targets[torch.rand(batch, time, generator=gen) < 0.3] = IGNORE_INDEX
    flat_logits, flat_targets = ce.flatten_class_axis(logits, targets)
    assert flat_logits.shape == (batch * time, num_classes)
    for reduction in ("sum", "mean"):
        torch.testing.assert_close(
            F.cross_entropy(logits, targets, reduction=reduction),
            F.cross_entropy(flat_logits, flat_targets, reduction=reduction),
            rtol=1e-6, atol=1e-6, equal_nan=True,
        )
    per_position = F.cross_entropy(logits, targets, reduction="none")
    assert per_position.shape == (batch, time)
    # Equal up to float32 rounding, not bit for bit: log-softmax over a
    # strided class axis may sum in a different order.
    torch.testing.assert_close(per_position.reshape(-1),
                               F.cross_entropy(flat_logits, flat_targets, reduction="none"),
                               rtol=1e-6, atol=1e-6)


def test_torch_reads_btv_logits_as_t_classes():
    # (B, T, V) logits passed straight in: dimension 1 (T) is taken as the classes.
    logits = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    wrong = F.cross_entropy(logits, targets)
    right = F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1))
    assert abs(wrong.item() - right.item()) > 1e-3
    with pytest.raises(RuntimeError):
        F.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


def test_torch_rejects_out_of_range_targets():
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_torch_ignored_rows_take_any_finite_logits():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    targets = torch.tensor([IGNORE_INDEX, 1, 2, IGNORE_INDEX])
    reference_loss = F.cross_entropy(logits, targets)
    scrambled = logits.clone()
    scrambled[[0, 3]] = 1e4 * torch.randn(2, 5, dtype=torch.float64,
                                          generator=gen)
    scrambled.requires_grad_(True)
    loss = F.cross_entropy(scrambled, targets)
    loss.backward()
    assert torch.equal(loss, reference_loss)
    assert (scrambled.grad[[0, 3]] == 0).all()


@pytest.mark.parametrize("bad_value", [math.inf, math.nan])
def test_torch_non_finite_logit_in_ignored_row_gives_nan_gradient(
    bad_value,
):
    # The loss stays finite, but the log-softmax backward turns the ignored
    # row's gradient into nan, and it reaches any parameter of the row.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    targets = torch.tensor([IGNORE_INDEX, 1, 2])
    clean = F.cross_entropy(logits, targets)
    poisoned = logits.clone()
    poisoned[0, 2] = bad_value
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    with_bias = poisoned + bias
    with_bias.retain_grad()
    loss = F.cross_entropy(with_bias, targets)
    loss.backward()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(clean.item(), abs=1e-12)
    assert with_bias.grad[0].isnan().all()
    assert torch.isfinite(with_bias.grad[1:]).all()
    assert bias.grad.isnan().all()


# ---------------------------------------------------------------------------
# Gradient
# ---------------------------------------------------------------------------


@given(cross_entropy_cases(max_scale=30.0), st.sampled_from(["mean", "sum"]),
       st.sampled_from([0.0, 0.2]))
def test_gradient_matches_torch_autograd(case, reduction, label_smoothing):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    x.requires_grad_(True)
    F.cross_entropy(x, y, weight=w, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=label_smoothing).backward()
    ours = ce.cross_entropy_grad(x, y, weight=w, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing)
    atol = 1e-5 if dtype_name == "float32" else 1e-12
    torch.testing.assert_close(ours, x.grad, rtol=1e-4, atol=atol)
    ignored = y == ignore_index
    assert torch.equal(ours[ignored], torch.zeros_like(ours[ignored]))
    assert torch.equal(x.grad[ignored], torch.zeros_like(x.grad[ignored]))


@settings(max_examples=20)
@given(cross_entropy_cases(max_scale=1.0), st.sampled_from([0.0, 0.3]))
def test_gradient_matches_finite_differences_of_reference(case, label_smoothing):
    logits, targets, weight, ignore_index, _ = case
    logits = logits.astype(np.float64)
    weight = None if weight is None else weight.astype(np.float64)
    if (targets == ignore_index).all():
        return
    step = 1e-6
    numeric = np.zeros_like(logits)
    for index in np.ndindex(*logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        loss = [reference.label_smoothed_cross_entropy(
            z, targets, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
            for z in (up, down)]
        numeric[index] = (loss[0] - loss[1]) / (2 * step)
    x, y, w = as_torch(logits, targets, weight)
    analytic = ce.cross_entropy_grad(x, y, weight=w, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing)
    assert_close(analytic, numeric, 1e-7)


def test_gradient_rows_sum_to_zero_and_target_entry_is_negative():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([1, 2])
    grad = ce.cross_entropy_grad(logits, targets)
    probs = torch.softmax(logits, dim=1)
    expected = (probs - F.one_hot(targets, 3)) / 2
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad.sum(dim=1), torch.zeros(2, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert grad[0, 1] < 0 and grad[1, 2] < 0


def test_gradient_rejects_reduction_none():
    with pytest.raises(ValueError, match="reduction"):
        ce.cross_entropy_grad(torch.zeros(2, 3), torch.tensor([0, 1]), reduction="none")


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


GOOD_LOGITS = torch.zeros(3, 4)


GOOD_TARGETS = torch.tensor([0, 1, IGNORE_INDEX])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.zeros(3, 4, dtype=torch.long)), TypeError, "logits must have a floating"),
        (dict(logits=torch.zeros(3)), ValueError, r"logits must be a 2-D tensor \(N, C\)"),
        (dict(targets=torch.tensor([0.0, 1.0, 2.0])), TypeError, "targets must hold integer"),
        (dict(targets=torch.tensor([0, 1])), ValueError, r"targets must have shape \(N,\)"),
        (dict(targets=torch.tensor([[0, 1, 2]])), ValueError, r"targets must be a 1-D tensor"),
        (dict(targets=torch.tensor([0, 4, 1])), ValueError, r"targets must lie in \[0, 4\).*found 4"),
        (dict(targets=torch.tensor([0, -1, 1])), ValueError, "found -1"),
        (dict(weight=torch.ones(3)), ValueError, r"weight must have shape \(C,\) = \(4,\)"),
        (dict(weight=torch.ones(4, dtype=torch.float64)), TypeError, "weight must have the dtype"),
        (dict(weight=[1.0, 1.0, 1.0, 1.0]), TypeError, "weight must be a torch.Tensor"),
        (dict(reduction="average"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must lie in \[0, 1\]"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a float"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ],
)
def test_cross_entropy_rejects_bad_input(kwargs, error, match):
    arguments = dict(logits=GOOD_LOGITS, targets=GOOD_TARGETS) | kwargs
    logits, targets = arguments.pop("logits"), arguments.pop("targets")
    with pytest.raises(error, match=match):
        ce.cross_entropy(logits, targets, **arguments)



def test_other_functions_reject_bad_input():
    with pytest.raises(ValueError, match=r"log_probs must be a 2-D tensor"):
        ce.nll_loss(torch.zeros(4), GOOD_TARGETS)
    with pytest.raises(TypeError, match="logits must have a floating"):
        ce.log_softmax(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"targets must have shape \(B, T\)"):
        ce.flatten_class_axis(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------
# Units: nats, bits, perplexity, bits per character and per byte
# ---------------------------------------------------------------------------


@given(cross_entropy_cases(with_weight=False, max_scale=30.0))
def test_perplexity_of_a_summed_loss_matches_the_float64_reference(case):
    logits, targets, _, ignore_index, dtype_name = case
    kept = int((targets != ignore_index).sum())
    if kept == 0:
        return
    x, y, _ = as_torch(logits, targets)
    total = F.cross_entropy(x, y, ignore_index=ignore_index, reduction="sum")
    mean = reference.cross_entropy(logits, targets, ignore_index=ignore_index)
    expected = math.exp(mean)
    ours = ce.perplexity(total, kept)
    assert isinstance(ours, float)
    # exp turns an absolute error of the mean into a relative one
    assert abs(ours - expected) <= expected * (math.expm1(tolerance(logits, dtype_name)) + 1e-15)
    assert ours >= 1.0 - 1e-6


@pytest.mark.parametrize("k", [1, 2, 7, 1000, 50257])
def test_uniform_over_k_choices_has_perplexity_k_and_log2_k_bits(k):
    loss = F.cross_entropy(torch.zeros(3, k, dtype=torch.float64), torch.tensor([0, k - 1, k // 2]),
                           reduction="sum")
    assert abs(ce.perplexity(loss, 3) - k) < 1e-9 * k
    assert abs(ce.nats_to_bits(loss / 3) - math.log2(k)) < 1e-12


def test_perplexity_is_the_geometric_mean_of_one_over_p():
    probabilities = np.array([0.5, 0.25, 0.9, 0.01])
    total = float(-np.log(probabilities).sum())
    geometric = float(np.prod(1 / probabilities) ** (1 / len(probabilities)))
    assert abs(ce.perplexity(total, len(probabilities)) - geometric) < 1e-12
    assert ce.perplexity(math.inf, 3) == math.inf and ce.perplexity(0.0, 5) == 1.0
    # exp of a mean above log(float max) ~ 709.78 overflows to inf, not an error
    assert ce.perplexity(1e4, 2) == math.inf and ce.perplexity(709.0, 1) < math.inf


@given(st.text(min_size=1, max_size=40), st.floats(0.0, 1e6))
def test_bits_per_character_and_byte_divide_one_total_by_the_text(text, total):
    per_char = ce.bits_per_character(total, text)
    per_byte = ce.bits_per_byte(total, text)
    assert abs(per_char * len(text) * math.log(2) - total) <= 1e-9 * max(total, 1.0)
    assert abs(per_byte * len(text.encode("utf-8")) * math.log(2) - total) <= 1e-9 * max(total, 1.0)
    assert per_byte <= per_char
    if text.isascii():
        assert per_byte == per_char


def test_bits_per_character_does_not_depend_on_the_tokenization():
    # the same total over two cuts of one text: two perplexities, one bpc
    text, total = "the café and the cat", 17.0
    by_characters, by_words = len(text), len(text.split())
    assert ce.perplexity(total, by_characters) < ce.perplexity(total, by_words)
    assert ce.bits_per_character(total, text) == ce.nats_to_bits(total) / by_characters
    assert ce.bits_per_byte(total, text) == ce.nats_to_bits(total) / (by_characters + 1)


def test_units_accept_tensors_and_numpy_numbers():
    assert ce.nats_to_bits(torch.tensor(math.log(2.0), dtype=torch.float64)) == 1.0
    assert abs(ce.nats_to_bits(np.float32(math.log(4.0))) - 2.0) < 1e-6
    assert ce.perplexity(torch.tensor(0.0), np.int64(4)) == 1.0
    assert abs(ce.bits_per_byte(torch.tensor(8 * math.log(2.0)), "ab") - 4.0) < 1e-6
