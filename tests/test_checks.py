"""The shared argument checks, directly and through the functions using them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion._checks import require_nonempty_lists, require_rows_and_targets


def test_rows_and_targets_are_returned_as_float64_and_targets():
    rows, targets = require_rows_and_targets([[1, 2], [3, 4]], [0, 1], "logits")
    assert rows.dtype == np.float64 and rows.shape == (2, 2)
    assert targets.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("rows", "targets", "pattern"),
    [
        (np.zeros(3), np.zeros(3, int), r"logits must be a 2-D array \(N, C\); got shape \(3,\)"),
        (np.zeros((3, 2)), np.zeros(2, int), r"targets must have shape \(N,\) = \(3,\); got shape \(2,\)"),
    ],
)
def test_rows_and_targets_name_the_bad_argument(rows, targets, pattern):
    with pytest.raises(ValueError, match=pattern):
        require_rows_and_targets(rows, targets, "logits")


def test_callers_use_the_shared_row_check():
    from companion.cross_entropy import reference_label_smoothed_cross_entropy
    from companion.plots.cross_entropy import plot_gradient_rows

    with pytest.raises(ValueError, match=r"logits must be a 2-D array"):
        reference_label_smoothed_cross_entropy(np.zeros(4), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"grad must be a 2-D array"):
        plot_gradient_rows(np.zeros(4), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\) = \(2,\)"):
        plot_gradient_rows(np.zeros((2, 3)), np.zeros(3, int))


@pytest.mark.parametrize("bad", [[[1], []], [[1], "ab"], [[1], 3]])
def test_nonempty_lists_names_the_bad_item(bad):
    with pytest.raises(ValueError, match=r"sizes\[1\] must be a non-empty list of rows"):
        require_nonempty_lists(bad, "sizes", "rows")


def test_nonempty_lists_accepts_lists_and_tuples():
    require_nonempty_lists([[1], (2, 3)], "sizes", "rows")


def test_data_parallel_step_uses_the_shared_list_check():
    from companion.accumulation import build_tiny_lm, data_parallel_accumulation_step

    model = build_tiny_lm(seed=0)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"rank_micro_batch_rows\[1\] must be a non-empty list"):
        data_parallel_accumulation_step(model, ids, ids.clone(), [[2], []], "global")
