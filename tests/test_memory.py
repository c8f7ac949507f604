"""Tests of companion.memory: the exact tracker, and the count from first
principles against it."""

from __future__ import annotations

import pytest
import torch

from companion.experiments.loss_memory import (
    CHUNKED_VARIANTS,
    LOSS_VARIANTS,
    eager_label_padding_loss,
)
from companion.memory import (
    ESTIMATED_VARIANTS,
    TensorMemoryTracker,
    estimate_peak_bytes,
    measure_peak_tensor_bytes,
)


# --------------------------------------------------------------------------
# Memory: the count from first principles against the exact tracker
# --------------------------------------------------------------------------


def test_tracker_counts_live_storage_exactly():
    with TensorMemoryTracker() as tracker:
        first = torch.empty(1000, dtype=torch.float32).fill_(1.0)
        view = first[10:]  # a view: no new memory
        del first, view
        second = torch.ones(300, dtype=torch.float64)
    assert tracker.peak_bytes == 4000
    assert tracker.live_bytes == 2400
    del second


@pytest.mark.parametrize(("batch", "time"), [(1, 256), (2, 128)])
@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_estimate_matches_tracked_peak(variant, batch, time):
    """The chapter's buffer count (three (B, T, V) tensors for eager, ...) holds in torch 2.13."""
    torch.manual_seed(5)
    hidden_size, vocab, chunk_size = 64, 3000, 64
    hidden = torch.randn(batch, time, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, time))
    kwargs = {"chunk_size": chunk_size} if variant in CHUNKED_VARIANTS else {}
    measured = measure_peak_tensor_bytes(LOSS_VARIANTS[variant], hidden, weight, labels, **kwargs)
    estimate = estimate_peak_bytes(variant, batch, time, vocab, hidden_size, chunk_size=chunk_size)
    assert measured == pytest.approx(estimate, rel=0.03)


def test_eager_peak_is_three_logits_tensors():
    torch.manual_seed(6)
    batch, time, hidden_size, vocab = 1, 200, 16, 5000
    hidden = torch.randn(batch, time, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, time))
    logits_bytes = batch * time * vocab * 4
    peak = measure_peak_tensor_bytes(eager_label_padding_loss, hidden, weight, labels)
    assert 3 * logits_bytes <= peak < 3.01 * logits_bytes


@pytest.mark.parametrize("chunk_size", [32, 200])
def test_bfloat16_estimate_matches_tracked_peak(chunk_size):
    """bfloat16: the block of rows of both dtypes, the float32 weight sum, the gradients."""
    torch.manual_seed(7)
    batch, time, hidden_size, vocab = 1, 256, 64, 3000
    hidden = torch.randn(batch, time, hidden_size, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, time))
    measured = measure_peak_tensor_bytes(
        LOSS_VARIANTS["chunked_function"], hidden, weight, labels, chunk_size=chunk_size
    )
    estimate = estimate_peak_bytes(
        "chunked_function", batch, time, vocab, hidden_size, chunk_size=chunk_size, element_size=2
    )
    assert measured == pytest.approx(estimate, rel=0.03)


def test_estimate_default_chunk_is_the_default_budget():
    from companion.chunked_loss import chunk_rows

    assert estimate_peak_bytes("chunked_function", 1, 2048, 32000, 512) == estimate_peak_bytes(
        "chunked_function", 1, 2048, 32000, 512, chunk_size=chunk_rows(32000, 512)
    )


def test_tracker_times_every_call():
    with TensorMemoryTracker() as tracker:
        first = torch.ones(100)
        second = first * 2
    assert len(tracker.times) == len(tracker.timeline) == 2
    assert 0 <= tracker.times[0] <= tracker.times[1] <= tracker.elapsed()
    del first, second


def test_estimate_rejects_unknown_variant_and_bad_sizes():
    with pytest.raises(ValueError, match="variant must be one of"):
        estimate_peak_bytes("fused", 1, 2, 3, 4)
    with pytest.raises(ValueError, match="time must be >= 1"):
        estimate_peak_bytes("label_padding", 1, 0, 3, 4)



def test_the_estimate_knows_every_variant_the_chapter_compares():
    assert tuple(LOSS_VARIANTS) == ESTIMATED_VARIANTS
