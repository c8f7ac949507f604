"""Tests of companion.plots.shapes."""

from __future__ import annotations

import pytest


def test_shift_figure_draws_one_arrow_per_scored_pair():
    from matplotlib.patches import FancyArrowPatch

    from companion.plots.shapes import plot_shift_alignment

    fig = plot_shift_alignment(["<s>", "The", "cat", "sat"])
    ax = fig.axes[0]
    assert sum(isinstance(p, FancyArrowPatch) for p in ax.patches) == 3
    assert ax.get_xlabel()
    with pytest.raises(ValueError, match="tokens must hold at least 2"):
        plot_shift_alignment(["only"])


def test_memory_figure_colours_the_dropped_row_of_each_sequence():
    from matplotlib.colors import to_hex

    from companion.plots import COLORS
    from companion.plots.shapes import plot_slice_in_memory

    fig = plot_slice_in_memory(time=4, vocab=3, batches=(1, 2))
    top, bottom = fig.axes
    red = [p for p in bottom.patches if to_hex(p.get_facecolor()) == COLORS["dropped"]]
    assert len(bottom.patches) == 2 * 4 * 3
    assert len(red) == 2 * 3  # one dropped row of V elements per sequence
    assert [p.get_x() for p in red] == [9, 10, 11, 21, 22, 23]
    assert len(top.patches) == 12
