"""The PDF edition that `make pdf` builds (_build/book.pdf).

It is complete (every chapter's title, a number glued from each chapter,
the glossary and the bibliography), every font is embedded, LaTeX reported
no error, and no line of code runs off the page.  Run by `make pdf` after
the build (and so by .ci/run); `make test` does not run it, since the PDF
needs TeX Live.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
PDF = ROOT / "_build" / "book.pdf"
LATEX = ROOT / "_build" / "pdf" / "_build" / "latex"
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
GLUE_MIME = "application/papermill.record/text/plain"


@pytest.fixture(scope="module")
def text() -> str:
    if not PDF.is_file():
        pytest.fail(f"{PDF} is missing: run `make pdf`")
    done = subprocess.run(["pdftotext", str(PDF), "-"], capture_output=True, text=True, check=True)
    # words broken across lines by hyphenation, and line breaks, undone
    return re.sub(r"\s+", " ", re.sub(r"-\n", "", done.stdout))


def _title(notebook: nbformat.NotebookNode) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^# (.+)$", cell.source, re.M)
            if match:
                return re.sub(r"[`*]", "", match.group(1)).strip()
    raise AssertionError("no title")


def _glued_numbers(notebook: nbformat.NotebookNode) -> list[str]:
    """Numbers the prose shows through ``{glue:text}`name:fmt```, formatted."""
    values = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            value = output.get("data", {}).get(GLUE_MIME)
            if name and value is not None:
                values[name] = "".join(value)
    shown = []
    prose = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    for name, spec in re.findall(r"\{glue:text\}`(\w+)(?::([^`]*))?`", prose):
        raw = values.get(name, "").strip("'")
        try:
            number = float(raw)
        except ValueError:
            continue
        shown.append(format(number, spec) if spec else raw)
    return shown


def test_every_font_is_embedded():
    done = subprocess.run(["pdffonts", str(PDF)], capture_output=True, text=True, check=True)
    rows = done.stdout.splitlines()[2:]
    assert rows, "no fonts listed"
    # columns: name type encoding emb sub uni object ID
    not_embedded = [row for row in rows if row.split()[-5] != "yes"]
    assert not not_embedded, not_embedded


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_is_in_the_pdf_with_its_glued_numbers(chapter, text):
    notebook = nbformat.read(chapter, as_version=4)
    title = _title(notebook)
    assert title in text, f"chapter title {title!r} not in the PDF"
    numbers = _glued_numbers(notebook)
    assert numbers, f"{chapter.stem} glues no number into its prose"
    found = [n for n in numbers if n in text]
    # every glued number is in the PDF, not only one (a number in a table
    # cell or a heading may be split by pdftotext: allow 5 % of them)
    assert len(found) >= 0.95 * len(numbers), sorted(set(numbers) - set(found))


def test_the_back_matter_is_in_the_pdf(text):
    glossary = (ROOT / "book" / "glossary.md").read_text()
    terms = re.findall(r"^([A-Za-z][^\n`{]+)\n  ?[A-Z]", glossary, re.M)
    assert len(terms) >= 10
    for term in terms:
        assert term.strip() in text, f"glossary term {term!r} not in the PDF"
    bib = (ROOT / "book" / "references.bib").read_text()
    entries = len(re.findall(r"^@\w+\{", bib, re.M))
    numbered = len(re.findall(r"\\bibitem\[", (LATEX / "book.tex").read_text()))
    assert numbered == entries, (numbered, entries)


def test_the_equations_are_numbered():
    """Every labelled display equation of the chapters, ``$$ ... $$ (eq-...)``,
    is a numbered equation in the LaTeX source."""
    labelled = sum(len(re.findall(r"\$\$ \(eq-[\w-]+\)", path.read_text())) for path in CHAPTERS)
    assert labelled >= 30
    tex = (LATEX / "book.tex").read_text()
    numbered = re.findall(r"\\label\{equation:[^}]*eq-[\w-]+\}", tex)
    assert len(numbered) == labelled, (len(numbered), labelled)


def _environments(tex: list[str]) -> list[str]:
    """For each line of book.tex (1-based: index 0 unused), the innermost of
    code block / table / other it belongs to."""
    kinds = ["other"]
    stack: list[str] = []
    for line in tex:
        if r"\begin{sphinxVerbatim}" in line or r"\begin{sphinxalltt}" in line:
            stack.append("code")
        elif re.search(r"\\begin\{(tabulary|tabular|longtable)", line):
            stack.append("table")
        kinds.append(stack[-1] if stack else "other")
        if r"\end{sphinxVerbatim}" in line or r"\end{sphinxalltt}" in line:
            stack.pop()
        elif re.search(r"\\end\{(tabulary|tabular|longtable)", line):
            stack.pop()
    return kinds


def test_latex_ran_without_errors_and_no_code_runs_off_the_page():
    log = (LATEX / "book.log").read_text(errors="replace")
    errors = [line for line in log.splitlines() if line.startswith("!")]
    assert not errors, errors
    kinds = _environments((LATEX / "book.tex").read_text().splitlines())
    overfull = Counter()
    in_code = []
    for width, first, last in re.findall(
        r"Overfull \\hbox \((\d+\.\d+)pt too wide\) in (?:paragraph|alignment) at lines (\d+)--(\d+)", log
    ):
        kind = kinds[int(first)] if int(first) < len(kinds) else "other"
        overfull[kind] += 1
        if kind == "code":
            in_code.append((first, width))
    print(f"\noverfull lines: {dict(overfull)} (code blocks must have none)")
    assert not in_code, f"code lines past the margin (book.tex line, pt): {in_code}"


def test_the_site_serves_the_pdf_that_every_page_links():
    site = ROOT / "_build" / "html"
    if not (site / "index.html").is_file():
        pytest.skip("no built site (make book): the PDF link is checked with the site")
    assert (site / "book.pdf").read_bytes() == PDF.read_bytes()
    pages = sorted((site / "book").glob("*.html"))
    assert pages
    for page in pages:
        assert 'href="../book.pdf"' in page.read_text(encoding="utf-8"), page.name
