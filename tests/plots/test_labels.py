"""Tests of companion.plots.labels."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from companion.causal_lm_loss import count_scored_targets
from companion.experiments.llava import SEGMENT_CODES, LlavaTrainingBatch, build_llava_batch
from companion.plots import TEXT_WIDTH_IN
from companion.plots.labels import (
    PADDING,
    SCORED,
    label_layout_grid,
    plot_label_layout,
)

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def batch() -> LlavaTrainingBatch:
    return build_llava_batch((2, 5, 3), (6, 2, 3), seed=0)


# --- the figure ------------------------------------------------------------------------


def test_label_layout_grid_and_figure(batch):
    grid = label_layout_grid(batch.labels, batch.attention_mask)
    assert int((grid == SCORED).sum()) == count_scored_targets(batch.labels)
    assert np.array_equal(grid == PADDING, (batch.attention_mask == 0).numpy())
    fig = plot_label_layout(batch.labels, batch.attention_mask, batch.segments, SEGMENT_CODES)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert np.array_equal(ax.images[0].get_array(), grid)
    assert f"{count_scored_targets(batch.labels)} of" in ax.get_title()
    # drawn at the text width, every text at least 9 pt
    assert fig.get_size_inches()[0] == pytest.approx(TEXT_WIDTH_IN)
    texts = [*ax.texts, *ax.get_legend().get_texts(),
             *ax.get_xticklabels(), *ax.get_yticklabels(),
             ax.xaxis.label, ax.yaxis.label, ax.title]
    assert all(t.get_fontsize() >= 9 for t in texts)
    matplotlib.pyplot.close(fig)


def test_label_layout_checks_its_arguments(batch):
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        label_layout_grid(batch.labels, batch.attention_mask[:, :-1])
    with pytest.raises(TypeError, match="labels must hold integer"):
        label_layout_grid(batch.labels.float(), batch.attention_mask)
