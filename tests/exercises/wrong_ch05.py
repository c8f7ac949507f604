"""Plausible wrong answers to chapter 5's exercises; each must fail its checker."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _summed(logits, labels):
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), reduction="sum"
    )


# one-denominator-ex1 ---------------------------------------------------------


def naive_step_nan_weight(sums, counts):
    """An empty micro-batch's weight 1 / (K * 0) taken as nan."""
    k = len(counts)
    reported = sum(s / n if n else math.nan for s, n in zip(sums, counts)) / k
    return reported, [1 / (k * n) if n else math.nan for n in counts]


def naive_step_k_of_non_empty(sums, counts):
    """K counted over the micro-batches that score something."""
    k = sum(1 for n in counts if n)
    reported = sum(s / n if n else math.nan for s, n in zip(sums, counts)) / len(counts)
    return reported, [1 / (k * n) if n else 0.0 for n in counts]


def naive_step_nan_skipped(sums, counts):
    """The logged loss averages only the finite micro-batch means."""
    k = len(counts)
    means = [s / n for s, n in zip(sums, counts) if n]
    return sum(means) / len(means), [1 / (k * n) if n else 0.0 for n in counts]


# one-denominator-ex2 ---------------------------------------------------------


def accumulate_counting_column_0(model, micro_batches):
    """Sum / count, but the count includes every row's first label."""
    model.zero_grad(set_to_none=True)
    total = sum(int((labels != -100).sum()) for _, labels in micro_batches)
    reported = 0.0
    for input_ids, labels in micro_batches:
        loss = _summed(model(input_ids), labels) / total
        loss.backward()
        reported += loss.item()
    return reported


def accumulate_sum_over_count_over_k(model, micro_batches):
    """Divides by the step's count, and still by K."""
    model.zero_grad(set_to_none=True)
    total = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro_batches)
    reported = 0.0
    for input_ids, labels in micro_batches:
        loss = _summed(model(input_ids), labels) / total / len(micro_batches)
        loss.backward()
        reported += loss.item()
    return reported


# one-denominator-ex3 ---------------------------------------------------------


def _adam(params, gradients, lr, betas, eps, weight_decay, *, correct=True, eps_inside=False, decoupled=False):
    beta1, beta2 = betas
    theta, m, v, path = params.clone(), torch.zeros_like(params), torch.zeros_like(params), []
    for t, g in enumerate(gradients, start=1):
        if decoupled:
            theta = theta * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t) if correct else m
        v_hat = v / (1 - beta2**t) if correct else v
        denominator = (v_hat + eps).sqrt() if eps_inside else v_hat.sqrt() + eps
        theta = theta - lr * m_hat / denominator
        path.append(theta)
    return torch.stack(path)


def adam_without_bias_correction(params, gradients, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    return _adam(params, gradients, lr, betas, eps, weight_decay, correct=False)


def adam_eps_inside_the_root(params, gradients, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    return _adam(params, gradients, lr, betas, eps, weight_decay, eps_inside=True)


def adam_with_decoupled_decay(params, gradients, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """AdamW's decay, where torch.optim.Adam adds weight_decay * theta to g."""
    return _adam(params, gradients, lr, betas, eps, weight_decay, decoupled=True)


# one-denominator-ex4 ---------------------------------------------------------


def rank_loss_local_count(model, input_ids, labels, dist):
    """Times R, but each rank divides by its own count."""
    count = (labels[:, 1:] != -100).sum()
    return dist.get_world_size() * _summed(model(input_ids), labels) / count


def rank_loss_divided_by_r(model, input_ids, labels, dist):
    """Divides by R, as if DDP summed the gradients instead of averaging them."""
    count = (labels[:, 1:] != -100).sum()
    dist.all_reduce(count)
    return _summed(model(input_ids), labels) / count / dist.get_world_size()


# one-denominator-ex5 ---------------------------------------------------------


def _step(
    model, micro_batches, dist, *, global_count=True, skip_empty=False, reduce_loss=True, times_r=True, zero=True
):
    if zero:
        model.zero_grad(set_to_none=True)
    count = torch.tensor(sum(int((y[:, 1:] != -100).sum()) for _, y in micro_batches), dtype=torch.float64)
    if global_count:
        dist.all_reduce(count)
    scale = (dist.get_world_size() if times_r else 1) / count
    loss_sum = torch.zeros((), dtype=torch.float64)
    for input_ids, labels in micro_batches:
        if skip_empty and int((labels[:, 1:] != -100).sum()) == 0:
            continue
        s = _summed(model(input_ids), labels)
        (s * scale).backward()
        loss_sum += s.detach()
    if reduce_loss:
        dist.all_reduce(loss_sum)
    return float(loss_sum / count)


def rank_step_per_rank_count(model, micro_batches, dist):
    """average_tokens_across_devices=False: each rank its own count."""
    return _step(model, micro_batches, dist, global_count=False, reduce_loss=False)


def rank_step_skipping_empty(model, micro_batches, dist):
    """Skips a micro-batch with nothing to score (DDP then waits forever)."""
    return _step(model, micro_batches, dist, skip_empty=True)


def rank_step_local_report(model, micro_batches, dist):
    """Reports its own share, s_r / |S|, without summing it over the ranks."""
    return _step(model, micro_batches, dist, reduce_loss=False)


def rank_step_without_r(model, micro_batches, dist):
    return _step(model, micro_batches, dist, times_r=False)


def rank_step_without_zero_grad(model, micro_batches, dist):
    """The solution without model.zero_grad(): adds to the stale gradients."""
    return _step(model, micro_batches, dist, zero=False)


WRONG = {
    "one-denominator-ex1": [naive_step_nan_weight, naive_step_k_of_non_empty, naive_step_nan_skipped],
    "one-denominator-ex2": [accumulate_counting_column_0, accumulate_sum_over_count_over_k],
    "one-denominator-ex3": [adam_without_bias_correction, adam_eps_inside_the_root, adam_with_decoupled_decay],
    "one-denominator-ex4": [rank_loss_local_count, rank_loss_divided_by_r],
    "one-denominator-ex5": [
        rank_step_per_rank_count,
        rank_step_skipping_empty,
        rank_step_local_report,
        rank_step_without_r,
        rank_step_without_zero_grad,
    ],
}
