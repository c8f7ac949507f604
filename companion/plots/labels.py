"""Figures of the LLaVA-loss chapter: which label positions a batch scores."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from companion import IGNORE_INDEX
from companion._checks import (
    require_integer,
    require_leading_dims,
    require_rank,
    require_tensor,
)
from companion.plots import COLORS, TEXT_WIDTH_IN, new_figure
from companion.plots.language import localized

#: Cell classes of :func:`label_layout_grid`, in colour-map order.
IGNORED, SCORED, PADDING = 0, 1, 2

_SEGMENT_LETTERS = {
    "bos": "\u25b6", "image": "I", "prompt": "P", "answer": "A", "padding": "",
}

#: Font sizes in points, for a figure shown at the text width.
CELL_FONTSIZE: float = 11.0
LEGEND_FONTSIZE: float = 9.5


def label_layout_grid(
    labels: torch.Tensor, attention_mask: torch.Tensor
) -> np.ndarray:
    """Classify every label position of a batch.

    Args:
        labels: ``(B, T)`` int, ``-100`` = ignored.
        attention_mask: ``(B, T)`` int or bool, ``0`` = padding.

    Returns:
        ``(B, T)`` int array: :data:`PADDING` where the mask is 0,
        :data:`SCORED` where ``t >= 1`` and the label is kept (a next-token
        target that enters the loss), :data:`IGNORED` elsewhere.  Column 0 is
        never scored: no position precedes it.
    """
    require_tensor(labels, "labels")
    require_rank(labels, 2, "labels", "(B, T)")
    require_integer(labels, "labels")
    require_tensor(attention_mask, "attention_mask")
    require_leading_dims(
        attention_mask, tuple(labels.shape), "attention_mask", "labels",
        "(B, T)",
    )
    kept = (labels != IGNORE_INDEX).cpu().numpy()
    kept[:, 0] = False
    grid = np.where(kept, SCORED, IGNORED)
    return np.where((attention_mask == 0).cpu().numpy(), PADDING, grid)


@localized
def plot_label_layout(
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    segments: torch.Tensor,
    segment_codes: Mapping[str, int],
) -> plt.Figure:
    """Grid of a batch's label positions, coloured by whether they are scored.

    Args:
        labels: ``(B, T)`` int, ``-100`` = ignored.
        attention_mask: ``(B, T)`` int or bool, ``0`` = padding.
        segments: ``(B, T)`` int segment code of each position.
        segment_codes: name -> code, with names among ``bos``, ``image``,
            ``prompt``, ``answer``, ``padding``.

    Returns:
        One row per sequence, one cell per position.  Blue: a target that
        enters the loss; grey: ``-100``; white: padding.  Each cell carries
        its segment's mark (a triangle for begin-of-sequence, I = image,
        P = prompt, A = answer: no letter that the book's notation uses for
        a set).  The figure is :data:`companion.plots.TEXT_WIDTH_IN`
        wide, with cell letters of :data:`CELL_FONTSIZE` and a legend of
        :data:`LEGEND_FONTSIZE` points.
    """
    grid = label_layout_grid(labels, attention_mask)
    require_leading_dims(
        segments, tuple(labels.shape), "segments", "labels", "(B, T)"
    )
    batch, time = grid.shape
    letters = {
        code: _SEGMENT_LETTERS.get(name, "?")
        for name, code in segment_codes.items()
    }
    cell = (TEXT_WIDTH_IN - 0.55) / time  # inches per square cell
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=cell * batch + 1.45)
    colormap = ListedColormap([COLORS["ignored"], COLORS["scored"], "white"])
    ax.imshow(grid, cmap=colormap, vmin=0, vmax=2, aspect="equal")
    for b in range(batch):
        for t in range(time):
            text_color = "white" if grid[b, t] == SCORED else "black"
            ax.text(t, b, letters[int(segments[b, t])], ha="center",
                    va="center", fontsize=CELL_FONTSIZE, color=text_color)
    ax.set_xticks(np.arange(-0.5, time, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, batch, 1), minor=True)
    ax.grid(which="minor", color="black", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xticks(range(time))
    ax.set_yticks(range(batch))
    ax.set_xlabel("label position t (token index)")
    ax.set_ylabel("sequence b")
    n_scored = int((grid == SCORED).sum())
    ax.set_title(
        f"Only the answers are scored: {n_scored} of {batch * time} "
        "label positions"
    )
    ax.legend(
        handles=[
            Patch(facecolor=COLORS["scored"], edgecolor="black",
                  label="scored target"),
            Patch(facecolor=COLORS["ignored"], edgecolor="black",
                  label="label = -100"),
            Patch(facecolor="white", edgecolor="black",
                  label="padding (mask 0)"),
            Patch(visible=False,
                  label="\u25b6 start, I image, P prompt, A answer"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.3),
        ncol=2,
        frameon=False,
        fontsize=LEGEND_FONTSIZE,
    )
    return fig
