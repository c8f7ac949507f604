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
  ``(C, V)`` block of logits ever exists.  Positions whose target is
  ignored never enter a matrix product; bfloat16 and float16 inputs are
  multiplied in their own dtype while the log-sum-exp, the softmax
  gradient and the weight-gradient sum stay in float32;
* :func:`checkpointed_chunked_loss` gets a similar saving from plain
  autograd and activation checkpointing, at the price of a second forward
  pass per chunk.

The number of rows ``C`` in a chunk comes from a memory budget, the bytes
the caller allows for the logits block (:func:`chunk_rows`; by default
:data:`DEFAULT_CHUNK_BYTES`, as many bytes as the float32 weight gradient);
``chunk_size=`` sets it directly instead.

The eager formulations are :mod:`companion.causal_lm_loss`'s own, on
``hidden @ weight.T``; :mod:`companion.memory` counts and measures the bytes
each formulation holds.

Shapes: ``B`` sequences of ``T`` positions, hidden width ``d``, vocabulary
``V``, ``N = B*T`` flattened positions, ``M <= N`` of them scored, ``C``
positions per chunk.
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
from companion.causal_lm_loss import NumItems, shift_labels_with_padding

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ChunkedLinearCrossEntropy",
    "check_hidden_weight_labels",
    "checkpointed_chunked_loss",
    "chunk_pass",
    "chunk_rows",
    "chunked_causal_lm_loss",
    "logits_row_bytes",
]

DEFAULT_CHUNK_BYTES = None
"""The default budget for one chunk's logits block: ``None``, meaning as many
bytes as the float32 weight gradient, ``4 V d``.

The block then never holds more than the ``(V, d)`` weight gradient beside
it, and a chunk has ``d`` rows in float32 (``0.6 d`` in bfloat16, whose rows
also hold a bfloat16 copy).  Rows matter for time as well as memory: every
chunk adds its share into the whole ``(V, d)`` weight gradient, a pass over
``4 V d`` bytes whatever the chunk's size, so a chunk of a few rows spends
its time moving that sum through memory rather than multiplying.  Chapter 6
measures time and memory over budgets from 16 MiB to 1 GiB.
"""


# --------------------------------------------------------------------------
# Checks, the chunk size and the shared denominator
# --------------------------------------------------------------------------


