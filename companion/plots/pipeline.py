"""The whole book on one picture: from ``input_ids`` to the perplexity.

The figure is drawn here, like every other one, and used twice: chapter 1
draws it in a cell, and the introduction (a Markdown page, which runs no
code) shows ``book/images/pipeline.svg``, written by

    python -m companion.plots.pipeline book/images/pipeline.svg

The SVG is committed, and ``tests/plots/test_pipeline.py`` renders the figure
again and requires the same bytes, so the picture on the introduction cannot
drift from this code: a change here fails the test until the file is
rewritten with the command above.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from companion.plots import TEXT_WIDTH_IN
from companion.plots.language import localized

FONT_PT = 9
"""Size of every text in the figure, in points (drawn at the text width)."""


@dataclass(frozen=True)
class Step:
    """One box of the pipeline.

    Attributes:
        name: what the step is, on the box's first line.
        detail: the code or formula, on its second line ("" for none).
        lane: ``"main"`` (the logits' path), ``"labels"`` (the labels'
            path) or ``"both"`` (a step that acts on logits and labels).
    """

    name: str
    detail: str
    lane: str


@dataclass(frozen=True)
class Arrow:
    """An arrow from row ``start`` down to row ``stop``, with a shape on it."""

    start: int
    stop: int
    shape: str
    lane: str


@dataclass(frozen=True)
class Chapter:
    """The rows ``first .. last`` (inclusive) where chapter ``number`` acts."""

    number: int
    text: str
    first: int
    last: int
    column: int


#: The boxes, top to bottom; a row may hold a labels box and a main box.
STEPS: tuple[tuple[Step, ...], ...] = (
    (Step("labels", "$y_{b,t}$", "labels"), Step("input_ids", "$x_{b,t}$", "main")),
    (Step("embeddings", "and the layers", "main"),),
    (Step("logits", "$z_{b,t}$, from lm_head", "main"),),
    (Step("shift", "logits[:, :-1],  labels[:, 1:]", "both"),),
    (Step("flatten", ".view(-1, V),  .view(-1)", "both"),),
    (Step("log-softmax", r"$\log p_n$", "main"),),
    (Step("pick the target", r"$\ell_n = -\log p_{n,y_n}$", "both"),),
    (Step("mask", r"0 where $y_n = -100$", "main"),),
    (Step("sum / count", r"$\Sigma_{n \in \mathcal{S}}\, \ell_n \;/\; |\mathcal{S}|$", "main"),),
    (Step("loss", r"$\mathcal{L}$", "main"),),
    (Step("perplexity", r"$\exp(\mathcal{L})$", "main"),),
)

#: The arrows and the shapes of what flows along them.
ARROWS: tuple[Arrow, ...] = (
    Arrow(0, 3, "(B, T)", "labels"),
    Arrow(0, 1, "(B, T)", "main"),
    Arrow(1, 2, "(B, T, d)", "main"),
    Arrow(2, 3, "(B, T, V)", "main"),
    Arrow(3, 4, "(B, T−1)", "labels"),
    Arrow(3, 4, "(B, T−1, V)", "main"),
    Arrow(4, 6, "(N,)", "labels"),
    Arrow(4, 5, "(N, V),  N = B(T−1)", "main"),
    Arrow(5, 6, "(N, V)", "main"),
    Arrow(6, 7, "(N,)", "main"),
    Arrow(7, 8, "(N,)", "main"),
    Arrow(8, 9, "()  a scalar", "main"),
    Arrow(9, 10, "()", "main"),
)

#: Where each chapter acts, in two columns of brackets right of the boxes.
CHAPTERS: tuple[Chapter, ...] = (
    Chapter(1, "Tensor shapes:\nshift, flatten", 0, 4, 0),
    Chapter(2, "The LLaVA loss:\nmask and count", 7, 8, 0),
    Chapter(3, "Cross-entropy:\nlog-softmax\nand NLL", 5, 6, 0),
    Chapter(4, "Keras masks", 7, 7, 1),
    Chapter(5, "One denominator:\nmicro-batches,\nranks", 8, 8, 1),
    Chapter(6, "The logits at\nvocabulary scale", 2, 5, 1),
    Chapter(7, "Training with\nlabel mistakes", 6, 6, 1),
    Chapter(8, "Checking\na batch", 0, 0, 1),
)

# Layout, in inches (the axes span the figure, one unit = one inch).
_PITCH = 0.6
_BOX_H = 0.36
_TOP_MARGIN = 0.08
_LANES = {"labels": (0.08, 1.08), "main": (1.28, 2.68), "both": (0.08, 2.68)}
_ARROW_X = {"labels": 0.58, "main": 1.98}
_COLUMN_X = (3.3, 4.74)
_CHAPTER_COLOURS = {
    1: "#1f77b4", 2: "#d62728", 3: "#2ca02c", 4: "#9467bd",
    5: "#ff7f0e", 6: "#8c564b", 7: "#e377c2", 8: "#17becf",
}


def _height() -> float:
    return _TOP_MARGIN * 2 + (len(STEPS) - 1) * _PITCH + _BOX_H


def _row_top(row: int) -> float:
    return _height() - _TOP_MARGIN - row * _PITCH


@localized
def plot_pipeline() -> plt.Figure:
    """The loss computation from ``input_ids`` to the perplexity, with the
    chapters placed where they act.

    One box per step, top to bottom: ``input_ids (B, T)``, the embeddings
    and layers, ``logits (B, T, V)``, the shift, the flattening, the
    log-softmax, picking the target, the mask, sum / count, the loss and the
    perplexity.  The labels travel on their own path on the left until they
    pick the target.  Every arrow carries the shape of what flows along it,
    in the symbols of the book's notation page; coloured brackets on the
    right mark the rows each chapter (1 to 8) is about.

    Returns:
        A figure as wide as the book's text column, with one axes whose
        units are inches.
    """
    height = _height()
    fig = plt.figure(figsize=(TEXT_WIDTH_IN, height), dpi=110)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0.0, TEXT_WIDTH_IN)
    ax.set_ylim(0.0, height)
    ax.set_axis_off()

    for row, steps in enumerate(STEPS):
        top = _row_top(row)
        for step in steps:
            left, right = _LANES[step.lane]
            ax.add_patch(FancyBboxPatch(
                (left, top - _BOX_H), right - left, _BOX_H,
                boxstyle="round,pad=0,rounding_size=0.06",
                facecolor="#f3f6fa", edgecolor="#4d4d4d", linewidth=0.9,
            ))
            middle = top - _BOX_H / 2
            if step.detail:
                ax.text((left + right) / 2, middle + 0.075, step.name,
                        ha="center", va="center", fontsize=FONT_PT,
                        fontweight="bold")
                ax.text((left + right) / 2, middle - 0.085, step.detail,
                        ha="center", va="center", fontsize=FONT_PT,
                        family="DejaVu Sans Mono" if "[" in step.detail
                        or step.detail.startswith(".") else None)
            else:
                ax.text((left + right) / 2, middle, step.name, ha="center",
                        va="center", fontsize=FONT_PT, fontweight="bold")

    for arrow in ARROWS:
        x = _ARROW_X[arrow.lane]
        start = _row_top(arrow.start) - _BOX_H
        stop = _row_top(arrow.stop)
        ax.add_patch(FancyArrowPatch(
            (x, start), (x, stop), arrowstyle="-|>", mutation_scale=9,
            color="#4d4d4d", linewidth=1.0, shrinkA=0, shrinkB=0,
        ))
        # the shape sits beside the arrow, in the gap just below the box
        ax.text(x + 0.07, start - (_PITCH - _BOX_H) / 2, arrow.shape,
                ha="left", va="center", fontsize=FONT_PT, color="#222222")

    for chapter in CHAPTERS:
        colour = _CHAPTER_COLOURS[chapter.number]
        x = _COLUMN_X[chapter.column]
        top = _row_top(chapter.first) - 0.02
        bottom = _row_top(chapter.last) - _BOX_H + 0.02
        ax.plot([x + 0.06, x, x, x + 0.06], [top, top, bottom, bottom],
                color=colour, linewidth=2.0, solid_capstyle="butt")
        middle = (top + bottom) / 2
        ax.text(x + 0.1, middle, f"{chapter.number}", ha="left",
                va="center", fontsize=FONT_PT + 2, fontweight="bold",
                color=colour)
        ax.text(x + 0.3, middle, chapter.text, ha="left", va="center",
                fontsize=FONT_PT, color="#222222", linespacing=1.15)
    return fig


def pipeline_svg() -> str:
    """:func:`plot_pipeline` rendered as SVG text, the same bytes every run.

    It is drawn with matplotlib's default style; the date and the random
    ids that matplotlib would write are fixed, and text is drawn as paths
    (from the fonts matplotlib ships), so the file depends only on this
    module and on the matplotlib version (pinned in ``requirements.txt``).
    """
    buffer = io.StringIO()
    # matplotlib's defaults, whatever a notebook or an earlier test has set
    with plt.style.context("default"), plt.rc_context(
        {"svg.hashsalt": "pipeline", "svg.fonttype": "path"}
    ):
        fig = plot_pipeline()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue()


def pipeline_pdf() -> bytes:
    """:func:`plot_pipeline` as a PDF (for the book's LaTeX/PDF edition).

    Fonts are embedded as Type 42 subsets; the creation date is left out,
    so the bytes depend only on this module and on matplotlib.
    """
    buffer = io.BytesIO()
    with plt.style.context("default"), plt.rc_context({"pdf.fonttype": 42}):
        fig = plot_pipeline()
        fig.savefig(buffer, format="pdf", metadata={"CreationDate": None})
    plt.close(fig)
    return buffer.getvalue()


def _main(argv: list[str]) -> int:
    if len(argv) != 1 or Path(argv[0]).suffix not in (".svg", ".pdf"):
        print("usage: python -m companion.plots.pipeline OUTPUT.svg|OUTPUT.pdf", file=sys.stderr)
        return 2
    target = Path(argv[0])
    if target.suffix == ".pdf":
        target.write_bytes(pipeline_pdf())
    else:
        target.write_text(pipeline_svg(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
