"""Tests of companion.plots.cross_entropy."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest

from companion import IGNORE_INDEX
from companion.experiments import cross_entropy as ce_exp
from companion.plots import cross_entropy as ce_plots

matplotlib.use("Agg")


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def test_plot_naive_versus_stable():
    scales = np.linspace(0.0, 100.0, 401)
    data = ce_exp.naive_versus_stable_by_scale(scales)
    assert set(data) == {"scale", "naive", "stable"}
    fig = ce_plots.plot_naive_versus_stable(data["scale"], data["naive"], data["stable"])
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and "nats" in ax.get_ylabel()
    assert np.isinf(data["naive"]).any() and np.isnan(data["naive"]).any()
    assert np.isfinite(data["stable"]).all()
    exact = data["scale"] + np.log1p(np.exp(-data["scale"]) + np.exp(-2 * data["scale"]))
    np.testing.assert_allclose(data["stable"], exact, rtol=1e-6, atol=1e-6)
    naive_breaks = ~np.isfinite(data["naive"])
    # Row 1's probability exp(-2s) rounds to 0 below 2**-150, i.e. for s > 75 ln 2.
    assert 0 < data["scale"][naive_breaks].min() - 75 * math.log(2) <= 0.25
    assert data["scale"][np.isnan(data["naive"])].min() > 88.7
    assert data["scale"][np.isinf(data["naive"])].max() < 88.8
    stable_line = [line for line in ax.get_lines() if line.get_label().startswith("stable")][0]
    np.testing.assert_array_equal(stable_line.get_ydata(), data["stable"])


def test_plot_gradient_rows():
    grad = np.array([[0.1, -0.2, 0.1], [0.0, 0.0, 0.0]])
    fig = ce_plots.plot_gradient_rows(grad, np.array([1, IGNORE_INDEX]))
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    np.testing.assert_array_equal(ax.images[0].get_array(), grad)
    assert "ignored" in ax.get_yticklabels()[1].get_text()
    with pytest.raises(ValueError, match="targets"):
        ce_plots.plot_gradient_rows(grad, np.array([1]))


def test_plot_clipped_probability_loss():
    margins = np.linspace(0.0, 40.0, 41)
    fig = ce_plots.plot_clipped_probability_loss(margins, margins, np.minimum(margins, 16.1),
                                                 epsilon=1e-7)
    ax = fig.axes[0]
    assert "nats" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    cap = [line for line in ax.get_lines() if "ε" in line.get_label()]
    assert cap and cap[0].get_ydata()[0] == pytest.approx(-math.log(1e-7))


def test_plots_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="one length"):
        ce_plots.plot_naive_versus_stable(np.arange(3.0), np.arange(2.0), np.arange(3.0))
    with pytest.raises(ValueError, match="one length"):
        ce_plots.plot_clipped_probability_loss(np.arange(3.0), np.arange(3.0), np.arange(2.0),
                                               epsilon=1e-7)
    with pytest.raises(ValueError, match="epsilon"):
        ce_plots.plot_clipped_probability_loss(np.arange(3.0), np.arange(3.0), np.arange(3.0),
                                               epsilon=0.0)


@pytest.mark.parametrize("name", ["naive", "gradient", "clipped"])
def test_plots_fit_the_text_width_with_readable_fonts(name):
    from matplotlib.text import Text

    from companion.plots import TEXT_WIDTH_IN

    if name == "naive":
        data = ce_exp.naive_versus_stable_by_scale(np.linspace(0.0, 100.0, 21))
        fig = ce_plots.plot_naive_versus_stable(data["scale"], data["naive"],
                                                data["stable"])
    elif name == "gradient":
        fig = ce_plots.plot_gradient_rows(
            np.array([[0.1, -0.2, 0.1], [0.0, 0.0, 0.0]]),
            np.array([1, IGNORE_INDEX]))
    else:
        margins = np.linspace(0.0, 40.0, 41)
        fig = ce_plots.plot_clipped_probability_loss(
            margins, margins, np.minimum(margins, 16.1), epsilon=1e-7)
    assert fig.get_size_inches()[0] == pytest.approx(TEXT_WIDTH_IN)
    fig.canvas.draw()
    texts = [text for text in fig.findobj(Text)
             if text.get_text() and text.get_visible()]
    assert texts
    assert min(text.get_fontsize() for text in texts) >= 9
