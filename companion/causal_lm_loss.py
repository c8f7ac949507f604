"""The next-token loss of a causal language model, and the count it divides by.

Every loss here pairs the logits at position ``t`` with the label at
``t + 1`` and averages ``-log softmax`` over the pairs whose label is not
``ignore_index``:

* :func:`shift_and_slice_loss`: drop the last logit row and the first label,
  flatten, cross-entropy.  This is how LLaVA's code read when no
  ``attention_mask`` was involved.
* :func:`label_padding_loss`: keep every logit row, append one
  ``ignore_index`` to each row of labels and shift the labels only
  (:func:`shift_labels_with_padding`).  This is ``ForCausalLMLoss`` of
  transformers 5.
* :func:`attention_mask_filter_loss`: before the flattening, keep only the
  pairs whose *target* position has ``attention_mask != 0``.  This is what
  LLaVA did up to transformers 4.51 when an ``attention_mask`` was passed,
  with the crop of 4.46.0-4.51.3 (``attention_mask[:, -(T - 1):]``);
  4.45 cropped with ``attention_mask[..., 1:]``, the same columns for a
  mask of length ``T >= 2``.

The first two give the same number for every input, and both take
``num_items_in_batch``: given, the summed loss is divided by it instead of
by the pairs of this batch, so that micro-batches can share one
denominator (see :mod:`companion.accumulation`).  The third agrees with
them exactly when every padded target position is already
``ignore_index``.  :func:`count_scored_targets` is the one rule for that
denominator: the targets of a batch, ``labels[:, 1:] != ignore_index``.
:func:`token_losses` gives the loss of every pair, and
:func:`unshifted_token_loss` the loss of an encoder-decoder model, whose
logits are already aligned with its labels.

Rules shared by every loss here and by the chunked formulations of
:mod:`companion.chunked_loss`:

* ``labels`` may have any integer dtype (``int8`` to ``int64``, ``uint8`` to
  ``uint64``) and is converted to ``int64`` first; ``bool``, float and
  complex labels raise ``TypeError``;
* half-precision logits (``float16``, ``bfloat16``) are upcast to float32
  before the reduction, as transformers' ``ForCausalLMLoss`` does, so the
  loss is float32; float32 and float64 logits keep their dtype;
* ``T = 1`` is valid and has no next-token pair: the mean over no pair is
  ``nan`` (with a zero gradient), as PyTorch and transformers report it,
  and ``sum / num_items_in_batch`` is 0;
* an empty batch (``B = 0``) or vocabulary (``V = 0``) raises ``ValueError``;
* ``num_items_in_batch`` is ``None``, an ``int >= 1`` or a 0-D integer
  tensor ``>= 1`` (see ``companion._checks.require_num_items``).
"""

from __future__ import annotations

import torch
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_class_indices,
    require_ignore_index,
    require_integer,
    require_labels_in_range,
    require_leading_dims,
    require_num_items,
    require_rank,
    require_tensor,
)
from companion.shapes import check_logits_and_labels, flatten_for_cross_entropy

