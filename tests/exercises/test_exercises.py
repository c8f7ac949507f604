"""Every exercise is assignable, and every grader can tell right from wrong.

For each chapter: every exercise has a title, a label, a difficulty and a
solution; at least one is hard.  For each exercise that asks for code (its
stub calls ``grade``): the solution's definition, executed on its own,
passes the checker; the stub as the student receives it does not; and each
plausible wrong answer in ``wrong_chNN.py`` fails it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections import Counter

import pytest

from companion import exercises as grading
from companion.exercises import ExerciseFailed

from .notebook_exercises import CHAPTERS, all_exercises, exercises

EXERCISES = all_exercises()
GRADED = [e for e in EXERCISES if e.stub is not None]


def wrong_answers(label: str) -> list:
    module = grading.CHAPTERS[label.rpartition("-ex")[0]]
    try:
        wrong = importlib.import_module(f"tests.exercises.wrong_{module}")
    except ModuleNotFoundError:
        return []
    return list(wrong.WRONG.get(label, []))


def run_cell(source: str, *before: str) -> dict:
    """Execute one notebook cell (after the ``before`` cells) with nothing
    else of the chapter; ``grade`` is bound, its output kept quiet."""
    namespace: dict = {"__name__": "exercise_cell", "grade": lambda label, function: None}
    with contextlib.redirect_stdout(io.StringIO()):
        for code in (*before, source):
            exec(compile(code, "<cell>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_is_complete(notebook):
    found = exercises(notebook)
    assert found, f"{notebook.name} has no exercises"
    for exercise in found:
        where = f"{notebook.name} {exercise.label or exercise.title!r}"
        assert exercise.label, f"{where}: no :label:"
        assert exercise.title, f"{where}: no title"
        assert exercise.difficulty, f"{where}: no **Difficulty:** easy/medium/hard line"
        assert exercise.kind, f"{where}: no **Kind:** line"
        assert exercise.solution_cells, f"{where}: no solution block"
    assert any(e.difficulty == "hard" for e in found), f"{notebook.name}: no hard exercise"
    labels = [e.label for e in found]
    assert len(labels) == len(set(labels))


def test_find_the_bug_exercises_exist():
    kinds = Counter(e.kind for e in EXERCISES)
    assert kinds["find the bug"] >= 6, kinds


def test_every_checker_belongs_to_an_exercise():
    assert sorted(grading.labels()) == sorted(e.label for e in GRADED)


@pytest.mark.parametrize("exercise", GRADED, ids=lambda e: e.label)
def test_the_solution_passes(exercise):
    cell = exercise.solution_definition()
    assert cell is not None, f"{exercise.label}: no solution cell defines {exercise.graded_name}()"
    setup = [c.source for c in exercise.solution_setup()]
    function = run_cell(cell.source, *setup)[exercise.graded_name]
    assert grading.check(exercise.label, function) >= 1


@pytest.mark.parametrize("exercise", GRADED, ids=lambda e: e.label)
def test_the_stub_does_not_pass(exercise):
    function = run_cell(exercise.stub.source)[exercise.graded_name]
    with pytest.raises((NotImplementedError, ExerciseFailed)):
        grading.check(exercise.label, function)


@pytest.mark.parametrize("exercise", GRADED, ids=lambda e: e.label)
def test_wrong_answers_fail(exercise):
    wrong = wrong_answers(exercise.label)
    assert wrong, f"{exercise.label}: no plausible wrong answer in tests/exercises/wrong_*.py"
    for function in wrong:
        with pytest.raises(ExerciseFailed):
            grading.check(exercise.label, function)


@pytest.mark.parametrize("exercise", GRADED, ids=lambda e: e.label)
def test_the_stored_verdicts(exercise):
    """The notebook shows the stub's verdict and the solution's 'correct'."""
    stub_output = "".join(o.get("text", "") for o in exercise.stub.outputs)
    assert stub_output.startswith(f"{exercise.label}: not "), stub_output
    outputs = "".join(
        o.get("text", "") for c in exercise.solution_cells if c.cell_type == "code" for o in c.outputs
    )
    assert f"{exercise.label}: correct (" in outputs


def test_grade_rejects_bad_input():
    with pytest.raises(ValueError, match="label"):
        grading.grade("no-such-ex1", print)
    with pytest.raises(TypeError, match="label"):
        grading.grade(1, print)
    with pytest.raises(TypeError, match="function"):
        grading.grade(GRADED[0].label if GRADED else "shapes-ex1", 3)


def test_grade_reports_without_crashing(capsys):
    label = GRADED[0].label

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    def stub(*args, **kwargs):
        raise NotImplementedError

    grading.grade(label, broken)
    grading.grade(label, stub)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{label}: not correct yet: the function raised ZeroDivisionError")
    assert out[1] == f"{label}: not attempted yet (the function still raises NotImplementedError)"
