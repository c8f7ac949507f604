"""Argument checks shared by the package: clear errors that name the argument.

Every public function validates its inputs here before any framework code
runs, so a mistake surfaces as ``ValueError``/``TypeError`` saying which
argument is wrong and what was expected, not as a traceback from deep inside
PyTorch or TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def require_tensor(value: Any, name: str) -> torch.Tensor:
    """Return ``value`` if it is a ``torch.Tensor``, else raise ``TypeError``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def require_rank(tensor: torch.Tensor, rank: int, name: str, layout: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` has ``rank`` dimensions.

    ``layout`` names the expected dimensions, e.g. ``"(B, T, V)"``.
    """
    if tensor.dim() != rank:
        raise ValueError(
            f"{name} must be a {rank}-D tensor {layout}; got shape {tuple(tensor.shape)}"
        )


def require_floating(tensor: torch.Tensor, name: str) -> None:
    """Raise ``TypeError`` unless ``tensor`` has a floating-point dtype."""
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {tensor.dtype}")


def require_integer(tensor: torch.Tensor, name: str) -> None:
    """Raise ``TypeError`` unless ``tensor`` holds integers (class indices)."""
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer class indices (e.g. torch.long); got {tensor.dtype}"
        )


def require_leading_dims(
    tensor: torch.Tensor,
    expected: Sequence[int],
    name: str,
    other: str,
    layout: str,
) -> None:
    """Raise ``ValueError`` unless ``tensor.shape[:len(expected)] == expected``.

    ``other`` names the tensor the dimensions must agree with.
    """
    got = tuple(tensor.shape[: len(expected)])
    if got != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} matching the first dimensions of {other} "
            f"{tuple(expected)}; got shape {tuple(tensor.shape)}"
        )


def require_labels_in_range(
    labels: torch.Tensor, num_classes: int, ignore_index: int, name: str
) -> None:
    """Raise ``ValueError`` if a label is outside ``[0, num_classes)`` and not ``ignore_index``."""
    if labels.numel() == 0:
        return
    valid = labels != ignore_index
    if not bool(valid.any()):
        return
    kept = labels[valid]
    low, high = int(kept.min()), int(kept.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found {bad}"
        )


def require_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an ``int`` >= 1, else raise ``ValueError``/``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


def require_rows_and_targets(
    rows: Any, targets: Any, rows_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rows as float64 (N, C), targets (N,))`` as NumPy arrays.

    Raises ``ValueError`` naming ``rows_name`` (e.g. ``"logits"``) or
    ``targets`` when the shapes do not fit.
    """
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(targets)
    if x.ndim != 2:
        raise ValueError(
            f"{rows_name} must be a 2-D array (N, C); got shape {x.shape}"
        )
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"targets must have shape (N,) = ({x.shape[0]},); "
            f"got shape {y.shape}"
        )
    return x, y


def require_nonempty_lists(value: Sequence[Any], name: str, what: str) -> None:
    """Raise ``ValueError`` unless every ``value[i]`` is a non-empty list.

    ``what`` names the list's items, e.g. ``"row lengths"``.
    """
    for index, item in enumerate(value):
        if (
            isinstance(item, (str, bytes))
            or not isinstance(item, Sequence)
            or not item
        ):
            raise ValueError(
                f"{name}[{index}] must be a non-empty list of {what}"
            )
