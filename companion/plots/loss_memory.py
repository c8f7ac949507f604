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
from companion.plots.language import localized

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


def _first_index(values: Sequence[float], start: int, level: float) -> int:
    """First index >= ``start`` whose value is within 5 % of ``level``."""
    for index in range(start, len(values)):
        if abs(values[index] - level) <= 0.05 * level:
            return index
    return -1


@localized
def plot_live_memory_timeline(
    timelines: Mapping[str, Mapping[str, Any]],
    logits_bytes: int,
    annotate: str | None = "label_padding",
) -> plt.Figure:
    """Live tensor memory against time through one forward + backward pass.

    Args:
        timelines: for each variant, a dict with ``bytes`` (live bytes
            after each operator call, ``TensorMemoryTracker.timeline``),
            ``seconds`` (when each call ended, ``TensorMemoryTracker.times``)
            and ``backward_start`` (seconds at which the backward pass
            began), as ``companion.experiments.loss_memory.memory_timelines``
            returns them.
        logits_bytes: bytes of one ``(B, T, V)`` logits tensor; memory is
            drawn in units of it, so "3" means three such tensors.
        annotate: the eager variant whose buffers are labelled (``Z``,
            ``A``, ``dL/dA``, ``G``), or ``None``.

    Returns:
        The figure, 6.3 in wide: x is milliseconds from the start of the
        pass, a dot marks where each variant's backward pass began.
    """
    if logits_bytes <= 0:
        raise ValueError(f"logits_bytes must be > 0; got {logits_bytes}")
    fig, ax = new_figure(height=3.4)
    top = 0.0
    end = 0.0
    for variant, line in timelines.items():
        units = [value / logits_bytes for value in line["bytes"]]
        millis = [1000 * t for t in line["seconds"]]
        if not units:
            continue
        style = {
            key: value
            for key, value in VARIANT_STYLES.get(variant, {}).items()
            if not key.startswith("marker")
        }
        style["linewidth"] = 1.5
        ax.step([0.0, *millis], [0.0, *units], where="pre",
                label=VARIANT_LABELS.get(variant, variant), **style)
        start_ms = 1000 * line["backward_start"]
        level = next(
            (u for m, u in zip(millis, units) if m >= start_ms), units[-1]
        )
        ax.plot([start_ms], [level], marker="o", markersize=5,
                color=style.get("color", "#333333"), linestyle="none")
        top = max(top, max(units))
        end = max(end, millis[-1])
        if variant == annotate:
            _annotate_buffers(ax, millis, units, line["backward_start"] * 1000)
    ax.set_ylim(0, 1.25 * top if top > 0 else 1.0)
    ax.set_xlim(0, end * 1.02 if end > 0 else 1.0)
    ax.set_xlabel("time from the start of the pass (ms); dot: backward pass begins",
                  fontsize=LABEL_PT)
    ax.set_ylabel("live tensors (× one logits)", fontsize=LABEL_PT)
    ax.set_title(
        "Tensors alive during one forward and backward pass of the loss",
        fontsize=TITLE_PT,
    )
    ax.tick_params(labelsize=TICK_PT)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=LEGEND_PT, loc="upper right", frameon=False)
    return fig


def _plateau_middle(xs: Sequence[float], units: Sequence[float], i: int) -> float:
    """x in the middle of the run of calls that keep ``units[i]``."""
    j = i
    level = units[i]
    while j + 1 < len(units) and abs(units[j + 1] - level) <= 0.05 * level:
        j += 1
    before = xs[i - 1] if i > 0 else 0.0
    return (before + xs[j]) / 2


def _annotate_buffers(
    ax: plt.Axes, xs: Sequence[float], units: Sequence[float], backward_x: float
) -> None:
    """Name the logits-sized buffers alive at each level of an eager line."""
    split = next((i for i, x in enumerate(xs) if x >= backward_x), len(xs))
    forward_peak = max(range(split), key=lambda i: units[i], default=-1)
    backward_peak = max(range(split, len(units)), key=lambda i: units[i], default=-1)
    events = [
        (forward_peak, "Z, A", True),
        (backward_peak, "A, ∂L/∂A, G", True),
    ]
    if backward_peak >= 0:
        events.append((_first_index(units, backward_peak + 1, 1.0), "G", False))
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


_PEER_COLORS = ("#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#9467bd")
_OUR_COLORS = ("#1f77b4", "#17becf", "#2ca02c", "#98df8a")
_MARKERS = ("o", "s", "^", "v", "P", "X", "*", "h")


