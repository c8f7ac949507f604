"""One denominator: token means across micro-batches, ranks and batches.

A token-level mean loss is ``sum of token losses / number of scored tokens``.
Whenever the tokens are split into groups (batches of an epoch, micro-batches
of gradient accumulation, ranks of data-parallel training) and each group is
averaged first, the result is a *mean of means*: every token of group ``k``
gets weight ``1 / (K n_k)`` instead of ``1 / |S|``, where ``|S|`` is the
number of scored tokens in all groups (the book's notation).  The two agree only when
every group holds the same number of scored tokens.

This module holds

* the two reductions on per-group sums and counts (:func:`token_mean`,
  :func:`mean_of_means`) and how much a token of each group counts in the
  second (:func:`token_weight_factors`);
* the rule that makes an optimizer step the token mean of all its tokens,
  however they are split: count the scored targets of every micro-batch of
  the step on every rank once (:func:`count_items_in_batch`, summed over
  ranks by an all-reduce), and have each micro-batch back-propagate its
  summed loss divided by that count, times the number of ranks, whose
  average ``DistributedDataParallel`` takes (:func:`micro_batch_loss`).
  This is what transformers' ``Trainer`` does since October 2024.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from companion import IGNORE_INDEX
from companion._checks import (
    require_floating,
    require_int,
    require_num_items,
    require_positive_int,
    require_real_number,
    require_sequence,
)
from companion.causal_lm_loss import count_scored_targets, label_padding_loss

__all__ = [
    "count_items_in_batch",
    "mean_of_means",
    "micro_batch_loss",
    "token_mean",
    "token_weight_factors",
]


# ---------------------------------------------------------------------------
# The two reductions, on per-group sums and counts
# ---------------------------------------------------------------------------


def _check_sums_and_counts(
    sums: Sequence[float], counts: Sequence[int]
) -> tuple[list[float], list[int]]:
    require_sequence(sums, "sums", "a sequence of floats")
    require_sequence(counts, "counts", "a sequence of ints")
    if len(sums) != len(counts):
        raise ValueError(
            "sums and counts must have one entry per group; "
            f"got {len(sums)} sums and {len(counts)} counts"
        )
    if len(counts) == 0:
        raise ValueError(
            "sums and counts must describe at least one group; got none"
        )
    float_sums = []
    for index, value in enumerate(sums):
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            require_floating(value, f"sums[{index}]")
            float_sums.append(float(value))
        else:
            float_sums.append(require_real_number(value, f"sums[{index}]"))
    int_counts = []
    for index, count in enumerate(counts):
        count = require_int(count, f"counts[{index}]")
        if count < 0:
            raise ValueError(f"counts[{index}] must be >= 0; got {count}")
        int_counts.append(count)
    return float_sums, int_counts


def token_mean(sums: Sequence[float], counts: Sequence[int]) -> float:
    """Token-level mean of grouped token losses: ``sum(sums) / sum(counts)``.

    Args:
        sums: ``(K,)`` summed token losses of each group.
        counts: ``(K,)`` scored tokens of each group (``>= 0``).

    Raises:
        ValueError: no group, lengths differ, a negative count, or
            ``sum(counts) == 0`` (the mean 0/0 is undefined).
    """
    float_sums, int_counts = _check_sums_and_counts(sums, counts)
    total = sum(int_counts)
    if total == 0:
        raise ValueError(
            "counts sum to 0: there is no scored token, so the token mean "
            "is 0/0"
        )
    return math.fsum(float_sums) / total


def mean_of_means(
    sums: Sequence[float],
    counts: Sequence[int],
    weights: Sequence[float] | None = None,
) -> float:
    """Average the groups' own means.

    ``sum_k w_k (sums_k / counts_k) / sum_k w_k``.

    With ``weights=None`` every group counts the same, which is what dividing
    each micro-batch's mean loss by the number of micro-batches does.  With
    ``weights`` = number of sequences per batch it is Keras's epoch loss.

    Args:
        sums: ``(K,)`` summed token losses of each group.
        counts: ``(K,)`` scored tokens of each group, all ``>= 1``.
        weights: optional ``(K,)`` non-negative group weights, not all zero.

    Raises:
        ValueError: a group without scored tokens (its mean is 0/0), or bad
            weights.
    """
    float_sums, int_counts = _check_sums_and_counts(sums, counts)
    for index, count in enumerate(int_counts):
        if count == 0:
            raise ValueError(
                f"counts[{index}] is 0: group {index} has no scored token, "
                "so its mean is 0/0"
            )
    if weights is None:
        group_weights = [1.0] * len(int_counts)
    else:
        require_sequence(weights, "weights", "a sequence of floats")
        group_weights = [
            require_real_number(w, f"weights[{index}]")
            for index, w in enumerate(weights)
        ]
        if not all(math.isfinite(w) for w in group_weights):
            raise ValueError(f"weights must be finite; got {group_weights}")
        if len(group_weights) != len(int_counts):
            raise ValueError(
                f"weights must have one entry per group ({len(int_counts)}); "
                f"got {len(group_weights)}"
            )
        if any(w < 0 for w in group_weights) or sum(group_weights) == 0:
            raise ValueError(
                f"weights must be >= 0 and not all 0; got {group_weights}"
            )
    weighted = [
        w * s / n
        for w, s, n in zip(group_weights, float_sums, int_counts, strict=True)
    ]
    return math.fsum(weighted) / math.fsum(group_weights)


def token_weight_factors(counts: Sequence[int]) -> list[float]:
    """How much more (or less) a token of each group counts, mean of means.

    The token mean weighs every token ``1 / |S|``; the equal-weight mean of
    means weighs a token of group ``k`` ``1 / (K n_k)``.  The ratio is
    ``|S| / (K n_k)``: above 1 in groups with fewer tokens than average.

    Args:
        counts: ``(K,)`` scored tokens of each group, all ``>= 1``.

    Returns:
        ``(K,)`` factors; ``sum_k n_k * factor_k == |S|``.
    """
    require_sequence(counts, "counts", "a sequence of ints")
    if len(counts) == 0:
        raise ValueError("counts must describe at least one group; got none")
    _, int_counts = _check_sums_and_counts([0.0] * len(counts), counts)
    for index, count in enumerate(int_counts):
        if count == 0:
            raise ValueError(
                f"counts[{index}] is 0: group {index} has no scored token"
            )
    total, groups = sum(int_counts), len(int_counts)
    return [total / (groups * count) for count in int_counts]


# ---------------------------------------------------------------------------
# The loss of one micro-batch, so that the step is the token mean
# ---------------------------------------------------------------------------


def count_items_in_batch(
    micro_batch_labels: Sequence[torch.Tensor],
    ignore_index: int = IGNORE_INDEX,
) -> int:
    """Scored targets of one optimizer step: ``num_items_in_batch``.

    The sum of :func:`~companion.causal_lm_loss.count_scored_targets` over
    the step's micro-batches, counted before the first forward pass.  With
    data parallelism, sum this over the ranks as well (an all-reduce of each
    rank's count), as the ``Trainer`` does with
    ``average_tokens_across_devices``.

    Args:
        micro_batch_labels: ``(B_k, T_k)`` labels of every micro-batch of
            the step, any integer dtype, ``ignore_index`` = ignored.
        ignore_index: label value that is not scored (an ``int``).

    Raises:
        TypeError: not a sequence of label tensors.
        ValueError: no micro-batch.
    """
    require_sequence(
        micro_batch_labels,
        "micro_batch_labels",
        "a sequence of (B, T) label tensors, one per micro-batch",
    )
    if len(micro_batch_labels) == 0:
        raise ValueError(
            "micro_batch_labels must hold at least one micro-batch; got none"
        )
    return sum(
        count_scored_targets(labels, ignore_index)
        for labels in micro_batch_labels
    )


def micro_batch_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor,
    world_size: int = 1,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss one micro-batch back-propagates: ``R * s_k / |S|``.

    ``s_k`` is the summed next-token loss of the micro-batch, ``|S|`` the
    scored targets of the whole step (:func:`count_items_in_batch`, over
    every micro-batch and every rank) and ``R`` the number of
    data-parallel ranks.  The gradients of the step's micro-batches add up
    in ``.grad``, and ``DistributedDataParallel`` averages them over the
    ``R`` ranks, so the step's gradient is ``sum_k grad s_k / |S|``: the
    gradient of the token mean of the whole step, however it was split.

    Args:
        logits: ``(B, T, V)`` float, the micro-batch's logits.
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` = ignored.
        num_items_in_batch: ``|S|``, an ``int >= 1`` or a 0-D integer tensor
            ``>= 1``.
        world_size: ``R >= 1``; 1 for gradient accumulation in one process.
        ignore_index: label value that is not scored (an ``int``).

    Returns:
        0-D tensor: ``world_size`` times
        :func:`~companion.causal_lm_loss.label_padding_loss` with
        ``num_items_in_batch``.
    """
    if require_num_items(num_items_in_batch) is None:
        raise TypeError(
            "num_items_in_batch must be the scored targets of the whole step "
            "(an int >= 1 or a 0-D integer tensor); got None"
        )
    world_size = require_positive_int(world_size, "world_size")
    loss = label_padding_loss(
        logits,
        labels,
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
    )
    return world_size * loss
