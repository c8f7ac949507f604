"""Argument checks shared by the package: clear errors that name the argument.

Every public function validates its inputs here before any framework code
runs, so a mistake surfaces as ``ValueError``/``TypeError`` saying which
argument is wrong and what was expected, not as a traceback from deep inside
PyTorch or TensorFlow.

The rules, the same in every entry point:

* class indices (``labels``, ``targets``, ``input_ids``) may have any
  integer dtype (``int8`` to ``int64``, ``uint8`` to ``uint64``); they are
  converted to ``int64`` (:func:`require_class_indices`) before any torch op,
  so padding with ``-100`` and ``cross_entropy`` work whatever the dtype.
  ``bool``, floating and complex tensors are rejected with ``TypeError``;
* ``ignore_index`` (and other integer options) must be an ``int`` (a NumPy
  integer is accepted); ``bool``, ``float`` and ``None`` raise ``TypeError``;
* a scored class axis has ``V >= 1`` classes, and a batch is never empty
  (``B >= 1`` sequences, ``T >= 1`` positions, ``N >= 1`` rows);
* ``num_items_in_batch`` is ``None``, an ``int >= 1`` or a 0-D integer
  tensor holding a value ``>= 1``: floats and float tensors raise
  ``TypeError``, ``0`` and negative counts ``ValueError``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
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


def require_class_axis(tensor: Any, name: str) -> torch.Tensor:
    """Return ``tensor`` if it is a float tensor ``(..., C)`` with ``C >= 1``.

    Raises ``TypeError`` for a non-tensor or a non-float dtype,
    ``ValueError`` for a 0-D tensor or ``C = 0``.
    """
    require_tensor(tensor, name)
    require_floating(tensor, name)
    if tensor.dim() == 0:
        raise ValueError(
            f"{name} must have a class axis (shape (..., C)); got a 0-D tensor"
        )
    if tensor.size(-1) == 0:
        raise ValueError(
            f"{name} must have at least one class (shape (..., C), C >= 1); "
            f"got shape {tuple(tensor.shape)}"
        )
    return tensor


def require_integer(tensor: torch.Tensor, name: str) -> None:
    """Raise ``TypeError`` unless ``tensor`` holds integers (class indices).

    Every integer dtype is accepted (``int8`` to ``int64``, ``uint8`` to
    ``uint64``); ``bool``, floating and complex dtypes are not.
    """
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer class indices (any integer dtype, "
            f"e.g. torch.long); got {tensor.dtype}"
        )


def require_class_indices(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` as ``int64`` after :func:`require_integer`.

    PyTorch's losses take ``int64`` targets only, and a ``uint8`` tensor
    cannot hold ``-100``; converting first makes every integer dtype work.
    An ``int64`` tensor is returned as it is (no copy).
    """
    require_integer(tensor, name)
    return tensor.long()


