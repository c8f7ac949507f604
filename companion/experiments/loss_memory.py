"""Chapter 6's experiments: the four formulations, and the benchmark's results.

* :data:`LOSS_VARIANTS`: the formulations the chapter and
  ``benchmarks/loss_memory.py`` compare, all called as
  ``loss_fn(hidden, weight, labels, **options)``.  The two eager ones,
  :func:`eager_shift_and_slice_loss` and :func:`eager_label_padding_loss`,
  are the library's own formulations of :mod:`companion.causal_lm_loss` on
  ``hidden @ weight.T``; the two chunked ones are
  :mod:`companion.chunked_loss`'s;
* readers of the benchmark's results file (:func:`find_results_file`,
  :func:`was_not_run`, :func:`not_run_text`) and the chapter's verdicts on
  its design goals (:func:`memory_target_report`,
  :func:`time_target_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from companion import IGNORE_INDEX
from companion.causal_lm_loss import (
    NumItems,
    label_padding_loss,
    shift_and_slice_loss,
)
from companion.chunked_loss import (
    check_hidden_weight_labels,
    checkpointed_chunked_loss,
    chunked_causal_lm_loss,
)
from companion.memory import LossFunction

__all__ = [
    "CHUNKED_VARIANTS",
    "EAGER_VARIANTS",
    "GIB",
    "LOSS_VARIANTS",
    "MEMORY_TARGETS",
    "NOT_RUN_STATUSES",
    "RESULTS_FILE_NAMES",
    "TIME_TARGET",
    "eager_label_padding_loss",
    "eager_shift_and_slice_loss",
    "find_results_file",
    "memory_target_report",
    "not_run_text",
    "time_target_report",
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
