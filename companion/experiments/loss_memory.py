"""Chapter 6's experiments: the formulations, their checks, and the benchmark's results.

* :data:`LOSS_VARIANTS`: the four formulations the chapter's small
  measurements compare, all called as ``loss_fn(hidden, weight, labels,
  **options)``.  The two eager ones, :func:`eager_shift_and_slice_loss` and
  :func:`eager_label_padding_loss`, are the library's own formulations of
  :mod:`companion.causal_lm_loss` on ``hidden @ weight.T``; the two chunked
  ones are :mod:`companion.chunked_loss`'s;
* the chapter's small measurements with the exact tracker
  (:func:`tracked_and_estimated_peaks`, :func:`memory_timelines`,
  :func:`kept_logits_peaks`, :func:`torchtune_style_peaks`,
  :func:`accumulation_check`), the count behind the checkpointed variant's
  peak (:func:`checkpointed_moments`), the operators that would wait for a
  GPU (:func:`host_reads`) and the errors in bfloat16
  (:func:`low_precision_errors`);
* the check of a chunked loss against the float64 NumPy reference, eager
  autograd and transformers' ``ForCausalLMLoss``
  (:func:`agreement_with_references`);
* readers of the benchmark's results file (:func:`results_directory`,
  :func:`find_results_file`, :func:`find_record`, :func:`sizes_of`,
  :func:`measured`) and what the chapter draws from it
  (:func:`side_by_side`, :func:`goal_report`, :func:`floor_bytes`,
  :func:`sweep_table`, :func:`tracker_disagreements`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils._python_dispatch

from companion import IGNORE_INDEX, reference
from companion._checks import require_positive_int, require_sequence
from companion.causal_lm_loss import (
    NumItems,
    label_padding_loss,
    shift_and_slice_loss,
    shift_labels_with_padding,
)
from companion.chunked_loss import (
    check_hidden_weight_labels,
    checkpointed_chunked_loss,
    chunked_causal_lm_loss,
)
from companion.memory import (
    LossFunction,
    TensorMemoryTracker,
    estimate_peak_bytes,
    measure_peak_tensor_bytes,
)

__all__ = [
    "CHUNKED_VARIANTS",
    "EAGER_VARIANTS",
    "GIB",
    "HOST_READ_OPS",
    "LOSS_VARIANTS",
    "MEMORY_FLOOR_FACTOR",
    "NOT_RUN_STATUSES",
    "OURS",
    "RESULTS_FILE_NAMES",
    "TIME_GOAL_RATIO",
    "TIME_GOAL_SIZE",
    "accumulation_check",
    "agreement_with_references",
    "checkpointed_moments",
    "eager_label_padding_loss",
    "eager_shift_and_slice_loss",
    "find_record",
    "find_results_file",
    "floor_bytes",
    "goal_report",
    "host_reads",
    "kept_logits_peaks",
    "low_precision_errors",
    "measured",
    "memory_timelines",
    "peak_total_bytes",
    "record_size",
    "results_directory",
    "side_by_side",
    "sizes_of",
    "sweep_table",
    "torchtune_style_peaks",
    "tracked_and_estimated_peaks",
    "tracker_disagreements",
    "transformers_causal_lm_loss",
    "variant_options",
]

GIB = 2**30


# --------------------------------------------------------------------------
# The two eager formulations, from hidden states
# --------------------------------------------------------------------------


def _on_hidden_states(
    formulation: LossFunction,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: NumItems,
    ignore_index: int,
) -> torch.Tensor:
    """``formulation(hidden @ weight.T, labels, ...)``, inputs checked first."""
    check_hidden_weight_labels(hidden, weight, labels, ignore_index)
    return formulation(
        hidden @ weight.T,
        labels,
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
    )


def eager_shift_and_slice_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`~companion.causal_lm_loss.shift_and_slice_loss` of ``hidden @ weight.T``.

    The ``(B, T, V)`` logits exist in full, and for ``B > 1`` their slice
    is copied by ``.contiguous()``.  The arguments are those of
    :func:`companion.chunked_loss.chunked_causal_lm_loss` without
    ``chunk_size``, and the value is the same: a 0-d tensor, float32 for
    float32 or half inputs, float64 for float64, ``nan`` when nothing is
    scored and ``num_items_in_batch`` is ``None`` (e.g. for ``T = 1``).
    """
    return _on_hidden_states(
        shift_and_slice_loss, hidden, weight, labels, num_items_in_batch, ignore_index
    )