def require_no_empty_dim(tensor: torch.Tensor, name: str, layout: str) -> None:
    """Raise ``ValueError`` if a dimension of ``tensor`` has size 0.

    ``layout`` names the dimensions, e.g. ``"(B, T, V)"``.
    """
    if 0 in tuple(tensor.shape):
        raise ValueError(
            f"{name} {layout} must have no empty dimension "
            f"(an empty batch or a vocabulary of 0 classes); "
            f"got shape {tuple(tensor.shape)}"
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
    labels = labels.long()
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


def require_int(value: Any, name: str) -> int:
    """Return ``value`` as an ``int``; raise ``TypeError`` unless it is one.

    A Python ``int`` or a NumPy integer is accepted; ``bool`` (an ``int``
    subclass), ``float`` (even ``-100.0``), ``None`` and tensors are not.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, np.integer)
    ):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return int(value)


def require_ignore_index(value: Any, name: str = "ignore_index") -> int:
    """Return ``ignore_index`` as an ``int`` (:func:`require_int`)."""
    return require_int(value, name)


def require_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an ``int`` >= 1, else raise ``ValueError``/``TypeError``."""
    value = require_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


def require_real_number(value: Any, name: str) -> float:
    """Return ``value`` as a ``float`` if it is a real number, else ``TypeError``.

    Python and NumPy numbers are accepted, ``bool`` and strings are not.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    return float(value)


def require_one_of(value: Any, allowed: Sequence[Any], name: str) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError``.

    Used for string options such as ``reduction``.
    """
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")
    return value


def require_label_smoothing(value: Any, name: str = "label_smoothing") -> float:
    """Return ``value`` as a ``float`` in ``[0, 1]``.

    Raises ``TypeError`` unless it is an ``int`` or ``float`` (not ``bool``),
    ``ValueError`` outside ``[0, 1]`` (``nan`` included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a float in [0, 1]; got {type(value).__name__}"
        )
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")
    return float(value)


def require_num_items(
    value: Any, name: str = "num_items_in_batch"
) -> int | torch.Tensor | None:
    """Validate ``num_items_in_batch``: the shared denominator of a summed loss.

    Accepted: ``None``; an ``int >= 1`` (or NumPy integer), returned as an
    ``int``; a 0-D tensor of an integer dtype holding a value ``>= 1``,
    returned as it is (transformers passes a tensor).

    Raises:
        TypeError: a ``float`` (even ``2.0``), ``bool``, a floating, complex
            or ``bool`` tensor, or any other type.
        ValueError: a tensor that is not 0-D, or a count ``< 1``.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"{name} must be a 0-D tensor (a single count); "
                f"got shape {tuple(value.shape)}"
            )
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must hold integer values (a count of scored "
                f"tokens); got {value.dtype}"
            )
        count = int(value)
        if count < 1:
            raise ValueError(f"{name} must be >= 1; got {count}")
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be an int >= 1, a 0-D integer tensor or None; "
            f"got {type(value).__name__}"
        )
    return require_positive_int(value, name)


def require_rows_and_targets(
    rows: Any, targets: Any, rows_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(rows as float64 (N, C), targets (N,))`` as NumPy arrays.

    Raises ``ValueError`` naming ``rows_name`` (e.g. ``"logits"``) or
    ``targets`` when the shapes do not fit, ``TypeError`` when ``rows`` do
    not hold real numbers or ``targets`` not integers (any integer dtype).
    """
    try:
        x = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{rows_name} must be a 2-D array of real numbers (N, C); "
            f"got {type(rows).__name__}"
        ) from error
    y = np.asarray(targets)
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(
            f"targets must hold integer class indices; got dtype {y.dtype}"
        )
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


def require_sequence(value: Any, name: str, expected: str) -> Sequence[Any]:
    """Return ``value`` if it is a sequence (a list, a tuple), not a string.

    ``expected`` completes the ``TypeError`` message
    ``"{name} must be {expected}; got ..."``, e.g. ``"a sequence of ints"``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be {expected}; got {type(value).__name__}")
    return value


def require_positive_ints(values: Any, name: str) -> list[int]:
    """Return ``values`` as a list of ``int >= 1``; errors name the item."""
    require_sequence(values, name, "a sequence of ints")
    return [
        require_positive_int(value, f"{name}[{index}]")
        for index, value in enumerate(values)
    ]


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


def require_mapping(value: Any, name: str, expected: str) -> Mapping[Any, Any]:
    """Return ``value`` if it is a mapping (a ``dict``, a ``BatchEncoding``).

    ``expected`` completes the ``TypeError`` message
    ``"{name} must be {expected}; got ..."``, e.g. ``"a dict of tensors"``.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be {expected}; got {type(value).__name__}")
    return value


def require_token_matrix(value: Any, name: str, shape: Sequence[int]) -> torch.Tensor:
    """Return ``value`` if it is a ``(B, T)`` integer or boolean tensor of ``shape``.

    Per-token masks and ids that sit beside ``input_ids`` (an attention mask,
    position ids, an assistant mask) share its shape; floating and complex
    dtypes raise ``TypeError``, another shape ``ValueError``.
    """
    require_tensor(value, name)
    if value.is_floating_point() or value.is_complex():
        raise TypeError(
            f"{name} must hold integers or booleans; got {value.dtype}"
        )
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have the shape of input_ids {tuple(shape)} (B, T); "
            f"got shape {tuple(value.shape)}"
        )
    return value
