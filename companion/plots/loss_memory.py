"""Figures of the chapter on the loss's memory at vocabulary scale."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from companion.plots import new_figure

MIB = 2**20

VARIANT_LABELS = {
    "shift_and_slice": "eager, shift and slice",
    "label_padding": "eager, label padding",
    "checkpointed_chunks": "chunks + checkpointing",
    "chunked_function": "chunked autograd Function",
}
"""Legend text of each variant of ``companion.chunked_loss.LOSS_VARIANTS``."""

VARIANT_STYLES: dict[str, dict[str, Any]] = {
    "shift_and_slice": {"color": "#d62728", "marker": "o", "linestyle": "-"},
    "label_padding": {"color": "#ff9896", "marker": "s", "linestyle": "--"},
    "checkpointed_chunks": {"color": "#9467bd", "marker": "^", "linestyle": "-"},
    "chunked_function": {"color": "#1f77b4", "marker": "D", "linestyle": "-"},
}


def _round_log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 times powers of ten between ``low`` and ``high`` (both > 0), ends included."""
    ticks = []
    for exponent in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if low <= value <= high:
                ticks.append(value)
    return ticks or [low, high]


def plot_peak_memory(records: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """Peak memory against sequence length, log-log, one line per variant, one panel per V.

    Args:
        records: benchmark records (the ``"results"`` list of a
            ``benchmarks/results/loss_memory_*.json`` file), each with
            ``variant``, ``time``, ``vocab``, ``status`` and, when ``status``
            is ``"ok"``, ``peak_bytes``.  Runs reported out of memory are
            drawn as a cross at their first-principles estimate
            (``estimate_bytes``).

    Returns:
        The figure.
    """
    vocabs = sorted({int(record["vocab"]) for record in records})
    if not vocabs:
        raise ValueError("records must contain at least one benchmark record")
    times = sorted({int(record["time"]) for record in records})
    fig, axes_grid = plt.subplots(
        1,
        len(vocabs),
        figsize=(3.6 * len(vocabs) + 0.8, 3.4),
        dpi=110,
        layout="constrained",
        sharey=True,
        squeeze=False,
    )
    axes = axes_grid[0]
    for ax, vocab in zip(axes, vocabs):
        for variant, label in VARIANT_LABELS.items():
            rows = sorted(
                (r for r in records if r["variant"] == variant and int(r["vocab"]) == vocab),
                key=lambda r: int(r["time"]),
            )
            measured = [(int(r["time"]), r["peak_bytes"] / MIB) for r in rows if r["status"] == "ok"]
            style = VARIANT_STYLES[variant]
            if measured:
                xs, ys = zip(*measured)
                ax.plot(xs, ys, label=label, **style)
            out_of_memory = [
                (int(r["time"]), r["estimate_bytes"] / MIB) for r in rows if r["status"] == "oom"
            ]
            if out_of_memory:
                xs, ys = zip(*out_of_memory)
                ax.plot(xs, ys, linestyle="none", marker="x", markersize=9, color=style["color"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(times))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in times])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_title(f"V = {vocab}")
        ax.grid(True, which="both", alpha=0.3)
    # Label 1-2-5 values: the data may span less than one decade, where a log
    # axis would otherwise show no labelled tick at all.
    low, high = axes[0].get_ylim()
    axes[0].yaxis.set_major_locator(FixedLocator(_round_log_ticks(low, high)))
    axes[0].set_ylabel("peak memory of forward + backward (MiB)")
    if any(r["status"] == "oom" for r in records):
        axes[0].plot([], [], linestyle="none", marker="x", color="#555555",
                     label="out of memory (at its estimate)")
    axes[0].legend(fontsize=8, loc="upper left")
    return fig


def plot_live_memory_timeline(
    timelines: Mapping[str, Sequence[int]], logits_bytes: int
) -> plt.Figure:
    """Live tensor memory through one forward + backward pass, one line per variant.

    Args:
        timelines: for each variant, the live bytes after each operator call
            (``TensorMemoryTracker.timeline``).
        logits_bytes: bytes of one ``(B, T, V)`` logits tensor; memory is
            drawn in units of it, so "3" means three such tensors.

    Returns:
        The figure; the x axis is progress through the pass (0 = first
        operator call, 1 = last), since the variants make different numbers
        of calls.
    """
    if logits_bytes <= 0:
        raise ValueError(f"logits_bytes must be > 0; got {logits_bytes}")
    fig, ax = new_figure(width=7.0, height=3.2)
    for variant, timeline in timelines.items():
        count = len(timeline)
        progress = [i / max(count - 1, 1) for i in range(count)]
        style = dict(VARIANT_STYLES.get(variant, {}))
        style.pop("marker", None)
        ax.step(
            progress,
            [value / logits_bytes for value in timeline],
            where="post",
            label=VARIANT_LABELS.get(variant, variant),
            **style,
        )
    ax.set_xlabel("progress through forward + backward (fraction of operator calls)")
    ax.set_ylabel("live tensors (× one (B, T, V) logits)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
