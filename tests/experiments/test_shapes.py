"""Tests of companion.experiments.shapes: the step trace, sizes, TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from companion.experiments.shapes import (
    logits_nbytes,
    shares_storage,
    tf_shift_and_flatten,
    trace_shift_and_flatten,
    trace_table,
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


# --- shares_storage and trace_table ---------------------------------------------


def test_shares_storage_compares_storage_not_the_first_element():
    x = torch.arange(24.0).reshape(2, 3, 4)
    # a slice that starts later in the block: another data_ptr, same storage
    later = x[:, 1:, :]
    assert later.data_ptr() != x.data_ptr()
    assert shares_storage(later, x) and shares_storage(x, later)
    assert shares_storage(x[..., :-1, :], x)
    assert shares_storage(x.view(-1, 4), x)
    assert not shares_storage(x.clone(), x)
    assert not shares_storage(x[..., :-1, :].contiguous(), x)
    # .reshape copies when no view exists, and only then
    assert not shares_storage(x[..., :-1, :].reshape(-1, 4), x)
    assert shares_storage(x[:1, :-1, :].reshape(-1, 4), x)
    assert not shares_storage(torch.arange(24.0), x)


def test_shares_storage_on_the_meta_device():
    x = torch.empty(2, 3, 4, device="meta")
    sliced = x[..., :-1, :]
    assert shares_storage(sliced, x)
    assert shares_storage(x[:, 1:], x[:, :1])  # two views of one tensor
    assert not shares_storage(sliced.contiguous(), x)
    assert not shares_storage(torch.empty(2, 3, 4, device="meta"), x)
    # a meta tensor has no memory to share with a real one
    real = torch.zeros(2, 3, 4)
    assert not shares_storage(x, real) and not shares_storage(real, x)


@pytest.mark.parametrize(
    ("result", "source", "name"),
    [(np.zeros(3), torch.zeros(3), "result"), (torch.zeros(3), [0.0], "source")],
)
def test_shares_storage_bad_input_names_the_argument(result, source, name):
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor"):
        shares_storage(result, source)


def test_trace_table_has_one_row_per_step_in_the_steps_order():
    logits, labels = make_logits_and_labels(2, 6, 10)
    steps = trace_shift_and_flatten(logits, labels)
    table = trace_table(steps)
    assert list(table.columns) == [
        "tensor", "code", "shape", "stride", "contiguous", "copied", "nbytes",
    ]
    assert table.to_dict("records") == [step.as_row() for step in steps]
    assert table["copied"].dtype == bool
    assert set(table.loc[table["copied"], "code"]) == {".contiguous()"}


def test_trace_table_of_no_steps_keeps_its_columns():
    table = trace_table([])
    assert table.empty and list(table.columns)[:2] == ["tensor", "code"]


@pytest.mark.parametrize(
    ("steps", "pattern"),
    [("steps", r"steps must be a sequence of TensorStep"),
     ([{"tensor": "logits"}], r"steps\[0\] must be a TensorStep")],
)
def test_trace_table_bad_input_names_the_argument(steps, pattern):
    with pytest.raises(TypeError, match=pattern):
        trace_table(steps)
