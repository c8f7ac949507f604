"""Tests of companion.experiments.shapes: the step trace, sizes, TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from companion.experiments.shapes import (
    logits_nbytes,
    tf_shift_and_flatten,
    trace_shift_and_flatten,
)
from companion.shapes import flatten_for_cross_entropy
from tests.shared import btv_dims, make_logits_and_labels


@given(btv_dims)
def test_trace_marks_exactly_the_contiguous_step_as_a_copy_when_batch_exceeds_one(shape):
    batch, time, vocab = shape
    logits, labels = make_logits_and_labels(batch, time, vocab)
    steps = {(s.tensor, s.code): s for s in trace_shift_and_flatten(logits, labels)}
    copies = {key for key, s in steps.items() if s.copied}
    if batch == 1:
        assert copies == set()
    else:
        assert copies == {("logits", ".contiguous()"), ("labels", ".contiguous()")}
    flat = steps[("logits", ".view(-1, V)")]
    assert flat.shape == (batch * (time - 1), vocab)
    assert flat.stride == (vocab, 1)
    assert flat.nbytes == batch * (time - 1) * vocab * 4
    assert steps[("logits", "logits")].stride == (time * vocab, vocab, 1)
    assert steps[("labels", ".to(logits.device)")].copied is False


@given(btv_dims)
def test_meta_trace_matches_real_trace(shape):
    batch, time, vocab = shape
    logits, labels = make_logits_and_labels(batch, time, vocab)
    real = trace_shift_and_flatten(logits, labels)
    meta = trace_shift_and_flatten(logits.to("meta"), labels.to("meta"))
    assert [s.as_row() for s in meta] == [s.as_row() for s in real]


def test_trace_at_realistic_size_costs_no_memory_and_counts_the_copy():
    batch, time, vocab = 8, 4096, 32000
    logits = torch.empty(batch, time, vocab, device="meta")
    labels = torch.empty(batch, time, dtype=torch.long, device="meta")
    steps = trace_shift_and_flatten(logits, labels)
    copy = next(s for s in steps if s.tensor == "logits" and s.copied)
    assert copy.nbytes == batch * (time - 1) * vocab * 4 == 4_193_280_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_logits_nbytes_matches_an_allocated_tensor(dtype):
    assert logits_nbytes(3, 5, 7, dtype) == torch.empty(3, 5, 7, dtype=dtype).nbytes


@given(btv_dims, st.integers(0, 2**16))
def test_tensorflow_flatten_equals_pytorch_flatten(shape, seed):
    logits, labels = make_logits_and_labels(*shape, seed=seed)
    tf_logits, tf_labels = tf_shift_and_flatten(logits.numpy(), labels.numpy())
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    np.testing.assert_array_equal(tf_logits.numpy(), flat_logits.numpy())
    np.testing.assert_array_equal(tf_labels.numpy(), flat_labels.numpy())


@pytest.mark.parametrize(
    ("logits", "labels", "error", "pattern"),
    [
        (np.zeros((2, 5), np.float32), np.zeros((2, 5), np.int64), ValueError, r"logits must be a 3-D"),
        (np.zeros((2, 5, 3), np.float32), np.zeros((2, 4), np.int64), ValueError,
         r"labels must have shape \(B, T\)"),
        (np.zeros((2, 5, 3), np.float32), np.zeros((2, 5), np.float32), TypeError,
         r"labels must hold integer"),
        (np.zeros((2, 5, 3), np.int32), np.zeros((2, 5), np.int64), TypeError,
         r"logits must have a floating-point dtype"),
    ],
)
def test_tensorflow_bad_input_names_the_argument(logits, labels, error, pattern):
    with pytest.raises(error, match=pattern):
        tf_shift_and_flatten(logits, labels)
