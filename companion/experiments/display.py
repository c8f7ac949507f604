"""Numbers as the book shows them: only digits that rounding cannot reach.

A stored notebook output is compared character by character on every test
run, on the reader's machine as well as the author's.  Float results differ
in their last bits between CPUs, vector instruction sets and thread counts,
so a number is shown, and passed to MyST-NB's ``glue``, only to the digits
the computation guarantees:

* float32 results: at most 5 significant digits (the default);
* float64 results that go through BLAS or reductions: at most 10;
* a difference that may be exactly 0 on one machine and 1e-17 on another:
  as a bound, ``"< 1e-10"``, on every machine.

``glue`` here is MyST-NB's ``glue`` with the rounding done first: MyST-NB
stores the full ``repr`` of the value in the notebook, and nbval compares
it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

FLOAT32_DIGITS = 5
"""Significant digits shown of a float32 result."""

FLOAT64_DIGITS = 10
"""Significant digits shown of a float64 result that went through reductions."""


def _check_digits(digits: Any) -> int:
    if isinstance(digits, bool) or not isinstance(digits, int):
        raise TypeError(f"digits must be an int; got {type(digits).__name__}")
    if not 1 <= digits <= 15:
        raise ValueError(f"digits must lie in [1, 15]; got {digits}")
    return digits


def _as_number(value: Any, name: str) -> int | float:
    """``value`` as a Python int or float (0-d tensors and NumPy scalars too)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number (int, float, NumPy or 0-d tensor); "
            f"got {type(value).__name__}"
        )
    return value if isinstance(value, numbers.Integral) else float(value)


def significant(value: Any, digits: int = FLOAT32_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits, as a Python float.

    ``nan`` and infinities are returned unchanged.

    >>> significant(5.574510574340820)
    5.5745
    >>> significant(993.8893317336922, 4)
    993.9
    """
    digits = _check_digits(digits)
    x = float(_as_number(value, "value"))
    if x == 0.0 or not math.isfinite(x):
        return x
    exponent = math.floor(math.log10(abs(x)))
    return round(x, digits - 1 - exponent)


def glue(
    name: str,
    value: Any,
    display: bool = False,
    *,
    digits: int = FLOAT32_DIGITS,
) -> None:
    """MyST-NB's ``glue`` with floats rounded to ``digits`` significant digits.

    Ints, strings and other objects are glued unchanged; a float (or a NumPy
    float, or a 0-d tensor holding one) is rounded by :func:`significant`
    first, so the ``repr`` that MyST-NB stores is the same on every machine.
    Unlike MyST-NB's ``glue``, ``display`` defaults to ``False``: the book
    glues numbers for its prose.
    """
    from myst_nb import glue as myst_glue

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str; got {name!r}")
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(
        value, (bool, numbers.Integral)
    ):
        value = significant(value, digits)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    myst_glue(name, value, display=display)


def bound(value: Any, threshold: float, *, digits: int = 3) -> str:
    """A non-negative difference as text that no rounding noise can change.

    Below ``threshold`` (a power of ten such as ``1e-10``) the text is the
    bound itself, ``"< 1e-10"``, whether the difference is exactly 0 on this
    machine or 1e-17 on another; at or above it, the value with ``digits``
    significant digits.  ``nan`` and ``inf`` are shown as such.

    >>> bound(0.0, 1e-10), bound(3e-17, 1e-10), bound(0.18074, 1e-6)
    ('< 1e-10', '< 1e-10', '0.181')
    """
    x = float(_as_number(value, "value"))
    t = float(_as_number(threshold, "threshold"))
    digits = _check_digits(digits)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"threshold must be a positive finite number; got {t}")
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x < 0:
        raise ValueError(f"value must be a non-negative difference; got {x}")
    if x < t:
        return f"< {t:.0e}".replace("e-0", "e-").replace("e+0", "e+")
    return f"{significant(x, digits):.{digits}g}"


def percent(relative_error: Any, floor: float = 1e-12) -> str:
    """A relative error as a percentage for a table, stable across machines.

    Below ``floor`` (default ``1e-12``, float64 rounding noise) the text is
    the bound ``"< 1e-10 %"``, exactly 0 included; from 1 % on, a whole
    percentage; in between, two significant digits.
    """
    x = float(_as_number(relative_error, "relative_error"))
    if math.isnan(x) or math.isinf(x):
        return f"{x} %"
    if x < 0:
        raise ValueError(
            f"relative_error must be non-negative; got {x}"
        )
    if x < floor:
        return f"{bound(x, 100 * floor)} %"
    if x >= 0.01:
        return f"{100 * x:.0f} %"
    return f"{100 * x:.2g} %"


__all__ = [
    "FLOAT32_DIGITS",
    "FLOAT64_DIGITS",
    "bound",
    "glue",
    "percent",
    "significant",
]
