"""A causal-LM loss that never holds the full ``(B, T, V)`` logits.

The usual loss computes ``logits = hidden @ weight.T`` for every position at
once, a ``(B, T, V)`` tensor, and the backward pass of ``cross_entropy`` keeps
two more tensors of that size alive.  At ``T = 8192`` and ``V = 128256`` one
such tensor is 3.9 GiB in float32.

This module computes the same loss, with the same semantics as Hugging Face's
``ForCausalLMLoss`` (labels padded with ``-100`` on the right and shifted
left; ``-100`` positions skipped; the sum divided by ``num_items_in_batch``
when given, else by the number of scored positions), from the final hidden
states and the output projection, a chunk of positions at a time:

* :func:`chunked_causal_lm_loss` uses :class:`ChunkedLinearCrossEntropy`, a
  ``torch.autograd.Function`` whose forward pass also computes the
  gradients (of the inputs that require grad, and none under
  ``torch.no_grad()``), chunk by chunk, so that only one
  ``(chunk_size, V)`` block of logits ever exists;
* :func:`checkpointed_chunked_loss` gets a similar saving from plain
  autograd and activation checkpointing, at the price of a second forward
  pass per chunk;
* :func:`eager_shift_and_slice_loss` and :func:`eager_label_padding_loss` are
  the two eager formulations, kept minimal, for comparison.

:func:`estimate_peak_bytes` counts, from first principles, the bytes each
formulation holds at its peak, and :class:`TensorMemoryTracker` measures the
same quantity exactly, storage by storage.

Shapes: ``B`` sequences of ``T`` positions, hidden width ``d``, vocabulary
``V``, ``N = B*T`` flattened positions, ``C`` positions per chunk.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

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

DEFAULT_CHUNK_SIZE = 256
"""Positions per chunk.  At ``V = 32000`` one float32 chunk is 31 MiB."""

GIB = 2**30

NumItems = int | torch.Tensor | None
LossFunction = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------
# Checks and label shifting
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
    check (:func:`companion._checks.require_num_items`): ``None``, an
    ``int >= 1`` or a 0-D integer tensor ``>= 1``.
    """
    value = require_num_items(num_items_in_batch, "num_items_in_batch")
    return None if value is None else float(value)


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
    padded = F.pad(labels.long(), (0, 1), value=ignore_index)
    return padded[:, 1:].contiguous()


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
    scored = int((targets != ignore_index).sum())
    if num_items is not None:
        return targets, scored, num_items
    return targets, scored, (float(scored) if scored else None)


# --------------------------------------------------------------------------
# The two eager formulations, from hidden states
# --------------------------------------------------------------------------


def _reduced_cross_entropy(
    flat_logits: torch.Tensor,
    flat_targets: torch.Tensor,
    num_items: float | None,
    ignore_index: int,
) -> torch.Tensor:
    """Mean over scored rows, or the sum divided by ``num_items``.

    ``flat_logits``: ``(N, V)`` float; ``flat_targets``: ``(N,)`` int64.
    """
    if num_items is None:
        return F.cross_entropy(flat_logits, flat_targets,
                               ignore_index=ignore_index)
    total = F.cross_entropy(flat_logits, flat_targets,
                            ignore_index=ignore_index, reduction="sum")
    return total / num_items


