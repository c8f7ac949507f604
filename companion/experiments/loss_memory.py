"""Chapter 6's experiments: the four formulations, and the benchmark's results.

* :data:`LOSS_VARIANTS`: the formulations the chapter and
  ``benchmarks/loss_memory.py`` compare, all called as
  ``loss_fn(hidden, weight, labels, **options)``.  The two eager ones,
  :func:`eager_shift_and_slice_loss` and :func:`eager_label_padding_loss`,
  are the library's own formulations of :mod:`companion.causal_lm_loss` on
  ``hidden @ weight.T``; the two chunked ones are
  :mod:`companion.chunked_loss`'s;
* the chapter's small measurements with the exact tracker
  (:func:`tracked_and_estimated_peaks`, :func:`memory_timelines`,
  :func:`kept_logits_peaks`) and the count behind the checkpointed
  variant's peak (:func:`checkpointed_moments`);
* the check of a chunked loss against the float64 NumPy reference, eager
  autograd and transformers' ``ForCausalLMLoss``
  (:func:`agreement_with_references`);
* readers of the benchmark's results file (:func:`results_directory`,
  :func:`find_results_file`, :func:`find_record`, :func:`common_value`,
  :func:`was_not_run`, :func:`not_run_text`), the tables and ratios the
  chapter draws from it (:func:`pivot_records`, :func:`goal_ratio_rows`,
  :func:`best_eager`, :func:`eager_peak_gap`, :func:`rss_over_live`,
  :func:`busy_share`) and its verdicts on the design goals
  (:func:`memory_target_report`, :func:`time_target_report`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from companion import IGNORE_INDEX, reference
from companion._checks import (
    require_int,
    require_positive_int,
    require_real_number,
    require_sequence,
)
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
    "LOSS_VARIANTS",
    "MEMORY_TARGETS",
    "NOT_RUN_STATUSES",
    "RESULTS_FILE_NAMES",
    "TIME_TARGET",
    "agreement_with_references",
    "best_eager",
    "busy_share",
    "checkpointed_moments",
    "common_value",
    "eager_label_padding_loss",
    "eager_peak_gap",
    "eager_shift_and_slice_loss",
    "find_record",
    "find_results_file",
    "goal_ratio_rows",
    "kept_logits_peaks",
    "memory_target_report",
    "memory_timelines",
    "not_run_text",
    "pivot_records",
    "results_directory",
    "rss_over_live",
    "time_target_report",
    "tracked_and_estimated_peaks",
    "transformers_causal_lm_loss",
    "variant_options",
    "was_not_run",
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
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Bytes alive after each operator of one forward and backward pass.

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
        ``(timelines, backward_starts)``: per variant, the tracker's
        ``timeline`` (bytes alive after each operator call, forward then
        backward), and the index in it of the backward pass's first call.
    """
    check_hidden_weight_labels(hidden, weight, labels)
    require_positive_int(chunk_size, "chunk_size")
    timelines, backward_starts = {}, {}
    for variant, loss_fn in LOSS_VARIANTS.items():
        hidden.grad, weight.grad = None, None
        with TensorMemoryTracker() as tracker:
            loss = loss_fn(
                hidden, weight, labels,
                **variant_options(variant, chunk_size),
            )
            backward_starts[variant] = len(tracker.timeline)
            loss.backward()
        timelines[variant] = tracker.timeline
        del loss
    hidden.grad, weight.grad = None, None
    return timelines, backward_starts


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
# Benchmark results (benchmarks/loss_memory.py) against the design goals
# --------------------------------------------------------------------------

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


def find_record(
    records: Sequence[dict[str, Any]], variant: str, time: int, vocab: int
) -> dict[str, Any] | None:
    """The record of ``variant`` at sequence length ``time`` and vocabulary
    ``vocab``, or ``None`` if the file has none.

    Raises:
        ValueError: the file has more than one such record.
    """
    found = [
        record
        for record in _check_records(records)
        if (record["variant"], record["time"], record["vocab"])
        == (variant, time, vocab)
    ]
    if len(found) > 1:
        raise ValueError(
            f"records hold {len(found)} records of {variant} at "
            f"T = {time}, V = {vocab}; expected at most one"
        )
    return found[0] if found else None


