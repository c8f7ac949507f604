"""Tests of companion.plots.denominator."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from companion.plots.denominator import (  # noqa: E402
    plot_naive_error_vs_imbalance,
    plot_token_weights,
)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def test_token_weight_figure_shows_both_reductions():
    fig = plot_token_weights([2, 30])
    ax = fig.axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([1.0, 1.0, 32 / 4, 32 / 60])
    assert ax.get_ylabel() and ax.get_xlabel()
    # N is the book's symbol for all rows, scored or not: the weights are
    # described in words, not as multiples of 1/N
    labels = [ax.get_ylabel()] + [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any("N" in label for label in labels)
    matplotlib.pyplot.close(fig)


def test_imbalance_figure_plots_its_data():
    fig = plot_naive_error_vs_imbalance([1, 2, 4], [0.0, 0.1, 0.2], [0.0, 0.3, 0.6], [0.0, 0.0, 0.0])
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3
    assert list(lines[0].get_ydata()) == pytest.approx([0.0, 30.0, 60.0])
    assert "%" in ax.get_ylabel() and ax.get_xlabel()
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="same length"):
        plot_naive_error_vs_imbalance([1, 2], [0.0], [0.0], [0.0])
