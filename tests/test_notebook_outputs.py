"""Stored notebook outputs that are the same on every reader's machine.

Strict nbval compares each stored output with a fresh run character by
character.  A float shown to its last bit differs between CPUs, instruction
sets and thread counts, so the stored outputs may show only digits that
rounding cannot reach.  This test reads the committed notebooks (no kernel
runs) and fails on any number that shows more:

* a decimal number in a cell's output: at most 5 significant digits
  (float32), or at most 10 in a cell tagged ``float64-output`` (its results
  are float64 and go through reductions), and no limit in a cell tagged
  ``results-file`` (it prints a committed results file, not a computation);
* a float passed to ``glue``: at most 5 significant digits, 10 in a
  ``float64-output`` cell;
* a glued float formatted in the prose (``{glue:text}`name:.4f```): no more
  significant digits than were glued, so no digit is padding;
* the nbval sanitizer hides memory addresses and nothing else.
"""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest

from companion.experiments.display import (
    FLOAT32_DIGITS,
    FLOAT64_DIGITS,
    bound,
    glue,
    percent,
    significant,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
GLUE_MIME = "application/papermill.record/text/plain"
FLOAT64_TAG = "float64-output"
RESULTS_TAG = "results-file"

# A decimal number: digits, a point and digits, optionally an exponent, or a
# mantissa with an exponent.  Not part of a longer word (hex, identifiers).
DECIMAL = re.compile(
    r"(?<![\w.])(\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)(?![\w.])"
)
GLUE_REF = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)(?::([^`]+))?`")


def significant_digits(literal: str) -> int:
    """Significant digits a decimal literal shows (trailing zeros count)."""
    mantissa = re.split(r"[eE]", literal)[0].lstrip("-+")
    digits = mantissa.replace(".", "").lstrip("0")
    return len(digits) if digits else 1


def _outputs_text(cell: dict) -> list[tuple[str, str]]:
    texts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            texts.append(("stream", "".join(output["text"])))
        for mime, data in output.get("data", {}).items():
            if mime.startswith("image/"):
                continue
            texts.append((mime, data if isinstance(data, str) else "".join(data)))
    return texts


def _cells():
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text())
        for index, cell in enumerate(notebook["cells"]):
            yield path.name, index, cell


def _limit(cell: dict) -> int | None:
    tags = cell.get("metadata", {}).get("tags", [])
    if RESULTS_TAG in tags:
        return None
    return FLOAT64_DIGITS if FLOAT64_TAG in tags else FLOAT32_DIGITS


def _glued() -> dict[tuple[str, str], str]:
    """(notebook, glue name) -> the stored repr of the glued value."""
    glued = {}
    for notebook, _, cell in _cells():
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if GLUE_MIME in data and name:
                value = data[GLUE_MIME]
                glued[(notebook, name)] = (
                    value if isinstance(value, str) else "".join(value)
                )
    return glued


def test_every_notebook_is_scanned():
    assert len(NOTEBOOKS) >= 6


def test_displayed_numbers_show_only_stable_digits():
    too_long = []
    for notebook, index, cell in _cells():
        if cell["cell_type"] != "code" or (limit := _limit(cell)) is None:
            continue
        for mime, text in _outputs_text(cell):
            for literal in DECIMAL.findall(text):
                if significant_digits(literal) > limit:
                    too_long.append(f"{notebook} cell {index} {mime}: {literal}")
    assert not too_long, "\n".join(too_long)


def test_glued_floats_are_rounded():
    too_long = []
    for notebook, index, cell in _cells():
        if cell["cell_type"] != "code":
            continue
        limit = _limit(cell) or FLOAT64_DIGITS
        for output in cell.get("outputs", []):
            value = output.get("data", {}).get(GLUE_MIME)
            if value is None:
                continue
            value = value if isinstance(value, str) else "".join(value)
            if DECIMAL.fullmatch(value.strip()) and significant_digits(value) > limit:
                too_long.append(f"{notebook} cell {index}: {value}")
    assert not too_long, "\n".join(too_long)


def test_prose_formats_show_no_padding_digits():
    """``{glue:text}`x:.4f``` of a value glued with fewer digits would pad."""
    glued = _glued()
    padded, missing = [], []
    for notebook, index, cell in _cells():
        if cell["cell_type"] != "markdown":
            continue
        for name, spec in GLUE_REF.findall("".join(cell["source"])):
            if (notebook, name) not in glued:
                missing.append(f"{notebook} cell {index}: {name}")
                continue
            stored = glued[(notebook, name)].strip()
            if not spec or not DECIMAL.fullmatch(stored):
                continue
            shown = format(float(stored), spec)
            if significant_digits(shown) > max(
                significant_digits(stored), FLOAT32_DIGITS
            ):
                padded.append(f"{notebook} cell {index}: {name} = {stored} as {shown}")
    assert not missing, "glue names used but never glued:\n" + "\n".join(missing)
    assert not padded, "\n".join(padded)


def test_sanitizer_hides_memory_addresses_only():
    config = configparser.ConfigParser()
    config.read(ROOT / "tests" / "nbval_sanitize.cfg")
    assert config.sections() == ["memory-addresses"]
    assert config["memory-addresses"]["regex"] == "0x[0-9a-fA-F]{6,16}"


@pytest.mark.parametrize(
    "literal, expected",
    [("5.574511", 7), ("0.000123", 3), ("2.0000", 5), ("1.40e-45", 3),
     ("16.1181", 6), ("1e-10", 1), ("1999.0234375", 11)],
)
def test_significant_digits(literal, expected):
    assert significant_digits(literal) == expected


@pytest.mark.parametrize(
    "value, digits, expected",
    [(5.57451057434082, 5, 5.5745), (993.8893317336922, 4, 993.9),
     (3.4123458802050024, 10, 3.41234588), (-0.0012345678, 3, -0.00123),
     (0.0, 5, 0.0), (12044.7, 3, 12000.0)],
)
def test_significant(value, digits, expected):
    assert significant(value, digits) == expected


def test_significant_is_stable_under_last_bit_changes():
    import numpy as np

    for value in (5.57451057434082, 3.4123458802050024, 0.2468712410014587):
        nearby = np.nextafter(value, np.inf), np.nextafter(value, -np.inf)
        assert {repr(significant(v)) for v in (value, *nearby)} == {
            repr(significant(value))
        }


def test_bound():
    assert bound(0.0, 1e-10) == bound(3e-17, 1e-10) == "< 1e-10"
    assert bound(0.18074, 1e-6) == "0.181"
    assert bound(float("nan"), 1e-6) == "nan"
    with pytest.raises(ValueError, match="value"):
        bound(-1.0, 1e-6)
    with pytest.raises(ValueError, match="threshold"):
        bound(1.0, 0.0)
    with pytest.raises(TypeError, match="value"):
        bound("0", 1e-6)


def test_percent():
    assert percent(0.0) == percent(3e-17) == "< 1e-10 %"
    assert percent(1.2188) == "122 %" and percent(0.0025) == "0.25 %"
    with pytest.raises(ValueError, match="relative_error"):
        percent(-0.1)


def test_glue_rounds_before_storing(monkeypatch):
    import myst_nb
    import numpy as np
    import torch

    stored = {}
    monkeypatch.setattr(
        myst_nb, "glue", lambda name, value, display=True: stored.update({name: value})
    )
    glue("a", 5.57451057434082)
    glue("b", np.float32(0.24687124))
    glue("c", torch.tensor(3.4123458802050024, dtype=torch.float64), digits=10)
    glue("d", np.int64(7))
    glue("e", "text")
    assert stored == {"a": 5.5745, "b": 0.24687, "c": 3.41234588, "d": 7, "e": "text"}
    assert type(stored["d"]) is int
    with pytest.raises(TypeError, match="digits"):
        glue("f", 1.0, digits=2.5)
    with pytest.raises(TypeError, match="name"):
        glue("", 1.0)