def best_eager(
    records: Sequence[dict[str, Any]], time: int, vocab: int, key: str
) -> float | None:
    """The smaller of the two eager formulations' ``key`` at ``(time, vocab)``.

    Only measured records count (``status == "ok"``, ``key`` present):
    the eager loss is the better of :data:`EAGER_VARIANTS` (smaller peak,
    shorter time).  ``None`` when neither was measured.
    """
    values = [
        float(record[key])
        for name in EAGER_VARIANTS
        if (record := find_record(records, name, time, vocab)) is not None
        and record["status"] == "ok"
        and record.get(key) is not None
    ]
    return min(values) if values else None


def common_value(records: Sequence[dict[str, Any]], key: str) -> Any:
    """The one value of ``key`` that every record shares (e.g. ``"batch"``).

    Raises:
        ValueError: no records, or two records differ in ``key``.
    """
    values = {record[key] for record in _check_records(records)}
    if len(values) != 1:
        raise ValueError(
            f"records must share one value of {key!r}; got {sorted(values)}"
        )
    return values.pop()


def pivot_records(
    records: Sequence[dict[str, Any]],
    key: str,
    *,
    scale: float = 1.0,
    digits: int = 0,
    labels: Mapping[str, str] | None = None,
) -> Any:
    """One value per record as a table: rows ``T``, columns ``(V, variant)``.

    Args:
        records: benchmark records (``variant``, ``time``, ``vocab``,
            ``status`` and, when ``status`` is ``"ok"``, ``key``); a record
            that was not measured shows as missing.
        key: the value to show, e.g. ``"peak_bytes"`` or ``"median_s"``.
        scale: each value is divided by it (``2**20`` for MiB), > 0.
        digits: decimals kept; with ``0`` the values are whole numbers
            (pandas ``Int64``, missing as ``<NA>``).
        labels: column header of each variant (default: its name).

    Returns:
        A ``pandas.DataFrame``: index ``T`` (sorted), columns
        ``(V, variant)`` with ``V`` sorted and the variants in the order of
        :data:`LOSS_VARIANTS`.
    """
    import pandas as pd

    records = _check_records(records)
    if not records:
        raise ValueError("records must hold at least one benchmark record")
    scale = require_real_number(scale, "scale")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number; got {scale}")
    digits = require_int(digits, "digits")
    if digits < 0:
        raise ValueError(f"digits must be >= 0; got {digits}")
    unknown = {r["variant"] for r in records} - set(LOSS_VARIANTS)
    if unknown:
        raise ValueError(
            f"records hold variants not in LOSS_VARIANTS: {sorted(unknown)}"
        )
    labels = dict(labels or {})
    rows = [
        {
            "T": r["time"],
            "V": r["vocab"],
            "variant": r["variant"],
            "value": r[key] / scale if r["status"] == "ok" else float("nan"),
        }
        for r in records
    ]
    table = pd.DataFrame(rows).pivot(
        index="T", columns=["V", "variant"], values="value"
    )
    columns = [
        (vocab, variant)
        for vocab in sorted({r["vocab"] for r in records})
        for variant in LOSS_VARIANTS
        if (vocab, variant) in table.columns
    ]
    table = table[columns].round(digits)
    if digits == 0:
        table = table.astype("Int64")
    table.columns = pd.MultiIndex.from_tuples(
        [(vocab, labels.get(variant, variant)) for vocab, variant in columns],
        names=["V", None],
    )
    return table


def eager_peak_gap(records: Sequence[dict[str, Any]]) -> float:
    """Largest relative difference between the two eager formulations' peaks.

    ``|shift_and_slice - label_padding| / label_padding`` of ``peak_bytes``,
    over the sizes where both were measured.

    Raises:
        ValueError: no size where both were measured.
    """
    gaps = []
    for sliced in _check_records(records):
        if sliced["variant"] != "shift_and_slice" or sliced["status"] != "ok":
            continue
        padded = find_record(
            records, "label_padding", sliced["time"], sliced["vocab"]
        )
        if padded is not None and padded["status"] == "ok":
            gaps.append(
                abs(sliced["peak_bytes"] - padded["peak_bytes"])
                / padded["peak_bytes"]
            )
    if not gaps:
        raise ValueError("records have no size where both eager variants ran")
    return max(gaps)