def eager_label_padding_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: NumItems = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`~companion.causal_lm_loss.label_padding_loss` of ``hidden @ weight.T``.

    ``ForCausalLMLoss`` style: the ``(B, T, V)`` logits exist in full and
    are flattened without a copy.  Arguments and value as
    :func:`eager_shift_and_slice_loss`.
    """
    return _on_hidden_states(
        label_padding_loss, hidden, weight, labels, num_items_in_batch, ignore_index
    )


LOSS_VARIANTS: dict[str, LossFunction] = {
    "shift_and_slice": eager_shift_and_slice_loss,
    "label_padding": eager_label_padding_loss,
    "checkpointed_chunks": checkpointed_chunked_loss,
    "chunked_function": chunked_causal_lm_loss,
}
"""The four formulations the chapter compares, by the benchmark's names
(those of :data:`companion.memory.ESTIMATED_VARIANTS`)."""

EAGER_VARIANTS = ("shift_and_slice", "label_padding")
"""The two formulations that materialise the ``(B, T, V)`` logits."""

CHUNKED_VARIANTS = frozenset({"checkpointed_chunks", "chunked_function"})
"""Variants that take a ``chunk_size`` argument."""


# --------------------------------------------------------------------------
# The small measurements: the exact tracker against the count
# --------------------------------------------------------------------------


def variant_options(variant: str, chunk_size: int) -> dict[str, int]:
    """The keyword arguments :data:`LOSS_VARIANTS` ``[variant]`` takes.

    ``{"chunk_size": chunk_size}`` for the chunked variants
    (:data:`CHUNKED_VARIANTS`), ``{}`` for the eager ones.

    Raises:
        ValueError: ``variant`` is not a key of :data:`LOSS_VARIANTS`, or
            ``chunk_size < 1``.
        TypeError: ``chunk_size`` is not an ``int``.
    """
    if variant not in LOSS_VARIANTS:
        raise ValueError(
            f"variant must be one of {sorted(LOSS_VARIANTS)}; got {variant!r}"
        )
    chunk_size = require_positive_int(chunk_size, "chunk_size")
    return {"chunk_size": chunk_size} if variant in CHUNKED_VARIANTS else {}


def tracked_and_estimated_peaks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int,
) -> list[dict[str, Any]]:
    """Each formulation's exact peak beside the first-principles estimate.

    Args:
        hidden: ``(B, T, d)`` float, the final hidden states, ``requires_grad``
            (its ``.grad`` is reset; the tracker does not count it).
        weight: ``(V, d)`` float, the output projection, same dtype.
        labels: ``(B, T)`` int, ``-100`` = ignored.
        chunk_size: positions per chunk of the chunked variants, >= 1.

    Returns:
        One dict per variant, in the order of :data:`LOSS_VARIANTS`:
        ``variant``, ``tracked_bytes``
        (:func:`companion.memory.measure_peak_tensor_bytes` of one forward
        and backward pass) and ``estimate_bytes``
        (:func:`companion.memory.estimate_peak_bytes` for ``(B, T, V, d)``
        and elements of ``hidden``'s size).
    """
    batch, time, hidden_size, vocab = check_hidden_weight_labels(
        hidden, weight, labels
    )
    require_positive_int(chunk_size, "chunk_size")
    rows = []
    for variant, loss_fn in LOSS_VARIANTS.items():
        tracked = measure_peak_tensor_bytes(
            loss_fn, hidden, weight, labels,
            **variant_options(variant, chunk_size),
        )
        estimate = estimate_peak_bytes(
            variant, batch, time, vocab, hidden_size,
            chunk_size=chunk_size, element_size=hidden.element_size(),
        )
        rows.append(
            {
                "variant": variant,
                "tracked_bytes": tracked,
                "estimate_bytes": estimate,
            }
        )
    return rows


def memory_timelines(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int,
) -> dict[str, dict[str, Any]]:
    """Bytes alive, and when, through one forward and backward pass.

    Every formulation of :data:`LOSS_VARIANTS` runs once under a
    :class:`companion.memory.TensorMemoryTracker`; the gradients of
    ``hidden`` and ``weight`` are reset to ``None`` before each pass and
    after the last.

    Args:
        hidden: ``(B, T, d)`` float, ``requires_grad``.
        weight: ``(V, d)`` float, same dtype.
        labels: ``(B, T)`` int, ``-100`` = ignored.
        chunk_size: positions per chunk of the chunked variants, >= 1.

    Returns:
        Per variant: ``bytes`` (the tracker's ``timeline``, live bytes
        after each operator call, forward then backward), ``seconds`` (the
        tracker's ``times``: when each call ended, from the start of the
        pass) and ``backward_start`` (seconds at which ``backward()`` was
        called).
    """
    check_hidden_weight_labels(hidden, weight, labels)
    require_positive_int(chunk_size, "chunk_size")
    timelines = {}
    for variant, loss_fn in LOSS_VARIANTS.items():
        hidden.grad, weight.grad = None, None
        with TensorMemoryTracker() as tracker:
            loss = loss_fn(
                hidden, weight, labels,
                **variant_options(variant, chunk_size),
            )
            backward_start = tracker.elapsed()
            loss.backward()
        timelines[variant] = {
            "bytes": tracker.timeline,
            "seconds": tracker.times,
            "backward_start": backward_start,
        }
        del loss
    hidden.grad, weight.grad = None, None
    return timelines


def kept_logits_peaks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[float, float]:
    """Peaks of transformers' ``ForCausalLMLoss`` while the caller keeps ``Z``.

    The logits ``Z = hidden @ weight.T``, computed in ``dtype``, stay
    referenced through the backward pass, as a training step's
    ``outputs.logits`` do; ``ForCausalLMLoss`` upcasts them to float32.

    Args:
        hidden: ``(B, T, d)`` float; a detached copy in ``dtype`` is used.
        weight: ``(V, d)`` float, same dtype as ``hidden``.
        labels: ``(B, T)`` int, ``-100`` = ignored.
        dtype: a floating ``torch.dtype`` for ``Z`` (``torch.bfloat16``...).

    Returns:
        ``(forward, forward_and_backward)``: the tracked peaks of the
        forward pass and of the whole pass, in units of one float32
        ``(B, T, V)`` tensor.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    batch, time, _, vocab = check_hidden_weight_labels(hidden, weight, labels)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    float32_logits_bytes = 4 * batch * time * vocab
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    with TensorMemoryTracker() as tracker:
        logits = hidden @ weight.T  # kept, like outputs.logits
        loss = ForCausalLMLoss(logits, labels, vocab)
        forward_peak = tracker.peak_bytes
        loss.backward()
    del logits, loss
    return (
        forward_peak / float32_logits_bytes,
        tracker.peak_bytes / float32_logits_bytes,
    )


def checkpointed_moments(
    vocab: int, hidden_size: int, chunk_size: int
) -> tuple[int, int]:
    """The two moments that may set the checkpointed variant's peak.

    In elements, without the running ``(N, d)`` gradient of the hidden
    states that both share: ``3 C V + V d`` while one chunk's
    ``log_softmax`` is differentiated (three ``(C, V)`` blocks and the
    running ``(V, d)`` weight gradient), and ``3 V d`` while that chunk's
    weight gradient is added to the running sum.  The larger one is the
    peak that :func:`companion.memory.estimate_peak_bytes` counts, for
    ``C = chunk_size <= B T``.

    Args:
        vocab, hidden_size, chunk_size: ``V``, ``d``, ``C``, ints >= 1.

    Returns:
        ``(first, second)`` = ``(3 C V + V d, 3 V d)``.
    """
    vocab = require_positive_int(vocab, "vocab")
    hidden_size = require_positive_int(hidden_size, "hidden_size")
    chunk_size = require_positive_int(chunk_size, "chunk_size")
    weight_grad = vocab * hidden_size
    return 3 * chunk_size * vocab + weight_grad, 3 * weight_grad


# --------------------------------------------------------------------------
# Same loss, same gradients: a chunked loss against three references
# --------------------------------------------------------------------------


def transformers_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch: NumItems = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on the full logits ``hidden @ weight.T``.

    Arguments as :func:`eager_label_padding_loss` (``hidden: (B, T, d)``,
    ``weight: (V, d)``, ``labels: (B, T)``, ``-100`` = ignored); the value
    is a 0-d tensor.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    _, _, _, vocab = check_hidden_weight_labels(hidden, weight, labels)
    return ForCausalLMLoss(
        hidden @ weight.T,
        labels,
        vocab,
        num_items_in_batch=num_items_in_batch,
    )


def _as_float_array(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array; got {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.floating):
        raise TypeError(f"{name} must hold floats; got dtype {value.dtype}")
    return value


def _loss_and_gradients(
    loss_fn: LossFunction,
    hidden: np.ndarray,
    weight: np.ndarray,
    labels: torch.Tensor,
    dtype: torch.dtype,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d hidden, d loss / d weight)`` in ``dtype``."""
    hidden_t = torch.tensor(hidden, dtype=dtype, requires_grad=True)
    weight_t = torch.tensor(weight, dtype=dtype, requires_grad=True)
    loss = loss_fn(hidden_t, weight_t, labels, **options)
    grads = torch.autograd.grad(loss, (hidden_t, weight_t))
    return loss.detach(), *grads


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute value of ``want``."""
    return float((got - want).abs().max() / want.abs().max())


def agreement_with_references(
    loss_fn: LossFunction,
    hidden: np.ndarray,
    weight: np.ndarray,
    labels: np.ndarray,
    *,
    chunk_size: int,
    num_items_in_batch: int | None = None,
) -> dict[str, Any]:
    """How closely a chunked loss and its gradients match three references.

    ``loss_fn`` (``chunked_causal_lm_loss`` or ``checkpointed_chunked_loss``)
    runs in float64 and in float32 from the same inputs.  In float64 its
    loss is compared with the NumPy reference
    :func:`companion.reference.causal_lm_loss` of ``hidden @ weight.T`` and
    its gradients with those of :func:`eager_label_padding_loss`; in
    float32 its loss and gradients are compared with those of
    :func:`eager_label_padding_loss` and of
    :func:`transformers_causal_lm_loss`.  Each error is relative: the
    largest absolute difference over the largest absolute value of the
    reference.

    Args:
        loss_fn: ``loss_fn(hidden, weight, labels, *, chunk_size,
            num_items_in_batch)``, a 0-d tensor.
        hidden: ``(B, T, d)`` float NumPy array.
        weight: ``(V, d)`` float NumPy array.
        labels: ``(B, T)`` integer NumPy array, ``-100`` = ignored.
        chunk_size: positions per chunk, >= 1.
        num_items_in_batch: the denominator, or ``None`` for the number of
            scored targets.

    Returns:
        ``loss`` (the float64 value, a float), ``float64_error`` and
        ``float32_error`` (the largest relative error in each dtype), and
        ``unscored_gradient_is_zero``: whether, in both dtypes, the
        gradient of every position with no target (its shifted label
        ignored) is exactly zero.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    hidden = _as_float_array(hidden, "hidden")
    weight = _as_float_array(weight, "weight")
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a NumPy array; got {type(labels).__name__}")
    labels_t = torch.as_tensor(labels)
    check_hidden_weight_labels(
        torch.as_tensor(hidden), torch.as_tensor(weight), labels_t
    )
    chunk_size = require_positive_int(chunk_size, "chunk_size")
    denominator = {"num_items_in_batch": num_items_in_batch}
    expected64 = reference.causal_lm_loss(
        hidden @ weight.T, labels, num_items_in_batch=num_items_in_batch
    )
    eager64, eager32, hf32 = (
        _loss_and_gradients(
            reference_fn, hidden, weight, labels_t, dtype, **denominator
        )
        for reference_fn, dtype in (
            (eager_label_padding_loss, torch.float64),
            (eager_label_padding_loss, torch.float32),
            (transformers_causal_lm_loss, torch.float32),
        )
    )
    options = {"chunk_size": chunk_size, **denominator}
    got64, got32 = (
        _loss_and_gradients(loss_fn, hidden, weight, labels_t, dtype, **options)
        for dtype in (torch.float64, torch.float32)
    )
    errors64 = [
        abs(float(got64[0]) - expected64) / abs(expected64),
        _relative_error(got64[1], eager64[1]),
        _relative_error(got64[2], eager64[2]),
    ]
    errors32 = [
        _relative_error(got, want)
        for reference32 in (eager32, hf32)
        for got, want in zip(got32, reference32)
    ]
    unscored = shift_labels_with_padding(labels_t) == IGNORE_INDEX
    return {
        "loss": float(got64[0]),
        "float64_error": max(errors64),
        "float32_error": max(errors32),
        "unscored_gradient_is_zero": not got64[1][unscored].any()
        and not got32[1][unscored].any(),
    }


# --------------------------------------------------------------------------
# The chunked loss's new behaviours, measured small
# --------------------------------------------------------------------------

HOST_READ_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal")
"""Operators that put a tensor's *value* on the host: on a GPU each waits
for the device (``.item()``, ``int()``, ``bool()`` dispatch
``_local_scalar_dense``; ``torch.nonzero`` must know its output's size)."""


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators of :data:`HOST_READ_OPS` that run in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in HOST_READ_OPS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def host_reads(loss_fn: LossFunction, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Operators that read a value to the host in ``loss_fn(...).backward()``.

    On a CPU nothing waits, but the same operators on a GPU each
    synchronise the host with the device; counting them here says how many
    synchronisations the loss costs there.  Gradients of the tensor
    arguments are reset first.

    Returns:
        ``{operator name: calls}`` for the operators of
        :data:`HOST_READ_OPS` that ran.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None
    with _HostReads() as reads:
        loss_fn(*args, **kwargs).backward()
    return dict(sorted(reads.counts.items()))


def _norm_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` (Frobenius), in float64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def low_precision_errors(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    dtype: torch.dtype = torch.bfloat16,
    chunk_size: int | None = None,
) -> list[dict[str, Any]]:
    """Errors of the loss and its gradients in ``dtype``, against float64.

    ``hidden`` and ``weight`` are rounded to ``dtype`` once; the float64
    reference is the eager loss on exactly those rounded values.  Three
    rows: the chunked loss in ``dtype`` (products in ``dtype``, the rest
    in float32), transformers' route (``ForCausalLMLoss`` on ``dtype``
    logits, which it upcasts with ``.float()``), and the float64 gradient
    merely rounded to ``dtype`` (the error of storing it there at all).

    Args:
        hidden: ``(B, T, d)`` float; weight: ``(V, d)`` float, same dtype;
        labels: ``(B, T)`` int, ``-100`` = ignored.
        dtype: a floating ``torch.dtype`` narrower than float32.
        chunk_size: rows per chunk of the chunked loss (``None``: its
            default budget).

    Returns:
        One dict per row: ``route``, ``loss`` (relative error of the loss),
        ``hidden`` and ``weight`` (norm-wise relative errors of the two
        gradients, ``||got - want|| / ||want||``), and ``hidden_max`` and
        ``weight_max`` (the largest element error over the largest
        element).
    """
    check_hidden_weight_labels(hidden, weight, labels)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    if dtype.itemsize >= 4:
        raise ValueError(f"dtype must be narrower than float32; got {dtype}")
    narrow_hidden = hidden.detach().to(dtype)
    narrow_weight = weight.detach().to(dtype)
    exact = _loss_and_gradients(
        eager_label_padding_loss, narrow_hidden.double().numpy(),
        narrow_weight.double().numpy(), labels, torch.float64,
    )

    def run(loss_fn: LossFunction, **options: Any) -> tuple[torch.Tensor, ...]:
        h = narrow_hidden.clone().requires_grad_()
        w = narrow_weight.clone().requires_grad_()
        loss = loss_fn(h, w, labels, **options)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))

    routes = {
        "chunked": run(chunked_causal_lm_loss, chunk_size=chunk_size),
        "transformers eager": run(transformers_causal_lm_loss),
        "float64 rounded": (exact[0], exact[1].to(dtype), exact[2].to(dtype)),
    }
    rows = []
    for route, (loss, grad_hidden, grad_weight) in routes.items():
        rows.append(
            {
                "route": route,
                "loss": abs(float(loss) - float(exact[0])) / abs(float(exact[0])),
                "hidden": _norm_error(grad_hidden, exact[1]),
                "weight": _norm_error(grad_weight, exact[2]),
                "hidden_max": _relative_error(grad_hidden.double(), exact[1]),
                "weight_max": _relative_error(grad_weight.double(), exact[2]),
            }
        )
    return rows


def accumulation_check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    micro_batches: int,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """Gradient accumulation into ``weight.grad``: the chunked loss against eager.

    The batch's rows are split into ``micro_batches`` parts; each part's
    loss, divided by the whole batch's count of scored targets
    (``num_items_in_batch``), is back-propagated in turn into the same
    ``weight``, once with the chunked loss and once with the eager loss.
    From the second part on, ``weight.grad`` exists and the chunked loss
    adds into it.

    Args:
        hidden: ``(B, T, d)`` float, ``B`` divisible by ``micro_batches``;
        weight: ``(V, d)`` float; labels: ``(B, T)`` int, ``-100`` = ignored.
        micro_batches: parts, ``>= 2``.
        chunk_size: rows per chunk (``None``: the default budget).

    Returns:
        ``difference``: the largest relative difference between the two
        accumulated weight gradients; ``peaks``: for each micro-batch, the
        live tensor bytes at the peak of the chunked loss's pass
        (:func:`companion.memory.TensorMemoryTracker`), the first without
        and the others with an existing ``weight.grad``; ``weight_grad_bytes``:
        the bytes of one ``(V, d)`` gradient.
    """
    batch, _, _, _ = check_hidden_weight_labels(hidden, weight, labels)
    micro_batches = require_positive_int(micro_batches, "micro_batches")
    if micro_batches < 2 or batch % micro_batches:
        raise ValueError(
            f"micro_batches must be >= 2 and divide B = {batch}; got {micro_batches}"
        )
    num_items = int((shift_labels_with_padding(labels) != IGNORE_INDEX).sum())
    rows = batch // micro_batches
    chunked_weight = weight.detach().clone().requires_grad_()
    eager_weight = weight.detach().clone().requires_grad_()
    peaks = []
    for part in range(micro_batches):
        part_rows = slice(part * rows, (part + 1) * rows)
        part_hidden = hidden.detach()[part_rows]
        with TensorMemoryTracker() as tracker:
            chunked_causal_lm_loss(
                part_hidden, chunked_weight, labels[part_rows],
                chunk_size=chunk_size, num_items_in_batch=num_items,
            ).backward()
        peaks.append(tracker.peak_bytes)
        eager_label_padding_loss(
            part_hidden, eager_weight, labels[part_rows], num_items_in_batch=num_items
        ).backward()
    return {
        "difference": _relative_error(chunked_weight.grad, eager_weight.grad),
        "peaks": peaks,
        "weight_grad_bytes": weight.numel() * weight.element_size(),
    }


def torchtune_style_peaks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_output_chunks: int = 8,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, float]:
    """Live tensors of torchtune's chunked-output loss, in eager mode.

    Reproduces ``CEWithChunkedOutputLoss`` of torchtune 0.6.1: the model's
    output layer returns the logits in ``dtype`` as ``num_output_chunks``
    chunks along the sequence, which the caller keeps; the loss upcasts
    each chunk with ``.float()`` and sums ``F.cross_entropy(..., reduction
    ="sum")`` over them, then divides by the count of scored labels.

    Returns:
        In units of one float32 ``(B, T, V)`` tensor: ``after_forward``
        (alive once the loss is returned: the chunks, and the float32
        log-probabilities ``log_softmax`` saved for each chunk),
        ``forward_peak`` and ``peak`` (of forward and backward).
    """
    batch, time, _, vocab = check_hidden_weight_labels(hidden, weight, labels)
    num_output_chunks = require_positive_int(num_output_chunks, "num_output_chunks")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    unit = 4 * batch * time * vocab
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    targets = shift_labels_with_padding(labels)
    with TensorMemoryTracker() as tracker:
        chunks = [part @ weight.T for part in hidden.chunk(num_output_chunks, dim=1)]
        total = 0.0
        for logits, target in zip(chunks, targets.chunk(num_output_chunks, dim=1)):
            total = total + torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab).float(), target.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
        loss = total / (targets != IGNORE_INDEX).sum()
        after_forward = tracker.live_bytes
        forward_peak = tracker.peak_bytes
        loss.backward()
    del chunks, loss, total
    return {
        "after_forward": after_forward / unit,
        "forward_peak": forward_peak / unit,
        "peak": tracker.peak_bytes / unit,
    }


# --------------------------------------------------------------------------
# Benchmark results (benchmarks/loss_memory.py)
# --------------------------------------------------------------------------

RESULTS_FILE_NAMES = ("loss_memory_cpu.json", "loss_memory_cpu_quick.json")
"""Benchmark result files, preferred first: the full run, then the quick."""

NOT_RUN_STATUSES = ("not_run", "needs_gpu", "unavailable")
"""Statuses of variants the benchmark did not measure, for a stated reason."""

MEMORY_FLOOR_FACTOR = 1.05
"""Goal: the chunked loss's peak <= this multiple of the memory floor."""

TIME_GOAL_SIZE = (512, 8192, 128256)
"""``(d, T, V)`` where the chunked loss should take at most
:data:`TIME_GOAL_RATIO` of the eager loss's time."""

TIME_GOAL_RATIO = 0.6
"""Goal at :data:`TIME_GOAL_SIZE`; also the masked-prompt and bfloat16
goals' ratio (half-masked over all-scored; bfloat16 over float32)."""

OURS = ("chunked", "chunked_masked", "chunked_bf16", "chunked_bf16_masked")
"""The benchmark's variants of :func:`companion.chunked_loss.chunked_causal_lm_loss`."""


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


def results_directory(start: str | Path) -> Path:
    """``benchmarks/results`` of the repository that contains ``start``.

    ``start`` and then each of its parents is tried in turn (the book's
    notebooks run in ``book/``).

    Raises:
        FileNotFoundError: no folder from ``start`` up has
            ``benchmarks/results``.
    """
    if not isinstance(start, (str, Path)):
        raise TypeError(f"start must be a str or Path; got {type(start).__name__}")
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / "benchmarks" / "results").is_dir():
            return folder / "benchmarks" / "results"
    raise FileNotFoundError(
        f"no benchmarks/results folder in {start} or any of its parents"
    )


def _check_records(records: Any) -> list[dict[str, Any]]:
    require_sequence(records, "records", "a list of benchmark records (dicts)")
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(
                f"records[{index}] must be a dict (a benchmark record); "
                f"got {type(record).__name__}"
            )
    return list(records)


def record_size(record: Mapping[str, Any]) -> tuple[int, int, int]:
    """A record's ``(d, T, V)``."""
    return (int(record["hidden_size"]), int(record["time"]), int(record["vocab"]))


def sizes_of(records: Sequence[dict[str, Any]], block: str = "main") -> list[tuple[int, int, int]]:
    """The ``(d, T, V)`` of a block's records (``"main"`` or ``"sweep"``), in run order."""
    seen: list[tuple[int, int, int]] = []
    for record in _check_records(records):
        if record.get("block", "main") == block and record_size(record) not in seen:
            seen.append(record_size(record))
    return seen


def find_record(
    records: Sequence[dict[str, Any]],
    variant: str,
    size: tuple[int, int, int],
    block: str = "main",
) -> dict[str, Any] | None:
    """The record of ``variant`` at ``size = (d, T, V)`` in ``block``, or ``None``.

    Raises:
        ValueError: the file has more than one such record.
    """
    found = [
        record
        for record in _check_records(records)
        if record["variant"] == variant
        and record_size(record) == tuple(size)
        and record.get("block", "main") == block
    ]
    if len(found) > 1:
        raise ValueError(
            f"records hold {len(found)} records of {variant} at {tuple(size)}; "
            "expected at most one"
        )
    return found[0] if found else None


def measured(record: Mapping[str, Any] | None) -> bool:
    """Whether ``record`` holds a measurement (``status == "ok"``)."""
    return record is not None and record.get("status") == "ok"


def floor_bytes(record: Mapping[str, Any]) -> int:
    """The memory floor of a chunked-loss record, inputs included.

    ``hidden`` and ``weight``, their two gradients (in the inputs' dtype),
    and one chunk's block (``chunk_bytes``, or fewer rows when fewer
    positions are scored).  For a bfloat16 record the
    design also keeps the float32 ``(V, d)`` sum of the weight gradient;
    the block is freed before that sum is rounded into the bfloat16
    weight gradient, so the floor counts the larger of the two beside it:
    inputs, hidden gradient, float32 sum and ``max(block, weight
    gradient)``.
    """
    hidden_size, time, vocab = record_size(record)
    element = 2 if record["dtype"] == "bfloat16" else 4
    inputs = (record["batch"] * time + vocab) * hidden_size * element
    # A chunk has at most as many rows as there are scored positions: the
    # benchmark masks the first ``masked * T`` labels of each sequence, and
    # the last position never has a target.
    prompt = int(round(float(record.get("masked", 0.0)) * time))
    scored = record["batch"] * (time - max(prompt, 1))
    rows = int(record["chunk_rows"])
    block = int(record["chunk_bytes"]) // rows * min(rows, scored)
    if element >= 4:
        return 2 * inputs + block
    hidden_grad = record["batch"] * time * hidden_size * element
    weight_grad = vocab * hidden_size * element
    return inputs + hidden_grad + 4 * vocab * hidden_size + max(block, weight_grad)


def peak_total_bytes(record: Mapping[str, Any]) -> float:
    """Inputs plus the median resident-set growth of a measured record."""
    return float(record["input_bytes"]) + float(record["peak_bytes"])


def side_by_side(
    records: Sequence[dict[str, Any]],
    variants: Sequence[str],
    labels: Mapping[str, str] | None = None,
) -> Any:
    """The main comparison as a table: one row per size and variant.

    Columns: ``memory (MiB)`` (inputs plus the median peak growth),
    ``live (MiB)`` (inputs plus the tracked tensors, where tracked),
    ``time (s)`` (median wall time), ``spread (s)`` (fastest to slowest
    pass), ``CPU (s)`` (median CPU time), ``× eager`` (median time over the
    eager loss's), ``faults (k)`` (median minor page faults per pass, in
    thousands) and ``status``.  Variants not measured keep their status.

    Returns:
        A ``pandas.DataFrame`` indexed by ``(size, variant)``, the size
        written ``"d, T, V"``.
    """
    import pandas as pd

    records = _check_records(records)
    labels = dict(labels or {})
    rows = []
    for size in sizes_of(records):
        eager = find_record(records, "eager", size)
        for variant in variants:
            record = find_record(records, variant, size)
            if record is None:
                continue
            row: dict[str, Any] = {
                "size": ", ".join(map(str, size)),
                "variant": labels.get(variant, variant),
                "status": record["status"],
            }
            if measured(record):
                tracked = record.get("peak_tensor_bytes")
                row.update(
                    {
                        "memory (MiB)": peak_total_bytes(record) / 2**20,
                        "live (MiB)": (
                            (record["input_bytes"] + tracked) / 2**20 if tracked else math.nan
                        ),
                        "time (s)": record["median_s"],
                        "spread (s)": "{:.2f} to {:.2f}".format(*record["time_spread_s"]),
                        "CPU (s)": record["median_cpu_s"],
                        "× eager": (
                            record["median_s"] / eager["median_s"] if measured(eager) else math.nan
                        ),
                        "faults (k)": record["median_minor_faults"] / 1000,
                    }
                )
            rows.append(row)
    columns = [
        "size", "variant", "memory (MiB)", "live (MiB)", "time (s)", "spread (s)",
        "CPU (s)", "× eager", "faults (k)", "status",
    ]
    return pd.DataFrame(rows).reindex(columns=columns).set_index(["size", "variant"])


def _ratio(records: Sequence[dict[str, Any]], top: str, bottom: str, size: tuple[int, int, int],
           key: str = "median_s") -> float | None:
    first, second = find_record(records, top, size), find_record(records, bottom, size)
    if not (measured(first) and measured(second)):
        return None
    return float(first[key]) / float(second[key])


def goal_report(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every goal of the benchmark, at every size where it can be judged.

    Goals (``goal``), each a ratio that must not exceed ``target``:

    * ``memory``: a chunked-loss record's peak (inputs included) over its
      floor (:func:`floor_bytes`), at most :data:`MEMORY_FLOOR_FACTOR`;
    * ``faster than eager``: the chunked loss's median time over the eager
      loss's, below 1;
    * ``no slower than compile``: over ``torch.compile`` of the eager loss,
      at most 1;
    * ``0.6 × eager``: at :data:`TIME_GOAL_SIZE` only;
    * ``masked``: half of the targets ignored over all scored, float32 and
      bfloat16, at most :data:`TIME_GOAL_RATIO`;
    * ``bfloat16``: bfloat16 over float32, at most :data:`TIME_GOAL_RATIO`.

    Returns:
        One dict per goal and size: ``goal``, ``variant``, ``size``,
        ``ratio`` (the median-time or memory ratio), ``cpu_ratio`` (the same
        for CPU time, for time goals), ``target``, ``met`` (``ratio <=
        target``, strictly below for "faster than eager").  A goal whose
        records were not both measured is left out.
    """
    records = _check_records(records)
    report: list[dict[str, Any]] = []

    def add(goal: str, variant: str, size: tuple[int, int, int], ratio: float | None,
            target: float, cpu_ratio: float | None = None, strict: bool = False) -> None:
        if ratio is None:
            return
        report.append(
            {
                "goal": goal, "variant": variant, "size": size, "ratio": ratio,
                "cpu_ratio": cpu_ratio, "target": target,
                "met": ratio < target if strict else ratio <= target,
            }
        )

    for size in sizes_of(records):
        for variant in OURS:
            record = find_record(records, variant, size)
            if measured(record):
                add("memory", variant, size, peak_total_bytes(record) / floor_bytes(record),
                    MEMORY_FLOOR_FACTOR)
        add("faster than eager", "chunked", size, _ratio(records, "chunked", "eager", size), 1.0,
            _ratio(records, "chunked", "eager", size, "median_cpu_s"), strict=True)
        add("no slower than compile", "chunked", size,
            _ratio(records, "chunked", "compiled_eager", size), 1.0,
            _ratio(records, "chunked", "compiled_eager", size, "median_cpu_s"))
        if tuple(size) == TIME_GOAL_SIZE:
            add("0.6 × eager", "chunked", size, _ratio(records, "chunked", "eager", size),
                TIME_GOAL_RATIO, _ratio(records, "chunked", "eager", size, "median_cpu_s"))
        for masked, full in (("chunked_masked", "chunked"), ("chunked_bf16_masked", "chunked_bf16")):
            add("masked", masked, size, _ratio(records, masked, full, size), TIME_GOAL_RATIO,
                _ratio(records, masked, full, size, "median_cpu_s"))
        add("bfloat16", "chunked_bf16", size, _ratio(records, "chunked_bf16", "chunked", size),
            TIME_GOAL_RATIO, _ratio(records, "chunked_bf16", "chunked", size, "median_cpu_s"))
    return report


def sweep_table(records: Sequence[dict[str, Any]]) -> Any:
    """The chunk-budget sweep: one row per dtype and budget.

    Columns ``dtype``, ``budget (MiB)``, ``rows`` (positions per chunk),
    ``memory (MiB)`` (inputs plus median peak growth), ``floor (MiB)``
    (:func:`floor_bytes`), ``time (s)`` (median wall) and ``CPU (s)``; the
    sweep's records that were measured, sorted by dtype and budget.
    """
    import pandas as pd

    rows = [
        {
            "dtype": record["dtype"],
            "budget (MiB)": record["chunk_budget_bytes"] / 2**20,
            "rows": record["chunk_rows"],
            "memory (MiB)": peak_total_bytes(record) / 2**20,
            "floor (MiB)": floor_bytes(record) / 2**20,
            "time (s)": record["median_s"],
            "CPU (s)": record["median_cpu_s"],
        }
        for record in _check_records(records)
        if record.get("block") == "sweep" and measured(record)
    ]
    if not rows:
        raise ValueError("records hold no measured record of the chunk-budget sweep")
    return pd.DataFrame(rows).sort_values(["dtype", "budget (MiB)"]).reset_index(drop=True)


def tracker_disagreements(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured records whose resident-set growth and tracked tensors differ
    by more than the benchmark's 5 % (``tracker_disagrees``)."""
    return [
        record for record in _check_records(records)
        if measured(record) and record.get("tracker_disagrees")
    ]
