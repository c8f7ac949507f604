"""Graders for the book's exercises.

Every exercise that asks for code has a *stub* in the chapter notebook: a
function whose body raises ``NotImplementedError`` (or, in a find-the-bug
exercise, the buggy code itself), followed by a call to :func:`grade`::

    def shifted_strides(shape):
        raise NotImplementedError  # your answer here

    grade("shapes-ex1", shifted_strides)

:func:`grade` runs the exercise's checker on the reader's function and
prints one line: the function is correct, not correct yet (with what a
check saw), or not attempted yet.  A checker calls the function on several
cases, including the ones a plausible wrong answer gets wrong, and compares
its results with a float64 reference or with the library; it never looks
at the code.  The checkers live in one module per chapter
(``companion.exercises.ch01`` ...) and hold no solution: the solutions are
in the chapters' solution blocks only, which the student edition removes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["ExerciseFailed", "as_float", "call", "check", "checker", "expect", "expect_close", "grade", "labels"]

# The label prefix of each chapter's exercises, and the module of its checkers.
CHAPTERS: dict[str, str] = {
    "shapes": "ch01",
    "llava": "ch02",
    "cross-entropy": "ch03",
    "keras-masking": "ch04",
    "one-denominator": "ch05",
    "loss-memory": "ch06",
    "training": "ch07",
    "bc": "ch08",
}

Checker = Callable[[Callable[..., Any]], int]
_CHECKERS: dict[str, Checker] = {}


class ExerciseFailed(AssertionError):
    """A check of an exercise saw a wrong result; the message says which."""


def checker(label: str) -> Callable[[Checker], Checker]:
    """Register ``function`` as the checker of exercise ``label``.

    A checker takes the reader's function, calls it on its cases, raises
    :class:`ExerciseFailed` at the first wrong result and returns the
    number of checks that passed.
    """

    def register(function: Checker) -> Checker:
        if label in _CHECKERS:
            raise ValueError(f"label {label!r} already has a checker")
        _CHECKERS[label] = function
        return function

    return register


def _module_of(label: str) -> str:
    if not isinstance(label, str):
        raise TypeError(f"label must be a str such as 'shapes-ex1'; got {type(label).__name__}")
    prefix, _, number = label.rpartition("-ex")
    if prefix not in CHAPTERS or not number.isdigit():
        raise ValueError(
            f"label must be an exercise label such as 'shapes-ex1' with a prefix "
            f"among {sorted(CHAPTERS)}; got {label!r}"
        )
    return CHAPTERS[prefix]


def _checker_of(label: str) -> Checker:
    importlib.import_module(f"{__name__}.{_module_of(label)}")
    if label not in _CHECKERS:
        raise ValueError(f"label {label!r} names no exercise that has a checker")
    return _CHECKERS[label]


def labels() -> list[str]:
    """Every exercise label that has a checker, in chapter order."""
    for module in CHAPTERS.values():
        importlib.import_module(f"{__name__}.{module}")
    order = list(CHAPTERS.values())
    return sorted(_CHECKERS, key=lambda lab: (order.index(_module_of(lab)), int(lab.rpartition("-ex")[2])))


def check(label: str, function: Callable[..., Any]) -> int:
    """Run exercise ``label``'s checks on ``function``; return how many passed.

    Raises:
        ExerciseFailed: a check saw a wrong result (the message says which).
        NotImplementedError: ``function`` still raises it (not attempted).
        TypeError, ValueError: ``label`` is not an exercise's label, or
            ``function`` is not callable.
    """
    grader = _checker_of(label)
    if not callable(function):
        raise TypeError(f"function must be callable (the function your answer defines); got {type(function).__name__}")
    return grader(function)


def grade(label: str, function: Callable[..., Any]) -> None:
    """Check ``function`` against exercise ``label`` and print the verdict.

    One line: ``correct`` with the number of checks, ``not correct yet``
    with the first check that failed, or ``not attempted yet`` while the
    stub still raises ``NotImplementedError``.  An exception the function
    raises is reported the same way, by its type and message.
    """
    grader = _checker_of(label)
    if not callable(function):
        raise TypeError(f"function must be callable (the function your answer defines); got {type(function).__name__}")
    try:
        passed = grader(function)
    except NotImplementedError:
        print(f"{label}: not attempted yet (the function still raises NotImplementedError)")
    except ExerciseFailed as failure:
        print(f"{label}: not correct yet: {failure}")
    except Exception as error:  # the reader's code failed: say how, do not crash
        print(f"{label}: not correct yet: the function raised {type(error).__name__}: {error}")
    else:
        print(f"{label}: correct ({passed} checks passed)")


def call(answer: Callable[..., Any], case: str, *args: Any, **kwargs: Any) -> Any:
    """Call the reader's function on one case of a checker.

    An exception it raises (other than ``NotImplementedError``, which means
    "not attempted") fails the check, with the exception's type, the first
    line of its message and ``case`` in the verdict.
    """
    try:
        return answer(*args, **kwargs)
    except (NotImplementedError, ExerciseFailed):
        raise
    except Exception as error:  # the reader's code failed on this case
        text = str(error).strip()
        message = text.splitlines()[0][:100] if text else ""
        raise ExerciseFailed(f"the function raised {type(error).__name__}: {message} ({case})") from error


def as_float(value: Any, what: str) -> float:
    """``value`` as a float, or a failed check that names ``what``."""
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ExerciseFailed(f"{what}: expected a number; got {type(value).__name__}") from error


def expect(condition: bool, message: str) -> None:
    """Raise :class:`ExerciseFailed` with ``message`` unless ``condition``."""
    if not condition:
        raise ExerciseFailed(message)


def expect_close(got: Any, want: Any, what: str, *, rtol: float = 1e-6, atol: float = 1e-9) -> None:
    """Raise :class:`ExerciseFailed` unless ``got`` is close to ``want``.

    ``got`` and ``want`` are numbers, arrays or tensors of the same shape;
    the message names ``what`` and gives both values to 5 significant
    digits (never more: messages are stored in notebooks).  When the two
    agree to those 5 digits, it adds their relative difference rounded to 2
    significant digits if that is over 1e-6, and otherwise says that they
    agree to 5 digits but not to the tolerance (a difference that small can
    change from one CPU to another).
    """
    import numpy as np
    import torch

    def as_array(value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", torch.float64).numpy()
        return np.asarray(value, dtype=np.float64)

    try:
        g, w = as_array(got), as_array(want)
    except (TypeError, ValueError) as error:
        raise ExerciseFailed(f"{what}: expected a number or an array; got {type(got).__name__}") from error
    if g.shape != w.shape:
        raise ExerciseFailed(f"{what}: expected shape {w.shape}; got {g.shape}")
    if not np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
        if g.size == 1:
            want_value, got_value, where = float(w), float(g), ""
        else:
            worst = int(np.argmax(np.abs(g - w)))
            want_value, got_value, where = float(w.flat[worst]), float(g.flat[worst]), f" at flat index {worst}"
        message = f"{what}: expected {want_value:.5g}{where}; got {got_value:.5g}"
        if f"{want_value:.5g}" == f"{got_value:.5g}":
            message += _difference_note(got_value, want_value, rtol)
        raise ExerciseFailed(message)


def _difference_note(got: float, want: float, rtol: float) -> str:
    """What tells apart two numbers that print the same to 5 digits."""
    scale = max(abs(want), abs(got))
    relative = abs(got - want) / scale if scale else 0.0
    if relative > 1e-6:
        return f" (relative difference {relative:.2g}, over the tolerance {rtol:.2g})"
    return f" (they agree to 5 digits but not to the relative tolerance {rtol:.2g})"
