"""Figures of the Keras masking chapter."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from companion.plots import COLORS, TEXT_WIDTH_IN
from companion.plots.language import localized

_SWEEP_COLUMNS = (
    "padding_fraction",
    "true",
    "wrong",
    "fixed",
    "true_ppl",
    "wrong_ppl",
    "fixed_ppl",
)


@localized
def reported_vs_true(sweep: pd.DataFrame) -> plt.Figure:
    """Loss and perplexity against padding: the wrong and the fixed reduction.

    Args:
        sweep: the table of
            :func:`companion.experiments.keras_masking.padding_sweep`, one
            row per padding fraction with columns ``padding_fraction``,
            ``true``, ``wrong``, ``fixed`` (nats per token) and
            ``true_ppl``, ``wrong_ppl``, ``fixed_ppl``.

    Returns:
        A figure with two panels sharing the x axis (padding, % of
        positions): the loss on the left, the perplexity on the right.
    """
    if not isinstance(sweep, pd.DataFrame):
        raise TypeError(
            f"sweep must be a pandas DataFrame; got {type(sweep).__name__}"
        )
    missing = [c for c in _SWEEP_COLUMNS if c not in sweep.columns]
    if missing:
        raise ValueError(
            f"sweep is missing columns {missing}; "
            f"expected {list(_SWEEP_COLUMNS)}"
        )
    if len(sweep) == 0:
        raise ValueError("sweep must have at least one row")

    fig, (loss_ax, ppl_ax) = plt.subplots(
        1,
        2,
        figsize=(TEXT_WIDTH_IN, 3.4),
        dpi=110,
        layout="constrained",
        sharex=True,
    )
    percent = 100.0 * sweep["padding_fraction"].to_numpy()
    panels = (
        (loss_ax, "", "cross-entropy (nats per real token)", "Loss"),
        (ppl_ax, "_ppl", "perplexity (exp of the loss)", "Perplexity"),
    )
    for ax, suffix, ylabel, title in panels:
        ax.plot(
            percent,
            sweep["true" + suffix],
            color="black",
            linestyle="--",
            linewidth=1.2,
            label="true token mean",
        )
        ax.plot(
            percent,
            sweep["wrong" + suffix],
            color=COLORS["wrong"],
            marker="o",
            markersize=4,
            label="divided by all positions",
        )
        ax.plot(
            percent,
            sweep["fixed" + suffix],
            color=COLORS["right"],
            marker="s",
            markersize=3,
            linestyle="none",
            label="MaskedSparseCrossEntropy",
        )
        ax.set_xlabel("padding (% of positions)", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=10)
        ax.set_title(title, fontsize=11)
        ax.tick_params(labelsize=9)
        ax.set_ylim(bottom=0.0 if suffix == "" else 1.0)
        ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncol=3, fontsize=9
    )
    return fig
