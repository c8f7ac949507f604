"""Figures of the tensor-shapes chapter."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

from companion.plots import COLORS, new_figure
from companion.plots.language import localized


@localized
def plot_shift_alignment(tokens: Sequence[str]) -> plt.Figure:
    """Which logit row is scored against which label after the shift.

    Args:
        tokens: the ``T`` tokens of one sequence, as strings (``T >= 2``).

    Returns:
        A figure with one row of logit positions ``0 .. T-1`` above one row of
        labels ``0 .. T-1``; an arrow joins logit row ``t`` to label ``t + 1``.
        The last logit row (nothing to predict) and the first label (nothing
        predicts it) are greyed, with a dashed red edge.
    """
    if len(tokens) < 2:
        raise ValueError(f"tokens must hold at least 2 tokens; got {len(tokens)}")
    time = len(tokens)
    fig, ax = new_figure(width=max(6.0, 1.05 * time), height=2.9)
    y_logits, y_labels, w, h = 1.6, 0.0, 0.8, 0.55
    def box(x: float, y: float, kept_face: str, kept_edge: str, dropped: bool) -> None:
        # a dropped entry is greyed with a dashed red edge, so its text stays legible
        ax.add_patch(Rectangle((x - w / 2, y), w, h,
                               facecolor="#eeeeee" if dropped else kept_face,
                               edgecolor=COLORS["dropped"] if dropped else kept_edge,
                               linestyle="--" if dropped else "-", linewidth=1.4))

    for t, token in enumerate(tokens):
        dropped_logit = t == time - 1
        dropped_label = t == 0
        box(t, y_logits, "#deebf7", COLORS["scored"], dropped_logit)
        ax.text(t, y_logits + h / 2, f"logits[{t}]\nafter '{token}'", ha="center",
                va="center", fontsize=8, color="#555555" if dropped_logit else "black")
        box(t, y_labels, "#e5f5e0", COLORS["accent"], dropped_label)
        ax.text(t, y_labels + h / 2, f"labels[{t}]\n'{token}'", ha="center", va="center",
                fontsize=8, color="#555555" if dropped_label else "black")
        if t + 1 < time:
            ax.add_patch(FancyArrowPatch((t, y_logits), (t + 1, y_labels + h),
                                         arrowstyle="-|>", mutation_scale=10,
                                         color=COLORS["scored"], linewidth=1.2))
    ax.text(-0.65, y_logits + h / 2, "shift_logits =\nlogits[..., :-1, :]", ha="right",
            va="center", fontsize=8)
    ax.text(-0.65, y_labels + h / 2, "shift_labels =\nlabels[..., 1:]", ha="right", va="center",
            fontsize=8)
    ax.set_xlim(-2.3, time - 0.4)
    ax.set_ylim(-0.25, y_logits + h + 0.25)
    ax.set_xticks(range(time), [str(t) for t in range(time)])
    ax.set_xlabel("position t in the sequence (grey, dashed red edge: dropped by the shift)")
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title("Logit row t is scored against label t + 1")
    return fig


@localized
def plot_slice_in_memory(time: int, vocab: int, batches: Sequence[int] = (1, 2)) -> plt.Figure:
    """Where the elements of ``logits[..., :-1, :]`` sit in the flat storage.

    Args:
        time: sequence length ``T`` of the drawn tensors (small, e.g. 4).
        vocab: vocabulary size ``V`` (small, e.g. 3).
        batches: the batch sizes ``B`` to draw, one panel each.

    Returns:
        One horizontal strip per batch size: every cell is one element of the
        ``(B, T, V)`` storage in memory order.  Cells kept by the slice are
        blue, the dropped last row of each sequence is red.  With ``B == 1`` the
        kept cells form one unbroken prefix (a contiguous tensor); with
        ``B > 1`` red gaps split them.
    """
    if time < 2 or vocab < 1:
        raise ValueError(f"time must be >= 2 and vocab >= 1; got time={time}, vocab={vocab}")
    if not batches or min(batches) < 1:
        raise ValueError(f"batches must be non-empty positive batch sizes; got {list(batches)}")
    longest = max(batches) * time * vocab
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(6.0, 0.23 * longest), 0.95 * len(batches) + 0.7),
                             dpi=110, layout="constrained", squeeze=False)
    for ax, batch in zip(axes[:, 0], batches):
        for offset in range(batch * time * vocab):
            t = (offset // vocab) % time
            kept = t < time - 1
            ax.add_patch(Rectangle((offset, 0), 1, 1, linewidth=0.6, edgecolor="white",
                                   facecolor=COLORS["scored"] if kept else COLORS["dropped"]))
        for b in range(1, batch):
            ax.axvline(b * time * vocab, color="black", linewidth=1.5)
        ax.set_xlim(0, longest)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_ylabel(f"B = {batch}", rotation=0, ha="right", va="center")
        ax.set_xticks(range(0, longest + 1, vocab))
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel(
        f"offset in storage, in elements (T = {time}, V = {vocab}; "
        "blue: kept by logits[..., :-1, :], red: dropped last row)"
    )
    axes[0, 0].set_title("The slice is one block of memory only when B = 1")
    return fig
