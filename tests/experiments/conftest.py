"""Fixtures shared by the experiments' tests."""

from __future__ import annotations

import pytest

from companion.experiments.denominator import warm_up
from companion.experiments.tiny_models import TinyCausalLM, build_tiny_lm
from tests.shared import TINY_LM_CONFIG



@pytest.fixture(scope="module")
def model() -> TinyCausalLM:
    """The tiny causal LM of :data:`tests.shared.TINY_LM_CONFIG`, warmed up."""
    trained = build_tiny_lm(TINY_LM_CONFIG, seed=0)
    warm_up(trained, steps=15, longest_row=16)
    return trained
