"""The PDF that `make pdf` builds (_build/book.pdf): complete, with every
font embedded, no LaTeX error, and code that stays on the page.

Run by `make pdf` after the build; `make test` does not run it (the PDF
needs TeX Live, an optional install).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
PDF = ROOT / "_build" / "book.pdf"
LOG = ROOT / "_build" / "pdf" / "_build" / "latex" / "book.log"
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def text() -> str:
    if not PDF.is_file():
        pytest.fail(f"{PDF} is missing: run `make pdf`")
    done = subprocess.run(["pdftotext", "-layout", str(PDF), "-"], capture_output=True,
                          text=True, check=True)
    return re.sub(r"\s+", " ", done.stdout)


def _title(notebook: nbformat.NotebookNode) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^# (.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
    raise AssertionError("no title")


def _a_glued_number(notebook: nbformat.NotebookNode) -> str | None:
    """The first number the notebook glues and its prose shows as text."""
    prose = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    shown = set(re.findall(r"\{glue:text\}`([\w]+)(?::[^`]*)?`", prose))
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            value = data.get("application/papermill.record/text/plain")
            if name in shown and value and re.fullmatch(r"-?\d+(\.\d+)?", value.strip("'")):
                return value.strip("'")
    return None


def test_every_font_is_embedded():
    done = subprocess.run(["pdffonts", str(PDF)], capture_output=True, text=True, check=True)
    rows = done.stdout.splitlines()[2:]
    assert rows, "no fonts listed"
    not_embedded = [row for row in rows if row.split()[-5] != "yes"]
    assert not not_embedded, not_embedded


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_is_in_the_pdf_with_a_glued_number(chapter, text):
    notebook = nbformat.read(chapter, as_version=4)
    title = re.sub(r"[`*]", "", _title(notebook))
    assert title in text, f"chapter title {title!r} not in the PDF"
    number = _a_glued_number(notebook)
    if number is not None:
        assert number in text, f"{chapter.stem}: glued number {number} not in the PDF"


def test_latex_ran_without_errors_and_code_stays_on_the_page():
    log = LOG.read_text(errors="replace")
    errors = [line for line in log.splitlines() if line.startswith("!")]
    assert not errors, errors
    overfull = re.findall(r"Overfull \\hbox \((\d+\.\d+)pt too wide\)", log)
    print(f"\n{len(overfull)} overfull lines, widest {max(map(float, overfull), default=0):.1f} pt")
    assert not [w for w in overfull if float(w) > 20], (
        f"lines more than 20 pt past the margin: {overfull}")