__all__ = [
    "HALF_DTYPES",
    "NumItems",
    "attention_mask_filter_loss",
    "count_scored_targets",
    "label_padding_loss",
    "shift_and_slice_loss",
    "shift_labels_with_padding",
    "token_losses",
    "unshifted_token_loss",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""Logit dtypes every loss here upcasts to float32 before reducing."""

NumItems = int | torch.Tensor | None
"""``num_items_in_batch``: ``None``, an ``int >= 1`` or a 0-D integer tensor."""


def _check_loss_inputs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Validate a ``(B, T, V)`` / ``(B, T)`` pair; return ``labels`` as int64.

    ``T = 1`` passes: a sequence of one token has no next-token pair, and
    each loss then returns the mean over no pair, ``nan``.
    """
    require_ignore_index(ignore_index)
    _, _, vocab = check_logits_and_labels(logits, labels, min_time=1)
    labels = require_class_indices(labels, "labels")
    require_labels_in_range(labels, vocab, ignore_index, "labels")
    return labels


def _check_num_items(num_items_in_batch: NumItems) -> NumItems:
    """Accept ``None``, an ``int >= 1`` or a 0-D integer tensor holding one."""
    return require_num_items(num_items_in_batch, "num_items_in_batch")


def _upcast_half(logits: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 logits as float32; other dtypes unchanged."""
    return logits.float() if logits.dtype in HALF_DTYPES else logits


def _reduce(
    flat_logits: torch.Tensor,
    flat_labels: torch.Tensor,
    num_items_in_batch: NumItems,
    ignore_index: int,
) -> torch.Tensor:
    """Cross-entropy of ``(N, V)`` rows against ``(N,)`` targets, reduced.

    The mean over kept rows, or, with ``num_items_in_batch``, their sum
    divided by it: transformers' ``fixed_cross_entropy``.
    """
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(
            flat_logits, flat_labels, ignore_index=ignore_index
        )
    total = nn.functional.cross_entropy(
        flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum"
    )
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _aligned_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``logits[b, t]`` ``(B, T, V)`` against ``targets[b, t]``.

    ``reduction="none"`` gives ``(B*T,)``, 0 where the target is ignored.
    """
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        reduction=reduction,
    )


def count_scored_targets(
    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> int:
    """Number of next-token targets that enter the loss.

    Args:
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` = ignored.
        ignore_index: label value that is skipped (an ``int``).

    Returns:
        The count of ``labels[:, 1:] != ignore_index``: label ``0`` of a row
        is never a target, because no position precedes it.  This matches
        the ``num_items_in_batch`` rule of the pinned transformers 5.23
        ``Trainer`` for models whose loss maps to ``ForCausalLMLoss``
        (``batch["labels"][..., 1:]``); 4.46.0 counted the same columns, but
        4.51.3 and 4.52.1 counted ``labels.ne(-100)`` over all columns, one
        more per row whose first label is not ignored.
    """
    ignore_index = require_ignore_index(ignore_index)
    require_tensor(labels, "labels")
    require_rank(labels, 2, "labels", "(B, T)")
    labels = require_class_indices(labels, "labels")
    return int((labels[:, 1:] != ignore_index).sum())


def shift_labels_with_padding(
    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The targets ``ForCausalLMLoss`` scores: labels padded, shifted left.

    Position ``t`` is scored against ``labels[:, t + 1]``; the last position
    has no next token, so it gets ``ignore_index``.

    Args:
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` = ignored.
        ignore_index: the value padded in, an ``int``.

    Returns:
        ``(B, T)`` int64.
    """
    ignore_index = require_ignore_index(ignore_index)
    require_tensor(labels, "labels")
    require_rank(labels, 2, "labels", "(B, T)")
    require_integer(labels, "labels")
    padded = nn.functional.pad(labels.long(), (0, 1), value=ignore_index)
    return padded[:, 1:].contiguous()


def shift_and_slice_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss as LLaVA's source wrote it: slice, flatten, cross-entropy.

    Args:
        logits: ``(B, T, V)`` float, scores before softmax.  Half precision
            is upcast to float32 (LLaVA's own code reduced in half
            precision; every loss of the package follows transformers).
        labels: ``(B, T)`` of any integer dtype, in ``[0, V)``,
            ``ignore_index`` (default ``-100``) = ignored.
        num_items_in_batch: ``None`` for the mean over kept pairs; else an
            ``int >= 1`` or a 0-D integer tensor ``>= 1``: the summed loss
            is divided by it, as in :func:`label_padding_loss`.
        ignore_index: label value that contributes nothing (an ``int``).

    Returns:
        0-D tensor, float32 for half-precision ``logits``, else of
        ``logits``' dtype: the mean of ``-log p(labels[b, t+1])`` over the
        ``B*(T-1)`` pairs whose label is kept (``nan`` if none is; for
        ``T = 1`` there is no pair at all), or the sum divided by
        ``num_items_in_batch``.
    """
    labels = _check_loss_inputs(logits, labels, ignore_index)
    num_items_in_batch = _check_num_items(num_items_in_batch)
    logits = _upcast_half(logits)
    if logits.size(1) == 1:
        # No pair: cross_entropy of zero rows, as the slices of a T = 1
        # batch give in PyTorch and transformers (its gradient is 0).
        flat_logits = logits[:, :0].reshape(0, logits.size(-1))
        flat_labels = labels.new_zeros(0).to(logits.device)
    else:
        flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    return _reduce(flat_logits, flat_labels, num_items_in_batch, ignore_index)


def label_padding_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss as ``ForCausalLMLoss`` computes it: pad and shift the labels.

    Appending one ``ignore_index`` to every row of ``labels`` and dropping the
    first column gives ``(B, T)`` targets aligned with all ``T`` logit rows
    (:func:`shift_labels_with_padding`); the last row of each sequence meets
    the appended ``ignore_index`` and contributes nothing, exactly as if it
    had been sliced away.

    Args:
        logits: ``(B, T, V)`` float.  Half precision is upcast to float32
            as transformers does; float64 stays float64 (transformers'
            ``.float()`` casts every dtype to float32, float64 included).
        labels: ``(B, T)`` of any integer dtype, in ``[0, V)``,
            ``ignore_index`` = ignored.
        num_items_in_batch: ``None`` for the mean over kept pairs; else an
            ``int >= 1`` or a 0-D integer tensor ``>= 1`` (floats are
            rejected): the summed loss is divided by it, so micro-batches
            can share one denominator.
        ignore_index: label value that contributes nothing (an ``int``).

    Returns:
        0-D float tensor: ``sum / num_items_in_batch``, or the mean over kept
        pairs (``nan`` when no pair is kept, e.g. for ``T = 1``).
    """
    labels = _check_loss_inputs(logits, labels, ignore_index)
    num_items_in_batch = _check_num_items(num_items_in_batch)
    logits = _upcast_half(logits)
    shift_labels = shift_labels_with_padding(labels, ignore_index)
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_labels = shift_labels.view(-1).to(flat_logits.device)
    return _reduce(flat_logits, flat_labels, num_items_in_batch, ignore_index)


def token_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Next-token loss of every pair, ``0`` where the target is ignored.

    Args:
        logits: ``(B, T, V)`` float; half precision is upcast to float32.
        labels: ``(B, T)`` of any integer dtype, in ``[0, V)``,
            ``ignore_index`` = ignored.
        ignore_index: label value that contributes nothing (an ``int``).

    Returns:
        ``(B, T-1)`` in the loss's dtype: entry ``[b, t]`` is
        ``-log p(labels[b, t+1] | tokens <= t)``.  Its sum is
        :func:`label_padding_loss` times :func:`count_scored_targets`.
    """
    labels = _check_loss_inputs(logits, labels, ignore_index)
    shift_labels = shift_labels_with_padding(labels, ignore_index)
    per_position = _aligned_cross_entropy(
        _upcast_half(logits), shift_labels, ignore_index, reduction="none"
    )
    return per_position.view(labels.shape)[:, :-1].contiguous()


def _check_attention_mask(
    attention_mask: torch.Tensor, batch: int, time: int
) -> None:
    """``attention_mask``: a ``(B, T')`` int or bool tensor, ``T' >= T - 1``."""
    require_tensor(attention_mask, "attention_mask")
    require_rank(attention_mask, 2, "attention_mask", "(B, T')")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(
            "attention_mask must hold integers or booleans (0 = padding); "
            f"got {attention_mask.dtype}"
        )
    require_leading_dims(
        attention_mask, (batch,), "attention_mask", "logits", "(B, T')"
    )
    if attention_mask.shape[1] < time - 1:
        raise ValueError(
            f"attention_mask must have at least T-1={time - 1} columns "
            f"(B, T'); got shape {tuple(attention_mask.shape)}"
        )


def attention_mask_filter_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """LLaVA's loss up to transformers 4.51: keep pairs with attended targets.

    The mask is cropped to its last ``T - 1`` columns, which line up with the
    *targets* ``labels[:, 1:]`` (for a mask of length ``T``: columns
    ``1 .. T-1``).  This is the crop of 4.46.0-4.51.3,
    ``attention_mask[:, -(logits.shape[1] - 1):]``, which also accepts a
    longer mask (prefix tuning); 4.45's ``attention_mask[..., 1:]`` keeps the
    same columns for a mask of length ``T >= 2`` and fails on a longer one.  Pairs where that column is ``0`` are removed before the
    mean, whatever their label; with ``attention_mask=None`` this is
    :func:`shift_and_slice_loss`.

    Args:
        logits: ``(B, T, V)`` float; half precision is upcast to float32.
        labels: ``(B, T)`` of any integer dtype, in ``[0, V)``,
            ``ignore_index`` = ignored.
        attention_mask: ``(B, T')`` int or bool with ``T' >= T - 1``,
            ``0`` = padding; or ``None``.
        ignore_index: label value that contributes nothing (an ``int``).

    Returns:
        0-D tensor (float32 for half-precision ``logits``): the mean over
        pairs that are attended *and* not ignored; ``nan`` when there are
        none (always for ``T = 1``).
    """
    labels = _check_loss_inputs(logits, labels, ignore_index)
    if attention_mask is None:
        return shift_and_slice_loss(logits, labels, ignore_index=ignore_index)
    batch, time, vocab = logits.shape
    _check_attention_mask(attention_mask, batch, time)
    logits = _upcast_half(logits)
    # the last T - 1 columns; not [:, -(T - 1):], which keeps all for T = 1
    first_target = attention_mask.shape[1] - (time - 1)
    target_mask = attention_mask[:, first_target:].to(logits.device) != 0
    kept_logits = logits[..., :-1, :][target_mask].contiguous()
    kept_labels = labels[..., 1:][target_mask.to(labels.device)].contiguous()
    loss = nn.CrossEntropyLoss(ignore_index=ignore_index)
    return loss(
        kept_logits.view(-1, vocab),
        kept_labels.view(-1).to(kept_logits.device),
    )


def unshifted_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cross-entropy of ``logits[b, t]`` against ``labels[b, t]``, no shift.

    An encoder-decoder model (T5, BART) feeds its decoder the labels shifted
    one step to the *right*, so its logits are already aligned with
    ``labels`` and its loss pairs equal positions.

    Args:
        logits: ``(B, T, V)`` float; half precision is upcast to float32.
        labels: ``(B, T)`` of any integer dtype, in ``[0, V)``,
            ``ignore_index`` = ignored.
        ignore_index: label value that contributes nothing (an ``int``).

    Returns:
        0-D tensor: mean over kept positions (``nan`` when none is kept).
    """
    labels = _check_loss_inputs(logits, labels, ignore_index)
    return _aligned_cross_entropy(_upcast_half(logits), labels, ignore_index)
