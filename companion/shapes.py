"""From ``logits (B, T, V)`` to the two flat tensors that cross-entropy takes.

A causal language model scores, at every position ``t``, the token that comes
*next*.  The loss therefore pairs logit row ``t`` with label ``t + 1``:

* ``shift_logits = logits[..., :-1, :]``  (B, T-1, V): drop the last row, which
  would predict a token that is not in the sequence;
* ``shift_labels = labels[..., 1:]``     (B, T-1): drop the first label, which
  no position predicts;
* flatten both to ``(B*(T-1), V)`` and ``(B*(T-1),)`` for ``cross_entropy``.

The functions here perform exactly those steps.  What each step does to
shape, strides and memory is traced by ``companion.experiments.shapes``.
"""

from __future__ import annotations

import torch

from companion._checks import (
    require_floating,
    require_integer,
    require_leading_dims,
    require_no_empty_dim,
    require_rank,
    require_tensor,
)

__all__ = [
    "check_logits_and_labels",
    "flatten_for_cross_entropy",
    "shift_for_next_token",
]


def check_logits_and_labels(
    logits: torch.Tensor, labels: torch.Tensor, *, min_time: int = 2
) -> tuple[int, int, int]:
    """Validate a causal-LM pair and return ``(B, T, V)``.

    Args:
        logits: ``(B, T, V)`` floating point, the scores before softmax.
        labels: ``(B, T)`` integer token ids (``-100`` = ignored).
        min_time: fewest positions ``T`` accepted: 2 for a next-token loss
            (one pair after the shift), 1 for a loss without a shift.

    ``labels`` may have any integer dtype (``int8`` to ``int64``, ``uint8``
    to ``uint64``); the losses convert it to ``int64``, the shape functions
    here keep it.

    Raises:
        TypeError: a non-tensor argument, non-float ``logits`` or non-integer ``labels``.
        ValueError: wrong rank, ``labels`` not matching ``logits``' first two
            dimensions, ``T < min_time`` (for the shift: nothing left to
            predict), an empty batch (``B = 0``) or no class (``V = 0``).
    """
    require_tensor(logits, "logits")
    require_tensor(labels, "labels")
    require_rank(logits, 3, "logits", "(B, T, V)")
    require_floating(logits, "logits")
    require_rank(labels, 2, "labels", "(B, T)")
    require_integer(labels, "labels")
    batch, time, vocab = logits.shape
    require_leading_dims(labels, (batch, time), "labels", "logits", "(B, T)")
    if time < min_time:
        need = "to form one next-token pair" if min_time == 2 else "for this loss"
        raise ValueError(f"logits and labels need T >= {min_time} positions {need}; got T={time}")
    require_no_empty_dim(logits, "logits", "(B, T, V)")
    return batch, time, vocab


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align each position's logits with the token that follows it.

    Args:
        logits: ``(B, T, V)`` float.
        labels: ``(B, T)`` int, ``-100`` = ignored.

    Returns:
        ``(shift_logits, shift_labels)`` of shapes ``(B, T-1, V)`` and
        ``(B, T-1)``.  Both are *views* of the inputs (no data is copied);
        ``shift_logits`` is contiguous only when ``B == 1``.
    """
    check_logits_and_labels(logits, labels)
    return logits[..., :-1, :], labels[..., 1:]


def flatten_for_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift, make contiguous, flatten and co-locate, as the LLaVA loss does.

    Args:
        logits: ``(B, T, V)`` float.
        labels: ``(B, T)`` int, ``-100`` = ignored.

    Returns:
        ``(flat_logits, flat_labels)`` of shapes ``(B*(T-1), V)`` and
        ``(B*(T-1),)``, with ``flat_labels`` on ``logits``' device.
    """
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    shift_logits = shift_logits.contiguous()
    shift_labels = shift_labels.contiguous()
    vocab = shift_logits.size(-1)
    flat_logits = shift_logits.view(-1, vocab)
    flat_labels = shift_labels.view(-1).to(shift_logits.device)
    return flat_logits, flat_labels
