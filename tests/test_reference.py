"""Tests of companion.reference beyond what every other test uses it for:
the label-smoothed cross-entropy, which the book calls on its own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from companion import cross_entropy as ce
from companion import reference
from tests.shared import assert_close, cross_entropy_cases


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_label_smoothing_reference_at_zero_is_the_reference(case, reduction):
    logits, targets, weight, ignore_index, _ = case
    kwargs = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
    smoothed = reference.label_smoothed_cross_entropy(logits, targets, label_smoothing=0.0,
                                                         **kwargs)
    assert_close(smoothed, reference.cross_entropy(logits, targets, **kwargs), 1e-12)


def test_label_smoothing_changes_the_loss():
    # A wrong smoothing formula that ignored eps would pass the eps=0 checks.
    logits = np.array([[2.0, 0.0, -1.0]])
    targets = np.array([0])
    plain = reference.cross_entropy(logits, targets)
    smoothed = reference.label_smoothed_cross_entropy(logits, targets, label_smoothing=0.3)
    logp = reference.log_softmax(logits)[0]
    assert smoothed == pytest.approx(0.7 * -logp[0] + 0.1 * -logp.sum(), abs=1e-12)
    assert smoothed > plain



def test_label_smoothed_reference_rejects_bad_input():
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\)|targets must have"):
        reference.label_smoothed_cross_entropy(np.zeros((2, 3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="reduction must be one of"):
        reference.label_smoothed_cross_entropy(np.zeros((2, 3)), np.zeros(2, dtype=int), reduction="avg")
