"""The PDF editions that `make pdf` builds: the English book
(_build/book.pdf) and the Japanese one (_build/book-ja.pdf, from the
prepared Japanese sources, tools/translations.py prepare ja).

Each is complete (every chapter's title in its language, a number glued
from each chapter, the glossary and the bibliography), every font is
embedded (in the Japanese one, a CJK font among them), no character is
missing from its font, the labelled equations are numbered, LaTeX reported
no error, and no line of code runs off the page.  Run by `make pdf` after
the build (and so by .ci/run); `make test` does not run it, since the PDF
needs TeX Live.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "_build"
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))

from translate_notebooks import load_catalog  # noqa: E402

GLUE_MIME = "application/papermill.record/text/plain"
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff00-\uffef]")


@dataclass(frozen=True)
class Edition:
    language: str
    pdf: Path
    latex: Path  # the LaTeX build's folder: book.tex, book.log
    site: Path  # the site that serves the PDF as book.pdf

    def translate(self, page: str, message: str) -> str:
        """``message`` (a msgid of ``page``'s catalog) in this edition's language."""
        if self.language == "en":
            return message
        translated = _catalog(self.language, page).get(message)
        assert translated, f"{page}: no {self.language} translation of {message!r}"
        return translated

    def normal(self, text: str) -> str:
        """Text as compared: whitespace made single spaces; in Japanese, where
        pdftotext breaks a line anywhere and xeCJK adds space between
        Japanese and Latin letters, dropped altogether."""
        return re.sub(r"\s+", "" if self.language == "ja" else " ", text).strip()


EDITIONS = [
    Edition("en", BUILD / "book.pdf", BUILD / "pdf" / "_build" / "latex", BUILD / "html"),
    Edition("ja", BUILD / "book-ja.pdf", BUILD / "pdf-ja" / "_build" / "latex", BUILD / "html" / "ja"),
]

_catalogs: dict[tuple[str, str], dict[str, str]] = {}


def _catalog(language: str, page: str) -> dict[str, str]:
    if (language, page) not in _catalogs:
        path = ROOT / "locales" / language / "LC_MESSAGES" / "book" / f"{page}.po"
        _catalogs[language, page] = load_catalog(path)
    return _catalogs[language, page]


@pytest.fixture(scope="module", params=EDITIONS, ids=lambda e: e.language)
def edition(request) -> Edition:
    if not request.param.pdf.is_file():
        pytest.fail(f"{request.param.pdf} is missing: run `make pdf`")
    return request.param


@pytest.fixture(scope="module")
def text(edition: Edition) -> str:
    done = subprocess.run(["pdftotext", str(edition.pdf), "-"], capture_output=True, text=True, check=True)
    # words broken across lines by hyphenation, and line breaks, undone
    return edition.normal(re.sub(r"-\n", "", done.stdout))


def _title(notebook: nbformat.NotebookNode) -> str:
    """The chapter's heading as written (the msgid of its translation)."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^# (.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
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


def test_every_font_is_embedded(edition):
    done = subprocess.run(["pdffonts", str(edition.pdf)], capture_output=True, text=True, check=True)
    rows = done.stdout.splitlines()[2:]
    assert rows, "no fonts listed"
    # columns: name type encoding emb sub uni object ID
    not_embedded = [row for row in rows if row.split()[-5] != "yes"]
    assert not not_embedded, not_embedded
    if edition.language == "ja":
        assert any("CJK" in row.split()[0] for row in rows), f"no CJK font in the Japanese PDF: {rows}"


def test_no_character_is_missing_from_its_font(edition):
    """XeLaTeX logs each character its font lacks, and prints nothing (or a
    box) in its place: Japanese in a Latin font, a sign the math font lacks."""
    log = (edition.latex / "book.log").read_text(errors="replace")
    missing = Counter(re.findall(r"Missing character: There is no (.+?) in font (\S+?)[!/]", log))
    assert not missing, f"{sum(missing.values())} characters missing: {missing.most_common(10)}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_is_in_the_pdf_with_its_glued_numbers(chapter, edition, text):
    notebook = nbformat.read(chapter, as_version=4)
    title = re.sub(r"[`*]", "", edition.translate(chapter.stem, _title(notebook)))
    assert edition.normal(title) in text, f"chapter title {title!r} not in the PDF"
    if edition.language == "ja":
        assert CJK.search(title), f"{chapter.stem}: the Japanese title {title!r} has no Japanese"
    numbers = _glued_numbers(notebook)
    assert numbers, f"{chapter.stem} glues no number into its prose"
    found = [n for n in numbers if n in text]
    # every glued number is in the PDF, not only one (a number in a table
    # cell or a heading may be split by pdftotext: allow 5 % of them)
    assert len(found) >= 0.95 * len(numbers), sorted(set(numbers) - set(found))


def test_the_back_matter_is_in_the_pdf(edition, text):
    glossary = (ROOT / "book" / "glossary.md").read_text()
    terms = re.findall(r"^([A-Za-z][^\n`{]+)\n  ?[A-Z]", glossary, re.M)
    assert len(terms) >= 10
    for term in terms:
        shown = edition.translate("glossary", term.strip())
        assert edition.normal(shown) in text, f"glossary term {shown!r} not in the PDF"
    bib = (ROOT / "book" / "references.bib").read_text()
    entries = len(re.findall(r"^@\w+\{", bib, re.M))
    numbered = len(re.findall(r"\\bibitem\[", (edition.latex / "book.tex").read_text()))
    assert numbered == entries, (numbered, entries)


def test_the_equations_are_numbered(edition):
    """Every labelled display equation of the chapters, ``$$ ... $$ (eq-...)``,
    is a numbered equation in the LaTeX source."""
    labelled = sum(len(re.findall(r"\$\$ \(eq-[\w-]+\)", path.read_text())) for path in CHAPTERS)
    assert labelled >= 30
    tex = (edition.latex / "book.tex").read_text()
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


def test_latex_ran_without_errors_and_no_code_or_japanese_runs_off_the_page(edition):
    """No LaTeX error; no overfull line in a code block, nor one that holds
    Japanese (which xeCJK may break between any two characters: such a line
    means the line breaking is wrong).  The other overfull lines (a long
    name in a table cell) are listed."""
    log = (edition.latex / "book.log").read_text(errors="replace")
    errors = [line for line in log.splitlines() if line.startswith("!")]
    assert not errors, errors
    kinds = _environments((edition.latex / "book.tex").read_text().splitlines())
    overfull = Counter()
    in_code = []
    japanese = []
    for width, first, last, content in re.findall(
        r"Overfull \\hbox \((\d+\.\d+)pt too wide\) in (?:paragraph|alignment) at lines (\d+)--(\d+)\n(.*?)\n\n",
        log, re.S,
    ):
        kind = kinds[int(first)] if int(first) < len(kinds) else "other"
        overfull[kind] += 1
        if kind == "code":
            in_code.append((first, width))
        elif CJK.search(content):
            japanese.append((first, width, " ".join(content.split())[:120]))
    print(f"\n{edition.language}: overfull lines: {dict(overfull)} (code blocks and Japanese text must have none)")
    assert not in_code, f"code lines past the margin (book.tex line, pt): {in_code}"
    assert not japanese, f"lines of Japanese past the margin (book.tex line, pt, line): {japanese}"


def test_the_site_serves_the_pdf_that_every_page_links(edition):
    site = edition.site
    if not (site / "index.html").is_file():
        pytest.skip(f"no built site at {site} (make book): the PDF link is checked with the site")
    assert (site / "book.pdf").read_bytes() == edition.pdf.read_bytes()
    pages = sorted((site / "book").glob("*.html"))
    assert pages
    for page in pages:
        assert 'href="../book.pdf"' in page.read_text(encoding="utf-8"), page.name