def eager_shift_and_slice_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Eager loss, older LLaVA style: drop the last logits row, first label.

    Args:
        hidden: ``(B, T, d)`` float.
        weight: ``(V, d)`` float.
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` = ignored.
        num_items_in_batch: divide the summed loss by this (an ``int >= 1``
            or a 0-D integer tensor ``>= 1``) instead of taking the mean
            over scored positions.
        ignore_index: label value that is not scored (an ``int``).

    Returns:
        0-d tensor (float32 for float32 or half inputs, float64 for
        float64, as every formulation): the loss (``nan`` when nothing is
        scored and ``num_items_in_batch`` is ``None``, e.g. for ``T = 1``).
    """
    check_hidden_weight_labels(hidden, weight, labels, ignore_index)
    num_items = _check_num_items(num_items_in_batch)
    # Half precision is reduced in float32, as in the other formulations.
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.T).to(compute_dtype)
    # sliced inline, not with companion.shapes.flatten_for_cross_entropy:
    # T = 1 is valid here (no pair to score), and that helper rejects it
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous().long()
    return _reduced_cross_entropy(
        shift_logits.view(-1, logits.size(-1)),
        shift_labels.view(-1).to(logits.device),
        num_items,
        ignore_index,
    )


def eager_label_padding_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Eager loss, ``ForCausalLMLoss`` style: labels padded and shifted.

    Args:
        hidden: ``(B, T, d)`` float.
        weight: ``(V, d)`` float.
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` = ignored.
        num_items_in_batch: divide the summed loss by this (an ``int >= 1``
            or a 0-D integer tensor ``>= 1``) instead of taking the mean
            over scored positions.
        ignore_index: label value that is not scored (an ``int``).

    Returns:
        0-d float32 (or float64) tensor: the loss.
    """
    check_hidden_weight_labels(hidden, weight, labels, ignore_index)
    num_items = _check_num_items(num_items_in_batch)
    # ForCausalLMLoss upcasts, so half-precision logits are reduced in float32.
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.T).to(compute_dtype)
    targets = shift_labels_with_padding(labels, ignore_index)
    return _reduced_cross_entropy(
        logits.view(-1, logits.size(-1)),
        targets.view(-1).to(logits.device),
        num_items,
        ignore_index,
    )


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
        0-d tensor: the same value as :func:`eager_label_padding_loss`.
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

    Inputs of :meth:`forward`: ``hidden_flat (N, d)`` float,
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


LOSS_VARIANTS: dict[str, LossFunction] = {
    "shift_and_slice": eager_shift_and_slice_loss,
    "label_padding": eager_label_padding_loss,
    "checkpointed_chunks": checkpointed_chunked_loss,
    "chunked_function": chunked_causal_lm_loss,
}
"""The four formulations the chapter compares, by the benchmark's names."""

CHUNKED_VARIANTS = frozenset({"checkpointed_chunks", "chunked_function"})
"""Variants that take a ``chunk_size`` argument."""


# --------------------------------------------------------------------------
# Memory: counted from first principles, and measured exactly
# --------------------------------------------------------------------------


def estimate_peak_bytes(
    variant: str,
    batch: int,
    time: int,
    vocab: int,
    hidden_size: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    element_size: int = 4,
) -> int:
    """Bytes a formulation's forward + backward holds at its peak.

    The inputs are not counted.  With ``L = B*T*V`` logits elements,
    ``C = min(chunk_size, B*T)`` and ``N = B*T``:

    * eager (``shift_and_slice``, ``label_padding``): ``3 L``.  During
      ``log_softmax``'s backward three ``(B, T, V)`` tensors are alive: the
      output ``log_softmax`` saved in the forward pass, the gradient
      ``nll_loss`` hands back, and the gradient being computed.  Later
      moments hold less (one ``(B, T, V)`` gradient and ``weight.grad``).
    * ``checkpointed_chunks``: the larger of two moments, plus the running
      ``(N, d)`` gradient of ``hidden``.  While a chunk's ``log_softmax``
      is differentiated: its three ``(C, V)`` tensors and the running
      ``(V, d)`` weight gradient, ``3 C V + V d``.  While that chunk's
      weight gradient is added to the running sum: the sum, the addend
      and the result, ``3 V d``.
    * ``chunked_function``: one ``(C, V)`` block, plus the two gradients
      it fills, ``(V, d)`` and ``(N, d)``.

    Args:
        variant: a key of :data:`LOSS_VARIANTS`.
        batch, time, vocab, hidden_size: ``B``, ``T``, ``V``, ``d``, >= 1.
        chunk_size: positions per chunk (chunked variants).
        element_size: bytes per element (4 for float32).

    Returns:
        The estimate in bytes (tensors of ``O(B*T)`` elements left out).
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(
            f"variant must be one of {sorted(LOSS_VARIANTS)}; got {variant!r}"
        )
    for value, name in (
        (batch, "batch"),
        (time, "time"),
        (vocab, "vocab"),
        (hidden_size, "hidden_size"),
        (chunk_size, "chunk_size"),
        (element_size, "element_size"),
    ):
        require_positive_int(value, name)
    positions = batch * time
    chunk = min(chunk_size, positions)
    weight_grad = vocab * hidden_size
    hidden_grad = positions * hidden_size
    if variant in ("shift_and_slice", "label_padding"):
        elements = 3 * positions * vocab
    elif variant == "checkpointed_chunks":
        first = 3 * chunk * vocab + weight_grad
        elements = max(first, 3 * weight_grad) + hidden_grad
    else:
        elements = chunk * vocab + weight_grad + hidden_grad
    return elements * element_size


class TensorMemoryTracker(TorchDispatchMode):
    """Exact bytes of tensor storage allocated inside a ``with`` block.

    Every operator call PyTorch dispatches (forward and backward alike) is
    seen; each new storage is counted from its creation until it is freed.
    Storages that existed before the block (the inputs) are not counted,
    and neither are a kernel's private scratch buffers, which are not
    tensors.  The counts are exact and deterministic, unlike a process's
    resident set.

    Attributes:
        live_bytes: bytes of counted storage alive now.
        peak_bytes: the most ``live_bytes`` has been.
        timeline: ``live_bytes`` right after each operator call, in order.

    Example::

        with TensorMemoryTracker() as tracker:
            loss_fn(hidden, weight, labels).backward()
        tracker.peak_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.timeline: list[int] = []
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._release_hooks: set[weakref.ref] = set()

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._counted:
            return  # a view, or the result of an in-place operator
        nbytes = storage.nbytes()
        self._counted[storage] = nbytes

        def release(hook: weakref.ref) -> None:
            self.live_bytes -= nbytes
            self._release_hooks.discard(hook)

        # The callback runs when the storage is freed; the set keeps the
        # weak reference itself alive until then.
        self._release_hooks.add(weakref.ref(storage, release))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        # Storages an operator receives but that this tracker has not seen
        # were created before the block (the inputs): remember them
        # uncounted, so that a view of them or an in-place result is not
        # taken for new memory.
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._counted.setdefault(leaf.untyped_storage(), 0)
        result = func(*args, **kwargs)
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._count(leaf)
        self.timeline.append(self.live_bytes)
        return result


