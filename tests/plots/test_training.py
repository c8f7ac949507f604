"""Tests of companion.plots.training."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from companion.plots.training import (  # noqa: E402
    plot_exact_answers,
    plot_logged_versus_validation,
    plot_trainer_curves,
    plot_training_curves,
)


def test_training_curves_draw_both_losses_and_log_v():
    fig = plot_training_curves([4.0, 3.0, 1.0], [0, 3], [4.1, 0.9], 53)
    ax = fig.axes[0]
    train, validation, log_v = ax.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3]
    assert list(validation.get_ydata()) == [4.1, 0.9]
    assert log_v.get_ydata()[0] == pytest.approx(math.log(53))
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="same length"):
        plot_training_curves([1.0], [0, 1], [1.0], 10)
    with pytest.raises(ValueError, match="vocab_size must be >= 2"):
        plot_training_curves([1.0], [0], [1.0], 1)


def test_logged_versus_validation_has_one_panel_per_run():
    runs = {name: ([3.0, 2.0], [0, 2], [3.0, 2.5]) for name in "abc"}
    fig = plot_logged_versus_validation(runs)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b", "c"]
    assert len(visible[0].get_lines()) == 2
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="at least one run"):
        plot_logged_versus_validation({})


def test_exact_answers_in_percent():
    fig = plot_exact_answers([0, 10], {"right": [0.0, 1.0], "wrong": [0.0, 0.5]})
    lines = fig.axes[0].get_lines()
    assert list(lines[0].get_ydata()) == [0.0, 100.0]
    assert list(lines[1].get_ydata()) == [0.0, 50.0]
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="same length"):
        plot_exact_answers([0, 10], {"right": [1.0]})


def test_trainer_curves_show_the_gap_to_the_first_run():
    fig = plot_trainer_curves({"a": [3.0, 2.0], "b": [3.0, 2.0], "c": [3.5, 1.0]})
    top, bottom = fig.axes
    assert len(top.get_lines()) == 3
    gaps = [np.asarray(line.get_ydata()) for line in bottom.get_lines()[:2]]
    assert list(gaps[0]) == [0.0, 0.0] and list(gaps[1]) == [0.5, -1.0]
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="at least two runs"):
        plot_trainer_curves({"a": [1.0]})
    with pytest.raises(ValueError, match="same length"):
        plot_trainer_curves({"a": [1.0], "b": [1.0, 2.0]})
