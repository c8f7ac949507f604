"""Figures of the chapter on the one denominator of a token-level mean."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from companion.accumulation import token_weight_factors
from companion.plots import COLORS, TEXT_WIDTH_IN, new_figure
from companion.plots.language import localized

LEGEND_PT = 9
"""Legend font size in points (tick labels and axis labels use 10 pt)."""


@localized
def plot_token_weights(
    counts: Sequence[int], group_label: str = "micro-batch"
) -> plt.Figure:
    """Weight of one token of each group in the loss, under both reductions.

    The token mean gives every one of the ``|S|`` scored tokens ``1 / |S|``;
    the equal-weight mean of means gives a token of group ``k``
    ``1 / (K n_k)``.  Bars show both as multiples of a token's share in the
    token mean, so the token mean is a row of ones.  The labels say this in
    words: ``N`` is the book's symbol for all rows, scored or not.

    Args:
        counts: ``(K,)`` scored tokens per group, all ``>= 1``.
        group_label: what a group is, for the x-axis.
    """
    factors = token_weight_factors(counts)
    positions = np.arange(len(factors))
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=3.0)
    width = 0.38
    ax.bar(
        positions - width / 2,
        np.ones(len(factors)),
        width,
        color=COLORS["right"],
        label="token mean",
    )
    ax.bar(
        positions + width / 2,
        factors,
        width,
        color=COLORS["wrong"],
        label="mean of means",
    )
    tick_labels = [
        f"{group_label} {k + 1}\n$n_{{{k + 1}}}$ = {n}"
        for k, n in enumerate(counts)
    ]
    ax.set_xticks(positions, tick_labels)
    ax.set_ylabel("weight of one token\n(1 = its share in the token mean)")
    ax.set_xlabel(f"{group_label} and its scored tokens")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.legend(frameon=False, fontsize=LEGEND_PT, loc="upper right")
    ax.set_title(
        "A token of a small group counts more under the mean of means",
        fontsize=11,
    )
    return fig


@localized
def plot_naive_error_vs_imbalance(
    token_ratios: Sequence[float],
    naive_loss_error: Sequence[float],
    naive_gradient_error: Sequence[float],
    fixed_gradient_error: Sequence[float],
) -> plt.Figure:
    """Relative error of the naive and fixed accumulated step vs full batch.

    Args:
        token_ratios: ``(R,)`` scored tokens of the long micro-batch divided
            by those of the short one.
        naive_loss_error: ``(R,)`` relative loss error of the mean of means.
        naive_gradient_error: ``(R,)`` relative gradient error (Euclidean
            norm) of the mean of means.
        fixed_gradient_error: ``(R,)`` the same for the
            ``num_items_in_batch`` fix.
    """
    lengths = {
        len(token_ratios),
        len(naive_loss_error),
        len(naive_gradient_error),
        len(fixed_gradient_error),
    }
    if len(lengths) != 1:
        raise ValueError(
            "token_ratios, naive_loss_error, naive_gradient_error and "
            "fixed_gradient_error must have the same length; "
            f"got lengths {sorted(lengths)}"
        )
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=3.2)
    ratios = np.asarray(token_ratios, dtype=float)
    ax.plot(
        ratios,
        100 * np.asarray(naive_gradient_error),
        marker="o",
        color=COLORS["wrong"],
        label="mean of means: gradient",
    )
    ax.plot(
        ratios,
        100 * np.asarray(naive_loss_error),
        marker="s",
        linestyle="--",
        color=COLORS["wrong"],
        alpha=0.6,
        label="mean of means: loss",
    )
    ax.plot(
        ratios,
        100 * np.asarray(fixed_gradient_error),
        marker="^",
        color=COLORS["right"],
        label="sum / num_items_in_batch: gradient",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel(
        "imbalance: scored tokens of micro-batch 2 / micro-batch 1 (ratio)"
    )
    ax.set_ylabel("relative error vs full batch (%)")
    ax.set_title(
        "The naive error grows with imbalance; the fix stays at zero",
        fontsize=11,
    )
    ax.legend(frameon=False, fontsize=LEGEND_PT)
    return fig
