"""Cross-entropy from its definition, and the same loss in PyTorch,
TensorFlow and Keras.

For ``N`` rows of scores ``x`` over ``C`` classes and targets ``y``::

    log_softmax(x)_c = x_c - log(sum_k exp(x_k))
    l_n  = -w[y_n] * log_softmax(x_n)_{y_n}   (0 if y_n == ignore_index)
    mean = sum_n l_n / sum_n w[y_n]           (over rows not ignored)

which is what ``torch.nn.CrossEntropyLoss`` computes: ``LogSoftmax`` followed
by ``NLLLoss``.  This module writes each step in plain PyTorch so it can be
read, differentiated by hand and compared:

* :func:`log_softmax`, :func:`nll_loss`, :func:`cross_entropy` (with
  ``weight``, ``ignore_index``, ``reduction`` and ``label_smoothing``);
* :func:`naive_log_softmax` / :func:`naive_cross_entropy`, the textbook
  formula that overflows, for contrast;
* :func:`cross_entropy_grad`, the analytic gradient
  ``w[y_n] * (softmax(x_n) - onehot(y_n)) / sum w[y]``;
* :func:`reference_label_smoothed_cross_entropy`, a float64 NumPy reference
  for label smoothing, which :mod:`companion.reference` does not cover;
* :func:`tf_sparse_softmax_cross_entropy` and
  :func:`keras_sparse_categorical_crossentropy`, the TensorFlow and Keras
  calls with the same ignore-index semantics;
* :func:`run_implementation` and :func:`compare_implementations`, which push
  one NumPy input through every implementation (PyTorch, ``tf.nn``, Keras)
  and tabulate the differences from the float64 reference, and
  :func:`format_comparison` to display that table.

TensorFlow and Keras are imported inside the functions that need them, so
importing this module does not start TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike

from companion import IGNORE_INDEX
from companion import reference as _reference
from companion.display import bound
from companion._checks import (
    require_class_indices,
    require_floating,
    require_ignore_index,
    require_integer,
    require_labels_in_range,
    require_leading_dims,
    require_no_empty_dim,
    require_rank,
    require_rows_and_targets,
    require_tensor,
)

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def _check_ignore_index(ignore_index: Any) -> int:
    return require_ignore_index(ignore_index)


def _check_reduction(
    reduction: Any, allowed: tuple[str, ...] = REDUCTIONS
) -> str:
    if reduction not in allowed:
        raise ValueError(
            f"reduction must be one of {allowed}; got {reduction!r}"
        )
    return reduction


def _check_label_smoothing(label_smoothing: Any) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(
        label_smoothing, (int, float)
    ):
        raise TypeError(
            "label_smoothing must be a float in [0, 1]; got "
            f"{type(label_smoothing).__name__}"
        )
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(
            f"label_smoothing must lie in [0, 1]; got {label_smoothing}"
        )
    return float(label_smoothing)


def _check_weight(weight: Any, num_classes: int, dtype: torch.dtype) -> None:
    require_tensor(weight, "weight")
    require_rank(weight, 1, "weight", "(C,)")
    require_floating(weight, "weight")
    if weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must have shape (C,) = ({num_classes},), one weight "
            f"per class of logits; got shape {tuple(weight.shape)}"
        )
    if weight.dtype != dtype:
        raise TypeError(
            f"weight must have the dtype of logits ({dtype}); "
            f"got {weight.dtype}"
        )


def check_cross_entropy_inputs(
    scores: Any,
    targets: Any,
    *,
    scores_name: str = "logits",
    weight: Any = None,
    ignore_index: Any = IGNORE_INDEX,
    reduction: Any = "mean",
    label_smoothing: Any = 0.0,
) -> tuple[int, int]:
    """Validate the arguments of a cross-entropy call and return ``(N, C)``.

    Args:
        scores: ``(N, C)`` float, logits or log-probabilities.
        targets: ``(N,)`` class indices of any integer dtype (``int8`` to
            ``int64``, ``uint8`` to ``uint64``; the losses convert them to
            int64), in ``[0, C)`` or equal to ``ignore_index``.
        scores_name: how ``scores`` is called in error messages.
        weight: ``None`` or ``(C,)`` float of the same dtype as ``scores``.
        ignore_index: int, the target value that is skipped.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: float in ``[0, 1]``.

    Raises:
        TypeError: a non-tensor, non-float ``scores``/``weight``, non-integer
            ``targets``, a ``weight`` whose dtype differs from ``scores``',
            or an ``ignore_index`` that is not an ``int``.
        ValueError: wrong ranks, ``targets`` not of length ``N``, ``N == 0``
            (an empty batch), ``C == 0``, a target outside ``[0, C)`` that
            is not ``ignore_index``, a wrong ``weight`` length, an unknown
            ``reduction`` or a ``label_smoothing`` outside ``[0, 1]``.
    """
    require_tensor(scores, scores_name)
    require_rank(scores, 2, scores_name, "(N, C)")
    require_floating(scores, scores_name)
    require_tensor(targets, "targets")
    require_rank(targets, 1, "targets", "(N,)")
    require_integer(targets, "targets")
    num_rows, num_classes = scores.shape
    require_leading_dims(targets, (num_rows,), "targets", scores_name, "(N,)")
    if num_classes == 0:
        raise ValueError(
            f"{scores_name} must have at least one class (C >= 1); got C=0"
        )
    if num_rows == 0:
        raise ValueError(
            f"{scores_name} must have at least one row (N >= 1), not an "
            "empty batch; got N=0"
        )
    ignore_index = _check_ignore_index(ignore_index)
    require_labels_in_range(targets, num_classes, ignore_index, "targets")
    if weight is not None:
        _check_weight(weight, num_classes, scores.dtype)
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    return num_rows, num_classes


# ---------------------------------------------------------------------------
# From scratch, in PyTorch
# ---------------------------------------------------------------------------


def naive_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log(exp(x) / sum_k exp(x_k))`` evaluated exactly as written.

    Kept for contrast with :func:`log_softmax`.  In float32, ``exp`` overflows
    to ``inf`` once a logit exceeds about 88.72 (then ``inf / inf = nan``), and
    a probability below half the smallest subnormal (``2**-150``, about
    ``7e-46``) rounds to 0, whose log is ``-inf``.

    Args:
        logits: ``(..., C)`` float.

    Returns:
        ``(..., C)`` of ``logits``' dtype; ``nan``/``-inf`` where the
        formula breaks.
    """
    require_tensor(logits, "logits")
    require_floating(logits, "logits")
    if logits.dim() == 0:
        raise ValueError(
            "logits must have a class axis (shape (..., C)); got a 0-D tensor"
        )
    if logits.size(-1) == 0:
        raise ValueError(
            "logits must have at least one class (shape (..., C), C >= 1); "
            f"got shape {tuple(logits.shape)}"
        )
    exps = torch.exp(logits)
    return torch.log(exps / exps.sum(dim=-1, keepdim=True))


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Stable log-softmax over the last axis.

    Computes ``x - m - log(sum_k exp(x_k - m))``.  ``m`` is the row maximum,
    so every exponent is ``<= 0`` and ``exp`` cannot overflow; the largest
    term is ``exp(0) = 1``, so the sum is ``>= 1`` and its log cannot be
    ``-inf``.

    Args:
        logits: ``(..., C)`` float.

    Returns:
        ``(..., C)`` log-probabilities, same dtype as ``logits``.
    """
    require_tensor(logits, "logits")
    require_floating(logits, "logits")
    if logits.dim() == 0:
        raise ValueError(
            "logits must have a class axis (shape (..., C)); got a 0-D tensor"
        )
    if logits.size(-1) == 0:
        raise ValueError(
            "logits must have at least one class (shape (..., C), C >= 1); "
            f"got shape {tuple(logits.shape)}"
        )
    # The shift cancels exactly in the formula; detaching it keeps a rounding
    # residue of that cancellation out of the gradient.
    shift = logits.detach().amax(dim=-1, keepdim=True)
    shifted = logits - shift
    return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))


def _kept_rows(
    targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, safe_targets)``: which rows count, and usable indices.

    Ignored rows get the placeholder class 0 so that ``gather`` and indexing
    work; every quantity taken from a placeholder is multiplied or masked away.
    """
    kept = targets != ignore_index
    safe_targets = torch.where(kept, targets, torch.zeros_like(targets))
    return kept, safe_targets