def rss_over_live(
    records: Sequence[dict[str, Any]], variant: str, vocab: int
) -> dict[int, float]:
    """Peak resident-set growth over peak live tensors, by sequence length.

    ``{T: peak_bytes / peak_tensor_bytes}`` for the measured records of
    ``variant`` at vocabulary ``vocab``: how much memory the process took
    beyond its tensors (allocator caching and fragmentation, work buffers).
    """
    return {
        r["time"]: r["peak_bytes"] / r["peak_tensor_bytes"]
        for r in _check_records(records)
        if r["status"] == "ok" and (r["variant"], r["vocab"]) == (variant, vocab)
    }


def busy_share(record: Mapping[str, Any], threads: int) -> float:
    """How busy the threads were: median CPU time over ``threads`` x median wall time.

    ``record`` is a measured benchmark record (``median_cpu_s``,
    ``median_s``); ``threads`` the number of PyTorch threads (the results
    file's ``machine["torch_threads"]``), >= 1.  1.0 means every thread
    computed for the whole pass.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"record must be a dict; got {type(record).__name__}")
    threads = require_positive_int(threads, "threads")
    return float(record["median_cpu_s"]) / (threads * float(record["median_s"]))


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
        chunked = find_record(records, "chunked_function", time, vocab)
        eagers = [
            find_record(records, name, time, vocab) for name in EAGER_VARIANTS
        ]
        eager_bytes = best_eager(records, time, vocab, "peak_bytes")
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
        chunked = find_record(records, "chunked_function", time, vocab)
        eager_s = best_eager(records, time, vocab, "median_s")
        if chunked is None or chunked["status"] != "ok" or eager_s is None:
            continue
        ratio = float(chunked["median_s"]) / eager_s
        eager_cpu_s = best_eager(records, time, vocab, "median_cpu_s")
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


def goal_ratio_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chapter's table of ratios at every size where both losses ran.

    At each ``(T, V)`` where the chunked Function and at least one eager
    formulation were measured (vocabularies, then lengths, ascending):

    * ``memory``: the better eager peak (:func:`best_eager`) over the
      chunked Function's, both as resident-set growth (``peak_bytes``);
    * ``goal``: ``"≥ k"`` where :data:`MEMORY_TARGETS` sets a goal, else
      ``""``;
    * ``live``: the same ratio of live tensors (``peak_tensor_bytes``);
    * ``time`` and ``CPU``: the chunked Function's median wall and CPU
      time over the faster eager formulation's
      (:func:`time_target_report`'s ``ratio`` and ``cpu_ratio``).

    Returns:
        One dict per size with keys ``T``, ``V`` and the five above.
    """
    records = _check_records(records)
    goal_of = {(t, v): k for t, v, k in MEMORY_TARGETS}
    time_of = {(r["time"], r["vocab"]): r for r in time_target_report(records)}
    rows = []
    for vocab in sorted({r["vocab"] for r in records}):
        for time in sorted({r["time"] for r in records}):
            chunked = find_record(records, "chunked_function", time, vocab)
            eager_peak = best_eager(records, time, vocab, "peak_bytes")
            if chunked is None or chunked["status"] != "ok" or eager_peak is None:
                continue
            live = best_eager(records, time, vocab, "peak_tensor_bytes")
            goal = goal_of.get((time, vocab))
            timing = time_of[(time, vocab)]
            rows.append(
                {
                    "T": time,
                    "V": vocab,
                    "memory": eager_peak / chunked["peak_bytes"],
                    "goal": f"≥ {goal}" if goal else "",
                    "live": live / chunked["peak_tensor_bytes"],
                    "time": timing["ratio"],
                    "CPU": timing["cpu_ratio"],
                }
            )
    return rows
