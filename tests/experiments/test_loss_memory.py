"""Tests of companion.experiments.loss_memory and the benchmark script: the
four formulations side by side, the results file and the verdicts on it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given

from companion.experiments.loss_memory import (
    CHUNKED_VARIANTS,
    LOSS_VARIANTS,
    TIME_TARGET,
    eager_label_padding_loss,
    eager_shift_and_slice_loss,
    find_results_file,
    memory_target_report,
    not_run_text,
    time_target_report,
    was_not_run,
)
from tests.shared import benchmark_records, loss_problems

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = REPO_ROOT / "benchmarks" / "loss_memory.py"


def _leaves(problem: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.tensor(problem["hidden"], dtype=dtype, requires_grad=True)
    weight = torch.tensor(problem["weight"], dtype=dtype, requires_grad=True)
    labels = torch.tensor(problem["labels"], dtype=torch.long)
    return hidden, weight, labels


@given(problem=loss_problems())
def test_shift_and_slice_equals_label_padding(problem):
    hidden, weight, labels = _leaves(problem, torch.float64)
    sliced = eager_shift_and_slice_loss(hidden, weight, labels, num_items_in_batch=problem["num_items"])
    padded = eager_label_padding_loss(hidden, weight, labels, num_items_in_batch=problem["num_items"])
    if math.isnan(padded.item()):
        assert math.isnan(sliced.item())
    else:
        assert sliced.item() == pytest.approx(padded.item(), rel=1e-12)


@pytest.mark.parametrize("loss_fn", list(LOSS_VARIANTS.values()), ids=list(LOSS_VARIANTS))
def test_nothing_scored_gives_nan_and_zero_gradients(loss_fn):
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # the first label is never a target
    loss = loss_fn(hidden, weight, labels)
    loss.backward()
    assert math.isnan(loss.item())
    assert torch.count_nonzero(hidden.grad) == 0
    assert torch.count_nonzero(weight.grad) == 0


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def _good():
    return torch.randn(2, 5, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 5))


@pytest.mark.parametrize("loss_fn", list(LOSS_VARIANTS.values()), ids=list(LOSS_VARIANTS))
@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda h, w, y: (h, torch.randn(7, 3), y), ValueError, r"weight must have shape \(V, d\) with d"),
        (lambda h, w, y: (h, w, y[:, :4]), ValueError, r"labels must have shape \(B, T\)"),
        (lambda h, w, y: (h, w, y[0]), ValueError, r"labels must be a 2-D tensor"),
        (lambda h, w, y: (h, w, y.float()), TypeError, r"labels must hold integer"),
        (lambda h, w, y: (h[0], w, y), ValueError, r"hidden must be a 3-D tensor \(B, T, d\)"),
        (lambda h, w, y: (h, w.double(), y), TypeError, r"weight must have hidden's dtype"),
        (lambda h, w, y: (h, w, y + 7), ValueError, r"labels must lie in \[0, 7\)"),
        (lambda h, w, y: (h.numpy(), w, y), TypeError, r"hidden must be a torch.Tensor"),
        (lambda h, w, y: (h[:, :0], w, y[:, :0]), ValueError, r"hidden \(B, T, d\) must have no empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(loss_fn, change, error, message):
    with pytest.raises(error, match=message):
        loss_fn(*change(*_good()))


@pytest.mark.parametrize("variant", sorted(CHUNKED_VARIANTS))
@pytest.mark.parametrize(
    ("chunk_size", "error"), [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_chunk_size(variant, chunk_size, error):
    with pytest.raises(error, match="chunk_size"):
        LOSS_VARIANTS[variant](*_good(), chunk_size=chunk_size)


def test_memory_target_report_verdicts():
    met = memory_target_report(benchmark_records(800.0, 200.0))
    verdicts = [row["verdict"] for row in met]
    assert verdicts == ["met", "not measured", "not measured"]
    assert met[0]["ratio"] == pytest.approx(4.0)
    missed = memory_target_report(benchmark_records(800.0, 201.0))
    assert missed[0]["verdict"] == "missed"


def _skipped(status: str, **extra) -> list[dict]:
    records = benchmark_records(None, 400.0, time=8192, vocab=128256, status=status)
    for record in records:
        if record["status"] != "ok":
            record.update(estimate_bytes=12 * 2**30, **extra)
    return records


def test_memory_target_report_never_judges_an_estimate():
    """An eager run skipped on its estimate gives no ratio and no verdict."""
    records = _skipped(
        "not_run", needed_bytes=13.5 * 2**30, budget_bytes=8 * 2**30
    )
    assert all(was_not_run(r) for r in records if r["status"] != "ok")
    row = memory_target_report(records)[2]
    assert row["verdict"] == "eager not run" and row["ratio"] is None
    assert row["note"] == (
        "eager not run (estimated 13.5 GiB > budget 8.0 GiB)"
    )
    # Older files: status "oom" with "not run" in the detail.
    legacy = _skipped("oom", detail="estimated 13.5 GiB > 8.0 GiB; not run")
    assert memory_target_report(legacy)[2]["verdict"] == "eager not run"
    # An eager run that started and failed to allocate is no estimate.
    ran = _skipped("oom", detail="can't allocate memory")
    row = memory_target_report(ran)[2]
    assert row["verdict"] == "eager out of memory" and row["ratio"] is None


def test_not_run_text_names_the_estimate_and_the_budget():
    record = {"status": "not_run", "estimate_bytes": 2**30}
    assert not_run_text(record) == "not run (estimated 1.0 GiB > budget)"
    record.update(needed_bytes=3 * 2**30, budget_bytes=2 * 2**30)
    assert not_run_text(record) == (
        "not run (estimated 3.0 GiB > budget 2.0 GiB)"
    )


def test_time_target_report_uses_faster_eager():
    records = benchmark_records(800.0, 100.0, eager_s=2.0, chunked_s=2.4)
    records[0]["median_s"] = 1.9  # shift_and_slice is the faster eager formulation
    (row,) = time_target_report(records)
    assert row["eager_s"] == 1.9
    assert row["ratio"] == pytest.approx(2.4 / 1.9)
    assert row["verdict"] == ("met" if 2.4 / 1.9 <= TIME_TARGET else "missed") == "missed"


def test_find_results_file_prefers_full_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark results"):
        find_results_file(tmp_path)
    (tmp_path / "loss_memory_cpu_quick.json").write_text("{}")
    assert find_results_file(tmp_path).name == "loss_memory_cpu_quick.json"
    (tmp_path / "loss_memory_cpu.json").write_text("{}")
    assert find_results_file(tmp_path).name == "loss_memory_cpu.json"


def test_committed_results_file_is_complete():
    payload = json.loads(find_results_file(REPO_ROOT / "benchmarks" / "results").read_text())
    assert {"machine", "libraries", "memory_method", "time_method", "results"} <= set(payload)
    assert payload["libraries"]["torch"].startswith("2.13")
    variants = {record["variant"] for record in payload["results"]}
    assert variants == set(LOSS_VARIANTS)
    for record in payload["results"]:
        if record["status"] == "ok":
            assert record["peak_bytes"] > 0
            assert len(record["times_s"]) >= 3


def _run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_benchmark_skips_what_its_estimate_says_cannot_fit(tmp_path):
    completed = _run_benchmark(
        "--quick", "--device", "cpu", "--memory-limit-gib", "0.5",
        "--results-dir", str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr
    payload = json.loads(
        (tmp_path / "loss_memory_cpu_quick.json").read_text()
    )
    assert {record["status"] for record in payload["results"]} == {"not_run"}
    for record in payload["results"]:
        assert "peak_bytes" not in record  # an estimate, not a measurement
        assert record["needed_bytes"] > record["budget_bytes"]
        assert was_not_run(record)
    assert "[8/8]" in completed.stderr  # progress is shown on stderr
    assert (tmp_path / "loss_memory_cpu_quick.csv").read_text().startswith("variant,")


def test_benchmark_worker_turns_allocation_failure_into_oom():
    completed = _run_benchmark(
        "--worker", "--variant", "label_padding", "--time", "512", "--vocab", "32000",
        "--device", "cpu", "--budget-bytes", str(16 * 2**20),
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[-1])["status"] == "oom"
