"""Plausible wrong answers to chapter 2's exercises; each must fail its checker."""

from __future__ import annotations

import math

import torch

from companion.causal_lm_loss import count_scored_targets, label_padding_loss


def scored_padding_plain_average(legacy_loss, n_answer, pad_losses):
    """Average the two means as if both groups were the same size."""
    return (legacy_loss + float(pad_losses.mean())) / 2


def scored_padding_nan_unsafe(legacy_loss, n_answer, pad_losses):
    """The weighted average, with an empty group's nan mean left in."""
    n_pad = pad_losses.numel()
    return (n_answer * legacy_loss + n_pad * float(pad_losses.mean())) / (n_answer + n_pad)


def accumulated_loss_last_column_dropped(micro_batches):
    """Half-fix: count labels[:, :-1], the columns the logits sit in."""
    num_items = sum(int((labels[:, :-1] != -100).sum()) for _, labels in micro_batches)
    return sum(label_padding_loss(x, y, num_items_in_batch=num_items) for x, y in micro_batches)


def accumulated_loss_own_counts(micro_batches):
    """Each micro-batch divided by its own count: a sum of means."""
    return sum(label_padding_loss(x, y) for x, y in micro_batches if count_scored_targets(y))


def perplexity_of_mean_loss(batch_losses, batch_labels):
    """exp of the average logged loss, empty batches skipped."""
    kept = [loss for loss in batch_losses if not math.isnan(loss)]
    return math.exp(sum(kept) / len(kept))


def perplexity_counts_every_label(batch_losses, batch_labels):
    """Weights by every label other than -100, column 0 included."""
    total, count = 0.0, 0
    for loss, labels in zip(batch_losses, batch_labels):
        n = int((labels != -100).sum())
        if not math.isnan(loss):
            total, count = total + loss * n, count + n
    return math.exp(total / count)


def perplexity_keeps_empty_batches(batch_losses, batch_labels):
    """Weights by the scored count, but a nan loss times 0 is still nan."""
    counts = [count_scored_targets(labels) for labels in batch_labels]
    return math.exp(sum(loss * n for loss, n in zip(batch_losses, counts)) / sum(counts))


def _ported(micro_batches, crop, shared=True):
    ported, counts = [], []
    for labels, mask in micro_batches:
        new = labels.clone()
        new[:, 1:] = labels[:, 1:].masked_fill(crop(mask, labels.shape[1]) == 0, -100)
        ported.append(new)
        counts.append(count_scored_targets(new))
    return ported, sum(counts) if shared else max(counts)


def port_with_first_column_crop(micro_batches):
    """The 4.45 crop, mask[:, 1:]: wrong once the mask is longer than T."""
    return _ported(micro_batches, lambda mask, time: mask[:, 1:])


def port_with_slice_crop(micro_batches):
    """The crop as a slice, mask[:, -(T-1):]: keeps the whole mask at T = 1."""
    return _ported(micro_batches, lambda mask, time: mask[:, -(time - 1):])


def port_with_predictor_mask(micro_batches):
    """Keep a pair when its *input* position is attended (mask[:, t], not t+1)."""
    return _ported(micro_batches, lambda mask, time: mask[:, mask.shape[1] - time : mask.shape[1] - 1])


def port_counting_every_column(micro_batches):
    """Labels right, but the count includes column 0."""
    ported, _ = _ported(micro_batches, lambda mask, time: mask[:, mask.shape[1] - (time - 1):])
    return ported, sum(int((labels != -100).sum()) for labels in ported)


def perplexity_counts_predictor_columns(batch_losses, batch_labels):
    """Counts labels[:, :-1], the columns the logits are read at."""
    total, count = 0.0, 0
    for loss, labels in zip(batch_losses, batch_labels):
        n = int((labels[:, :-1] != -100).sum())
        if n and not math.isnan(loss):
            total += loss * n
            count += n
    return math.exp(total / count)


def port_inplace(micro_batches):
    """Right labels and count, but written into the caller's label tensors."""
    out, n = [], 0
    for labels, mask in micro_batches:
        first = mask.shape[1] - (labels.shape[1] - 1)
        labels[:, 1:][~(mask[:, first:] != 0)] = -100
        out.append(labels)
        n += count_scored_targets(labels)
    return out, n


WRONG = {
    "llava-ex1": [scored_padding_plain_average, scored_padding_nan_unsafe],
    "llava-ex2": [accumulated_loss_last_column_dropped, accumulated_loss_own_counts],
    "llava-ex3": [perplexity_counts_predictor_columns, perplexity_of_mean_loss, perplexity_counts_every_label, perplexity_keeps_empty_batches],
    "llava-ex4": [
        port_with_first_column_crop,
        port_with_slice_crop,
        port_with_predictor_mask,
        port_counting_every_column,
        port_inplace,
    ],
}
