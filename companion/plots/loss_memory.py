"""Figures of the chapter on the loss's memory at vocabulary scale."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    NullFormatter,
    NullLocator,
)

from companion.plots import TEXT_WIDTH_IN, new_figure

MIB = 2**20
TICK_PT = 9
LEGEND_PT = 9
LABEL_PT = 10
TITLE_PT = 10

VARIANT_LABELS = {
    "shift_and_slice": "eager, shift and slice",
    "label_padding": "eager, label padding",
    "checkpointed_chunks": "chunks + checkpointing",
    "chunked_function": "chunked autograd Function",
}
"""Legend text of each variant of
``companion.experiments.loss_memory.LOSS_VARIANTS``."""

VARIANT_SHORT = {
    "shift_and_slice": "slice",
    "label_padding": "pad",
    "checkpointed_chunks": "ckpt",
    "chunked_function": "Function",
}
"""Column headers of the variants in the chapter's tables."""

VARIANT_STYLES: dict[str, dict[str, Any]] = {
    # The two eager lines coincide: a wide line with large hollow markers
    # under a dashed one with small filled markers keeps both visible.
    "shift_and_slice": {
        "color": "#d62728",
        "marker": "o",
        "markersize": 10,
        "markerfacecolor": "none",
        "linewidth": 3,
        "linestyle": "-",
    },
    "label_padding": {
        "color": "#ff9896",
        "marker": "s",
        "markersize": 5,
        "linestyle": "--",
    },
    "checkpointed_chunks": {
        "color": "#9467bd",
        "marker": "^",
        "linestyle": "-",
    },
    "chunked_function": {"color": "#1f77b4", "marker": "D", "linestyle": "-"},
}

NOT_MEASURED = ("oom", "not_run")
"""Statuses drawn as a cross at the estimate: skipped, or out of memory."""


def _round_log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 times powers of ten between ``low`` and ``high``, ends in."""
    ticks = []
    first = math.floor(math.log10(low)) - 1
    for exponent in range(first, math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            value = mantissa * 10.0**exponent
            if low <= value <= high:
                ticks.append(value)
    return ticks or [low, high]


def _round_below(value: float) -> float:
    """The largest 1, 2 or 5 times a power of ten that is <= ``value``."""
    exponent = math.floor(math.log10(value))
    candidates = [
        m * 10.0**e for e in (exponent - 1, exponent) for m in (1, 2, 5)
    ]
    return max(c for c in candidates if c <= value * (1 + 1e-12))


def _round_above(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= ``value``."""
    exponent = math.floor(math.log10(value))
    candidates = [
        m * 10.0**e for e in (exponent, exponent + 1) for m in (1, 2, 5)
    ]
    return min(c for c in candidates if c >= value * (1 - 1e-12))


