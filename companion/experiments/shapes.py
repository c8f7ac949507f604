"""The shift and flatten of :mod:`companion.shapes`, step by step.

For chapter 1: what each step of the next-token shift does to shape,
strides and memory (:func:`trace_shift_and_flatten`, on real tensors or on
the ``meta`` device, where realistic sizes cost nothing, and
:func:`trace_table`, the same as a table), whether two tensors share memory
(:func:`shares_storage`), when the sliced logits are contiguous, how many
bytes a logits tensor takes, and the same steps in TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import pandas as pd
import torch

from companion._checks import require_positive_int, require_sequence, require_tensor
from companion.shapes import check_logits_and_labels

__all__ = [
    "TensorStep",
    "logits_nbytes",
    "shares_storage",
    "slice_is_contiguous",
    "tf_shift_and_flatten",
    "trace_shift_and_flatten",
    "trace_table",
]


@dataclass(frozen=True)
class TensorStep:
    """What one step of the pipeline produced.

    Attributes:
        tensor: which tensor the step acts on (``"logits"`` or ``"labels"``).
        code: the expression, as it is written in the loss code.
        shape: shape of the result.
        stride: stride of the result, in elements.
        contiguous: ``result.is_contiguous()``.
        copied: ``True`` when the result lives in new memory (a copy was
            made); ``False`` when it is a view of the step's input.
        nbytes: bytes of the result's elements, ``numel * element_size``.
    """

    tensor: str
    code: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    contiguous: bool
    copied: bool
    nbytes: int

    def as_row(self) -> dict[str, Any]:
        """The step as a flat ``dict``, one table row."""
        return asdict(self)


def _storage_address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _view_root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory ``tensor`` borrows (itself if it is no view)."""
    return tensor if tensor._base is None else tensor._base


