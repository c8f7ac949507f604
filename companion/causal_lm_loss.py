"""Three ways to compute the next-token loss of a causal language model.

All three pair the logits at position ``t`` with the label at ``t + 1`` and
average ``-log softmax`` over the pairs whose label is not ``ignore_index``:

* :func:`shift_and_slice_loss`: drop the last logit row and the first label,
  flatten, ``nn.CrossEntropyLoss()`` with its defaults.  This is how LLaVA's
  code read when no ``attention_mask`` was involved.
* :func:`label_padding_loss`: keep every logit row, append one
  ``ignore_index`` to each row of labels and shift the labels only; optionally
  divide the summed loss by ``num_items_in_batch``.  This is
  ``ForCausalLMLoss`` of transformers 5.
* :func:`attention_mask_filter_loss`: before the flattening, keep only the
  pairs whose *target* position has ``attention_mask != 0``.  This is what
  LLaVA did up to transformers 4.51 (quoted as in 4.45) when an
  ``attention_mask`` was passed.

The first two give the same number for every input; the third agrees with
them exactly when every padded target position is already ``ignore_index``.
"""

from __future__ import annotations

import torch
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_integer,
    require_labels_in_range,
    require_leading_dims,
    require_positive_int,
    require_rank,
    require_tensor,
)
from companion.shapes import check_logits_and_labels, flatten_for_cross_entropy


def _check_ignore_index(ignore_index: int) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            "ignore_index must be an int; "
            f"got {type(ignore_index).__name__}"
        )


def _check_loss_inputs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> int:
    """Validate a ``(B, T, V)`` / ``(B, T)`` pair and return ``V``."""
    _check_ignore_index(ignore_index)
    _, _, vocab = check_logits_and_labels(logits, labels)
    require_labels_in_range(labels, vocab, ignore_index, "labels")
    return vocab


def _check_num_items(num_items_in_batch: int | torch.Tensor | None) -> None:
    """Accept ``None``, an ``int >= 1`` or a 0-D integer tensor holding one."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0:
            raise ValueError(
                "num_items_in_batch must be a 0-D tensor (a single count); "
                f"got shape {tuple(num_items_in_batch.shape)}"
            )
        require_integer(num_items_in_batch, "num_items_in_batch")
        require_positive_int(int(num_items_in_batch), "num_items_in_batch")
        return
    require_positive_int(num_items_in_batch, "num_items_in_batch")


def count_scored_targets(
    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> int:
    """Number of next-token targets that enter the loss.

    Args:
        labels: ``(B, T)`` int, ``ignore_index`` = ignored.
        ignore_index: label value that is skipped.

    Returns:
        The count of ``labels[:, 1:] != ignore_index``: label ``0`` of a row
        is never a target, because no position precedes it.  This is the
        ``num_items_in_batch`` of a batch.
    """
    require_tensor(labels, "labels")
    require_rank(labels, 2, "labels", "(B, T)")
    require_integer(labels, "labels")
    return int((labels[:, 1:] != ignore_index).sum())


def shift_and_slice_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss as LLaVA's source wrote it: slice, flatten, cross-entropy.

    Args:
        logits: ``(B, T, V)`` float, scores before softmax.
        labels: ``(B, T)`` int in ``[0, V)``, ``ignore_index`` (default
            ``-100``) = ignored.
        ignore_index: label value that contributes nothing.

    Returns:
        0-D tensor of ``logits``' dtype: the mean of ``-log p(labels[b, t+1])``
        over the ``B*(T-1)`` pairs whose label is kept; ``nan`` if none is.
    """
    _check_loss_inputs(logits, labels, ignore_index)
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    loss = nn.CrossEntropyLoss(ignore_index=ignore_index)
    return loss(flat_logits, flat_labels)


def label_padding_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss as ``ForCausalLMLoss`` computes it: pad and shift the labels.

    Appending one ``ignore_index`` to every row of ``labels`` and dropping the
    first column gives ``(B, T)`` targets aligned with all ``T`` logit rows;
    the last row of each sequence meets the appended ``ignore_index`` and
    contributes nothing, exactly as if it had been sliced away.

    Args:
        logits: ``(B, T, V)`` float.  Half precision is upcast to float32
            as transformers does; float64 stays float64 (transformers'
            ``.float()`` casts every dtype to float32, float64 included).
        labels: ``(B, T)`` int in ``[0, V)``, ``ignore_index`` = ignored.
        num_items_in_batch: ``None`` for the mean over kept pairs; else an
            ``int >= 1`` (or 0-D integer tensor): the summed loss is divided
            by it, so micro-batches can share one denominator.
        ignore_index: label value that contributes nothing.

    Returns:
        0-D float tensor: ``sum / num_items_in_batch``, or the mean over kept
        pairs (``nan`` when no pair is kept).
    """
    vocab = _check_loss_inputs(logits, labels, ignore_index)
    _check_num_items(num_items_in_batch)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    padded_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
    shift_labels = padded_labels[..., 1:].contiguous()
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = shift_labels.view(-1).to(flat_logits.device)
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(
            flat_logits, flat_labels, ignore_index=ignore_index,
            reduction="mean",
        )
    total = nn.functional.cross_entropy(
        flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum"
    )
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


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
    ``1 .. T-1``).  Pairs where that column is ``0`` are removed before the
    mean, whatever their label; with ``attention_mask=None`` this is
    :func:`shift_and_slice_loss`.

    Args:
        logits: ``(B, T, V)`` float.
        labels: ``(B, T)`` int in ``[0, V)``, ``ignore_index`` = ignored.
        attention_mask: ``(B, T')`` int or bool with ``T' >= T - 1``,
            ``0`` = padding; or ``None``.
        ignore_index: label value that contributes nothing.

    Returns:
        0-D tensor: the mean over pairs that are attended *and* not ignored;
        ``nan`` when there are none.
    """
    _check_loss_inputs(logits, labels, ignore_index)
    if attention_mask is None:
        return shift_and_slice_loss(logits, labels, ignore_index=ignore_index)
    require_tensor(attention_mask, "attention_mask")
    require_rank(attention_mask, 2, "attention_mask", "(B, T')")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(
            "attention_mask must hold integers or booleans (0 = padding); "
            f"got {attention_mask.dtype}"
        )
    batch, time, vocab = logits.shape
    require_leading_dims(
        attention_mask, (batch,), "attention_mask", "logits", "(B, T')"
    )
    if attention_mask.shape[1] < time - 1:
        raise ValueError(
            f"attention_mask must have at least T-1={time - 1} columns "
            f"(B, T'); got shape {tuple(attention_mask.shape)}"
        )
    target_mask = attention_mask[:, -(time - 1) :].to(logits.device) != 0
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
        logits: ``(B, T, V)`` float.
        labels: ``(B, T)`` int in ``[0, V)``, ``ignore_index`` = ignored.
        ignore_index: label value that contributes nothing.

    Returns:
        0-D tensor: mean over kept positions (``nan`` when none is kept).
    """
    _check_ignore_index(ignore_index)
    _, _, vocab = check_logits_and_labels(logits, labels, min_time=1)
    require_labels_in_range(labels, vocab, ignore_index, "labels")
    return nn.functional.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1),
        ignore_index=ignore_index,
    )