def plot_peak_memory(records: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """Peak RSS growth against sequence length, log-log, one panel per V.

    Args:
        records: benchmark records (the ``"results"`` list of a
            ``benchmarks/results/loss_memory_*.json`` file), each with
            ``variant``, ``time``, ``vocab``, ``status`` and, when
            ``status`` is ``"ok"``, ``peak_bytes``.  Records the benchmark
            did not run (``"not_run"``) or that ran out of memory
            (``"oom"``) are drawn as a cross at their first-principles
            estimate (``estimate_bytes``), never as a measurement.

    Returns:
        The figure, 6.3 in wide; the legend sits below the panels.
    """
    vocabs = sorted({int(record["vocab"]) for record in records})
    if not vocabs:
        raise ValueError("records must contain at least one benchmark record")
    times = sorted({int(record["time"]) for record in records})
    fig, axes_grid = plt.subplots(
        1,
        len(vocabs),
        figsize=(TEXT_WIDTH_IN, 3.9),
        dpi=110,
        layout="constrained",
        sharey=True,
        squeeze=False,
    )
    axes = axes_grid[0]
    drawn: list[float] = []
    for ax, vocab in zip(axes, vocabs):
        for variant, label in VARIANT_LABELS.items():
            rows = sorted(
                (
                    r
                    for r in records
                    if r["variant"] == variant and int(r["vocab"]) == vocab
                ),
                key=lambda r: int(r["time"]),
            )
            measured = [
                (int(r["time"]), r["peak_bytes"] / MIB)
                for r in rows
                if r["status"] == "ok"
            ]
            style = VARIANT_STYLES[variant]
            if measured:
                xs, ys = zip(*measured)
                ax.plot(xs, ys, label=label, **style)
                drawn += ys
            estimated = [
                (int(r["time"]), r["estimate_bytes"] / MIB)
                for r in rows
                if r["status"] in NOT_MEASURED
            ]
            if estimated:
                xs, ys = zip(*estimated)
                ax.plot(
                    xs,
                    ys,
                    linestyle="none",
                    marker="x",
                    markersize=9,
                    color=style["color"],
                )
                drawn += ys
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(times))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in times])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(labelsize=TICK_PT)
        ax.set_xlabel("sequence length T (tokens)", fontsize=LABEL_PT)
        ax.set_title(f"V = {vocab}", fontsize=TITLE_PT)
        ax.grid(True, which="both", alpha=0.3)
    # Limits at 1-2-5 values just outside the data, each labelled, so the
    # smallest value has a labelled tick below it even within one decade.
    positive = [value for value in drawn if value > 0]
    if positive:
        low = _round_below(min(positive) / 1.05)
        high = _round_above(max(positive) * 1.05)
        axes[0].set_ylim(low, high)
        axes[0].yaxis.set_major_locator(
            FixedLocator(_round_log_ticks(low, high))
        )
    axes[0].set_ylabel("peak RSS growth (MiB)", fontsize=LABEL_PT)
    handles, labels = axes[0].get_legend_handles_labels()
    statuses = {r["status"] for r in records}
    if statuses & set(NOT_MEASURED):
        (cross,) = axes[0].plot(
            [], [], linestyle="none", marker="x", color="#555555"
        )
        handles.append(cross)
        labels.append(
            "not run or out of memory (at its estimate)"
            if statuses >= set(NOT_MEASURED)
            else "out of memory (at its estimate)"
            if "oom" in statuses
            else "not run, over budget (at its estimate)"
        )
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=2,
        fontsize=LEGEND_PT,
        frameon=False,
    )
    return fig


def _first_index(values: Sequence[float], start: int, level: float) -> int:
    """First index >= ``start`` whose value is within 5 % of ``level``."""
    for index in range(start, len(values)):
        if abs(values[index] - level) <= 0.05 * level:
            return index
    return -1