def _row_weights(
    safe_targets: torch.Tensor,
    kept: torch.Tensor,
    weight: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``w[y_n]`` for kept rows, 0 for ignored ones: ``(N,)`` of ``dtype``."""
    if weight is None:
        return kept.to(dtype)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(kept, weight[safe_targets], zero)


def _reduce(
    per_row: torch.Tensor, row_weights: torch.Tensor, reduction: str
) -> torch.Tensor:
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    # 0 / 0 = nan when every row is ignored, exactly as PyTorch reports it.
    return per_row.sum() / row_weights.sum()


def nll_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Negative log-likelihood of the targets, with ``nn.NLLLoss`` semantics.

    Args:
        log_probs: ``(N, C)`` float log-probabilities (e.g.
            :func:`log_softmax`).
        targets: ``(N,)`` int, ``ignore_index`` = skipped.
        weight: optional ``(C,)`` float per-class weights (same dtype).
        ignore_index: target value that contributes nothing.
        reduction: ``"none"`` -> ``(N,)`` with ``-w[y_n] * log_probs[n, y_n]``
            and 0 on ignored rows; ``"sum"`` -> their sum; ``"mean"`` -> their
            sum divided by ``sum_n w[y_n]`` over kept rows (``nan`` if none).

    Returns:
        A 0-D tensor, or ``(N,)`` for ``reduction="none"``; dtype of
        ``log_probs``.
    """
    check_cross_entropy_inputs(
        log_probs, targets, scores_name="log_probs", weight=weight,
        ignore_index=ignore_index, reduction=reduction,
    )
    targets = require_class_indices(targets, "targets")
    kept, safe_targets = _kept_rows(targets, ignore_index)
    row_weights = _row_weights(safe_targets, kept, weight, log_probs.dtype)
    picked = log_probs.gather(1, safe_targets.unsqueeze(1)).squeeze(1)
    # where(), not a product with 0: a placeholder log-probability may be -inf.
    per_row = torch.where(
        kept, -picked * row_weights, torch.zeros_like(picked)
    )
    return _reduce(per_row, row_weights, reduction)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy from scratch, with ``nn.CrossEntropyLoss`` semantics.

    Row ``n`` scores ``-sum_c w_c q_{n,c} log p_{n,c}`` with the target
    distribution ``q_n = (1 - eps) * onehot(y_n) + eps / C``; for
    ``eps = 0`` this is ``-w[y_n] log p_{n, y_n}``, i.e. :func:`nll_loss`
    of :func:`log_softmax`.
    ``"mean"`` divides by ``sum_n w[y_n]`` over kept rows, with or without
    smoothing, as PyTorch does.

    Args:
        logits: ``(N, C)`` float scores before softmax.
        targets: ``(N,)`` int, ``ignore_index`` = skipped.
        weight: optional ``(C,)`` float per-class weights (same dtype).
        ignore_index: target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(N,)``, 0 on
            ignored rows).
        label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
        A 0-D tensor, or ``(N,)`` for ``reduction="none"``; dtype of
        ``logits``.
    """
    num_rows, num_classes = check_cross_entropy_inputs(
        logits, targets, weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing,
    )
    targets = require_class_indices(targets, "targets")
    log_probs = log_softmax(logits)
    if label_smoothing == 0:
        return nll_loss(
            log_probs, targets, weight=weight, ignore_index=ignore_index,
            reduction=reduction,
        )
    kept, safe_targets = _kept_rows(targets, ignore_index)
    row_weights = _row_weights(safe_targets, kept, weight, logits.dtype)
    nll = nll_loss(
        log_probs, targets, weight=weight, ignore_index=ignore_index,
        reduction="none",
    )
    class_weights = (
        log_probs.new_ones(num_classes) if weight is None else weight
    )
    uniform_part = -(log_probs * class_weights).sum(dim=1)
    uniform_part = torch.where(
        kept, uniform_part, torch.zeros_like(uniform_part)
    )
    eps = float(label_smoothing)
    per_row = (1.0 - eps) * nll + (eps / num_classes) * uniform_part
    return _reduce(per_row, row_weights, reduction)


def naive_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """:func:`nll_loss` of :func:`naive_log_softmax`.

    Right in exact arithmetic, fragile in floating point.

    Args:
        logits: ``(N, C)`` float.
        targets: ``(N,)`` int, ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Like :func:`cross_entropy`, with ``inf``/``nan`` where ``exp``
        over- or underflows.
    """
    check_cross_entropy_inputs(
        logits, targets, ignore_index=ignore_index, reduction=reduction
    )
    return nll_loss(
        naive_log_softmax(logits), targets, ignore_index=ignore_index,
        reduction=reduction,
    )


def naive_versus_stable_by_scale(
    scales: ArrayLike, *, dtype: torch.dtype = torch.float32
) -> dict[str, np.ndarray]:
    """Mean loss of a two-row batch at growing logit scale, naive and stable.

    Both rows hold the logits ``s * [1, 0, -1]``; row 0 targets the top class
    (0), row 1 the bottom class (2).  The exact mean is
    ``s + log(1 + exp(-s) + exp(-2s))``.  In float32 the naive formula gives
    ``inf`` once row 1's probability, about ``exp(-2s)``, rounds to 0 (``s``
    above ``75 ln 2``, about 51.99) and
    ``nan`` once ``exp(s)`` overflows (``s`` above about 88.72), which turns
    row 0's probability into ``inf / inf``.

    Args:
        scales: ``(S,)`` values of ``s``.
        dtype: floating dtype to compute in.

    Returns:
        ``{"scale": (S,), "naive": (S,), "stable": (S,)}``, float64 arrays.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a floating-point torch dtype; got "
            f"{type(dtype).__name__}"
        )
    s = np.asarray(scales, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(
            f"scales must be a 1-D array (S,); got shape {s.shape}"
        )
    if not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating-point torch dtype; got {dtype}"
        )
    row = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    naive, stable = [], []
    for scale in s:
        logits = (scale * row).expand(2, 3).to(dtype)
        naive.append(naive_cross_entropy(logits, targets).item())
        stable.append(cross_entropy(logits, targets).item())
    return {"scale": s, "naive": np.array(naive), "stable": np.array(stable)}


