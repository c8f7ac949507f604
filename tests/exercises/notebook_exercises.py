"""Read the exercises out of the chapter notebooks.

An exercise is a gated block of cells::

    ```{exercise-start} Title
    :label: shapes-ex1
    ```
    **Difficulty:** easy · **Kind:** predict, then check
    ... the task, hints in a collapsed admonition ...
    (code cells: the stub, ending in grade("shapes-ex1", name))
    ```{exercise-end}
    ```

and its solution the block from ``{solution-start} shapes-ex1`` to
``{solution-end}``.  This module finds both, so that the tests (and the
student edition) work from the notebooks themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "book").glob("0*.ipynb"))

START = re.compile(r"^```\{exercise-start\}[ \t]*(?P<title>[^\n]*)\n(?P<options>(?::[\w-]+:[^\n]*\n)*)```", re.M)
END = re.compile(r"^```\{exercise-end\}", re.M)
SOLUTION_START = re.compile(r"^```\{solution-start\}\s+(?P<label>\S+)", re.M)
SOLUTION_END = re.compile(r"^```\{solution-end\}", re.M)
LABEL = re.compile(r"^:label:\s*(\S+)", re.M)
DIFFICULTY = re.compile(r"\*\*Difficulty:\*\*\s*(easy|medium|hard)\b")
KIND = re.compile(r"\*\*Kind:\*\*\s*([^\n·]+)")
GRADE = re.compile(r"""^grade\(\s*["'](?P<label>[\w-]+)["']\s*,\s*(?P<name>\w+)\s*\)\s*$""", re.M)


@dataclass
class Exercise:
    notebook: Path
    label: str
    title: str
    difficulty: str | None
    kind: str | None
    cells: list = field(default_factory=list)  # the exercise block, start to end
    solution_cells: list = field(default_factory=list)  # solution-start to solution-end

    @property
    def text(self) -> str:
        return "\n".join(c.source for c in self.cells if c.cell_type == "markdown")

    @property
    def stub(self):
        """The code cell that calls ``grade`` (None when no code is asked)."""
        cells = [c for c in self.cells if c.cell_type == "code" and GRADE.search(c.source)]
        return cells[0] if cells else None

    @property
    def graded_name(self) -> str | None:
        stub = self.stub
        return GRADE.search(stub.source)["name"] if stub is not None else None

    def solution_setup(self) -> list:
        """The solution's code cells before the defining one that only
        import and define (a class the function uses, say): they run with it."""
        import ast

        definition = self.solution_definition()
        cells = []
        for cell in self.solution_cells:
            if cell is definition:
                break
            if cell.cell_type == "code":
                body = ast.parse(cell.source).body
                kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)
                if body and all(isinstance(node, kinds) for node in body):
                    cells.append(cell)
        return cells

    def solution_definition(self):
        """The solution's code cell that defines the graded function."""
        name = self.graded_name
        pattern = re.compile(rf"^def {name}\(", re.M)
        cells = [c for c in self.solution_cells if c.cell_type == "code" and pattern.search(c.source)]
        return cells[0] if cells else None


def exercises(notebook: Path) -> list[Exercise]:
    """Every exercise of ``notebook``, in order, with its solution cells."""
    cells = nbformat.read(notebook, as_version=4).cells
    found: list[Exercise] = []
    current: Exercise | None = None
    solution: Exercise | None = None
    by_label: dict[str, Exercise] = {}
    for cell in cells:
        source = cell.source
        start = START.search(source) if cell.cell_type == "markdown" else None
        if start:
            label = LABEL.search(start["options"])
            current = Exercise(
                notebook,
                label[1] if label else "",
                start["title"].strip(),
                None,
                None,
            )
            found.append(current)
            by_label[current.label] = current
        if current is not None:
            current.cells.append(cell)
            if cell.cell_type == "markdown" and END.search(source):
                text = current.text
                difficulty, kind = DIFFICULTY.search(text), KIND.search(text)
                current.difficulty = difficulty[1] if difficulty else None
                current.kind = kind[1].strip() if kind else None
                current = None
            continue
        sol = SOLUTION_START.search(source) if cell.cell_type == "markdown" else None
        if sol:
            solution = by_label.get(sol["label"])
            if solution is None:
                raise ValueError(f"{notebook.name}: a solution for {sol['label']!r} without an exercise before it")
        if solution is not None:
            solution.solution_cells.append(cell)
            if cell.cell_type == "markdown" and SOLUTION_END.search(source):
                solution = None
    return found


def all_exercises() -> list[Exercise]:
    return [exercise for notebook in CHAPTERS for exercise in exercises(notebook)]