@localized
def plot_side_by_side(
    table: Any,
    highlight: Sequence[str] = (),
) -> plt.Figure:
    """Memory against time of every measured variant, one panel per size.

    Args:
        table: ``companion.experiments.loss_memory.side_by_side``'s table
            (index ``(size, variant)``, columns ``memory (MiB)`` and
            ``× eager``); rows without a measurement are skipped.
        highlight: variant labels drawn filled (the package's own); the
            others are drawn hollow.  Each variant keeps its marker and
            colour in every panel, named once in the legend below.

    Returns:
        The figure, 6.3 in wide: x is the peak memory in MiB (log scale,
        inputs included), y the median time over the eager loss's.
    """
    measured = table.dropna(subset=["memory (MiB)", "× eager"])
    sizes = list(dict.fromkeys(measured.index.get_level_values(0)))
    if not sizes:
        raise ValueError("table must hold at least one measured row")
    variants = list(dict.fromkeys(measured.index.get_level_values(1)))
    styles: dict[str, dict[str, Any]] = {}
    peers = ours = 0
    for label in variants:
        if label in highlight:
            color = _OUR_COLORS[ours % len(_OUR_COLORS)]
            styles[label] = {"marker": "D", "color": color, "markerfacecolor": color}
            ours += 1
        else:
            styles[label] = {
                "marker": _MARKERS[peers % len(_MARKERS)],
                "color": _PEER_COLORS[peers % len(_PEER_COLORS)],
                "markerfacecolor": "none",
            }
            peers += 1
    columns = 2 if len(sizes) > 1 else 1
    rows = math.ceil(len(sizes) / columns)
    fig, axes_grid = plt.subplots(
        rows, columns, figsize=(TEXT_WIDTH_IN, 2.6 * rows + 1.3), dpi=110,
        layout="constrained", squeeze=False,
    )
    axes = list(axes_grid.flat)
    handles: dict[str, Any] = {}
    for ax, size in zip(axes, sizes):
        part = measured.xs(size, level=0)
        for label, row in part.iterrows():
            (line,) = ax.plot(row["memory (MiB)"], row["× eager"], linestyle="none",
                              markersize=7, markeredgewidth=1.3, **styles[label])
            handles.setdefault(label, line)
        ax.axhline(1.0, color="#555555", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"d, T, V = {size}", fontsize=TITLE_PT)
        ax.set_xlabel("peak memory, inputs included (MiB)", fontsize=LABEL_PT)
        ax.set_ylabel("time × eager", fontsize=LABEL_PT)
        ax.tick_params(labelsize=TICK_PT)
        ax.grid(True, which="both", alpha=0.3)
        low, high = part["memory (MiB)"].min(), part["memory (MiB)"].max()
        ax.set_xlim(low / 1.5, high * 1.5)
        ax.set_ylim(0, max(1.1, part["× eager"].max() * 1.1))
    for ax in axes[len(sizes):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=3,
               fontsize=LEGEND_PT - 1, frameon=False)
    return fig


@localized
def plot_chunk_sweep(table: Any) -> plt.Figure:
    """Time and memory of the chunked loss over its chunk budget.

    Args:
        table: ``companion.experiments.loss_memory.sweep_table``'s table
            (columns ``dtype``, ``budget (MiB)``, ``rows``, ``memory
            (MiB)``, ``floor (MiB)``, ``time (s)``).

    Returns:
        The figure, 6.3 in wide, two panels sharing the x axis (budget in
        MiB, log scale): median time per pass, and peak memory with its
        floor dashed, one line per dtype.
    """
    if len(table) == 0:
        raise ValueError("table must hold at least one row")
    fig, (time_ax, memory_ax) = plt.subplots(
        1, 2, figsize=(TEXT_WIDTH_IN, 3.0), dpi=110, layout="constrained", sharex=True
    )
    styles = {"float32": ("#1f77b4", "D"), "bfloat16": ("#2ca02c", "s")}
    for dtype, part in table.groupby("dtype", sort=False):
        color, marker = styles.get(dtype, ("#555555", "o"))
        budgets = part["budget (MiB)"]
        time_ax.plot(budgets, part["time (s)"], marker=marker, color=color, label=dtype)
        memory_ax.plot(budgets, part["memory (MiB)"], marker=marker, color=color, label=dtype)
        memory_ax.plot(budgets, part["floor (MiB)"], linestyle="--", color=color, linewidth=1,
                       label=f"{dtype} floor")
    for ax in (time_ax, memory_ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(table["budget (MiB)"]))))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("chunk budget (MiB)", fontsize=LABEL_PT)
        ax.tick_params(labelsize=TICK_PT)
        ax.grid(True, alpha=0.3)
    time_ax.set_ylim(bottom=0)
    memory_ax.set_ylim(bottom=0)
    time_ax.set_ylabel("median time per pass (s)", fontsize=LABEL_PT)
    memory_ax.set_ylabel("peak memory (MiB)", fontsize=LABEL_PT)
    time_ax.legend(fontsize=LEGEND_PT, frameon=False)
    memory_ax.legend(fontsize=LEGEND_PT - 1, frameon=False)
    return fig