def cross_entropy_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Literal["mean", "sum"] = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The analytic gradient of :func:`cross_entropy` w.r.t. ``logits``.

    With ``p_n = softmax(x_n)``, ``a_n = w[y_n]`` on kept rows and 0 on ignored
    ones, and ``eps`` the label smoothing::

        row n = (1 - eps) * a_n * (p_n - onehot(y_n))
                + [n kept] * (eps / C) * (sum_c w_c * p_n - w)

    which is ``a_n * (p_n - onehot(y_n))`` without smoothing and
    ``p_n - q_n`` without weights.  ``"mean"`` divides by ``sum_n a_n``;
    when every row is ignored the gradient is all zeros (PyTorch's choice:
    the loss is ``nan`` but its gradient is not).

    Args:
        logits: ``(N, C)`` float.
        targets: ``(N,)`` int, ``ignore_index`` = skipped.
        weight: optional ``(C,)`` float per-class weights (same dtype).
        ignore_index: target value that contributes nothing.
        reduction: ``"mean"`` or ``"sum"`` (the loss must be a scalar).
        label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
        ``(N, C)``, dtype of ``logits``; ignored rows are exactly 0.
    """
    num_rows, num_classes = check_cross_entropy_inputs(
        logits, targets, weight=weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing,
    )
    _check_reduction(reduction, ("mean", "sum"))
    targets = require_class_indices(targets, "targets")
    logits = logits.detach()
    probs = torch.exp(log_softmax(logits))
    kept, safe_targets = _kept_rows(targets, ignore_index)
    row_weights = _row_weights(safe_targets, kept, weight, logits.dtype)
    onehot = torch.nn.functional.one_hot(safe_targets, num_classes)
    onehot = onehot.to(logits.dtype)
    eps = float(label_smoothing)
    grad = (1.0 - eps) * row_weights.unsqueeze(1) * (probs - onehot)
    if eps > 0:
        class_weights = (
            logits.new_ones(num_classes) if weight is None else weight
        )
        total_weight = class_weights.sum()
        smooth = (eps / num_classes) * (
            total_weight * probs - class_weights.unsqueeze(0)
        )
        grad = grad + kept.unsqueeze(1).to(logits.dtype) * smooth
    # where(), not a product with 0: keeps ignored rows exactly +0.0.
    grad = torch.where(kept.unsqueeze(1), grad, torch.zeros_like(grad))
    if reduction == "mean":
        denominator = row_weights.sum()
        if denominator == 0:
            return torch.zeros_like(grad)
        grad = grad / denominator
    return grad


def flatten_class_axis(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn PyTorch's class-second layout into the flat one.

    ``nn.CrossEntropyLoss`` takes ``(B, C, T)`` logits with ``(B, T)`` targets
    (the class axis is dimension 1).  This returns the equivalent
    ``(B*T, C)`` logits and ``(B*T,)`` targets, rows in ``(b, t)`` order.

    Args:
        logits: ``(B, C, T)`` float, no empty dimension.
        targets: ``(B, T)`` of any integer dtype.

    Returns:
        ``(flat_logits, flat_targets)`` of shapes ``(B*T, C)`` and ``(B*T,)``;
        ``flat_targets`` is int64, ready for any cross-entropy.
    """
    require_tensor(logits, "logits")
    require_rank(logits, 3, "logits", "(B, C, T)")
    require_floating(logits, "logits")
    require_tensor(targets, "targets")
    require_rank(targets, 2, "targets", "(B, T)")
    require_integer(targets, "targets")
    batch, num_classes, time = logits.shape
    if tuple(targets.shape) != (batch, time):
        raise ValueError(
            f"targets must have shape (B, T) = {(batch, time)} to match "
            f"logits (B, C, T) {tuple(logits.shape)}; "
            f"got shape {tuple(targets.shape)}"
        )
    require_no_empty_dim(logits, "logits", "(B, C, T)")
    flat_logits = logits.permute(0, 2, 1).reshape(-1, num_classes)
    return flat_logits, targets.reshape(-1).long()


