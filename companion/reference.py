"""Slow, obviously-correct float64 NumPy references.

Every fast implementation in the package and every framework call the book
makes is tested against these.  They loop where a loop is clearer than a
vectorised trick, and they compute in float64 whatever the input dtype.
Only :func:`label_smoothed_cross_entropy`, which the book calls on its own,
checks its arguments.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from companion._checks import (
    require_ignore_index,
    require_label_smoothing,
    require_one_of,
    require_rows_and_targets,
)

__all__ = [
    "IGNORE_INDEX",
    "causal_lm_loss",
    "cross_entropy",
    "label_smoothed_cross_entropy",
    "log_softmax",
    "softmax",
]

IGNORE_INDEX = -100
"""Label value the references skip, as PyTorch and transformers do."""


def log_softmax(logits: ArrayLike) -> np.ndarray:
    """Stable log-softmax over the last axis, in float64.

    ``log_softmax(x)_c = x_c - m - log(sum_k exp(x_k - m))`` with ``m = max_k x_k``,
    which never overflows because every exponent is <= 0.
    """
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def softmax(logits: ArrayLike) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    return np.exp(log_softmax(logits))


def _reduce(
    per_row: np.ndarray, denominator: float, reduction: str
) -> np.ndarray | float:
    """``"none"``: the rows; ``"sum"``: their sum; ``"mean"``: sum / denominator."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return float(per_row.sum())
    if reduction == "mean":
        return float(per_row.sum() / denominator) if denominator else float("nan")
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> np.ndarray | float:
    """Cross-entropy with PyTorch's ``nn.CrossEntropyLoss`` semantics, in float64.

    Args:
        logits: ``(N, C)`` scores before softmax.
        targets: ``(N,)`` class indices; ``ignore_index`` rows are skipped.
        weight: optional ``(C,)`` per-class weights.
        ignore_index: target value that contributes nothing.
        reduction: ``"mean"`` (sum of ``w[y_n] * l_n`` over kept rows divided
            by the sum of their ``w[y_n]``), ``"sum"``, or ``"none"``
            (``(N,)``, zeros on ignored rows).

    Returns:
        A float for ``"mean"``/``"sum"`` (``nan`` for ``"mean"`` when every
        row is ignored), else an ``(N,)`` array.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets)
    n_rows, n_classes = x.shape
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    logp = log_softmax(x)
    per_row = np.zeros(n_rows)
    denominator = 0.0
    for n in range(n_rows):
        if y[n] == ignore_index:
            continue
        per_row[n] = -w[y[n]] * logp[n, y[n]]
        denominator += w[y[n]]
    return _reduce(per_row, denominator, reduction)


def causal_lm_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: int | None = None,
) -> float:
    """Next-token loss of a ``(B, T, V)`` batch, position by position.

    Position ``t`` of row ``b`` is scored against ``labels[b, t + 1]``.  The
    result is the sum of ``-log p`` over scored positions divided by
    ``num_items_in_batch`` if given, else by the number of scored positions.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    batch, time, _ = x.shape
    total, count = 0.0, 0
    for b in range(batch):
        logp = log_softmax(x[b])
        for t in range(time - 1):
            target = y[b, t + 1]
            if target == ignore_index:
                continue
            total -= logp[t, target]
            count += 1
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / count if count else float("nan")


def label_smoothed_cross_entropy(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> np.ndarray | float:
    """Slow float64 NumPy reference for cross-entropy with label smoothing.

    Row ``n`` builds its target distribution
    ``q = (1 - eps) * onehot(y_n) + eps / C`` and scores
    ``-sum_c w_c q_c log p_c``; ``"mean"`` divides the sum over kept rows by
    ``sum_n w[y_n]``.  For ``eps = 0`` it equals
    :func:`cross_entropy`.

    Args:
        logits: ``(N, C)`` scores before softmax.
        targets: ``(N,)`` int class indices; ``ignore_index`` rows are skipped.
        weight: optional ``(C,)`` per-class weights.
        ignore_index: target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``, 0 on
            ignored rows).
        label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
        A float (``nan`` for ``"mean"`` when every row is ignored), or an
        ``(N,)`` array.
    """
    x, y = require_rows_and_targets(logits, targets, "logits")
    ignore_index = require_ignore_index(ignore_index)
    require_one_of(reduction, ("mean", "sum", "none"), "reduction")
    eps = require_label_smoothing(label_smoothing)
    n_rows, n_classes = x.shape
    if n_rows == 0 or n_classes == 0:
        raise ValueError(
            "logits must have N >= 1 rows and C >= 1 classes; "
            f"got shape {x.shape}"
        )
    kept = y[y != ignore_index]
    if kept.size and (kept.min() < 0 or kept.max() >= n_classes):
        bad = kept.min() if kept.min() < 0 else kept.max()
        raise ValueError(
            f"targets must lie in [0, {n_classes}) or equal "
            f"ignore_index={ignore_index}; found {bad}"
        )
    w = (
        np.ones(n_classes) if weight is None
        else np.asarray(weight, dtype=np.float64)
    )
    if w.shape != (n_classes,):
        raise ValueError(
            f"weight must have shape (C,) = ({n_classes},); got shape {w.shape}"
        )
    logp = log_softmax(x)
    per_row = np.zeros(n_rows)
    denominator = 0.0
    for n in range(n_rows):
        if y[n] == ignore_index:
            continue
        q = np.full(n_classes, eps / n_classes)
        q[y[n]] += 1.0 - eps
        per_row[n] = -np.sum(w * q * logp[n])
        denominator += w[y[n]]
    return _reduce(per_row, denominator, reduction)