def shares_storage(result: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``result`` lives in the memory of ``source``: a view, no copy.

    Real tensors are compared by the address of their *storage*, not of
    their first element, so a slice that starts later in the same block
    (``x[:, 1:]``) still counts as sharing it.  ``meta`` tensors have no
    storage; there the autograd view relation is used: a view's ``_base``
    is the tensor whose memory it borrows.  A ``meta`` tensor never shares
    memory with a real one.

    Args:
        result: a tensor of any shape and dtype, e.g. ``(B, T - 1, V)``.
        source: a tensor of any shape and dtype, e.g. ``(B, T, V)``.

    Returns:
        ``True`` when both use one block of memory, ``False`` when
        ``result`` was copied.
    """
    require_tensor(result, "result")
    require_tensor(source, "source")
    if result.is_meta or source.is_meta:
        return result.is_meta and source.is_meta and (
            _view_root(result) is _view_root(source)
        )
    return _storage_address(result) == _storage_address(source)


def trace_shift_and_flatten(logits: torch.Tensor, labels: torch.Tensor) -> list[TensorStep]:
    """Run the shift-and-flatten steps and record each one.

    Works on real tensors and on the ``meta`` device, where realistic sizes
    (say ``B=8, T=4096, V=32000``) cost no memory.

    Args:
        logits: ``(B, T, V)`` float.
        labels: ``(B, T)`` int.

    Returns:
        One :class:`TensorStep` per step: the inputs, the slices,
        ``.contiguous()``, ``.view`` and, for labels, ``.to(logits.device)``.
    """
    check_logits_and_labels(logits, labels)
    steps: list[TensorStep] = []

    def record(name: str, code: str, result: torch.Tensor, source: torch.Tensor | None) -> None:
        copied = source is not None and not shares_storage(result, source)
        steps.append(
            TensorStep(
                tensor=name,
                code=code,
                shape=tuple(result.shape),
                stride=tuple(result.stride()),
                contiguous=result.is_contiguous(),
                copied=copied,
                nbytes=result.numel() * result.element_size(),
            )
        )

    vocab = logits.size(-1)
    record("logits", "logits", logits, None)
    sliced = logits[..., :-1, :]
    record("logits", "logits[..., :-1, :]", sliced, logits)
    packed = sliced.contiguous()
    record("logits", ".contiguous()", packed, sliced)
    flat = packed.view(-1, vocab)
    record("logits", ".view(-1, V)", flat, packed)

    record("labels", "labels", labels, None)
    sliced_labels = labels[..., 1:]
    record("labels", "labels[..., 1:]", sliced_labels, labels)
    packed_labels = sliced_labels.contiguous()
    record("labels", ".contiguous()", packed_labels, sliced_labels)
    flat_labels = packed_labels.view(-1)
    record("labels", ".view(-1)", flat_labels, packed_labels)
    moved = flat_labels.to(logits.device)
    record("labels", ".to(logits.device)", moved, flat_labels)
    return steps


def trace_table(steps: Sequence[TensorStep]) -> pd.DataFrame:
    """The steps of :func:`trace_shift_and_flatten` as a table.

    Args:
        steps: :class:`TensorStep` objects, in the order they ran.

    Returns:
        One row per step, with the columns of :class:`TensorStep` in their
        order: ``tensor``, ``code``, ``shape``, ``stride``, ``contiguous``,
        ``copied`` (bool), ``nbytes`` (int).
    """
    require_sequence(steps, "steps", "a sequence of TensorStep")
    for index, step in enumerate(steps):
        if not isinstance(step, TensorStep):
            raise TypeError(
                f"steps[{index}] must be a TensorStep; got {type(step).__name__}"
            )
    columns = [field.name for field in fields(TensorStep)]
    return pd.DataFrame([step.as_row() for step in steps], columns=columns)


def slice_is_contiguous(batch: int, time: int, vocab: int) -> bool:
    """Whether ``logits[..., :-1, :]`` of a ``(batch, time, vocab)`` tensor is contiguous.

    Decided on the ``meta`` device, so any size is free to ask about.
    ``batch``, ``time`` and ``vocab`` are ints >= 1.
    """
    for value, name in ((batch, "batch"), (time, "time"), (vocab, "vocab")):
        require_positive_int(value, name)
    logits = torch.empty(batch, time, vocab, device="meta")
    return logits[..., :-1, :].is_contiguous()


def logits_nbytes(batch: int, time: int, vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a ``(batch, time, vocab)`` tensor of ``dtype``.

    ``batch``, ``time`` and ``vocab`` are ints >= 1; ``dtype`` a
    ``torch.dtype``.
    """
    for value, name in ((batch, "batch"), (time, "time"), (vocab, "vocab")):
        require_positive_int(value, name)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype; got {type(dtype).__name__}")
    return batch * time * vocab * torch.empty((), dtype=dtype).element_size()


def tf_shift_and_flatten(logits: Any, labels: Any) -> tuple[Any, Any]:
    """The same steps in TensorFlow: slice, then ``tf.reshape``.

    TensorFlow exposes no strides and no views; ``tf.reshape`` is always
    valid and the runtime decides whether to copy.

    Args:
        logits: ``(B, T, V)`` float ``tf.Tensor`` (or array-like).
        labels: ``(B, T)`` int ``tf.Tensor`` (or array-like).

    Returns:
        ``(flat_logits, flat_labels)`` of shapes ``(B*(T-1), V)`` and ``(B*(T-1),)``.
    """
    import tensorflow as tf

    def as_tensor(value: Any, name: str) -> Any:
        if value is None or isinstance(value, (str, bytes)):
            raise TypeError(f"{name} must be a tf.Tensor or array; got {type(value).__name__}")
        try:
            return tf.convert_to_tensor(value)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{name} must be a tf.Tensor or array; got {type(value).__name__}"
            ) from error

    logits = as_tensor(logits, "logits")
    labels = as_tensor(labels, "labels")
    if logits.shape.rank != 3:
        raise ValueError(f"logits must be a 3-D tensor (B, T, V); got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating:
        raise TypeError(f"logits must have a floating-point dtype; got {logits.dtype.name}")
    if labels.shape.rank != 2:
        raise ValueError(f"labels must be a 2-D tensor (B, T); got shape {tuple(labels.shape)}")
    if not labels.dtype.is_integer:
        raise TypeError(f"labels must hold integer class indices; got {labels.dtype.name}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            "labels must have shape (B, T) matching the first dimensions of logits "
            f"{tuple(logits.shape[:2])}; got shape {tuple(labels.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(
            "logits and labels need T >= 2 positions to form one next-token pair; "
            f"got T={logits.shape[1]}"
        )
    if 0 in tuple(logits.shape):
        raise ValueError(
            "logits (B, T, V) must have no empty dimension (an empty batch or a "
            f"vocabulary of 0 classes); got shape {tuple(logits.shape)}"
        )
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    return tf.reshape(shift_logits, (-1, vocab)), tf.reshape(shift_labels, (-1,))
