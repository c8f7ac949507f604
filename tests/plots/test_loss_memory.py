"""Tests of companion.plots.loss_memory."""

from __future__ import annotations

import pytest

from companion.experiments.loss_memory import LOSS_VARIANTS
from tests.shared import benchmark_records


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def test_plot_peak_memory_draws_one_line_per_variant_and_marks_oom():
    from companion.plots.loss_memory import plot_peak_memory

    records = []
    for vocab in (32000, 128256):
        for time in (512, 2048):
            records += benchmark_records(3.0 * time * vocab * 4, 1e8, time=time, vocab=vocab)
    for record in records:
        record["estimate_bytes"] = 1e9
    records[0]["status"] = "oom"
    fig = plot_peak_memory(records)
    axes = fig.axes
    assert len(axes) == 2
    assert fig.get_figwidth() == pytest.approx(6.3)
    assert axes[0].get_yscale() == "log" and axes[0].get_xscale() == "log"
    assert axes[0].get_ylabel() == "peak RSS growth (MiB)"
    assert "tokens" in axes[0].get_xlabel()
    drawn = [line for line in axes[1].get_lines() if line.get_marker() != "x"]
    assert len(drawn) == len(LOSS_VARIANTS)
    (legend,) = fig.legends  # below the panels, for both
    texts = [text.get_text() for text in legend.get_texts()]
    assert len(texts) == len(LOSS_VARIANTS) + 1
    assert "out of memory" in texts[-1]
    assert min(text.get_fontsize() for text in legend.get_texts()) >= 9
    crosses = [line for line in axes[0].get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert len(crosses) == 1


def test_plot_live_memory_timeline_in_logits_units():
    from companion.plots.loss_memory import plot_live_memory_timeline

    fig = plot_live_memory_timeline(
        {"label_padding": [0, 100, 300, 100], "chunked_function": [0, 30]},
        100,
    )
    (ax,) = fig.axes
    assert max(ax.get_lines()[0].get_ydata()) == 3.0
    assert "logits" in ax.get_ylabel()
    with pytest.raises(ValueError, match="logits_bytes"):
        plot_live_memory_timeline({}, 0)


def test_peak_memory_axis_has_labelled_ticks_within_one_decade():
    from companion.plots.loss_memory import plot_peak_memory

    records = benchmark_records(700 * 2**20, 120 * 2**20)
    for record in records:
        record["estimate_bytes"] = 1.0
    fig = plot_peak_memory(records)
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    labels = [tick.get_text() for tick in ax.get_yticklabels() if low <= tick.get_position()[1] <= high]
    assert {"100", "200", "500"} <= set(labels)  # a tick below the data
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 9


def test_plot_live_memory_timeline_marks_passes_and_buffers():
    from companion.plots.loss_memory import plot_live_memory_timeline

    # Z; Z and A; A (forward ends); A and dL/dA; all three; G; G and grads.
    eager = [100, 200, 100, 200, 300, 100, 110]
    fig = plot_live_memory_timeline(
        {"label_padding": eager, "chunked_function": [50, 60, 60]},
        100,
        backward_starts={"label_padding": 3, "chunked_function": 2},
    )
    (ax,) = fig.axes
    assert fig.get_figwidth() == pytest.approx(6.3)
    assert ax.get_title()
    texts = {text.get_text() for text in ax.texts}
    assert {"forward", "backward"} <= texts
    assert {"Z", "Z, A", "A", "A, ∂L/∂A", "A, ∂L/∂A, G", "G"} <= texts
    xs = ax.get_lines()[0].get_xdata()
    assert max(xs[:3]) < 0.5 <= min(xs[3:])  # forward left, backward right
