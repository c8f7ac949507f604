"""The student edition that `make student` builds into _build/student.

Nothing of any solution is left in it (no solution block, no line of a
solution's code, no sentence of a solution's prose, in the HTML, the decks
or the notebooks), every exercise is still there with its stub, and the
stubs still call the grader.  The solutions stay in the full edition, where
the exercise tests run them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.exercises.notebook_exercises import CHAPTERS, all_exercises

ROOT = Path(__file__).resolve().parents[2]
EDITION = ROOT / "_build" / "student"
EXERCISES = all_exercises()


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    """Every text file of the edition: its HTML, decks and notebooks."""
    if not (EDITION / "html" / "index.html").is_file():
        pytest.fail(f"no student edition in {EDITION}: run `make student`")
    found = {}
    for path in [*(EDITION / "html").rglob("*.html"), *(EDITION / "notebooks").glob("*.ipynb")]:
        found[str(path.relative_to(EDITION))] = path.read_text(encoding="utf-8")
    for path in (EDITION / "html" / "_sources").rglob("*"):
        if path.is_file() and path.suffix in (".ipynb", ".md", ".txt"):
            found[str(path.relative_to(EDITION))] = path.read_text(encoding="utf-8")
    return found


def _text(file: str, content: str) -> str:
    """What a reader sees or runs: notebook sources joined, HTML untagged."""
    if file.endswith(".ipynb"):
        notebook = json.loads(content)
        return "\n".join("".join(cell["source"]) for cell in notebook["cells"])
    import html

    text = html.unescape(re.sub(r"<[^>]+>", "", content))
    return re.sub(r"\s+", " ", text.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"'))


def _solution_fragments() -> dict[str, list[str]]:
    """Per exercise, lines of its solution that occur nowhere else in the
    book (outside every solution): code lines of 25+ characters, prose
    sentences of 40+."""
    import nbformat

    blocks: list[tuple[str, list]] = []
    outside: list[str] = [path.read_text(encoding="utf-8") for path in (ROOT / "book").glob("*.md")]
    for notebook_path in sorted((ROOT / "book").glob("*.ipynb")):
        notebook = nbformat.read(notebook_path, as_version=4)
        current = None
        for cell in notebook.cells:
            start = re.search(r"^```\{solution-start\}\s+(\S+)", cell.source, re.M)
            if cell.cell_type == "markdown" and start:
                current = (start[1], [])
                blocks.append(current)
            if current is None:
                if cell.cell_type == "markdown":
                    outside.append(re.sub(r"\*\*|(?<!\w)\*|\*(?!\w)", "", cell.source))
                else:  # code and what it printed
                    outside.append(cell.source)
                    outside += [output.get("text", "") for output in cell.get("outputs", [])]
            else:
                current[1].append(cell)
                if cell.cell_type == "markdown" and re.search(r"^```\{solution-end\}", cell.source, re.M):
                    current = None
    everywhere_else = re.sub(r"\s+", " ", "\n".join(outside))
    fragments: dict[str, list[str]] = {}
    for label, cells in blocks:
        pieces = []
        for cell in cells:
            if cell.cell_type == "code":
                pieces += [line.strip() for line in cell.source.splitlines() if len(line.strip()) >= 25]
            else:
                # the plain runs of text between math, code and roles, which
                # the site renders as they are written
                prose = re.sub(r"\*\*|(?<!\w)\*|\*(?!\w)", "", cell.source)
                runs = re.split(r"```.*?```|\{[^}]+\}`[^`]*`|\$\$.*?\$\$|\$[^$]*\$|`[^`]*`|\[[^\]]*\]\([^)]*\)|[.:;!?(),]",
                                prose, flags=re.S)
                pieces += [re.sub(r"\s+", " ", run).strip() for run in runs
                           if len(run.strip()) >= 30 and not re.search(r"[{}\\<>|#]", run)]
        fragments[label] = [piece for piece in pieces if re.sub(r"\s+", " ", piece) not in everywhere_else]
    return fragments


def test_every_solution_has_fragments_to_look_for():
    fragments = _solution_fragments()
    assert set(fragments) == {e.label for e in EXERCISES}
    empty = [label for label, pieces in fragments.items() if not pieces]
    assert not empty, f"solutions with nothing distinctive to search for: {empty}"


def test_no_solution_is_left(files):
    for file, content in files.items():
        assert "solution-start" not in content and "solution-end" not in content, file
        if file.endswith(".html"):
            assert 'class="solution' not in content, f"{file}: a solution admonition"
    texts = {file: _text(file, content) for file, content in files.items()}
    leaks = []
    for label, pieces in _solution_fragments().items():
        for piece in pieces:
            plain = re.sub(r"\s+", " ", piece).strip()
            for file, text in texts.items():
                if plain in text or piece in text:
                    leaks.append(f"{label} in {file}: {piece[:60]!r}")
    assert not leaks, "\n".join(leaks[:20])


def test_every_exercise_is_still_there_with_its_stub(files):
    for exercise in EXERCISES:
        stem = exercise.notebook.stem
        html = files[f"html/book/{stem}.html"]
        assert f'id="{exercise.label}"' in html, f"{exercise.label} missing from the student site"
        notebook = _text(f"notebooks/{stem}.ipynb", files[f"notebooks/{stem}.ipynb"])
        assert f":label: {exercise.label}" in notebook
        if exercise.stub is not None:
            assert exercise.stub.source in notebook, f"{exercise.label}: stub missing"


def test_the_student_site_links_no_pdf(files):
    assert not any('href="../book.pdf"' in c or 'href="book.pdf"' in c for c in files.values())


def test_the_search_finds_every_fragment_in_the_full_edition():
    """The control: the same search finds every fragment in the full site,
    so finding none in the student edition means they are gone."""
    full = ROOT / "_build" / "html" / "book"
    if not full.is_dir():
        pytest.skip("no full site (make book)")
    texts = [_text(p.name, p.read_text(encoding="utf-8")) for p in full.glob("*.html")]
    missing = [
        (label, piece)
        for label, pieces in _solution_fragments().items()
        for piece in pieces
        if not any(re.sub(r"\s+", " ", piece).strip() in text for text in texts)
    ]
    assert not missing, missing[:10]
