"""Figures of the book: one module per topic, each function returns a Figure.

Drawing code lives here, not in notebook cells, so that every figure is
importable, tested for what it shows, and styled alike.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

#: Colours used consistently across chapters.
COLORS = {
    "scored": "#1f77b4",
    "ignored": "#bbbbbb",
    "dropped": "#d62728",
    "accent": "#2ca02c",
    "wrong": "#d62728",
    "right": "#1f77b4",
}


TEXT_WIDTH_IN = 6.3
"""Width of the book's text column in inches: figures drawn at this width are
shown at their natural size, so 9-10 pt text stays readable."""


def new_figure(width: float = TEXT_WIDTH_IN, height: float = 3.0) -> tuple[plt.Figure, plt.Axes]:
    """A figure with one axes, sized for the book's text column (inches)."""
    fig, ax = plt.subplots(figsize=(width, height), dpi=110, layout="constrained")
    return fig, ax
