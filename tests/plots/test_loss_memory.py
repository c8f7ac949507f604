"""Tests of companion.plots.loss_memory: what each figure of chapter 6 shows."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

from companion.plots.loss_memory import (  # noqa: E402
    plot_chunk_sweep,
    plot_live_memory_timeline,
    plot_side_by_side,
)


def _timeline(levels, backward_at):
    return {
        "bytes": [level * 100 for level in levels],
        "seconds": [0.001 * (i + 1) for i in range(len(levels))],
        "backward_start": backward_at,
    }


def test_plot_live_memory_timeline_against_time_in_logits_units():
    timelines = {
        "label_padding": _timeline([1, 2, 1, 2, 3, 1], 0.0035),
        "chunked_function": _timeline([0.2, 0.3, 0.3], 0.0025),
    }
    fig = plot_live_memory_timeline(timelines, 100)
    ax = fig.axes[0]
    assert "ms" in ax.get_xlabel() and "× one logits" in ax.get_ylabel()
    steps = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert max(steps[0].get_ydata()) == 3  # units of one logits tensor
    assert max(steps[0].get_xdata()) == pytest.approx(6.0)  # milliseconds
    texts = {text.get_text() for text in ax.texts}
    assert {"Z, A", "A, ∂L/∂A, G", "G"} <= texts
    with pytest.raises(ValueError, match="logits_bytes must be > 0"):
        plot_live_memory_timeline({}, 0)


def _table():
    rows = [
        ("4, 10, 100", "eager", 300.0, 1.0),
        ("4, 10, 100", "chunked", 100.0, 0.6),
        ("4, 10, 100", "liger", float("nan"), float("nan")),
        ("8, 10, 100", "eager", 600.0, 1.0),
    ]
    return pd.DataFrame(
        [{"size": s, "variant": v, "memory (MiB)": m, "× eager": t} for s, v, m, t in rows]
    ).set_index(["size", "variant"])


def test_plot_side_by_side_one_panel_per_size_skipping_unmeasured():
    fig = plot_side_by_side(_table(), highlight=["chunked"])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2
    legend = {text.get_text() for text in fig.legends[0].get_texts()}
    assert legend == {"eager", "chunked"}  # the unmeasured row is left out
    assert len(visible[0].get_lines()) == 3  # two points and the eager line
    assert visible[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="at least one measured row"):
        plot_side_by_side(_table().iloc[2:3])


def test_plot_chunk_sweep_two_panels_with_floors():
    table = pd.DataFrame(
        {
            "dtype": ["float32", "float32", "bfloat16", "bfloat16"],
            "budget (MiB)": [16, 64, 16, 64],
            "rows": [4, 16, 3, 12],
            "memory (MiB)": [100.0, 150.0, 90.0, 130.0],
            "floor (MiB)": [98.0, 148.0, 88.0, 128.0],
            "time (s)": [2.0, 1.0, 1.0, 0.5],
            "CPU (s)": [4.0, 2.0, 2.0, 1.0],
        }
    )
    fig = plot_chunk_sweep(table)
    time_ax, memory_ax = fig.axes
    assert len(time_ax.get_lines()) == 2 and len(memory_ax.get_lines()) == 4
    assert "budget" in time_ax.get_xlabel() and "time" in time_ax.get_ylabel()
    with pytest.raises(ValueError, match="at least one row"):
        plot_chunk_sweep(table.iloc[:0])
