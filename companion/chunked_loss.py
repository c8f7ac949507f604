"""A causal-LM loss that never holds the full ``(B, T, V)`` logits.

The usual loss computes ``logits = hidden @ weight.T`` for every position at
once, a ``(B, T, V)`` tensor, and the backward pass of ``cross_entropy`` keeps
two more tensors of that size alive.  At ``T = 8192`` and ``V = 128256`` one
such tensor is 3.9 GiB in float32.

This module computes the same loss, with the same semantics as Hugging Face's
``ForCausalLMLoss`` and :func:`companion.causal_lm_loss.label_padding_loss`
(labels padded with ``-100`` on the right and shifted left; ``-100``
positions skipped; the sum divided by ``num_items_in_batch`` when given,
else by the number of scored positions), from the final hidden states and
the output projection, a chunk of positions at a time:

* :func:`chunked_causal_lm_loss` uses :class:`ChunkedLinearCrossEntropy`, a
  ``torch.autograd.Function`` whose forward pass also computes the
  gradients (of the inputs that require grad, and none under
  ``torch.no_grad()``), chunk by chunk, so that only one
  ``(chunk_size, V)`` block of logits ever exists;
* :func:`checkpointed_chunked_loss` gets a similar saving from plain
  autograd and activation checkpointing, at the price of a second forward
  pass per chunk.

The eager formulations are :mod:`companion.causal_lm_loss`'s own, on
``hidden @ weight.T``; :mod:`companion.memory` counts and measures the bytes
each formulation holds.

Shapes: ``B`` sequences of ``T`` positions, hidden width ``d``, vocabulary
``V``, ``N = B*T`` flattened positions, ``C`` positions per chunk.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from companion import IGNORE_INDEX
from companion._checks import (
    require_floating,
    require_ignore_index,
    require_integer,
    require_labels_in_range,
    require_leading_dims,
    require_num_items,
    require_positive_int,
    require_rank,
    require_tensor,
)
from companion.causal_lm_loss import (
    NumItems,
    count_scored_targets,
    shift_labels_with_padding,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkedLinearCrossEntropy",
    "check_hidden_weight_labels",
    "checkpointed_chunked_loss",
    "chunked_causal_lm_loss",
]

DEFAULT_CHUNK_SIZE = 256
"""Positions per chunk.  At ``V = 32000`` one float32 chunk is 31 MiB."""


# --------------------------------------------------------------------------
# Checks and the shared denominator
# --------------------------------------------------------------------------


def check_hidden_weight_labels(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int, int]:
    """Validate the inputs of every loss here; return ``(B, T, d, V)``.

    Args:
        hidden: ``(B, T, d)`` float, the final hidden states.
        weight: ``(V, d)`` float, the output projection
            (``lm_head.weight``), same dtype and device as ``hidden``.
        labels: ``(B, T)`` token ids of any integer dtype (``int8`` to
            ``int64``, ``uint8`` to ``uint64``; the losses convert them to
            int64), ``ignore_index`` = ignored.
        ignore_index: label value that is not scored, an ``int``.

    Raises:
        TypeError: a non-tensor argument, non-float ``hidden``/``weight``,
            ``hidden`` and ``weight`` of different dtypes, non-integer
            ``labels``, or an ``ignore_index`` that is not an ``int``.
        ValueError: wrong ranks, an empty dimension, ``weight``'s ``d``
            not matching ``hidden``'s, ``labels`` not ``(B, T)``, the two
            float tensors on different devices, or a label outside
            ``[0, V)``.
    """
    require_ignore_index(ignore_index)
    require_tensor(hidden, "hidden")
    require_tensor(weight, "weight")
    require_tensor(labels, "labels")
    require_rank(hidden, 3, "hidden", "(B, T, d)")
    require_floating(hidden, "hidden")
    require_rank(weight, 2, "weight", "(V, d)")
    require_floating(weight, "weight")
    require_rank(labels, 2, "labels", "(B, T)")
    require_integer(labels, "labels")
    batch, time, hidden_size = hidden.shape
    vocab, weight_hidden_size = weight.shape
    if min(batch, time, hidden_size) < 1:
        raise ValueError(
            "hidden (B, T, d) must have no empty dimension; "
            f"got shape {tuple(hidden.shape)}"
        )
    if vocab < 1:
        raise ValueError(
            f"weight (V, d) must have V >= 1; got shape {tuple(weight.shape)}"
        )
    if weight_hidden_size != hidden_size:
        raise ValueError(
            "weight must have shape (V, d) with "
            f"d = hidden.shape[-1] = {hidden_size}; "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight must have hidden's dtype {hidden.dtype}; "
            f"got {weight.dtype}"
        )
    if weight.device != hidden.device:
        raise ValueError(
            f"weight must be on hidden's device {hidden.device}; "
            f"got {weight.device}"
        )
    require_leading_dims(labels, (batch, time), "labels", "hidden", "(B, T)")
    require_labels_in_range(labels, vocab, ignore_index, "labels")
    return batch, time, hidden_size, vocab


def _check_num_items(num_items_in_batch: NumItems) -> float | None:
    """Return ``num_items_in_batch`` as a positive float, or ``None``.

    The accepted forms are those of ``label_padding_loss``, from the same
    check (``companion._checks.require_num_items``): ``None``, an
    ``int >= 1`` or a 0-D integer tensor ``>= 1``.
    """
    value = require_num_items(num_items_in_batch, "num_items_in_batch")
    return None if value is None else float(value)


def _flat_targets_and_denominator(
    labels: torch.Tensor,
    device: torch.device,
    ignore_index: int,
    num_items_in_batch: NumItems,
) -> tuple[torch.Tensor, int, float | None]:
    """``(targets (B*T,), number of scored positions, denominator)``.

    The denominator is ``None`` when nothing is scored and no
    ``num_items_in_batch`` was given: the mean of nothing, which is ``nan``.
    """
    num_items = _check_num_items(num_items_in_batch)
    targets = shift_labels_with_padding(labels, ignore_index)
    targets = targets.view(-1).to(device)
    scored = count_scored_targets(labels, ignore_index)
    if num_items is not None:
        return targets, scored, num_items
    return targets, scored, (float(scored) if scored else None)


# --------------------------------------------------------------------------
# Chunks with activation checkpointing
# --------------------------------------------------------------------------


def _chunk_loss_sum(
    hidden_chunk: torch.Tensor,
    weight: torch.Tensor,
    targets_chunk: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """Summed cross-entropy of one chunk: ``(C, d)``, ``(V, d)``, ``(C,)``."""
    compute_dtype = torch.promote_types(hidden_chunk.dtype, torch.float32)
    logits = (hidden_chunk @ weight.T).to(compute_dtype)
    return F.cross_entropy(
        logits, targets_chunk, ignore_index=ignore_index, reduction="sum"
    )


def checkpointed_chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss summed chunk by chunk, each chunk under checkpointing.

    Autograd saves nothing inside a checkpointed chunk; the backward pass
    recomputes the chunk's logits, so at most one chunk's
    ``(chunk_size, V)`` tensors exist at a time.  The cost is a second
    forward matmul per chunk.

    Args:
        hidden: ``(B, T, d)`` float.
        weight: ``(V, d)`` float.
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` = ignored.
        chunk_size: positions per chunk (of the ``B*T`` flattened
            positions), >= 1.
        num_items_in_batch: divide the summed loss by this (an ``int >= 1``
            or a 0-D integer tensor ``>= 1``) instead of taking the mean
            over scored positions.
        ignore_index: label value that is not scored (an ``int``).

    Returns:
        0-d tensor: the same value as
        :func:`companion.causal_lm_loss.label_padding_loss` of
        ``hidden @ weight.T``.
    """
    require_positive_int(chunk_size, "chunk_size")
    _, _, hidden_size, _ = check_hidden_weight_labels(
        hidden, weight, labels, ignore_index
    )
    targets, _, denominator = _flat_targets_and_denominator(
        labels, hidden.device, ignore_index, num_items_in_batch
    )
    hidden_flat = hidden.reshape(-1, hidden_size)
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    total = hidden.new_zeros((), dtype=compute_dtype)
    for start in range(0, hidden_flat.size(0), chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(
            _chunk_loss_sum,
            hidden_flat[start:stop],
            weight,
            targets[start:stop],
            ignore_index,
            use_reentrant=False,
        )
    # Nothing scored: 0 / 0 = nan, as F.cross_entropy's mean gives; its
    # gradient is 0 because every chunk's gradient is 0.
    return total / (denominator if denominator is not None else 0.0)


# --------------------------------------------------------------------------
# Chunks with gradients computed in the forward pass
# --------------------------------------------------------------------------


def _backward_keeps_graph() -> bool:
    """Whether the running backward pass keeps the graph for another.

    ``True`` with ``retain_graph=True`` (and ``create_graph=True``, its
    default).  PyTorch exposes this only privately (its AOT autograd reads
    it); where it is missing, assume the graph is kept, which is always
    correct, only less frugal.
    """
    keeps_graph = getattr(
        torch._C._autograd, "_get_current_graph_task_keep_graph", None
    )
    if keeps_graph is None:
        return True
    try:
        return bool(keeps_graph())
    except RuntimeError:
        return True


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss of ``hidden_flat @ weight.T``, gradients computed in forward.

    For each chunk of rows the forward pass forms the ``(C, V)`` logits
    once, reduces them to the chunk's loss, turns the *same* buffer, in
    place, into ``d loss / d logits = (softmax - onehot) / denominator``
    (zero on ignored rows), and multiplies it into the two gradients:
    ``grad_hidden[chunk] = grad_logits @ weight`` and
    ``grad_weight += grad_logits.T @ hidden[chunk]``.  The backward pass
    only scales the stored gradients by the incoming gradient: in place
    when the graph is freed after it (the usual ``loss.backward()``), on
    copies when it is kept (``retain_graph=True``), so that a second
    backward pass through the same graph adds the same gradients again,
    as with the eager loss.

    Only the gradients that will be used are computed: those of the
    inputs that require grad, and none when ``compute_gradients`` is
    false.  Pass ``torch.is_grad_enabled()`` (as
    :func:`chunked_causal_lm_loss` does): under ``torch.no_grad()`` no
    graph is built, so the forward pass computes the loss alone.  Grad
    mode is always off inside ``forward``, so it cannot tell by itself.

    Inputs of ``forward``: ``hidden_flat (N, d)`` float,
    ``weight (V, d)`` float, ``targets (N,)`` int64 already shifted,
    ``chunk_size`` int, ``ignore_index`` int, ``denominator`` float or
    ``None`` (nothing scored: the loss is ``nan``, the gradients zero),
    ``compute_gradients`` bool.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_flat: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
        denominator: float | None,
        compute_gradients: bool,
    ) -> torch.Tensor:
        dtype = torch.promote_types(hidden_flat.dtype, torch.float32)
        device = hidden_flat.device
        positions, vocab = hidden_flat.size(0), weight.size(0)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if not compute_gradients:  # no graph (torch.no_grad()): loss only
            need_hidden = need_weight = False
        grad_scale = 0.0 if denominator is None else 1.0 / denominator
        grad_hidden = grad_weight = None
        if need_hidden:
            grad_hidden = torch.empty_like(hidden_flat)
        if need_weight:
            grad_weight = torch.zeros(
                weight.shape, dtype=dtype, device=device
            )
        loss_sum = torch.zeros((), dtype=dtype, device=device)
        # The only (C, V) buffer, allocated once and reused by every chunk,
        # so that the memory allocator never has to find room for another.
        logits_buffer = torch.empty(
            (min(chunk_size, positions), vocab), dtype=dtype, device=device
        )

        for start in range(0, positions, chunk_size):
            stop = start + chunk_size
            hidden_chunk = hidden_flat[start:stop]
            targets_chunk = targets[start:stop]
            scored = targets_chunk != ignore_index
            safe_targets = torch.where(scored, targets_chunk, 0).unsqueeze(1)

            logits = logits_buffer[: hidden_chunk.size(0)]
            if hidden_chunk.dtype == dtype:
                torch.mm(hidden_chunk, weight.T, out=logits)
            else:
                logits.copy_(hidden_chunk @ weight.T)
            # Subtract the row maximum: exp below cannot overflow.
            logits.sub_(logits.amax(dim=1, keepdim=True))
            target_logit = logits.gather(1, safe_targets).squeeze(1)
            logits.exp_()
            sum_exp = logits.sum(dim=1)
            row_loss = sum_exp.log() - target_logit  # -log softmax[target]
            loss_sum += torch.where(scored, row_loss, 0.0).sum()

            if grad_hidden is None and grad_weight is None:
                continue
            # softmax / denominator on scored rows, 0 on ignored rows ...
            row_factor = scored.to(dtype) * grad_scale
            logits.mul_((row_factor / sum_exp).unsqueeze(1))
            # ... minus onehot / denominator: now d loss / d logits.
            logits.scatter_add_(1, safe_targets, -row_factor.unsqueeze(1))
            if grad_hidden is not None:
                torch.mm(
                    logits.to(weight.dtype),
                    weight,
                    out=grad_hidden[start:stop],
                )
            if grad_weight is not None:
                grad_weight.addmm_(logits.T, hidden_chunk.to(dtype))

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        if denominator is None:
            return torch.full((), math.nan, dtype=dtype, device=device)
        return loss_sum / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        for name, grad, needed in zip(
            ("hidden", "weight"), ctx.saved_tensors, ctx.needs_input_grad
        ):
            if needed and grad is None:
                raise RuntimeError(
                    f"ChunkedLinearCrossEntropy: the gradient of {name} was "
                    "not computed in the forward pass (compute_gradients "
                    "was False); pass torch.is_grad_enabled()"
                )
        if _backward_keeps_graph():
            # retain_graph=True: a later backward pass through this graph
            # needs the stored gradients unchanged, so scale copies.
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_loss
            if grad_weight is not None:
                grad_weight = grad_weight * grad_loss
        else:
            # The graph is freed after this pass: scale in place.  No
            # second (V, d) tensor, and no test of whether grad_loss is 1,
            # which on a GPU would wait for the device.
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Causal-LM loss of ``hidden @ weight.T`` without the full logits.

    Same value as ``ForCausalLMLoss(hidden @ weight.T, labels, V,
    num_items_in_batch)``; same gradients with respect to ``hidden`` and
    ``weight``.  Peak extra memory is one ``(chunk_size, V)`` block plus
    the two gradients, ``(B*T, d)`` and ``(V, d)``.  The forward pass
    computes the gradients of the inputs that require grad, and none
    under ``torch.no_grad()`` or ``torch.inference_mode()``, where it
    costs one matrix product per chunk, like the eager loss's forward.
    A second backward pass through a retained graph
    (``retain_graph=True``) adds the same gradients again.

    Args:
        hidden: ``(B, T, d)`` float, the final hidden states.
        weight: ``(V, d)`` float, the output projection, same dtype and
            device.
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` =
            ignored; position ``t`` is scored against ``labels[:, t + 1]``.
        chunk_size: positions per chunk (of the ``B*T`` flattened
            positions), >= 1; it need not divide ``B*T``.
        num_items_in_batch: divide the summed loss by this (an ``int >= 1``
            or a 0-D integer tensor ``>= 1``; floats are rejected) instead
            of taking the mean over scored positions, as in gradient
            accumulation.
        ignore_index: label value that is not scored (an ``int``).

    Returns:
        0-d tensor (float32 for float32 or half inputs, float64 for
        float64): the loss; ``nan`` with zero gradients when no position
        is scored and ``num_items_in_batch`` is ``None``.
    """
    require_positive_int(chunk_size, "chunk_size")
    _, _, hidden_size, _ = check_hidden_weight_labels(
        hidden, weight, labels, ignore_index
    )
    targets, _, denominator = _flat_targets_and_denominator(
        labels, hidden.device, ignore_index, num_items_in_batch
    )
    hidden_flat = hidden.reshape(-1, hidden_size)
    # Under no_grad (an evaluation loop) no graph is built: loss only.
    return ChunkedLinearCrossEntropy.apply(
        hidden_flat,
        weight,
        targets,
        chunk_size,
        ignore_index,
        denominator,
        torch.is_grad_enabled(),
    )


