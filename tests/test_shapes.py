"""Tests of companion.shapes: the shift and the flatten."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from companion import reference
from companion.experiments.shapes import slice_is_contiguous, trace_shift_and_flatten
from companion.shapes import (
    check_logits_and_labels,
    flatten_for_cross_entropy,
    shift_for_next_token,
)
from tests.shared import btv_dims, make_logits_and_labels


@given(btv_dims, st.integers(0, 2**16))
def test_flatten_pairs_position_t_with_label_t_plus_1(shape, seed):
    batch, time, vocab = shape
    logits, labels = make_logits_and_labels(batch, time, vocab, seed)
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    assert flat_logits.shape == (batch * (time - 1), vocab)
    assert flat_labels.shape == (batch * (time - 1),)
    np.testing.assert_array_equal(
        flat_logits.numpy(), logits.numpy()[:, :-1, :].reshape(-1, vocab)
    )
    np.testing.assert_array_equal(flat_labels.numpy(), labels.numpy()[:, 1:].reshape(-1))
    # row (b, t) of the flat tensor is position t of sequence b, scored against t + 1
    b, t = batch - 1, time - 2
    assert torch.equal(flat_logits[b * (time - 1) + t], logits[b, t])
    assert flat_labels[b * (time - 1) + t] == labels[b, t + 1]


@given(btv_dims, st.integers(0, 2**16))
def test_cross_entropy_of_flat_tensors_is_the_next_token_loss(shape, seed):
    logits, labels = make_logits_and_labels(*shape, seed=seed)
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    expected = reference.causal_lm_loss(logits.numpy(), labels.numpy())
    got = F.cross_entropy(flat_logits.double(), flat_labels).item()
    if np.isnan(expected):
        assert np.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(btv_dims)
def test_shift_returns_views_contiguous_only_for_batch_of_one(shape):
    batch, time, vocab = shape
    logits, labels = make_logits_and_labels(batch, time, vocab)
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    assert shift_logits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    assert shift_labels.untyped_storage().data_ptr() == labels.untyped_storage().data_ptr()
    assert shift_logits.stride() == logits.stride()
    assert shift_logits.is_contiguous() == (batch == 1)
    assert shift_labels.is_contiguous() == (batch == 1)
    assert slice_is_contiguous(batch, time, vocab) == (batch == 1)


def test_view_of_the_sliced_logits_fails_for_batches_and_reshape_copies():
    """The library behaviour the chapter explains: .view needs compatible strides."""
    logits, labels = make_logits_and_labels(2, 5, 3)
    sliced = logits[..., :-1, :]
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        sliced.view(-1, 3)
    reshaped = sliced.reshape(-1, 3)
    assert reshaped.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
    single = logits[:1, :-1, :]
    assert single.view(-1, 3).data_ptr() == logits.data_ptr()
    assert single.reshape(-1, 3).data_ptr() == logits.data_ptr()
    packed = logits.contiguous()
    assert packed is logits


@pytest.mark.parametrize(
    ("logits", "labels", "error", "pattern"),
    [
        (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), ValueError,
         r"logits must be a 3-D tensor \(B, T, V\); got shape \(2, 5\)"),
        (torch.zeros(2, 5, 3), torch.zeros(10, dtype=torch.long), ValueError,
         r"labels must be a 2-D tensor \(B, T\); got shape \(10,\)"),
        (torch.zeros(2, 5, 3), torch.zeros(3, 5, dtype=torch.long), ValueError,
         r"labels must have shape \(B, T\) matching .* logits \(2, 5\); got shape \(3, 5\)"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), ValueError,
         r"labels must have shape \(B, T\) matching .* logits \(2, 5\); got shape \(2, 4\)"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5), TypeError,
         r"labels must hold integer class indices .* got torch.float32"),
        (torch.zeros(2, 5, 3, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long), TypeError,
         r"logits must have a floating-point dtype; got torch.int64"),
        (torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long), ValueError,
         r"T >= 2 .* got T=1"),
        (np.zeros((2, 5, 3)), torch.zeros(2, 5, dtype=torch.long), TypeError,
         r"logits must be a torch.Tensor; got ndarray"),
    ],
)
def test_bad_input_names_the_argument(logits, labels, error, pattern):
    for function in (check_logits_and_labels, shift_for_next_token, flatten_for_cross_entropy,
                     trace_shift_and_flatten):
        with pytest.raises(error, match=pattern):
            function(logits, labels)
