"""Figures of the training chapter: loss curves, what the log shows, answers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from companion.plots import COLORS, TEXT_WIDTH_IN, new_figure
from companion.plots.language import localized

LEGEND_PT = 9
"""Legend font size in points."""

_SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _check_lengths(**series: Sequence[float]) -> None:
    lengths = {name: len(values) for name, values in series.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"series must have the same length; got {lengths}")


@localized
def plot_training_curves(
    logged_losses: Sequence[float],
    eval_steps: Sequence[int],
    validation_losses: Sequence[float],
    vocab_size: int,
) -> plt.Figure:
    """Training loss per step and validation loss, log scale, with ``log V``.

    Args:
        logged_losses: ``(steps,)`` the loss of each optimiser step
            (step 1 first).
        eval_steps: steps at which the validation loss was measured.
        validation_losses: the validation loss at each of ``eval_steps``.
        vocab_size: ``V``; the line ``log V`` is the loss of a uniform guess.
    """
    _check_lengths(eval_steps=eval_steps, validation_losses=validation_losses)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2; got {vocab_size}")
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=3.2)
    steps = np.arange(1, len(logged_losses) + 1)
    ax.plot(steps, logged_losses, color=COLORS["right"], linewidth=1.0,
            label="training loss (each step's batch)")
    ax.plot(eval_steps, validation_losses, "o-", color=COLORS["accent"],
            markersize=4, label="validation loss")
    ax.axhline(math.log(vocab_size), color="black", linestyle="--",
               linewidth=0.8, label=f"log V = log {vocab_size}")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats per target)")
    ax.legend(frameon=False, fontsize=LEGEND_PT)
    ax.set_title("The loss starts near log V and falls", fontsize=11)
    return fig


@localized
def plot_logged_versus_validation(
    runs: Mapping[str, tuple[Sequence[float], Sequence[int], Sequence[float]]],
) -> plt.Figure:
    """One panel per run: the loss the log shows against the real one.

    Args:
        runs: ``{title: (logged_losses, eval_steps, validation_losses)}``,
            the validation loss measured with the right labels.
    """
    if not runs:
        raise ValueError("runs must hold at least one run")
    columns = min(2, len(runs))
    rows = math.ceil(len(runs) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(TEXT_WIDTH_IN, 2.4 * rows), dpi=110,
        layout="constrained", sharex=True, sharey=True, squeeze=False,
    )
    for ax, (title, (logged, eval_steps, validation)) in zip(
        axes.flat, runs.items()
    ):
        _check_lengths(eval_steps=eval_steps, validation_losses=validation)
        steps = np.arange(1, len(logged) + 1)
        ax.plot(steps, logged, color=COLORS["wrong"], linewidth=1.0,
                label="what the log shows")
        ax.plot(eval_steps, validation, "o-", color=COLORS["right"],
                markersize=3, label="validation, right labels")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("optimiser step")
    for ax in axes[:, 0]:
        ax.set_ylabel("loss (nats)")
    axes.flat[0].legend(frameon=False, fontsize=LEGEND_PT - 1)
    return fig


@localized
def plot_exact_answers(
    eval_steps: Sequence[int], shares: Mapping[str, Sequence[float]]
) -> plt.Figure:
    """Share of validation questions answered exactly, per run, by step.

    Args:
        eval_steps: the steps at which the shares were measured.
        shares: ``{run label: shares at each of eval_steps}``, in ``[0, 1]``.
    """
    if not shares:
        raise ValueError("shares must hold at least one run")
    fig, ax = new_figure(width=TEXT_WIDTH_IN, height=3.0)
    for color, (label, values) in zip(_SERIES_COLORS, shares.items()):
        _check_lengths(eval_steps=eval_steps, shares=values)
        ax.plot(eval_steps, 100 * np.asarray(values, dtype=float), "o-",
                color=color, markersize=4, label=label)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation questions\nanswered exactly (%)")
    ax.set_ylim(-3, 103)
    ax.legend(frameon=False, fontsize=LEGEND_PT)
    ax.set_title("What the model writes, greedy decoding", fontsize=11)
    return fig


@localized
def plot_trainer_curves(curves: Mapping[str, Sequence[float]]) -> plt.Figure:
    """The loss the ``Trainer`` logs per step, and each run's gap to the first.

    Top: every run's logged loss.  Bottom: each later run's logged loss
    minus the first run's, step by step, which shows a run that coincides
    with the first as a flat line at 0.

    Args:
        curves: ``{run label: logged losses, one per step}``; the first run
            is the reference.  At least two runs of equal length.
    """
    if len(curves) < 2:
        raise ValueError("curves must hold at least two runs")
    _check_lengths(**{str(k): v for k, v in curves.items()})
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(TEXT_WIDTH_IN, 4.2), dpi=110, layout="constrained",
        sharex=True, height_ratios=(3, 2),
    )
    styles = ("-", "--", ":")
    reference = np.asarray(next(iter(curves.values())), dtype=float)
    steps = np.arange(1, len(reference) + 1)
    for index, (label, values) in enumerate(curves.items()):
        color = _SERIES_COLORS[index % len(_SERIES_COLORS)]
        style = styles[index % len(styles)]
        top.plot(steps, values, style, color=color,
                 linewidth=3.0 if index == 0 else 1.3, label=label)
        if index:
            bottom.plot(steps, np.asarray(values, dtype=float) - reference,
                        style, color=color, linewidth=1.3, label=label)
    bottom.axhline(0.0, color="black", linewidth=0.6)
    top.set_ylabel("logged loss (nats)")
    bottom.set_ylabel(f"minus the\n{next(iter(curves))} run")
    bottom.set_xlabel("optimiser step")
    top.legend(frameon=False, fontsize=LEGEND_PT)
    top.set_title("The Trainer's log, same examples, same steps", fontsize=11)
    return fig
