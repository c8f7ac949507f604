"""Cross-entropy from its definition, in plain PyTorch.

For ``N`` rows of scores ``x`` over ``C`` classes and targets ``y``::

    log_softmax(x)_c = x_c - log(sum_k exp(x_k))
    l_n  = -w[y_n] * log_softmax(x_n)_{y_n}   (0 if y_n == ignore_index)
    mean = sum_n l_n / sum_n w[y_n]           (over rows not ignored)

which is what ``torch.nn.CrossEntropyLoss`` computes: ``LogSoftmax`` followed
by ``NLLLoss``.  This module writes each step in plain PyTorch so it can be
read, differentiated by hand and compared:

* :func:`log_softmax`, :func:`nll_loss`, :func:`cross_entropy` (with
  ``weight``, ``ignore_index``, ``reduction`` and ``label_smoothing``);
* :func:`cross_entropy_grad`, the analytic gradient
  ``w[y_n] * (softmax(x_n) - onehot(y_n)) / sum w[y]``;
* :func:`flatten_class_axis`, from ``nn.CrossEntropyLoss``'s class-second
  ``(B, C, T)`` layout to flat rows;
* :func:`check_cross_entropy_inputs`, the checks every function here runs;
* :func:`nats_to_bits`, :func:`perplexity`, :func:`bits_per_character` and
  :func:`bits_per_byte`, the units a summed loss is reported in: a
  perplexity depends on the tokenizer, bits per character or byte of the
  same text do not.

The float64 NumPy references these are tested against are in
:mod:`companion.reference`; the textbook formula that overflows, and the
same loss in TensorFlow and Keras side by side, are chapter 3's experiments
(``companion.experiments.cross_entropy``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from companion import IGNORE_INDEX
from companion._checks import (
    require_class_axis,
    require_class_indices,
    require_floating,
    require_ignore_index,
    require_integer,
    require_label_smoothing,
    require_labels_in_range,
    require_leading_dims,
    require_no_empty_dim,
    require_one_of,
    require_positive_int,
    require_rank,
    require_real_number,
    require_tensor,
)

__all__ = [
    "REDUCTIONS",
    "Reduction",
    "bits_per_byte",
    "bits_per_character",
    "check_cross_entropy_inputs",
    "cross_entropy",
    "cross_entropy_grad",
    "flatten_class_axis",
    "log_softmax",
    "nats_to_bits",
    "nll_loss",
    "perplexity",
]

Reduction = Literal["mean", "sum", "none"]
"""The ``reduction`` argument: ``"mean"``, ``"sum"`` or ``"none"``."""

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
"""The accepted values of ``reduction``, as PyTorch's losses take them."""


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


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
    ignore_index = require_ignore_index(ignore_index)
    require_labels_in_range(targets, num_classes, ignore_index, "targets")
    if weight is not None:
        _check_weight(weight, num_classes, scores.dtype)
    require_one_of(reduction, REDUCTIONS, "reduction")
    require_label_smoothing(label_smoothing)
    return num_rows, num_classes


# ---------------------------------------------------------------------------
# From scratch, in PyTorch
# ---------------------------------------------------------------------------


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
    require_class_axis(logits, "logits")
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
    require_one_of(reduction, ("mean", "sum"), "reduction")
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
# Units: nats, bits, perplexity, bits per character and per byte
# ---------------------------------------------------------------------------


def _nats(value: Any, name: str) -> float:
    """``value`` (a real number or a 0-D float tensor) as a float >= 0."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"{name} must be a single number (a 0-D tensor); "
                f"got shape {tuple(value.shape)}"
            )
        require_floating(value, name)
        value = float(value)
    else:
        value = require_real_number(value, name)
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"{name} must be a negative log-likelihood in nats, >= 0 and not "
            f"nan; got {value}"
        )
    return value


def _text_length(text: Any, unit: str) -> int:
    """Characters or UTF-8 bytes of ``text``, a non-empty ``str``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    if not text:
        raise ValueError("text must not be empty (0 characters)")
    return len(text) if unit == "character" else len(text.encode("utf-8"))


def nats_to_bits(nats: Any) -> float:
    """A loss in nats (natural log) in bits (log base 2): ``nats / ln 2``.

    PyTorch, TensorFlow and transformers report nats; information theory
    and compression usually count bits.  One nat is ``1 / ln 2``, about
    1.4427 bits.

    Args:
        nats: a non-negative real number, or a 0-D float tensor (a loss,
            a sum of losses or an entropy).

    Returns:
        ``nats / ln 2`` as a Python float.
    """
    return _nats(nats, "nats") / math.log(2.0)


def perplexity(total_nll: Any, num_targets: Any) -> float:
    """``exp(total_nll / num_targets)``: the perplexity of a text.

    ``total_nll`` is the *summed* ``-log p`` of every scored target (a
    ``reduction="sum"`` loss, added up over all batches) and
    ``num_targets`` their number, so the mean inside is the token mean
    over the whole text, never a mean of batch means.  It is the geometric
    mean of ``1 / p`` over the targets: a model that spreads its
    probability evenly over ``k`` tokens at every step has perplexity
    ``k``.  It counts *tokens*, so it changes with the tokenizer; see
    :func:`bits_per_byte` for a measure that does not.

    Args:
        total_nll: summed negative log-likelihood in nats, ``>= 0`` (a real
            number or a 0-D float tensor).
        num_targets: the number of scored targets it sums over, ``>= 1``.

    Returns:
        The perplexity, a Python float ``>= 1``; ``inf`` when the mean
        exceeds the largest float's log, about 709.78 nats.
    """
    total = _nats(total_nll, "total_nll")
    count = require_positive_int(num_targets, "num_targets")
    try:
        return math.exp(total / count)
    except OverflowError:  # a mean above ~709.78 nats
        return math.inf


def bits_per_character(total_nll: Any, text: Any) -> float:
    """Bits per character: ``total_nll / (len(text) * ln 2)``.

    ``total_nll`` must be the summed ``-log p`` (nats) a model assigns to
    the whole of ``text``, every token of it scored.  Two models with
    different tokenizers split ``text`` into different numbers of tokens,
    so their perplexities are not comparable; their bits per character are.

    Args:
        total_nll: summed negative log-likelihood of ``text`` in nats,
            ``>= 0`` (a real number or a 0-D float tensor).
        text: the non-empty ``str`` it was computed on.

    Returns:
        Bits per Unicode character (code point), a Python float.
    """
    total = _nats(total_nll, "total_nll")
    return total / (_text_length(text, "character") * math.log(2.0))


def bits_per_byte(total_nll: Any, text: Any) -> float:
    """Bits per UTF-8 byte: ``total_nll / (len(text.encode()) * ln 2)``.

    As :func:`bits_per_character`, with the UTF-8 bytes of ``text`` as the
    unit: a character outside ASCII takes 2 to 4 bytes, so the two differ
    unless ``text`` is ASCII.  Bytes are unambiguous where "character" is
    not (Unicode normalisation, combining marks), which is why corpus
    benchmarks report this one.

    Args:
        total_nll: summed negative log-likelihood of ``text`` in nats,
            ``>= 0`` (a real number or a 0-D float tensor).
        text: the non-empty ``str`` it was computed on.

    Returns:
        Bits per byte, a Python float.
    """
    total = _nats(total_nll, "total_nll")
    return total / (_text_length(text, "byte") * math.log(2.0))
