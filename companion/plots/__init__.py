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


def new_figure(width: float = 7.0, height: float = 3.0) -> tuple[plt.Figure, plt.Axes]:
    """A figure with one axes, sized for the book's text column (inches)."""
    fig, ax = plt.subplots(figsize=(width, height), dpi=110, layout="constrained")
    return fig, ax
