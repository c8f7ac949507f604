"""Show the package's own code in the book, so text and code cannot drift."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

__all__ = ["source_of"]


def source_of(obj: Callable[..., Any] | type, *, docstring: bool = False) -> str:
    """The source of a function or class as it is in the package.

    Args:
        obj: a function or class defined in Python source.
        docstring: keep the docstring (default: drop it, the book's prose
            explains the code instead).

    Returns:
        The dedented source text, without a trailing newline.
    """
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        raise TypeError(f"obj must be a function or class; got {type(obj).__name__}")
    source = textwrap.dedent(inspect.getsource(obj))
    if docstring:
        return source.rstrip()
    tree = ast.parse(source)
    node = tree.body[0]
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines = source.splitlines()
        del lines[first.lineno - 1 : first.end_lineno]
        source = "\n".join(lines)
    return source.rstrip()
