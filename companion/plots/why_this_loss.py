"""Figures of chapter 3's opening, "Why this loss"."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from companion.plots import COLORS, TEXT_WIDTH_IN
from companion.plots.language import localized
from companion.plots.cross_entropy import LEGEND_FONTSIZE, LABEL_FONTSIZE, TICK_FONTSIZE, TITLE_FONTSIZE

__all__ = ["plot_loss_to_entropy"]

_CURVES = (
    ("train", "training text", COLORS["right"], "-"),
    ("validation", "validation text", COLORS["accent"], "--"),
    ("expected", "expected on endless text (exact)", "black", ":"),
)


@localized
def plot_loss_to_entropy(
    history: pd.DataFrame, entropy_rate: float, vocab_size: int, *, zoom_from: int = 20
) -> plt.Figure:
    """Training curves falling from ``log V`` to the entropy rate of the source.

    Args:
        history: one row per step with columns ``step``, ``train``,
            ``validation`` and ``expected`` (mean losses in nats), as
            :func:`companion.experiments.why_this_loss.train_bigram` returns.
        entropy_rate: the source's entropy rate in nats per token, the floor.
        vocab_size: ``V``; ``log V`` is the loss of a uniform guess.
        zoom_from: the first step of the right panel, which zooms in on the
            floor.

    Returns:
        Two panels: every step, with ``log V`` and the floor drawn; and the
        steps from ``zoom_from`` on, where the expected loss stays above
        the floor.
    """
    missing = {"step", "train", "validation", "expected"} - set(history.columns)
    if missing:
        raise ValueError(f"history lacks the columns {sorted(missing)}")
    if not (isinstance(vocab_size, int) and vocab_size >= 2):
        raise ValueError(f"vocab_size must be an int >= 2; got {vocab_size!r}")
    if not math.isfinite(entropy_rate) or entropy_rate < 0:
        raise ValueError(f"entropy_rate must be finite and >= 0; got {entropy_rate}")
    steps = history["step"].to_numpy()
    if not 0 <= zoom_from < steps.max():
        raise ValueError(f"zoom_from must lie in [0, {steps.max()}); got {zoom_from}")
    fig, (full, zoom) = plt.subplots(
        1, 2, figsize=(TEXT_WIDTH_IN, 3.2), dpi=110, layout="constrained",
        gridspec_kw={"width_ratios": [3, 2]},
    )
    uniform = math.log(vocab_size)
    late = steps >= zoom_from
    for ax, keep in ((full, np.ones_like(late)), (zoom, late)):
        for column, label, colour, style in _CURVES:
            ax.plot(steps[keep], history[column].to_numpy()[keep], style,
                    color=colour, linewidth=1.8, label=label)
        ax.axhline(entropy_rate, color=COLORS["wrong"], linewidth=1.0,
                   label=f"entropy rate of the source, {entropy_rate:.4f}")
        ax.set_xlabel("optimiser step", fontsize=LABEL_FONTSIZE)
        ax.tick_params(labelsize=TICK_FONTSIZE)
    full.axhline(uniform, color="grey", linewidth=1.0, linestyle="-.",
                 label=f"uniform guess, log V = {uniform:.4f}")
    full.set_ylabel("mean loss (nats per word)", fontsize=LABEL_FONTSIZE)
    full.set_title("From log V down to the floor", fontsize=TITLE_FONTSIZE)
    zoom.set_title(f"Zoomed, from step {zoom_from}", fontsize=TITLE_FONTSIZE)
    late_values = history.loc[late, ["train", "validation", "expected"]].to_numpy()
    low = min(late_values.min(), entropy_rate)
    high = late_values.max()
    margin = 0.15 * (high - low)
    zoom.set_ylim(low - margin, high + margin)
    full.legend(loc="upper right", fontsize=LEGEND_FONTSIZE - 1)
    return fig
