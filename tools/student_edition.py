"""The student edition: the book's site and notebooks without the solutions.

Instructors hand it out; the full edition keeps every solution, executed and
tested as before.  From a copy of the book's sources this script

* removes from every chapter notebook each solution block, the cells from
  ``{solution-start}`` to ``{solution-end}`` (code cells included), and
  checks that no solution directive is left anywhere;
* turns off the links to the PDF (the PDF holds the solutions) and sets
  sphinx-exercise's ``hide_solutions`` as a second guard;
* builds the site with warnings as errors (a glued number defined in a
  solution and used outside it would fail here) into ``OUT/html``, and the
  chapter decks into ``OUT/html/slides``;
* writes the notebooks for JupyterLab, roles resolved as ``make lab`` does,
  into ``OUT/notebooks``.  Each exercise keeps its stub, so a student fills
  in the function and runs ``grade(...)``.

Usage: ``python tools/student_edition.py OUT`` (``make student``: OUT is
``_build/student``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab_notebooks  # noqa: E402
import slides  # noqa: E402
from book_sources import build_site, copy_sources  # noqa: E402

SOLUTION_START = re.compile(r"^```\{solution-start\}", re.M)
SOLUTION_END = re.compile(r"^```\{solution-end\}", re.M)
SOLUTION_ANY = re.compile(r"\{solution(?:-start|-end)?\}")


def strip_solutions(notebook: nbformat.NotebookNode) -> int:
    """Remove every solution block from ``notebook``; return how many."""
    kept, inside, removed = [], False, 0
    for cell in notebook.cells:
        starts = cell.cell_type == "markdown" and SOLUTION_START.search(cell.source)
        if starts:
            if inside:
                raise ValueError("a solution-start inside another solution")
            inside, removed = True, removed + 1
        if not inside:
            kept.append(cell)
        if inside and cell.cell_type == "markdown" and SOLUTION_END.search(cell.source):
            inside = False
    if inside:
        raise ValueError("a solution-start without its solution-end")
    notebook.cells = kept
    return removed


def prepare_sources(target: Path) -> int:
    """Copy the book's sources into ``target`` and strip the solutions."""
    copy_sources(target)
    removed = 0
    for path in sorted((target / "book").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        removed += strip_solutions(notebook)
        nbformat.write(notebook, path)
    for path in (target / "book").rglob("*"):
        if path.suffix in (".ipynb", ".md") and SOLUTION_ANY.search(path.read_text(encoding="utf-8")):
            raise ValueError(f"{path.name}: a solution directive is left in the student edition")
    config = (target / "_config.yml").read_text(encoding="utf-8")
    config = config.replace("title: How Language Models Compute Their Training Loss",
                            "title: How Language Models Compute Their Training Loss (student edition)")
    config = config.replace("  config:\n", "  config:\n    hide_solutions: true\n    course_kit_pdf: false\n", 1)
    (target / "_config.yml").write_text(config, encoding="utf-8")
    return removed


def build(out: Path) -> None:
    source = out / "src"
    removed = prepare_sources(source)
    print(f"{removed} solutions removed")
    html = out / "html"
    build_site(source, html)
    slides.build(html / "slides", ROOT / ".slides-deps" / "revealjs", source=source / "book")
    notebooks = out / "notebooks"
    lab_notebooks.make_copies(source / "book", notebooks)
    print(f"student edition: {html / 'index.html'} and {notebooks}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    build(Path(argv[0]).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
