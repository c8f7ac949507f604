"""Tests of companion.plots.why_this_loss."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from companion.experiments import why_this_loss as why
from companion.plots import why_this_loss as why_plots

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    chain = why.word_chain()
    return why.train_bigram(why.BigramLM(chain.vocab_size), chain.sample(2000, 0),
                            chain.sample(1000, 1), steps=30, source=chain)


def test_plot_loss_to_entropy_draws_the_curves_the_floor_and_log_v(history):
    chain = why.word_chain()
    fig = why_plots.plot_loss_to_entropy(history, chain.entropy_rate, chain.vocab_size, zoom_from=10)
    full, zoom = fig.axes
    assert "nats" in full.get_ylabel() and full.get_xlabel() and zoom.get_xlabel()
    labels = [line.get_label() for line in full.get_lines()]
    assert any("log V" in label for label in labels) and any("entropy rate" in label for label in labels)
    heights = {round(line.get_ydata()[0], 12) for line in full.get_lines()
               if len(set(np.round(line.get_ydata(), 12))) == 1}
    assert round(chain.entropy_rate, 12) in heights and round(math.log(chain.vocab_size), 12) in heights
    # the zoomed panel starts at zoom_from and keeps the floor in view
    assert min(line.get_xdata()[0] for line in zoom.get_lines() if len(line.get_xdata()) > 2) == 10
    low, high = zoom.get_ylim()
    assert low < chain.entropy_rate < high and high < math.log(chain.vocab_size)


def test_plot_loss_to_entropy_rejects_bad_input(history):
    with pytest.raises(ValueError, match="history"):
        why_plots.plot_loss_to_entropy(history.drop(columns="expected"), 0.8, 10)
    with pytest.raises(ValueError, match="^vocab_size"):
        why_plots.plot_loss_to_entropy(history, 0.8, 1)
    with pytest.raises(ValueError, match="^entropy_rate"):
        why_plots.plot_loss_to_entropy(history, math.nan, 10)
    with pytest.raises(ValueError, match="^zoom_from"):
        why_plots.plot_loss_to_entropy(history, 0.8, 10, zoom_from=30)
