"""Tests of companion.shapes: the shift, the flatten and the step trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from companion import IGNORE_INDEX, reference
from companion.shapes import (
    check_logits_and_labels,
    flatten_for_cross_entropy,
    logits_nbytes,
    shift_for_next_token,
    slice_is_contiguous,
    tf_shift_and_flatten,
    trace_shift_and_flatten,
)

dims = st.tuples(
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=2, max_value=7),
    st.integers(min_value=1, max_value=9),
)


def make_batch(batch: int, time: int, vocab: int, seed: int = 0, ignore_fraction: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, time, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    ignored = torch.rand(batch, time, generator=generator) < ignore_fraction
    return logits, labels.masked_fill(ignored, IGNORE_INDEX)


@given(dims, st.integers(0, 2**16))
def test_flatten_pairs_position_t_with_label_t_plus_1(shape, seed):
    batch, time, vocab = shape
    logits, labels = make_batch(batch, time, vocab, seed)
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


@given(dims, st.integers(0, 2**16))
def test_cross_entropy_of_flat_tensors_is_the_next_token_loss(shape, seed):
    logits, labels = make_batch(*shape, seed=seed)
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    expected = reference.causal_lm_loss(logits.numpy(), labels.numpy())
    got = F.cross_entropy(flat_logits.double(), flat_labels).item()
    if np.isnan(expected):
        assert np.isnan(got)
    else:
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(dims)
def test_shift_returns_views_contiguous_only_for_batch_of_one(shape):
    batch, time, vocab = shape
    logits, labels = make_batch(batch, time, vocab)
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    assert shift_logits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    assert shift_labels.untyped_storage().data_ptr() == labels.untyped_storage().data_ptr()
    assert shift_logits.stride() == logits.stride()
    assert shift_logits.is_contiguous() == (batch == 1)
    assert shift_labels.is_contiguous() == (batch == 1)
    assert slice_is_contiguous(batch, time, vocab) == (batch == 1)


@given(dims)
def test_trace_marks_exactly_the_contiguous_step_as_a_copy_when_batch_exceeds_one(shape):
    batch, time, vocab = shape
    logits, labels = make_batch(batch, time, vocab)
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


@given(dims)
def test_meta_trace_matches_real_trace(shape):
    batch, time, vocab = shape
    logits, labels = make_batch(batch, time, vocab)
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


def test_view_of_the_sliced_logits_fails_for_batches_and_reshape_copies():
    """The library behaviour the chapter explains: .view needs compatible strides."""
    logits, labels = make_batch(2, 5, 3)
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


@given(dims, st.integers(0, 2**16))
def test_tensorflow_flatten_equals_pytorch_flatten(shape, seed):
    logits, labels = make_batch(*shape, seed=seed)
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


def test_shift_figure_draws_one_arrow_per_scored_pair():
    from matplotlib.patches import FancyArrowPatch

    from companion.plots.shapes import plot_shift_alignment

    fig = plot_shift_alignment(["<s>", "The", "cat", "sat"])
    ax = fig.axes[0]
    assert sum(isinstance(p, FancyArrowPatch) for p in ax.patches) == 3
    assert ax.get_xlabel()
    with pytest.raises(ValueError, match="tokens must hold at least 2"):
        plot_shift_alignment(["only"])


def test_memory_figure_colours_the_dropped_row_of_each_sequence():
    from matplotlib.colors import to_hex

    from companion.plots import COLORS
    from companion.plots.shapes import plot_slice_in_memory

    fig = plot_slice_in_memory(time=4, vocab=3, batches=(1, 2))
    top, bottom = fig.axes
    red = [p for p in bottom.patches if to_hex(p.get_facecolor()) == COLORS["dropped"]]
    assert len(bottom.patches) == 2 * 4 * 3
    assert len(red) == 2 * 3  # one dropped row of V elements per sequence
    assert [p.get_x() for p in red] == [9, 10, 11, 21, 22, 23]
    assert len(top.patches) == 12


def test_source_of_drops_the_docstring_and_keeps_the_code():
    from companion.source import source_of

    text = source_of(shift_for_next_token)
    assert text.startswith("def shift_for_next_token(")
    assert "Align each position" not in text
    assert text.endswith("return logits[..., :-1, :], labels[..., 1:]")
    assert "Align each position" in source_of(shift_for_next_token, docstring=True)
    with pytest.raises(TypeError, match="obj must be a function or class"):
        source_of(42)
