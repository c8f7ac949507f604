"""Plausible wrong answers to chapter 1's exercises; each must fail its checker."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scored_targets_same_for_both_sides(lengths, T, side):
    """Left padding moves tokens, so it cannot change the count (wrong)."""
    return sum(max(length - 1, 0) for length in lengths)


def scored_targets_every_left_row_gains_one(lengths, T, side):
    """Left padding scores every real token, even in a row with no padding."""
    if side == "left":
        return sum(lengths)
    return sum(max(length - 1, 0) for length in lengths)


def scored_targets_every_real_token(lengths, T, side):
    """Every labelled token is a target, column 0 included."""
    return sum(lengths)


def contiguous_exact_strides(shape, stride):
    """Compare with the packed strides, size-1 and empty axes included."""
    expected, packed = 1, []
    for size in reversed(shape):
        packed.append(expected)
        expected *= size
    return tuple(reversed(packed)) == tuple(stride)


def contiguous_ignores_empty(shape, stride):
    """Skip size-1 axes, but treat a tensor with no element like any other."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def contiguous_last_stride_one(shape, stride):
    """Contiguous means 'the last axis has stride 1'."""
    return len(stride) == 0 or stride[-1] == 1


def next_token_loss_reshaped(logits, labels):
    """Half-fix: reshape (B, T, V) to (B, V, T): right shape, scrambled rows."""
    batch, time, vocab = logits.shape
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(batch, vocab, time), targets, ignore_index=-100)


def next_token_loss_unshifted_view(logits, labels):
    """Half-fix: flatten the logits, but forget that the labels were shifted."""
    vocab = logits.size(-1)
    return F.cross_entropy(logits.view(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100)


def flatten_time_major_batch_order(logits, labels):
    """Shift on the time axis, but flatten the labels sequence by sequence."""
    vocab = logits.size(-1)
    return logits[:-1].view(-1, vocab), labels[:, 1:].reshape(-1)


def flatten_time_major_via_batch_major(logits, labels):
    """Transpose to (B, T, V) first, then the chapter's recipe: a copy."""
    batch_major = logits.transpose(0, 1)
    vocab = logits.size(-1)
    return batch_major[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1)


def flatten_time_major_wrong_end(logits, labels):
    """Drop the first time step of the logits instead of the last."""
    vocab = logits.size(-1)
    return logits[1:].reshape(-1, vocab), labels[:, 1:].t().reshape(-1)


def contiguous_skips_size_0_like_size_1(shape, stride):
    """Skip every axis of size <= 1: an empty axis is treated as a size-1 one."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size > 1 and step != expected:
            return False
        expected *= max(size, 1)
    return True


def scored_targets_as_tensor(lengths, T, side):
    """The right count, but built as a tensor and returned as one."""
    lengths = torch.tensor(lengths)
    if side == "right":
        return (lengths - 1).clamp(min=0).sum()
    return lengths.clamp(max=T - 1).sum()


def flatten_time_major_float_targets(logits, labels):
    """Right order, but the targets as floats: cross_entropy reads them as probabilities."""
    vocab = logits.size(-1)
    return logits[:-1].view(-1, vocab), labels[:, 1:].t().reshape(-1).float()


WRONG = {
    "shapes-ex1": [
        scored_targets_same_for_both_sides,
        scored_targets_every_left_row_gains_one,
        scored_targets_every_real_token,
        scored_targets_as_tensor,
    ],
    "shapes-ex2": [contiguous_skips_size_0_like_size_1, contiguous_exact_strides, contiguous_ignores_empty, contiguous_last_stride_one],
    "shapes-ex3": [next_token_loss_reshaped, next_token_loss_unshifted_view],
    "shapes-ex4": [
        flatten_time_major_batch_order,
        flatten_time_major_via_batch_major,
        flatten_time_major_wrong_end,
        flatten_time_major_float_targets,
    ],
}
