"""Plausible wrong answers to chapter 3's exercises; each must fail its checker."""

import math

import numpy as np
import torch
import torch.nn.functional as F


def perplexity_as_arithmetic_mean(k, fraction):
    # averages 1/p instead of log(1/p): k at the uncertain targets, 1 elsewhere
    return fraction * k + (1 - fraction)


def perplexity_as_loss(k, fraction):
    # the mean loss in nats, not its exponential
    return fraction * math.log(k)


def smoothing_without_mass_on_the_target(target, num_classes, epsilon):
    # q_y = 1 - epsilon: forgets that the uniform part gives the target epsilon/C too
    q = torch.full((num_classes,), epsilon / num_classes, dtype=torch.float64)
    q[target] = 1 - epsilon
    return q.log(), float(-(q * q.log()).sum())


def floor_as_target_term_only(target, num_classes, epsilon):
    # right minimiser, but the floor keeps only -log p_y
    q = torch.full((num_classes,), epsilon / num_classes, dtype=torch.float64)
    q[target] += 1 - epsilon
    return q.log(), float(-q[target].log())


def keras_default_reduction(targets, weight):
    import keras

    kept = targets != -100
    y_true = np.where(kept, targets, 0)
    sample_weight = np.where(kept, weight[y_true], 0.0)
    # default sum_over_batch_size: divides by N, not by the sum of the weights
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), y_true, sample_weight


def keras_ignored_rows_not_zeroed(targets, weight):
    import keras

    y_true = np.where(targets != -100, targets, 0)
    # the ignored rows keep the weight of class 0
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    return loss, y_true, weight[y_true]


def keras_labels_left_at_minus_100(targets, weight):
    import keras

    kept = targets != -100
    sample_weight = np.where(kept, weight[np.where(kept, targets, 0)], 0.0)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    return loss, targets, sample_weight


def _rows(micro_batches):
    return [(x[:, :-1].reshape(-1, x.shape[-1]), y[:, 1:].reshape(-1)) for x, y in micro_batches]


def accumulation_mean_of_means(micro_batches, weight):
    # each micro-batch's own weighted mean, divided by the number of micro-batches
    rows = _rows(micro_batches)
    return [F.cross_entropy(x, t, weight=weight) / len(rows) for x, t in rows]


def accumulation_divided_by_count(micro_batches, weight):
    # num_items_in_batch as a count of targets, not their summed weight
    rows = _rows(micro_batches)
    count = sum(int((t != -100).sum()) for _, t in rows)
    return [F.cross_entropy(x, t, weight=weight, reduction="sum") / count for x, t in rows]


def accumulation_without_the_shift(micro_batches, weight):
    rows = [(x.reshape(-1, x.shape[-1]), y.reshape(-1)) for x, y in micro_batches]
    total = sum(weight[t[t != -100]].sum() for _, t in rows)
    return [F.cross_entropy(x, t, weight=weight, reduction="sum") / total for x, t in rows]


def accumulation_local_mean_rescaled(micro_batches, weight):
    # right whenever a micro-batch scores something; nan when it scores nothing
    rows = _rows(micro_batches)
    local = [weight[t[t != -100]].sum() for _, t in rows]
    total = sum(local)
    return [F.cross_entropy(x, t, weight=weight) * w / total for (x, t), w in zip(rows, local)]


def accumulation_weight_of_unshifted_labels(micro_batches, weight):
    """The shared denominator summed over every label, column 0 included."""
    W = sum(weight[l[l != -100]].sum() for _, l in micro_batches)
    V = weight.shape[0]
    return [
        F.cross_entropy(x[:, :-1].reshape(-1, V), l[:, 1:].reshape(-1), weight=weight, reduction="sum") / W
        for x, l in micro_batches
    ]


def shift_by_the_row_mean(logits, targets):
    # a per-row constant, but the mean: a row whose logits span 200 overflows exp
    shifted = logits - logits.mean(dim=1, keepdim=True)
    log_probs = shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))
    kept = targets != -100
    return -log_probs[kept, targets[kept]].mean()


def log_of_softmax(logits, targets):
    # torch.softmax is stable, but its log cannot recover a probability rounded to 0
    log_probs = torch.log(torch.softmax(logits, dim=1))
    kept = targets != -100
    return -log_probs[kept, targets[kept]].mean()


def shift_by_the_column_max(logits, targets):
    """amax over dim=0: one shift per class, which changes every row's softmax."""
    shifted = logits - logits.detach().amax(dim=0, keepdim=True)
    log_probs = shifted - torch.log(torch.exp(shifted).sum(dim=1, keepdim=True))
    kept = targets != -100
    return -log_probs[kept, targets[kept]].mean()


WRONG = {
    "cross-entropy-ex1": [smoothing_without_mass_on_the_target, floor_as_target_term_only],
    "cross-entropy-ex2": [keras_default_reduction, keras_ignored_rows_not_zeroed, keras_labels_left_at_minus_100],
    "cross-entropy-ex3": [shift_by_the_column_max, shift_by_the_row_mean, log_of_softmax],
    "cross-entropy-ex4": [perplexity_as_arithmetic_mean, perplexity_as_loss],
    "cross-entropy-ex5": [
        accumulation_mean_of_means,
        accumulation_divided_by_count,
        accumulation_without_the_shift,
        accumulation_local_mean_rescaled,
        accumulation_weight_of_unshifted_labels,
    ],
}
