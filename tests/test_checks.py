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
    from companion.reference import label_smoothed_cross_entropy
    from companion.plots.cross_entropy import plot_gradient_rows

    with pytest.raises(ValueError, match=r"logits must be a 2-D array"):
        label_smoothed_cross_entropy(np.zeros(4), np.zeros(4, int))
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
    from companion.experiments.denominator import data_parallel_accumulation_step
    from companion.experiments.tiny_models import build_tiny_lm

    model = build_tiny_lm(seed=0)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"rank_micro_batch_rows\[1\] must be a non-empty list"):
        data_parallel_accumulation_step(model, ids, ids.clone(), [[2], []], "global")


def test_sequences_are_lists_or_tuples_not_strings():
    from companion._checks import require_positive_ints, require_sequence

    assert require_sequence((1, 2), "sizes", "a sequence of ints") == (1, 2)
    for bad in ("12", b"12", 3, None):
        with pytest.raises(TypeError, match="sizes must be a sequence of ints; got"):
            require_sequence(bad, "sizes", "a sequence of ints")
    assert require_positive_ints([1, np.int64(2)], "sizes") == [1, 2]
    with pytest.raises(ValueError, match=r"sizes\[1\] must be >= 1"):
        require_positive_ints([1, 0], "sizes")


def test_options_and_class_axes():
    from companion._checks import require_class_axis, require_label_smoothing, require_one_of

    assert require_one_of("sum", ("mean", "sum"), "reduction") == "sum"
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\); got 'none'"):
        require_one_of("none", ("mean", "sum"), "reduction")
    assert require_label_smoothing(0) == 0.0
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        require_label_smoothing(True)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
        require_label_smoothing(float("nan"))
    with pytest.raises(ValueError, match="class axis"):
        require_class_axis(torch.tensor(1.0), "logits")
    with pytest.raises(ValueError, match="at least one class"):
        require_class_axis(torch.zeros(2, 0), "logits")