# ---------------------------------------------------------------------------
# Float64 reference for label smoothing
# ---------------------------------------------------------------------------


def reference_label_smoothed_cross_entropy(
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
    :func:`companion.reference.cross_entropy`.

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
    ignore_index = _check_ignore_index(ignore_index)
    _check_reduction(reduction)
    eps = _check_label_smoothing(label_smoothing)
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
    logp = _reference.log_softmax(x)
    per_row = np.zeros(n_rows)
    denominator = 0.0
    for n in range(n_rows):
        if y[n] == ignore_index:
            continue
        q = np.full(n_classes, eps / n_classes)
        q[y[n]] += 1.0 - eps
        per_row[n] = -np.sum(w * q * logp[n])
        denominator += w[y[n]]
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return float(per_row.sum())
    return float(per_row.sum() / denominator) if denominator else float("nan")


# ---------------------------------------------------------------------------
# The same input through every implementation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImplementationResult:
    """One implementation's answer on one input.

    Attributes:
        name: the implementation's key in :data:`IMPLEMENTATIONS`.
        per_row: ``(N,)`` float64 per-row losses, 0 on ignored rows.
        mean: the implementation's own mean over kept rows, as a float.
    """

    name: str
    per_row: np.ndarray
    mean: float


def _check_numpy_inputs(
    logits: Any, targets: Any, ignore_index: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Validate NumPy inputs with the tensor checks, before any framework."""
    if not isinstance(logits, np.ndarray):
        raise TypeError(
            "logits must be a numpy.ndarray (N, C); got "
            f"{type(logits).__name__}"
        )
    if not isinstance(targets, np.ndarray):
        raise TypeError(
            "targets must be a numpy.ndarray (N,); got "
            f"{type(targets).__name__}"
        )
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"logits must be float32 or float64; got {logits.dtype}"
        )
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(
            f"targets must hold integer class indices; got {targets.dtype}"
        )
    # Private writable copies: torch.from_numpy warns on read-only arrays.
    logits, targets = np.array(logits), targets.astype(np.int64)
    check_cross_entropy_inputs(
        torch.from_numpy(logits), torch.from_numpy(targets),
        ignore_index=ignore_index,
    )
    return logits, targets


def _torch_from_scratch(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    x, y = torch.from_numpy(logits), torch.from_numpy(targets)
    per_row = cross_entropy(
        x, y, ignore_index=ignore_index, reduction="none"
    )
    return per_row, cross_entropy(x, y, ignore_index=ignore_index)


def _torch_naive(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    x, y = torch.from_numpy(logits), torch.from_numpy(targets)
    per_row = naive_cross_entropy(
        x, y, ignore_index=ignore_index, reduction="none"
    )
    return per_row, naive_cross_entropy(x, y, ignore_index=ignore_index)


def _torch_cross_entropy_loss(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    x, y = torch.from_numpy(logits), torch.from_numpy(targets)
    per_row = torch.nn.CrossEntropyLoss(
        ignore_index=ignore_index, reduction="none"
    )(x, y)
    mean = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)(x, y)
    return per_row, mean


def _torch_nll_of_log_softmax(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    x, y = torch.from_numpy(logits), torch.from_numpy(targets)
    log_probs = torch.nn.LogSoftmax(dim=1)(x)
    per_row = torch.nn.NLLLoss(
        ignore_index=ignore_index, reduction="none"
    )(log_probs, y)
    mean = torch.nn.NLLLoss(ignore_index=ignore_index)(log_probs, y)
    return per_row, mean


def tf_sparse_softmax_cross_entropy(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Any, Any]:
    """``tf.nn.sparse_softmax_cross_entropy_with_logits`` with an ignore
    index added.

    ``tf.nn`` has neither an ignore index nor a reduction, and on CPU it
    raises for a label outside ``[0, C)``: ignored rows get class 0, and
    their losses are then replaced by 0 and left out of the count.

    Args:
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``.
        targets: ``(N,)`` integer ``numpy.ndarray``,
            ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.

    Returns:
        ``(per_row, mean)`` as ``tf.Tensor``: ``(N,)`` losses (0 on ignored
        rows) and their sum over the number of kept rows (``nan`` if none).
    """
    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    import tensorflow as tf

    kept = tf.not_equal(targets, ignore_index)
    safe_targets = tf.where(kept, targets, tf.zeros_like(targets))
    per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=safe_targets, logits=logits
    )
    per_row = tf.where(kept, per_row, tf.zeros_like(per_row))
    kept_count = tf.reduce_sum(tf.cast(kept, per_row.dtype))
    return per_row, tf.reduce_sum(per_row) / kept_count


def keras_sparse_categorical_crossentropy(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    from_logits: bool,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Any, Any]:
    """``keras.losses.SparseCategoricalCrossentropy`` on logits or on
    their softmax.

    With ``from_logits=False`` the loss receives ``tf.nn.softmax(logits)``:
    unlike ``keras.ops.softmax``, it leaves no logits behind for Keras to
    recover, so the probability path (with its clipping) is what runs.

    Args:
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``; the loss
            object computes in this dtype.
        targets: ``(N,)`` integer ``numpy.ndarray``, ``ignore_index`` = skipped
            (passed as ``ignore_class``).
        from_logits: give Keras the logits (``True``) or probabilities
            (``False``).
        ignore_index: target value that contributes nothing.

    Returns:
        ``(per_row, mean)`` as ``tf.Tensor``: ``reduction="none"`` (0 on
        ignored rows) and the default ``"sum_over_batch_size"`` reduction.
    """
    if not isinstance(from_logits, bool):
        raise TypeError(
            f"from_logits must be a bool; got {type(from_logits).__name__}"
        )
    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    import keras
    import tensorflow as tf

    y_pred = logits if from_logits else tf.nn.softmax(logits)
    options = dict(
        from_logits=from_logits, ignore_class=ignore_index,
        dtype=logits.dtype.name,
    )
    scce = keras.losses.SparseCategoricalCrossentropy
    per_row = scce(reduction="none", **options)(targets, y_pred)
    mean = scce(**options)(targets, y_pred)
    return per_row, mean


def _tf_sparse_softmax(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    return tf_sparse_softmax_cross_entropy(
        logits, targets, ignore_index=ignore_index
    )


def _keras_from_logits(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    return keras_sparse_categorical_crossentropy(
        logits, targets, from_logits=True, ignore_index=ignore_index
    )


def _keras_from_probs(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    return keras_sparse_categorical_crossentropy(
        logits, targets, from_logits=False, ignore_index=ignore_index
    )


_Implementation = Callable[[np.ndarray, np.ndarray, int], tuple[Any, Any]]

IMPLEMENTATIONS: dict[str, _Implementation] = {
    "companion cross_entropy": _torch_from_scratch,
    "torch CrossEntropyLoss": _torch_cross_entropy_loss,
    "torch NLLLoss(LogSoftmax)": _torch_nll_of_log_softmax,
    "tf.nn sparse_softmax_ce + mask": _tf_sparse_softmax,
    "keras SCCE from_logits=True": _keras_from_logits,
    "keras SCCE from_logits=False": _keras_from_probs,
    "naive log(softmax)": _torch_naive,
}
"""Every implementation :func:`compare_implementations` runs, by name.

Each takes ``(logits (N, C) float32|float64, targets (N,) int64,
ignore_index)`` and returns ``(per_row, mean)`` in its own framework's
tensor type.  The Keras entries pass ``ignore_class=ignore_index``;
``from_logits=False`` receives ``tf.nn.softmax(logits)``.
"""


def _to_float64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def run_implementation(
    name: str,
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> ImplementationResult:
    """Run one implementation of :data:`IMPLEMENTATIONS` on NumPy inputs.

    Args:
        name: a key of :data:`IMPLEMENTATIONS`.
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``; every
            implementation computes in this dtype.
        targets: ``(N,)`` integer ``numpy.ndarray``,
            ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.

    Returns:
        The :class:`ImplementationResult`, converted to float64 NumPy.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"name must be one of {tuple(IMPLEMENTATIONS)}; got {name!r}"
        )
    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    per_row, mean = IMPLEMENTATIONS[name](logits, targets, ignore_index)
    return ImplementationResult(
        name=name, per_row=_to_float64(per_row),
        mean=float(_to_float64(mean)),
    )


def compare_implementations(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = IGNORE_INDEX,
    names: tuple[str, ...] | None = None,
) -> Any:
    """One input through every implementation, against the float64 reference.

    Args:
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``.
        targets: ``(N,)`` integer ``numpy.ndarray``,
            ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.
        names: which implementations (default: all of :data:`IMPLEMENTATIONS`).

    Returns:
        A ``pandas.DataFrame`` indexed by implementation, first row
        ``"reference (NumPy float64)"``, with columns ``dtype``, ``mean loss``,
        ``|mean - ref|`` and ``max |row - ref|`` (the largest per-row
        difference).  ``inf``/``nan`` propagate, so a broken implementation
        shows as such.
    """
    import pandas as pd

    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    selected = tuple(IMPLEMENTATIONS) if names is None else names
    ref_rows = np.asarray(_reference.cross_entropy(
        logits, targets, ignore_index=ignore_index, reduction="none"
    ))
    ref_mean = float(_reference.cross_entropy(
        logits, targets, ignore_index=ignore_index
    ))
    records = [
        {"implementation": "reference (NumPy float64)", "dtype": "float64",
         "mean loss": ref_mean, "|mean - ref|": 0.0, "max |row - ref|": 0.0}
    ]
    for name in selected:
        result = run_implementation(
            name, logits, targets, ignore_index=ignore_index
        )
        row_errors = np.abs(result.per_row - ref_rows)
        records.append(
            {"implementation": name, "dtype": logits.dtype.name,
             "mean loss": result.mean,
             "|mean - ref|": abs(result.mean - ref_mean),
             # np.max propagates nan, so a nan row shows as nan;
             # initial covers N = 0.
             "max |row - ref|": float(np.max(row_errors, initial=0.0))}
        )
    return pd.DataFrame.from_records(records).set_index("implementation")


def format_comparison(table: Any, threshold: float = 1e-4) -> Any:
    """:func:`compare_implementations`' table with display-stable strings.

    Args:
        table: the ``pandas.DataFrame`` that
            :func:`compare_implementations` returns.
        threshold: differences below it are shown as the bound
            ``"< 1e-4"`` (:func:`companion.display.bound`), the same on
            every machine; float32 rows differ from the float64 reference
            by rounding noise far below the default.

    Returns:
        A copy whose ``mean loss`` has 5 significant digits and whose
        difference columns go through :func:`companion.display.bound`.
    """
    shown = table.copy()
    shown["mean loss"] = [f"{v:.5g}" for v in table["mean loss"]]
    for column in ("|mean - ref|", "max |row - ref|"):
        shown[column] = [bound(v, threshold) for v in table[column]]
    return shown
