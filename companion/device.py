"""The device the chapters compute on: the CPU, unless the reader opts in.

Every stored output of the book was computed on the CPU, and the tests
check them there.  A reader with a GPU or an Apple Silicon machine may run
the chapters that support it on that device by setting one variable before
starting Jupyter, ``COMPANION_DEVICE=cuda`` (or ``mps``); the stored outputs
never change, since they are only ever written with the variable unset
(``make notebooks`` and the tests clear it).  Numbers printed on another
device may differ in their last digits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from companion.check_env import DEVICE_VARIABLE

__all__ = ["DEVICES", "book_device"]

DEVICES: tuple[str, ...] = ("cpu", "cuda", "mps")
"""The values :data:`~companion.check_env.DEVICE_VARIABLE` may take."""


def book_device(environ: Mapping[str, str] | None = None) -> torch.device:
    """The device named by ``COMPANION_DEVICE`` (unset or empty: the CPU).

    Args:
        environ: where to read the variable (default ``os.environ``).

    Raises:
        TypeError: ``environ`` is not a mapping.
        ValueError: the variable names another device, or one that this
            machine does not have (the message says which).
    """
    if environ is None:
        environ = os.environ
    if not isinstance(environ, Mapping):
        raise TypeError(f"environ must be a mapping such as os.environ; got {type(environ).__name__}")
    value = str(environ.get(DEVICE_VARIABLE, "")).strip().lower() or "cpu"
    if value not in DEVICES:
        raise ValueError(f"{DEVICE_VARIABLE} must be one of {', '.join(DEVICES)} (or unset); got {value!r}")
    if value == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_VARIABLE}=cuda, but torch.cuda.is_available() is False on this machine")
    if value == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{DEVICE_VARIABLE}=mps, but torch.backends.mps.is_available() is False on this machine")
    return torch.device(value)
