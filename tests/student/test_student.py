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
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", content))


def _solution_fragments() -> dict[str, list[str]]:
    """Per exercise, lines of its solution that occur nowhere else in the
    chapter: code lines of 25+ characters, prose sentences of 40+."""
    import nbformat

    fragments: dict[str, list[str]] = {}
    for notebook_path in CHAPTERS:
        notebook = nbformat.read(notebook_path, as_version=4)
        blocks, current = [], None
        for cell in notebook.cells:
            if cell.cell_type == "markdown" and re.search(r"^```\{solution-start\}\s+(\S+)", cell.source, re.M):
                current = (re.search(r"^```\{solution-start\}\s+(\S+)", cell.source, re.M)[1], [])
                blocks.append(current)
            if current is not None:
                current[1].append(cell)
                if cell.cell_type == "markdown" and re.search(r"^```\{solution-end\}", cell.source, re.M):
                    current = None
        inside = {id(cell) for _, cells in blocks for cell in cells}
        outside = "\n".join(cell.source for cell in notebook.cells if id(cell) not in inside)
        for label, cells in blocks:
            pieces = []
            for cell in cells:
                if cell.cell_type == "code":
                    pieces += [line.strip() for line in cell.source.splitlines() if len(line.strip()) >= 25]
                else:
                    prose = re.sub(r"```\{solution-(start|end)\}[^`]*```|\{[^}]+\}`[^`]*`|\$[^$]*\$|`[^`]*`", " ", cell.source)
                    pieces += [s.strip() for s in re.split(r"(?<=[.:;!?])\s+", re.sub(r"\s+", " ", prose))
                               if len(s.strip()) >= 40 and not re.search(r"[{}\\]", s)]
            fragments[label] = [p for p in pieces if p not in outside]
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
            plain = re.sub(r"\s+", " ", piece)
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
