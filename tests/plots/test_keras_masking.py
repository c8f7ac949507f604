"""Tests of companion.plots.keras_masking."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from companion.experiments import keras_masking as km  # noqa: E402
from companion.plots import keras_masking as km_plots  # noqa: E402


def test_reported_vs_true_figure_draws_the_sweep() -> None:
    sweep = km.padding_sweep()
    fig = km_plots.reported_vs_true(sweep)
    loss_ax, ppl_ax = fig.axes
    assert fig.get_figwidth() == pytest.approx(6.3)
    assert loss_ax.get_xlabel() == "padding (% of positions)"
    assert "nats" in loss_ax.get_ylabel()
    assert "perplexity" in ppl_ax.get_ylabel()
    for ax in fig.axes:
        for label in ax.get_xticklabels() + ax.get_yticklabels():
            assert label.get_fontsize() >= 9
    (legend,) = fig.legends
    legend_texts = legend.get_texts()
    assert len(legend_texts) == 3
    assert all(text.get_fontsize() >= 9 for text in legend_texts)
    wrong_line = loss_ax.get_lines()[1]
    np.testing.assert_allclose(wrong_line.get_ydata(), sweep["wrong"])
    np.testing.assert_allclose(
        wrong_line.get_xdata(), 100 * sweep["padding_fraction"]
    )
    np.testing.assert_allclose(
        ppl_ax.get_lines()[2].get_ydata(), sweep["fixed_ppl"]
    )
    matplotlib.pyplot.close(fig)



def test_reported_vs_true_checks_its_argument() -> None:
    with pytest.raises(TypeError, match="sweep must be a pandas DataFrame"):
        km_plots.reported_vs_true(np.zeros((3, 7)))
    with pytest.raises(ValueError, match="sweep is missing columns"):
        km_plots.reported_vs_true(pd.DataFrame({"padding_fraction": [0.0]}))