def check_hidden_weight_labels(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    validate: bool = True,
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
        validate: also check that every label lies in ``[0, V)`` or equals
            ``ignore_index``.  That check reads the labels' values: on a
            GPU it waits for the device (three device-to-host copies).  The
            other checks read only shapes, dtypes and devices.

    Raises:
        TypeError: a non-tensor argument, non-float ``hidden``/``weight``,
            ``hidden`` and ``weight`` of different dtypes, non-integer
            ``labels``, an ``ignore_index`` that is not an ``int``, or a
            ``validate`` that is not a ``bool``.
        ValueError: wrong ranks, an empty dimension, ``weight``'s ``d``
            not matching ``hidden``'s, ``labels`` not ``(B, T)``, the two
            float tensors on different devices, or (with ``validate``) a
            label outside ``[0, V)``.
    """
    require_ignore_index(ignore_index)
    _require_bool(validate, "validate")
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
    if validate:
        require_labels_in_range(labels, vocab, ignore_index, "labels")
    return batch, time, hidden_size, vocab


def _require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def _require_float_dtype(dtype: Any, name: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype; got {dtype!r}")
    return dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and narrower floats, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def logits_row_bytes(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one position of a chunk holds, for inputs of ``dtype``.

    A float32 or float64 input: one row of logits in its dtype,
    ``V * itemsize``.  A narrower input (bfloat16, float16): the row of
    the matrix product in that dtype, its float32 copy, and an eighth of
    a row in both dtypes for the buffers that carry the weight gradient's
    product into the float32 sum, ``6.75 V`` bytes for bfloat16.

    Args:
        vocab: ``V``, an ``int >= 1``.
        dtype: the dtype of ``hidden`` and ``weight``, a floating
            ``torch.dtype``.
    """
    vocab = require_positive_int(vocab, "vocab")
    dtype = _require_float_dtype(dtype, "dtype")
    compute = _compute_dtype(dtype)
    row = vocab * compute.itemsize
    if compute != dtype:
        row += vocab * dtype.itemsize + (vocab * (dtype.itemsize + row // vocab)) // 8
    return row


def chunk_rows(
    vocab: int,
    hidden_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    chunk_bytes: int | None = None,
) -> int:
    """Rows per chunk that fit in a budget of ``chunk_bytes`` bytes.

    ``chunk_bytes // logits_row_bytes(vocab, dtype)``.

    Args:
        vocab: ``V``, an ``int >= 1``.
        hidden_size: ``d``, an ``int >= 1``.
        dtype: the dtype of ``hidden`` and ``weight``.
        chunk_bytes: bytes allowed for the logits block, an ``int >= 1``;
            ``None`` (:data:`DEFAULT_CHUNK_BYTES`) for the bytes of the
            float32 weight gradient, ``4 V d``, and then at least one row.

    Raises:
        ValueError: an explicit ``chunk_bytes`` smaller than one row
            (:func:`logits_row_bytes`): no chunk fits the budget.
    """
    row = logits_row_bytes(vocab, dtype)
    hidden_size = require_positive_int(hidden_size, "hidden_size")
    if chunk_bytes is None:
        return max(1, (4 * vocab * hidden_size) // row)
    chunk_bytes = require_positive_int(chunk_bytes, "chunk_bytes")
    if chunk_bytes < row:
        raise ValueError(
            f"chunk_bytes must hold at least one row of logits, {row} bytes "
            f"at V = {vocab} in {dtype}; got {chunk_bytes}"
        )
    return chunk_bytes // row


def _resolve_chunk_size(
    chunk_size: int | None,
    chunk_bytes: int | None,
    vocab: int,
    hidden_size: int,
    dtype: torch.dtype,
) -> int:
    """The row count ``chunk_size``, or the rows that fit ``chunk_bytes``."""
    if chunk_size is not None:
        if chunk_bytes is not None:
            raise ValueError(
                "chunk_size must be None when chunk_bytes is given "
                f"(pass one of them); got chunk_size={chunk_size!r} and "
                f"chunk_bytes={chunk_bytes!r}"
            )
        return require_positive_int(chunk_size, "chunk_size")
    return chunk_rows(vocab, hidden_size, dtype, chunk_bytes=chunk_bytes)


def _resolve_validate(validate: bool | None, device: torch.device) -> bool:
    if validate is None:
        return device.type == "cpu"
    return _require_bool(validate, "validate")


def _inverse_denominator(
    num_items_in_batch: NumItems,
    scored: int,
    dtype: torch.dtype,
    device: torch.device,
    validate: bool,
) -> torch.Tensor | None:
    """``1 / D`` as a 0-d tensor on ``device``; ``None`` for the mean of nothing.

    ``D`` is ``num_items_in_batch`` when given, else ``scored``.  A tensor
    ``num_items_in_batch`` stays on its device unless ``validate`` asks for
    its value to be checked (``>= 1``), which reads it.
    """
    if num_items_in_batch is None:
        if scored == 0:
            return None
        return torch.full((), 1.0 / scored, dtype=dtype, device=device)
    if validate or not isinstance(num_items_in_batch, torch.Tensor):
        value = require_num_items(num_items_in_batch, "num_items_in_batch")
    else:
        value = _num_items_without_reading(num_items_in_batch)
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reciprocal()
    return torch.full((), 1.0 / value, dtype=dtype, device=device)


def _num_items_without_reading(value: torch.Tensor) -> torch.Tensor:
    """The checks of ``require_num_items`` that need no device read."""
    if value.dim() != 0:
        raise ValueError(
            "num_items_in_batch must be a 0-D tensor (a single count); "
            f"got shape {tuple(value.shape)}"
        )
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(
            "num_items_in_batch must hold integer values (a count of scored "
            f"tokens); got {value.dtype}"
        )
    return value


def _scored_rows(
    labels: torch.Tensor, device: torch.device, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(targets of the scored rows (M,), their rows (M,) or None, M)``.

    The rows are ``None`` when every one of the ``N`` rows is scored.
    Finding them is the one step that needs a number on the host, ``M``
    (``torch.nonzero``): on a GPU, one device-to-host synchronisation.
    """
    targets = shift_labels_with_padding(labels, ignore_index).view(-1).to(device)
    rows = torch.nonzero(targets != ignore_index).squeeze(1)
    scored = rows.numel()
    if scored == targets.numel():
        return targets, None, scored
    return targets.index_select(0, rows), rows, scored


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
    compute_dtype = _compute_dtype(hidden_chunk.dtype)
    logits = (hidden_chunk @ weight.T).to(compute_dtype)
    return F.cross_entropy(
        logits, targets_chunk, ignore_index=ignore_index, reduction="sum"
    )


def checkpointed_chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss summed chunk by chunk, each chunk under checkpointing.

    Autograd saves nothing inside a checkpointed chunk; the backward pass
    recomputes the chunk's logits, so at most one chunk's ``(C, V)``
    tensors exist at a time (three of them while its ``log_softmax`` is
    differentiated).  The cost is a second forward matmul per chunk.

    Args:
        hidden: ``(B, T, d)`` float.
        weight: ``(V, d)`` float.
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` = ignored.
        chunk_size: positions per chunk (of the ``B*T`` flattened
            positions), >= 1; or ``None`` to derive it from
            ``chunk_bytes`` (:func:`chunk_rows`).
        chunk_bytes: bytes allowed for one ``(C, V)`` block (``None``:
            :data:`DEFAULT_CHUNK_BYTES`); not together with ``chunk_size``.
        num_items_in_batch: divide the summed loss by this (an ``int >= 1``
            or a 0-D integer tensor ``>= 1``) instead of taking the mean
            over scored positions.
        ignore_index: label value that is not scored (an ``int``).

    Returns:
        0-d tensor: the same value as
        :func:`companion.causal_lm_loss.label_padding_loss` of
        ``hidden @ weight.T``.
    """
    _, _, hidden_size, vocab = check_hidden_weight_labels(
        hidden, weight, labels, ignore_index
    )
    chunk_size = _resolve_chunk_size(
        chunk_size, chunk_bytes, vocab, hidden_size, hidden.dtype
    )
    value = require_num_items(num_items_in_batch, "num_items_in_batch")
    targets = shift_labels_with_padding(labels, ignore_index)
    targets = targets.view(-1).to(hidden.device)
    scored = int((targets != ignore_index).sum())
    denominator = float(value) if value is not None else float(scored)
    hidden_flat = hidden.reshape(-1, hidden_size)
    compute_dtype = _compute_dtype(hidden.dtype)
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
    return total / (denominator if denominator else 0.0)


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


def _will_accumulate_into(weight: torch.Tensor) -> bool:
    """Whether the running backward pass will write ``weight.grad``.

    ``False`` under ``torch.autograd.grad`` or ``backward(inputs=...)``
    without ``weight``; where PyTorch's private query is missing, ``False``,
    which sends the caller down the always-correct path.
    """
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
    if will_execute is None or edge is None:
        return False
    try:
        return bool(will_execute(edge(weight).node))
    except RuntimeError:
        return False


def _accumulates_in_place(weight: torch.Tensor) -> bool:
    """The safe case for writing the weight gradient into ``weight.grad``.

    A leaf that requires grad, whose ``.grad`` already exists as a dense,
    contiguous tensor of its own dtype, shape and device that is not itself
    part of a graph, and with no hook that should see the gradient
    (``register_hook``, ``register_post_accumulate_grad_hook``).
    """
    if not (weight.is_leaf and weight.requires_grad):
        return False
    grad = weight.grad
    return bool(
        grad is not None
        and not grad.requires_grad
        and grad.layout == torch.strided
        and grad.is_contiguous()
        and grad.dtype == weight.dtype
        and grad.shape == weight.shape
        and grad.device == weight.device
        and not weight._backward_hooks
        and not getattr(weight, "_post_accumulate_grad_hooks", None)
    )


def chunk_pass(
    hidden_flat: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    chunk_size: int,
    inv_denominator: torch.Tensor | None,
    *,
    want_loss: bool,
    grad_hidden: torch.Tensor | None,
    weight_sum: torch.Tensor | None,
) -> torch.Tensor | None:
    """One pass over the scored rows, a ``(C, V)`` block at a time.

    The loop of :class:`ChunkedLinearCrossEntropy`.  Only shapes, dtypes
    and types are checked here (nothing that reads a tensor's values).

    Args:
        hidden_flat: ``(N, d)``, weight ``(V, d)``, same float dtype.
        targets: ``(M,)`` int64, the targets of the scored rows.
        rows: ``(M,)`` int64, which rows of ``hidden_flat`` are scored, or
            ``None`` for all of them (``M = N``).
        chunk_size: rows per chunk.
        inv_denominator: 0-d tensor ``1 / D`` in the compute dtype, or
            ``None`` (nothing scored, so no chunk runs).
        want_loss: return the summed loss (unscaled).
        grad_hidden: ``(N, d)`` or ``None``: its scored rows receive
            ``G W / D``; the others are left alone.
        weight_sum: ``(V, d)`` in the compute dtype, or ``None``: receives
            ``+= G^T H / D``.

    Returns:
        The summed loss of the scored rows (``want_loss``), else ``None``.
    """
    _check_chunk_pass(hidden_flat, weight, targets, rows, chunk_size,
                      inv_denominator, grad_hidden, weight_sum)
    dtype = hidden_flat.dtype
    compute = _compute_dtype(dtype)
    device = hidden_flat.device
    scored = targets.numel()
    vocab, hidden_size = weight.shape
    loss_sum = torch.zeros((), dtype=compute, device=device) if want_loss else None
    if scored == 0:
        return loss_sum
    chunk = min(chunk_size, scored)
    narrow = compute != dtype
    # Allocated once, reused by every chunk: the (C, V) block in the
    # compute dtype, and for a narrow input the product in its own dtype
    # (which becomes the narrow copy of the gradient block).
    block = torch.empty((chunk, vocab), dtype=compute, device=device)
    product = torch.empty((chunk, vocab), dtype=dtype, device=device) if narrow else None
    minus_one = torch.full((chunk, 1), -1.0, dtype=compute, device=device)
    gradients = grad_hidden is not None or weight_sum is not None
    gathered = None
    if rows is not None:
        gathered = torch.empty((chunk, hidden_size), dtype=dtype, device=device)
    rows_grad = None
    if rows is not None and grad_hidden is not None:
        rows_grad = torch.empty((chunk, hidden_size), dtype=dtype, device=device)
    weight_rows = vocab
    weight_buffer = weight_buffer_wide = None
    if narrow and weight_sum is not None:
        # The product G^T H of a chunk, a slice of the vocabulary at a
        # time, before it joins the float32 sum (copied to float32 first:
        # a mixed-dtype add_ is twice as slow), an eighth of the block.
        weight_rows = max(1, min(vocab, (chunk * vocab) // (8 * hidden_size)))
        weight_buffer = torch.empty(
            (weight_rows, hidden_size), dtype=dtype, device=device
        )
        weight_buffer_wide = torch.empty(
            (weight_rows, hidden_size), dtype=compute, device=device
        )

    for start in range(0, scored, chunk):
        stop = min(start + chunk, scored)
        size = stop - start
        target = targets[start:stop].unsqueeze(1)
        if rows is None:
            hidden_chunk = hidden_flat[start:stop]
        else:
            index = rows[start:stop]
            hidden_chunk = torch.index_select(
                hidden_flat, 0, index, out=gathered[:size]
            )
        logits = block[:size]
        if narrow:
            torch.mm(hidden_chunk, weight.T, out=product[:size])
            logits.copy_(product[:size])
        else:
            torch.mm(hidden_chunk, weight.T, out=logits)
        # log-softmax in place: one fused pass, stable (it subtracts the
        # row maximum), and the loss is minus its value at the target.
        torch.log_softmax(logits, 1, out=logits)
        if loss_sum is not None:
            loss_sum.sub_(logits.gather(1, target).sum())
        if not gradients:
            continue
        # exp(log softmax) - onehot = d loss / d logits, still unscaled.
        logits.exp_()
        logits.scatter_add_(1, target, minus_one[:size])
        if narrow:
            # Divided by D in float32, then the one rounding to the narrow
            # dtype that the two products need.  (torch.mul with a narrow
            # out= is five times slower than these two passes.)
            logits.mul_(inv_denominator)
            gradient = product[:size].copy_(logits)
            hidden_scaled = hidden_chunk
        else:
            gradient = logits
            hidden_scaled = hidden_chunk * inv_denominator
        if grad_hidden is not None:
            if rows is None:
                out = grad_hidden[start:stop]
            else:
                out = rows_grad[:size]
            torch.mm(gradient, weight, out=out)
            if not narrow:
                out.mul_(inv_denominator)
            if rows is not None:
                grad_hidden.index_copy_(0, index, out)
        if weight_sum is not None:
            if not narrow:
                weight_sum.addmm_(gradient.T, hidden_scaled)
                continue
            for first in range(0, vocab, weight_rows):
                last = min(first + weight_rows, vocab)
                part = torch.mm(
                    gradient[:, first:last].T,
                    hidden_scaled,
                    out=weight_buffer[: last - first],
                )
                weight_sum[first:last].add_(
                    weight_buffer_wide[: last - first].copy_(part)
                )
    return loss_sum


def _check_chunk_pass(
    hidden_flat: Any,
    weight: Any,
    targets: Any,
    rows: Any,
    chunk_size: Any,
    inv_denominator: Any,
    grad_hidden: Any,
    weight_sum: Any,
) -> None:
    require_tensor(hidden_flat, "hidden_flat")
    require_rank(hidden_flat, 2, "hidden_flat", "(N, d)")
    require_floating(hidden_flat, "hidden_flat")
    require_tensor(weight, "weight")
    require_rank(weight, 2, "weight", "(V, d)")
    if weight.dtype != hidden_flat.dtype or weight.shape[1] != hidden_flat.shape[1]:
        raise ValueError(
            f"weight must be (V, d) of hidden_flat's dtype {hidden_flat.dtype} and "
            f"d = {hidden_flat.shape[1]}; got {tuple(weight.shape)} {weight.dtype}"
        )
    require_tensor(targets, "targets")
    require_rank(targets, 1, "targets", "(M,)")
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be int64; got {targets.dtype}")
    expected_rows = hidden_flat.shape[0] if rows is None else None
    if rows is not None:
        require_tensor(rows, "rows")
        if rows.shape != targets.shape or rows.dtype != torch.long:
            raise ValueError(
                f"rows must be int64 of targets' shape {tuple(targets.shape)}; "
                f"got {tuple(rows.shape)} {rows.dtype}"
            )
    elif targets.numel() != expected_rows:
        raise ValueError(
            f"targets must have one entry per row of hidden_flat ({expected_rows}) "
            f"when rows is None; got {targets.numel()}"
        )
    require_positive_int(chunk_size, "chunk_size")
    if inv_denominator is not None:
        require_tensor(inv_denominator, "inv_denominator")
        if inv_denominator.dim() != 0:
            raise ValueError(
                f"inv_denominator must be a 0-d tensor; got shape {tuple(inv_denominator.shape)}"
            )
    elif targets.numel():
        raise ValueError("inv_denominator must be a 0-d tensor when a row is scored; got None")
    if grad_hidden is not None and (
        not isinstance(grad_hidden, torch.Tensor) or grad_hidden.shape != hidden_flat.shape
    ):
        raise ValueError(f"grad_hidden must be None or a tensor of shape {tuple(hidden_flat.shape)}")
    if weight_sum is not None and (
        not isinstance(weight_sum, torch.Tensor) or weight_sum.shape != weight.shape
        or weight_sum.dtype != _compute_dtype(weight.dtype)
    ):
        raise ValueError(
            f"weight_sum must be None or a {_compute_dtype(weight.dtype)} tensor "
            f"of shape {tuple(weight.shape)}"
        )


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss of ``hidden_flat @ weight.T``, gradients computed in forward.

    For each chunk of scored rows the forward pass forms the ``(C, V)``
    logits once, turns them in place into log-probabilities (whose value
    at the target is minus the row's loss), then, in the *same* buffer,
    into ``d loss / d logits = softmax - onehot``, and multiplies that
    into the two gradients: ``grad_hidden[rows] = G W / D`` and
    ``grad_weight += G^T H[rows] / D``.  Rows whose target is ignored
    never enter a product; their gradient is zero.  For bfloat16 or
    float16 inputs the products run in that dtype and everything else
    (the log-softmax, the gradient block, the weight-gradient sum) in
    float32; the float32 gradient block is rounded to the input dtype
    once, on its way into the two products.

    The backward pass only scales the stored gradients by the incoming
    gradient ``g``: in place when the graph is freed after it (the usual
    ``loss.backward()``), on copies when it is kept
    (``retain_graph=True``), so that a second backward pass through the
    same graph adds the same gradients again, as with the eager loss.

    **Accumulation into** ``weight.grad``.  When ``weight.grad`` already
    exists (a second micro-batch of gradient accumulation) and it is safe
    (``weight`` is a leaf without gradient hooks, its ``.grad`` a dense
    tensor of its dtype), the forward pass adds the weight gradient into
    ``weight.grad`` itself instead of a fresh ``(V, d)`` tensor, and the
    backward pass returns ``None`` for ``weight``.  That is exact for
    ``g = 1`` and a single backward pass that writes ``weight.grad``.
    Otherwise (``g != 1``, a second pass through a retained graph,
    ``torch.autograd.grad``, or ``weight.grad`` replaced in between) the
    backward pass computes the weight gradient again, takes the forward
    pass's share back out of ``weight.grad`` if it is still there, and
    returns ``g`` times it like any other gradient: correct, at the cost
    of two more products per chunk.  Reading ``g`` is one device-to-host
    copy on a GPU.  Do not zero ``weight.grad`` *in place* between the
    forward and the backward pass (``zero_grad()`` sets it to ``None``,
    which is handled).

    Only the gradients that will be used are computed: those of the
    inputs that require grad, and none when ``compute_gradients`` is
    false.  Pass ``torch.is_grad_enabled()`` (as
    :func:`chunked_causal_lm_loss` does): under ``torch.no_grad()`` no
    graph is built, so the forward pass computes the loss alone.  Grad
    mode is always off inside ``forward``, so it cannot tell by itself.

    Inputs of ``forward``: ``hidden_flat (N, d)`` float,
    ``weight (V, d)`` float, ``targets (M,)`` int64 (the shifted targets
    of the scored rows), ``rows (M,)`` int64 (which rows of
    ``hidden_flat`` they are) or ``None`` (all ``N``), ``chunk_size``
    int, ``inv_denominator`` a 0-d tensor ``1 / D`` in the compute dtype
    or ``None`` (nothing scored and no ``num_items_in_batch``: the loss is
    ``nan``, the gradients zero), ``compute_gradients`` bool.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_flat: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        rows: torch.Tensor | None,
        chunk_size: int,
        inv_denominator: torch.Tensor | None,
        compute_gradients: bool,
    ) -> torch.Tensor:
        dtype = hidden_flat.dtype
        compute = _compute_dtype(dtype)
        device = hidden_flat.device
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if not compute_gradients:  # no graph (torch.no_grad()): loss only
            need_hidden = need_weight = False
        in_place = need_weight and _accumulates_in_place(weight)
        grad_hidden = weight_sum = None
        if need_hidden:
            grad_hidden = (
                torch.empty_like(hidden_flat)
                if rows is None and targets.numel()
                else torch.zeros_like(hidden_flat)
            )
        if need_weight:
            if in_place and compute == dtype:
                weight_sum = weight.grad
            else:
                weight_sum = torch.zeros(weight.shape, dtype=compute, device=device)

        loss_sum = chunk_pass(
            hidden_flat, weight, targets, rows, chunk_size, inv_denominator,
            want_loss=True, grad_hidden=grad_hidden, weight_sum=weight_sum,
        )

        grad_weight = None
        if need_weight and compute != dtype:
            if in_place:
                weight.grad.add_(weight_sum)
            else:
                grad_weight = weight_sum.to(dtype)
            weight_sum = None
        elif need_weight and not in_place:
            grad_weight = weight_sum
        ctx.in_place = in_place
        ctx.backward_passes = 0
        ctx.chunk_size = chunk_size
        ctx.inv_denominator = inv_denominator
        if in_place:
            ctx.weight = weight
            ctx.written_grad = weight.grad
            ctx.save_for_backward(grad_hidden, None, hidden_flat, targets, rows)
        else:
            ctx.save_for_backward(grad_hidden, grad_weight, None, None, None)
        if inv_denominator is None:
            return torch.full((), math.nan, dtype=compute, device=device)
        return loss_sum * inv_denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, hidden_flat, targets, rows = ctx.saved_tensors
        stored = (grad_hidden, grad_weight if not ctx.in_place else True)
        for name, grad, needed in zip(("hidden", "weight"), stored, ctx.needs_input_grad):
            if needed and grad is None:
                raise RuntimeError(
                    f"ChunkedLinearCrossEntropy: the gradient of {name} was "
                    "not computed in the forward pass (compute_gradients "
                    "was False); pass torch.is_grad_enabled()"
                )
        ctx.backward_passes += 1
        keeps_graph = _backward_keeps_graph()
        if grad_hidden is not None:
            # retain_graph=True: a later backward pass through this graph
            # needs the stored gradient unchanged, so scale a copy.  Else
            # scale in place: no second tensor, and no test of whether
            # grad_loss is 1, which on a GPU would wait for the device.
            grad_hidden = grad_hidden * grad_loss if keeps_graph else grad_hidden.mul_(grad_loss)
        if not ctx.in_place:
            if grad_weight is not None:
                grad_weight = grad_weight * grad_loss if keeps_graph else grad_weight.mul_(grad_loss)
            return grad_hidden, grad_weight, None, None, None, None, None
        weight = ctx.weight
        written = weight.grad is ctx.written_grad
        if (
            ctx.backward_passes == 1
            and written
            and _will_accumulate_into(weight)
            and bool(grad_loss == 1)
        ):
            # The forward pass already added exactly this into weight.grad.
            return grad_hidden, None, None, None, None, None, None
        share = _weight_gradient(
            hidden_flat, weight, targets, rows, ctx.chunk_size, ctx.inv_denominator
        )
        if ctx.backward_passes == 1 and written:
            weight.grad.sub_(share)  # take the forward pass's share back
        return grad_hidden, share.mul_(grad_loss), None, None, None, None, None


def _weight_gradient(
    hidden_flat: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    chunk_size: int,
    inv_denominator: torch.Tensor | None,
) -> torch.Tensor:
    """``G^T H / D`` again, in ``weight``'s dtype, for the backward pass."""
    compute = _compute_dtype(weight.dtype)
    total = torch.zeros(weight.shape, dtype=compute, device=weight.device)
    with torch.no_grad():
        chunk_pass(
            hidden_flat.detach(), weight.detach(), targets, rows, chunk_size,
            inv_denominator, want_loss=False, grad_hidden=None, weight_sum=total,
        )
    return total.to(weight.dtype)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
    validate: bool | None = None,
) -> torch.Tensor:
    """Causal-LM loss of ``hidden @ weight.T`` without the full logits.

    Same value as ``ForCausalLMLoss(hidden @ weight.T, labels, V,
    num_items_in_batch)``; same gradients with respect to ``hidden`` and
    ``weight``.  Peak extra memory is one chunk's block
    (``chunk_bytes``, :func:`logits_row_bytes` per row) plus the two
    gradients, ``(B*T, d)`` and ``(V, d)`` (and for bfloat16 or float16
    inputs the float32 ``(V, d)`` sum of the weight gradient).  Positions
    whose target is ignored (padding, masked prompts) cost no matrix
    product.  The forward pass computes the gradients of the inputs that
    require grad, and none under ``torch.no_grad()`` or
    ``torch.inference_mode()``, where it costs one matrix product per
    chunk, like the eager loss's forward.  A second backward pass through
    a retained graph (``retain_graph=True``) adds the same gradients
    again.  When ``weight.grad`` already exists, the weight gradient is
    added into it (see :class:`ChunkedLinearCrossEntropy`).

    Device-to-host synchronisation on a GPU: one, to count the scored
    positions (``torch.nonzero``), which the loop over chunks needs;
    with ``validate`` three more for the label range (whether any label
    is scored, the smallest and the largest) and one for a tensor
    ``num_items_in_batch``.

    Args:
        hidden: ``(B, T, d)`` float, the final hidden states.
        weight: ``(V, d)`` float, the output projection, same dtype and
            device.
        labels: ``(B, T)`` of any integer dtype, ``ignore_index`` =
            ignored; position ``t`` is scored against ``labels[:, t + 1]``.
        chunk_size: scored positions per chunk, >= 1; ``None`` (the
            default) derives it from ``chunk_bytes``.
        chunk_bytes: bytes allowed for a chunk's logits block, an
            ``int`` of at least one row (:func:`chunk_rows`); ``None`` for
            :data:`DEFAULT_CHUNK_BYTES`.  Not together with ``chunk_size``.
        num_items_in_batch: divide the summed loss by this (an ``int >= 1``
            or a 0-D integer tensor ``>= 1``; floats are rejected) instead
            of taking the mean over scored positions, as in gradient
            accumulation.
        ignore_index: label value that is not scored (an ``int``).
        validate: check the values of ``labels`` (in ``[0, V)`` or
            ``ignore_index``) and of a tensor ``num_items_in_batch``
            (``>= 1``).  ``None`` (the default): on CPU tensors yes, on a
            GPU no, since reading values waits for the device.  An
            unchecked out-of-range label gives an indexing error or a
            wrong loss.

    Returns:
        0-d tensor (float32 for float32 or narrower inputs, float64 for
        float64): the loss; ``nan`` with zero gradients when no position
        is scored and ``num_items_in_batch`` is ``None``.
    """
    validate = _resolve_validate(
        validate, hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")
    )
    _, _, hidden_size, vocab = check_hidden_weight_labels(
        hidden, weight, labels, ignore_index, validate=validate
    )
    chunk_size = _resolve_chunk_size(
        chunk_size, chunk_bytes, vocab, hidden_size, hidden.dtype
    )
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, torch.Tensor):
        require_num_items(num_items_in_batch, "num_items_in_batch")
    targets, rows, scored = _scored_rows(labels, hidden.device, ignore_index)
    inv_denominator = _inverse_denominator(
        num_items_in_batch, scored, _compute_dtype(hidden.dtype), hidden.device, validate
    )
    # Under no_grad (an evaluation loop) no graph is built: loss only.
    return ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden_size),
        weight,
        targets,
        rows,
        chunk_size,
        inv_denominator,
        torch.is_grad_enabled(),
    )