def measure_peak_tensor_bytes(
    loss_fn: LossFunction, *args: Any, **kwargs: Any
) -> int:
    """Peak bytes alive at once in ``loss_fn(*args, **kwargs).backward()``.

    Gradients of the inputs are reset to ``None`` first, so every call
    measures the same thing.  Returns the :class:`TensorMemoryTracker`
    peak.
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None
    with TensorMemoryTracker() as tracker:
        loss_fn(*args, **kwargs).backward()
    return tracker.peak_bytes


# --------------------------------------------------------------------------
# Benchmark results (benchmarks/loss_memory.py) against the design goals
# --------------------------------------------------------------------------

EAGER_VARIANTS = ("shift_and_slice", "label_padding")
"""The two formulations that materialise the ``(B, T, V)`` logits."""

MEMORY_TARGETS: tuple[tuple[int, int, int], ...] = (
    (2048, 32000, 4),
    (8192, 32000, 12),
    (8192, 128256, 12),
)
"""``(T, V, k)``: goal, the chunked Function's peak <= 1/k of eager's."""

TIME_TARGET = 1.2
"""Goal: the chunked Function's median time <= this multiple of eager's."""

RESULTS_FILE_NAMES = ("loss_memory_cpu.json", "loss_memory_cpu_quick.json")
"""Benchmark result files, preferred first: the full run, then the quick."""

NOT_RUN_STATUSES = ("not_run",)
"""Record statuses of configurations the benchmark skipped on an estimate."""


def find_results_file(directory: str | Path) -> Path:
    """The first of :data:`RESULTS_FILE_NAMES` that exists in ``directory``.

    Raises:
        FileNotFoundError: none exists.
    """
    directory = Path(directory)
    for name in RESULTS_FILE_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no benchmark results in {directory}: expected one of "
        f"{', '.join(RESULTS_FILE_NAMES)}"
    )


def was_not_run(record: dict[str, Any]) -> bool:
    """Whether the benchmark skipped this record because of its estimate.

    Such a record holds an estimate, never a measurement.  Older result
    files report it as ``"oom"`` with ``"not run"`` in its ``detail``.
    """
    if record["status"] in NOT_RUN_STATUSES:
        return True
    return (
        record["status"] == "oom"
        and record.get("peak_bytes") is None
        and "not run" in str(record.get("detail", ""))
    )


def not_run_text(record: dict[str, Any]) -> str:
    """``"not run (estimated X GiB > budget Y GiB)"`` for a skipped record."""
    needed = record.get("needed_bytes", record.get("estimate_bytes"))
    budget = record.get("budget_bytes")
    if needed is None:
        return "not run (estimated above the memory budget)"
    if budget is None:
        return f"not run (estimated {needed / GIB:.1f} GiB > budget)"
    return (
        f"not run (estimated {needed / GIB:.1f} GiB "
        f"> budget {budget / GIB:.1f} GiB)"
    )


def _record(
    records: list[dict[str, Any]], variant: str, time: int, vocab: int
) -> dict[str, Any] | None:
    for record in records:
        key = (record["variant"], record["time"], record["vocab"])
        if key == (variant, time, vocab):
            return record
    return None


def _best_eager(
    records: list[dict[str, Any]], time: int, vocab: int, key: str
) -> float | None:
    """The smaller of the two eager formulations' ``key`` (``None``: none)."""
    values = [
        float(record[key])
        for name in EAGER_VARIANTS
        if (record := _record(records, name, time, vocab)) is not None
        and record["status"] == "ok"
        and record.get(key) is not None
    ]
    return min(values) if values else None


