"""Figures of the cross-entropy chapter.

Every figure is drawn at :data:`companion.plots.TEXT_WIDTH_IN`, so it is
shown at its natural size and the font sizes below are the sizes read.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import ArrayLike

from companion import IGNORE_INDEX
from companion._checks import require_rows_and_targets
from companion.plots import COLORS, TEXT_WIDTH_IN, new_figure
from companion.plots.language import localized

#: Font sizes in points, for a figure shown at the text width.
LABEL_FONTSIZE: float = 10.0
TICK_FONTSIZE: float = 9.5
LEGEND_FONTSIZE: float = 9.5
TITLE_FONTSIZE: float = 10.5


def _style(ax: plt.Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Title, axis labels and tick labels at the module's font sizes."""
    ax.set_title(title, fontsize=TITLE_FONTSIZE)
    ax.set_xlabel(xlabel, fontsize=LABEL_FONTSIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_FONTSIZE)
    ax.tick_params(labelsize=TICK_FONTSIZE)


@localized
def plot_naive_versus_stable(
    scales: ArrayLike, naive_loss: ArrayLike, stable_loss: ArrayLike
) -> plt.Figure:
    """The naive ``log(softmax)`` loss breaking where the stable one does not.

    Args:
        scales: ``(S,)`` logit scales ``s`` (each row is ``s * [1, 0, -1]``,
            as in
            :func:`companion.experiments.cross_entropy.naive_versus_stable_by_scale`).
        naive_loss: ``(S,)`` mean loss from the naive formula (may hold
            ``inf``/``nan``).
        stable_loss: ``(S,)`` mean loss from the log-sum-exp form.

    Returns:
        The stable loss as a line, the naive one as dots where it is finite,
        and shaded bands where it is ``inf`` and where it is ``nan``.
    """
    s = np.asarray(scales, dtype=np.float64)
    naive = np.asarray(naive_loss, dtype=np.float64)
    stable = np.asarray(stable_loss, dtype=np.float64)
    if not (s.ndim == 1 and naive.shape == s.shape
            and stable.shape == s.shape):
        raise ValueError(
            "scales, naive_loss and stable_loss must be 1-D arrays of one "
            f"length; got {s.shape}, {naive.shape}, {stable.shape}"
        )
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=3.3)
    ax.plot(s, stable, color=COLORS["right"], linewidth=2.0,
            label="stable (log-sum-exp)")
    finite = np.isfinite(naive)
    ax.plot(s[finite], naive[finite], "o", color=COLORS["accent"],
            markersize=3, label="naive log(softmax), finite")
    step = float(np.median(np.diff(s))) if s.size > 1 else 1.0
    bands = ((np.isposinf(naive), "#fdae6b", "naive returns inf"),
             (np.isnan(naive), COLORS["wrong"], "naive returns nan"))
    for mask, colour, text in bands:
        if mask.any():
            ax.axvspan(s[mask].min() - step / 2, s[mask].max() + step / 2,
                       color=colour, alpha=0.25, linewidth=0, label=text)
    _style(ax, "Naive log(softmax) breaks in float32; log-sum-exp does not",
           "logit scale λ  (rows λ · [1, 0, −1], targets 0 and 2)",
           "mean loss of the batch (nats)")
    ax.legend(loc="upper left", fontsize=LEGEND_FONTSIZE)
    return fig


@localized
def plot_gradient_rows(grad: ArrayLike, targets: ArrayLike,
                       ignore_index: int = IGNORE_INDEX) -> plt.Figure:
    """The gradient ``dL/dlogits`` of a small batch as a heat map.

    Args:
        grad: ``(N, C)`` float, the gradient of the (mean) loss.
        targets: ``(N,)`` int, ``ignore_index`` = ignored row.
        ignore_index: the value marking ignored rows.

    Returns:
        A diverging heat map (negative = the logit should grow), the target
        cell of each row outlined, ignored rows labelled as such.
    """
    g, y = require_rows_and_targets(grad, targets, "grad")
    num_rows, num_classes = g.shape
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=0.42 * num_rows + 1.5)
    limit = float(np.abs(g).max()) or 1.0
    image = ax.imshow(g, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for n, target in enumerate(y):
        if target != ignore_index:
            ax.add_patch(plt.Rectangle(
                (target - 0.5, n - 0.5), 1, 1, fill=False,
                edgecolor="black", linewidth=1.6,
            ))
    ax.set_xticks(range(num_classes), [str(c) for c in range(num_classes)])
    row_names = [f"row {n} (ignored)" if t == ignore_index
                 else f"row {n}, y={t}" for n, t in enumerate(y)]
    ax.set_yticks(range(num_rows), row_names)
    _style(ax, "(softmax − one-hot) / |S|; boxed: target class",
           "class c", "row n of the batch")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("gradient ∂L/∂z[n, c]", fontsize=LABEL_FONTSIZE)
    colorbar.ax.tick_params(labelsize=TICK_FONTSIZE)
    return fig


@localized
def plot_clipped_probability_loss(
    true_loss: ArrayLike,
    from_logits_loss: ArrayLike,
    from_probs_loss: ArrayLike,
    *,
    epsilon: float,
) -> plt.Figure:
    """Keras' ``from_logits=True`` versus ``from_logits=False`` on
    confident mistakes.

    Args:
        true_loss: ``(S,)`` exact ``-log p_y`` (x axis), nats.
        from_logits_loss: ``(S,)`` Keras loss given the logits.
        from_probs_loss: ``(S,)`` Keras loss given ``softmax(logits)``.
        epsilon: Keras' clipping constant; ``-log(epsilon)`` is drawn as a
            cap.

    Returns:
        Both losses against the exact one, with the cap as a dotted line.
    """
    x = np.asarray(true_loss, dtype=np.float64)
    with_logits = np.asarray(from_logits_loss, dtype=np.float64)
    with_probs = np.asarray(from_probs_loss, dtype=np.float64)
    if not (x.ndim == 1 and with_logits.shape == x.shape
            and with_probs.shape == x.shape):
        raise ValueError(
            "true_loss, from_logits_loss and from_probs_loss must be 1-D "
            f"arrays of one length; got {x.shape}, {with_logits.shape}, "
            f"{with_probs.shape}"
        )
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1); got {epsilon}")
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=3.4)
    cap = -math.log(epsilon)
    ax.plot([x.min(), x.max()], [cap, cap], color="grey", linewidth=0.8,
            linestyle=":", zorder=1,
            label=f"−log(ε) = {cap:.2f}, ε = {epsilon:g}")
    ax.plot(x, with_logits, color=COLORS["right"], linewidth=2.0, zorder=2,
            label="from_logits=True (given logits)")
    ax.plot(x, with_probs, color=COLORS["wrong"], linewidth=2.0,
            linestyle="--", zorder=3,
            label="from_logits=False (given softmax)")
    _style(ax, "Given probabilities, Keras caps a row's loss near −log ε",
           "exact loss −log p_y of the row (nats)",
           "loss Keras reports (nats)")
    ax.legend(loc="upper left", fontsize=LEGEND_FONTSIZE)
    return fig
