"""Plausible wrong answers to chapter 6's exercises; each must fail its checker."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# loss-memory-ex1 -------------------------------------------------------------


def peak_three_full_tensors(batch, time, vocab):
    """Three (B, T, V) tensors, the label-padding count."""
    return 3 * batch * time * vocab * 4


def peak_backward_only(batch, time, vocab):
    """Three (B, T-1, V) tensors in the backward pass, whatever B."""
    return 3 * batch * (time - 1) * vocab * 4


def peak_with_copy_always(batch, time, vocab):
    """The copy's forward peak, at B = 1 as well."""
    return max(3 * batch * (time - 1), batch * (3 * time - 2)) * vocab * 4


# loss-memory-ex2 -------------------------------------------------------------


def chunk_without_block_rows(batch, time, hidden_size, vocab, fraction, multiple):
    """The count C V + V d + N d: the 3 C d of the chunk's (C, d) rows left out."""
    positions = batch * time
    largest = math.floor((fraction * 3 * positions * vocab - vocab * hidden_size - positions * hidden_size) / vocab)
    return max(largest // multiple * multiple, 0)


def chunk_rounded_to_nearest(batch, time, hidden_size, vocab, fraction, multiple):
    positions = batch * time
    budget = fraction * 3 * positions * vocab - vocab * hidden_size - positions * hidden_size
    return max(round(budget / (vocab + 3 * hidden_size) / multiple) * multiple, 0)


# loss-memory-ex3 -------------------------------------------------------------


def _targets(labels):
    return F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)


def _chunked(hidden, weight, targets, chunk_size, eps, *, spread, gradient_eps, count):
    class Chunks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight):
            rows = (targets != -100).nonzero().squeeze(1)
            vocab = weight.shape[0]
            denominator = count if count is not None else rows.numel()
            grad_h, grad_w = torch.zeros_like(hidden), torch.zeros_like(weight)
            total = hidden.new_zeros(())
            for start in range(0, rows.numel(), chunk_size):
                chunk = rows[start:start + chunk_size]
                h, y = hidden[chunk], targets[chunk]
                block = torch.log_softmax(h @ weight.T, dim=1)
                on = 1 - eps if spread == vocab else 1 - eps
                rest = eps / spread
                picked = block.gather(1, y[:, None]).sum()
                if spread == vocab:
                    total -= on * picked + rest * block.sum()
                else:  # eps spread over the V - 1 other classes
                    total -= on * picked + rest * (block.sum() - picked)
                block.exp_()
                g_eps = gradient_eps
                block.sub_(g_eps / vocab)
                block[torch.arange(len(chunk)), y] -= 1 - g_eps
                grad_h[chunk] = block @ weight / denominator
                grad_w += block.T @ h / denominator
            ctx.save_for_backward(grad_h, grad_w)
            return total / denominator

        @staticmethod
        def backward(ctx, grad):
            grad_h, grad_w = ctx.saved_tensors
            return grad * grad_h, grad * grad_w

    return Chunks.apply(hidden.reshape(-1, hidden.shape[-1]), weight)


def smoothed_over_other_classes(hidden, weight, labels, *, chunk_size, label_smoothing=0.0):
    """eps / (V - 1) on every class but the target."""
    vocab = weight.shape[0]
    return _chunked(hidden, weight, _targets(labels), chunk_size, label_smoothing,
                    spread=vocab - 1, gradient_eps=label_smoothing, count=None)


def smoothed_loss_plain_gradient(hidden, weight, labels, *, chunk_size, label_smoothing=0.0):
    """The loss smoothed, the gradient still softmax minus one-hot."""
    return _chunked(hidden, weight, _targets(labels), chunk_size, label_smoothing,
                    spread=weight.shape[0], gradient_eps=0.0, count=None)


def smoothed_over_every_position(hidden, weight, labels, *, chunk_size, label_smoothing=0.0):
    """Divides by all B*T positions, ignored ones included."""
    return _chunked(hidden, weight, _targets(labels), chunk_size, label_smoothing,
                    spread=weight.shape[0], gradient_eps=label_smoothing, count=labels.numel())


def smoothed_full_logits(hidden, weight, labels, *, chunk_size, label_smoothing=0.0):
    """Right values, but the whole (N, V) logits at once."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    return F.cross_entropy(logits, _targets(labels), ignore_index=-100, label_smoothing=label_smoothing)


def smoothed_autograd_loop(hidden, weight, labels, *, chunk_size, label_smoothing=0.0):
    """Chunks under plain autograd: every chunk's graph, log-probabilities
    included, is kept until the backward pass."""
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), _targets(labels)
    total = flat.new_zeros(())
    for start in range(0, flat.shape[0], chunk_size):
        total = total + F.cross_entropy(
            flat[start:start + chunk_size] @ weight.T, targets[start:start + chunk_size],
            ignore_index=-100, label_smoothing=label_smoothing, reduction="sum",
        )
    return total / (targets != -100).sum()


def chunk_without_the_hidden_states(batch, time, hidden_size, vocab, fraction, multiple):
    """Leaves out the N d elements of the hidden states (and their gradient)."""
    room = fraction * 3 * batch * time * vocab - vocab * hidden_size
    rows = math.floor(room / (vocab + 3 * hidden_size))
    return max(rows // multiple * multiple, 0)


def chunk_not_capped_at_n(batch, time, hidden_size, vocab, fraction, multiple):
    """The right bound, but not capped at the N = BT rows there are."""
    positions = batch * time
    room = fraction * 3 * positions * vocab - (vocab + positions) * hidden_size
    rows = math.floor(room / (vocab + 3 * hidden_size))
    return max(rows // multiple * multiple, 0)


WRONG = {
    "loss-memory-ex1": [peak_three_full_tensors, peak_backward_only, peak_with_copy_always],
    "loss-memory-ex2": [
        chunk_without_the_hidden_states,
        chunk_without_block_rows,
        chunk_rounded_to_nearest,
        chunk_not_capped_at_n,
    ],
    "loss-memory-ex3": [
        smoothed_over_other_classes,
        smoothed_loss_plain_gradient,
        smoothed_over_every_position,
        smoothed_full_logits,
        smoothed_autograd_loop,
    ],
}