def memory_target_report(
    records: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each memory goal of :data:`MEMORY_TARGETS`, against benchmark records.

    The chunked Function is compared with the *better* (smaller) of the two
    eager formulations.  Only measurements count: an eager formulation the
    benchmark skipped because its estimate exceeded the memory budget has
    no ratio, and the goal is not judged on the estimate.

    Args:
        records: the ``"results"`` list of a benchmark JSON file.

    Returns:
        One dict per goal: ``time``, ``vocab``, ``required`` (``k``),
        ``eager_bytes``, ``chunked_bytes``, ``ratio`` (eager / chunked, or
        ``None``), ``verdict`` and ``note``.  ``verdict`` is ``"met"``,
        ``"missed"``, ``"eager not run"`` (skipped on its estimate; ``note``
        says ``"eager not run (estimated X GiB > budget Y GiB)"``),
        ``"eager out of memory"`` (it ran and an allocation failed) or
        ``"not measured"`` (the size is not in the file).
    """
    report = []
    for time, vocab, required in MEMORY_TARGETS:
        chunked = _record(records, "chunked_function", time, vocab)
        eagers = [
            _record(records, name, time, vocab) for name in EAGER_VARIANTS
        ]
        eager_bytes = _best_eager(records, time, vocab, "peak_bytes")
        row: dict[str, Any] = {
            "time": time,
            "vocab": vocab,
            "required": required,
            "eager_bytes": eager_bytes,
            "chunked_bytes": None,
            "ratio": None,
            "verdict": "not measured",
            "note": "",
        }
        report.append(row)
        if chunked is None or chunked["status"] != "ok":
            continue
        row["chunked_bytes"] = float(chunked["peak_bytes"])
        if eager_bytes is not None:
            row["ratio"] = eager_bytes / row["chunked_bytes"]
            row["verdict"] = "met" if row["ratio"] >= required else "missed"
            continue
        present = [r for r in eagers if r is not None]
        if not present:
            continue
        if all(was_not_run(r) for r in present):
            row["verdict"] = "eager not run"
            row["note"] = "eager " + not_run_text(present[0])
        elif any(
            r["status"] == "oom" and not was_not_run(r) for r in present
        ):
            row["verdict"] = "eager out of memory"
            row["note"] = "eager ran out of memory within the budget"
    return report


def time_target_report(
    records: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The time goal (:data:`TIME_TARGET`) at every size where both ran.

    Returns:
        One dict per ``(time, vocab)``: ``eager_s`` (the faster eager
        median wall time), ``chunked_s``, ``ratio`` (chunked / eager),
        ``verdict`` (``"met"`` or ``"missed"``), and ``cpu_ratio``, the
        same ratio of median CPU times (``None`` if not recorded), which
        other processes on the machine disturb less; sorted by
        ``(vocab, time)``.
    """
    sizes = sorted({(r["vocab"], r["time"]) for r in records})
    report = []
    for vocab, time in sizes:
        chunked = _record(records, "chunked_function", time, vocab)
        eager_s = _best_eager(records, time, vocab, "median_s")
        if chunked is None or chunked["status"] != "ok" or eager_s is None:
            continue
        ratio = float(chunked["median_s"]) / eager_s
        eager_cpu_s = _best_eager(records, time, vocab, "median_cpu_s")
        chunked_cpu_s = chunked.get("median_cpu_s")
        cpu_ratio = None
        if eager_cpu_s and chunked_cpu_s:
            cpu_ratio = float(chunked_cpu_s) / eager_cpu_s
        report.append(
            {
                "time": time,
                "vocab": vocab,
                "eager_s": eager_s,
                "chunked_s": float(chunked["median_s"]),
                "ratio": ratio,
                "verdict": "met" if ratio <= TIME_TARGET else "missed",
                "cpu_ratio": cpu_ratio,
            }
        )
    return report