def plot_live_memory_timeline(
    timelines: Mapping[str, Sequence[int]],
    logits_bytes: int,
    backward_starts: Mapping[str, int] | None = None,
    annotate: str | None = "label_padding",
) -> plt.Figure:
    """Live tensor memory through one forward + backward pass, per variant.

    Args:
        timelines: for each variant, the live bytes after each operator
            call (``TensorMemoryTracker.timeline``).
        logits_bytes: bytes of one ``(B, T, V)`` logits tensor; memory is
            drawn in units of it, so "3" means three such tensors.
        backward_starts: for each variant, the index in its timeline of
            the first operator call of the backward pass.  When given, the
            forward calls fill the left half of the x axis and the backward
            calls the right half, with the boundary marked; otherwise the
            x axis is the fraction of operator calls.
        annotate: the eager variant whose buffers are labelled (``Z``,
            ``A``, ``dL/dA``, ``G``), or ``None``; needs ``backward_starts``.

    Returns:
        The figure, 6.3 in wide.
    """
    if logits_bytes <= 0:
        raise ValueError(f"logits_bytes must be > 0; got {logits_bytes}")
    fig, ax = new_figure(height=3.4)
    positions: dict[str, list[float]] = {}
    for variant, timeline in timelines.items():
        count = len(timeline)
        split = None if backward_starts is None else backward_starts[variant]
        units = [value / logits_bytes for value in timeline]
        if split is None:
            progress = [i / max(count - 1, 1) for i in range(count)]
        else:
            # Forward calls fill [0, 0.5), backward calls [0.5, 1).
            forward = max(split, 1)
            backward = max(count - split, 1)
            progress = [
                0.5 * i / forward
                if i < split
                else 0.5 + 0.5 * (i - split) / backward
                for i in range(count)
            ]
        positions[variant] = progress
        style = {
            key: value
            for key, value in VARIANT_STYLES.get(variant, {}).items()
            if not key.startswith("marker")
        }
        style["linewidth"] = 1.5
        ax.step(
            progress + [1.0],
            units + units[-1:],
            where="post",
            label=VARIANT_LABELS.get(variant, variant),
            **style,
        )
    top = max(
        (max(t, default=0) / logits_bytes for t in timelines.values()),
        default=1.0,
    )
    ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)
    if backward_starts is not None:
        ax.axvline(0.5, color="#333333", linewidth=1, linestyle=":")
        ax.text(0.49, 1.2 * top, "forward", ha="right", fontsize=LABEL_PT)
        ax.text(0.51, 1.2 * top, "backward", ha="left", fontsize=LABEL_PT)
        ax.set_xlabel(
            "operator calls, in order (forward pass left, backward right)",
            fontsize=LABEL_PT,
        )
        ax.set_xticks([0, 0.5, 1])
    else:
        ax.set_xlabel(
            "progress through forward + backward (fraction of operator calls)",
            fontsize=LABEL_PT,
        )
    if annotate is not None and backward_starts is not None:
        if annotate in timelines:
            _annotate_buffers(
                ax,
                positions[annotate],
                [v / logits_bytes for v in timelines[annotate]],
                backward_starts[annotate],
            )
    ax.set_ylabel("live tensors (× one logits)", fontsize=LABEL_PT)
    ax.set_title(
        "Tensors alive during one forward and backward pass of the loss",
        fontsize=TITLE_PT,
    )
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=TICK_PT)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=LEGEND_PT, loc="upper left", frameon=False)
    return fig


def _plateau_middle(
    xs: Sequence[float], units: Sequence[float], i: int
) -> float:
    """x in the middle of the run of calls that keep ``units[i]``."""
    j = i
    level = units[i]
    while j + 1 < len(units) and abs(units[j + 1] - level) <= 0.05 * level:
        j += 1
    end = xs[j + 1] if j + 1 < len(xs) else 1.0
    return (xs[i] + end) / 2


def _annotate_buffers(
    ax: plt.Axes, xs: Sequence[float], units: Sequence[float], split: int
) -> None:
    """Name the logits-sized buffers alive at each level of an eager line."""
    forward_peak = max(range(split), key=lambda i: units[i], default=-1)
    backward_peak = max(
        range(split, len(units)), key=lambda i: units[i], default=-1
    )
    # (call index, text, above the line?)
    events = [
        (_first_index(units, 0, 1.0), "Z", True),
        (forward_peak, "Z, A", True),
        # Z goes when the loss function returns, between two calls.
        (_first_index(units, max(forward_peak, 0), 1.0), "A", False),
        (_first_index(units, split, 2.0), "A, ∂L/∂A", True),
        (backward_peak, "A, ∂L/∂A, G", True),
    ]
    if backward_peak >= 0:
        events.append(
            (_first_index(units, backward_peak + 1, 1.0), "G", False)
        )
    for index, text, above in events:
        if index < 0:
            continue
        ax.annotate(
            text,
            (_plateau_middle(xs, units, index), units[index]),
            xytext=(0, 4 if above else -4),
            textcoords="offset points",
            ha="center",
            va="bottom" if above else "top",
            fontsize=TICK_PT,
        )
