"""Tests of companion.experiments.source."""

from __future__ import annotations

import pytest

from companion.shapes import shift_for_next_token


def test_source_of_drops_the_docstring_and_keeps_the_code():
    from companion.experiments.source import source_of

    text = source_of(shift_for_next_token)
    assert text.startswith("def shift_for_next_token(")
    assert "Align each position" not in text
    assert text.endswith("return logits[..., :-1, :], labels[..., 1:]")
    assert "Align each position" in source_of(shift_for_next_token, docstring=True)
    with pytest.raises(TypeError, match="obj must be a function or class"):
        source_of(42)
