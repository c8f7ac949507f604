"""Tests of companion.experiments.loss_memory and the benchmark script: the
four formulations side by side, the results file and the verdicts on it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given

from companion import reference
from companion.causal_lm_loss import shift_labels_with_padding
from companion.chunked_loss import checkpointed_chunked_loss, chunked_causal_lm_loss
from companion.experiments.loss_memory import (
    CHUNKED_VARIANTS,
    LOSS_VARIANTS,
    TIME_TARGET,
    agreement_with_references,
    best_eager,
    busy_share,
    checkpointed_moments,
    common_value,
    eager_label_padding_loss,
    eager_peak_gap,
    eager_shift_and_slice_loss,
    find_record,
    find_results_file,
    goal_ratio_rows,
    kept_logits_peaks,
    memory_target_report,
    memory_timelines,
    not_run_text,
    pivot_records,
    results_directory,
    rss_over_live,
    time_target_report,
    tracked_and_estimated_peaks,
    transformers_causal_lm_loss,
    variant_options,
    was_not_run,
)
from companion.memory import estimate_peak_bytes
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


# --------------------------------------------------------------------------
# The chapter's small measurements
# --------------------------------------------------------------------------


def _small_problem(seed: int = 0, batch: int = 1, time: int = 64, hidden_size: int = 8, vocab: int = 500):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, time, hidden_size, generator=generator, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, hidden_size, generator=generator)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    return hidden, weight, labels


def test_variant_options_gives_chunk_size_to_chunked_variants_only():
    assert variant_options("chunked_function", 16) == {"chunk_size": 16}
    assert variant_options("checkpointed_chunks", 16) == {"chunk_size": 16}
    assert variant_options("label_padding", 16) == {}
    assert variant_options("shift_and_slice", 16) == {}
    with pytest.raises(ValueError, match="variant must be one of"):
        variant_options("chunked", 16)
    with pytest.raises(ValueError, match="chunk_size"):
        variant_options("chunked_function", 0)


def test_tracked_and_estimated_peaks_reports_each_variant_in_order():
    hidden, weight, labels = _small_problem(time=128, vocab=2000, hidden_size=16)
    logits_bytes = 128 * 2000 * 4
    rows = tracked_and_estimated_peaks(hidden, weight, labels, chunk_size=32)
    assert [row["variant"] for row in rows] == list(LOSS_VARIANTS)
    by_variant = {row["variant"]: row for row in rows}
    # The eager loss holds three logits tensors; the estimate says so too.
    assert 2.95 < by_variant["label_padding"]["tracked_bytes"] / logits_bytes < 3.05
    assert by_variant["label_padding"]["estimate_bytes"] == 3 * logits_bytes
    for row in rows:
        assert row["tracked_bytes"] == pytest.approx(row["estimate_bytes"], rel=0.03)
    assert hidden.grad is None or hidden.grad.shape == hidden.shape


def test_memory_timelines_split_forward_from_backward():
    hidden, weight, labels = _small_problem(time=128, vocab=2000, hidden_size=16)
    logits_bytes = 128 * 2000 * 4
    timelines, starts = memory_timelines(hidden, weight, labels, chunk_size=32)
    assert set(timelines) == set(starts) == set(LOSS_VARIANTS)
    eager, split = timelines["label_padding"], starts["label_padding"]
    assert 0 < split < len(eager)
    # Forward: at most Z and A; the backward pass reaches three tensors.
    assert max(eager[:split]) < 2.05 * logits_bytes
    assert max(eager[split:]) > 2.95 * logits_bytes
    # The chunked Function's backward pass only scales stored gradients.
    chunked, split = timelines["chunked_function"], starts["chunked_function"]
    assert max(chunked[split:]) <= chunked[split - 1]
    assert hidden.grad is None and weight.grad is None


@pytest.mark.parametrize(
    ("dtype", "forward", "peak"),
    [(torch.float32, 2.0, 4.0), (torch.bfloat16, 2.5, 3.5)],
)
def test_kept_logits_peaks_counts_the_kept_logits(dtype, forward, peak):
    hidden, weight, labels = _small_problem(time=64, vocab=3000, hidden_size=8)
    got_forward, got_peak = kept_logits_peaks(hidden, weight, labels, dtype)
    assert forward <= got_forward < forward + 0.02
    assert peak <= got_peak < peak + 0.02
    assert hidden.grad is None  # a detached copy was differentiated


def test_kept_logits_peaks_rejects_a_non_float_dtype():
    with pytest.raises(TypeError, match="dtype must be a floating"):
        kept_logits_peaks(*_small_problem(), torch.int64)


@pytest.mark.parametrize(
    ("batch", "time", "vocab", "hidden_size", "chunk_size"),
    [(1, 64, 500, 8, 16), (2, 40, 300, 64, 8), (1, 32, 1000, 4, 32)],
)
def test_checkpointed_moments_are_the_estimate(batch, time, vocab, hidden_size, chunk_size):
    first, second = checkpointed_moments(vocab, hidden_size, chunk_size)
    assert (first, second) == (3 * chunk_size * vocab + vocab * hidden_size, 3 * vocab * hidden_size)
    estimate = estimate_peak_bytes(
        "checkpointed_chunks", batch, time, vocab, hidden_size, chunk_size=chunk_size
    )
    assert estimate == 4 * (max(first, second) + batch * time * hidden_size)


def test_checkpointed_moments_bad_input():
    with pytest.raises(ValueError, match="chunk_size"):
        checkpointed_moments(10, 4, 0)
    with pytest.raises(TypeError, match="vocab"):
        checkpointed_moments(10.0, 4, 2)


# --------------------------------------------------------------------------
# A chunked loss against the references
# --------------------------------------------------------------------------


def _check_batch():
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(3, 12, 5))
    weight = 0.3 * rng.normal(size=(40, 5))
    labels = rng.integers(0, 40, size=(3, 12))
    labels[0, 7:] = -100
    labels[2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("loss_fn", [chunked_causal_lm_loss, checkpointed_chunked_loss])
@pytest.mark.parametrize("num_items", [None, 40])
def test_agreement_with_references_accepts_the_chunked_losses(loss_fn, num_items):
    hidden, weight, labels = _check_batch()
    result = agreement_with_references(
        loss_fn, hidden, weight, labels, chunk_size=5, num_items_in_batch=num_items
    )
    assert result["float64_error"] < 1e-12
    assert result["float32_error"] <= 1e-5
    assert result["unscored_gradient_is_zero"]
    expected = reference.causal_lm_loss(hidden @ weight.T, labels, num_items_in_batch=num_items)
    assert result["loss"] == pytest.approx(expected, rel=1e-12)


def _mean_over_all_positions(hidden, weight, labels, *, chunk_size, num_items_in_batch=None):
    """Wrong: the denominator counts every position, ignored ones too."""
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch)
    scored = int((shift_labels_with_padding(labels) != -100).sum())
    return loss * scored / labels.numel()


def _unshifted(hidden, weight, labels, *, chunk_size, num_items_in_batch=None):
    """Wrong: scores each position against its own label."""
    shifted_back = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
    return chunked_causal_lm_loss(
        hidden, weight, shifted_back, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch
    )


def _ignores_nothing(hidden, weight, labels, *, chunk_size, num_items_in_batch=None):
    """Wrong: every position gets a gradient, ignored ones included."""
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch)
    return loss + 1e-3 * hidden.sum() - 1e-3 * hidden.detach().sum()


@pytest.mark.parametrize("wrong", [_mean_over_all_positions, _unshifted])
def test_agreement_with_references_catches_a_wrong_loss(wrong):
    hidden, weight, labels = _check_batch()
    result = agreement_with_references(wrong, hidden, weight, labels, chunk_size=5)
    assert result["float64_error"] > 1e-3
    assert result["float32_error"] > 1e-3


def test_agreement_with_references_catches_gradients_at_unscored_positions():
    hidden, weight, labels = _check_batch()
    result = agreement_with_references(_ignores_nothing, hidden, weight, labels, chunk_size=5)
    assert not result["unscored_gradient_is_zero"]


def test_agreement_with_references_bad_input():
    hidden, weight, labels = _check_batch()
    with pytest.raises(TypeError, match="hidden must be a NumPy array"):
        agreement_with_references(chunked_causal_lm_loss, torch.tensor(hidden), weight, labels, chunk_size=5)
    with pytest.raises(TypeError, match="labels must be a NumPy array"):
        agreement_with_references(chunked_causal_lm_loss, hidden, weight, labels.tolist(), chunk_size=5)
    with pytest.raises(TypeError, match="weight must hold floats"):
        agreement_with_references(chunked_causal_lm_loss, hidden, labels, labels, chunk_size=5)
    with pytest.raises(ValueError, match="weight must have shape"):
        agreement_with_references(chunked_causal_lm_loss, hidden, weight[:, :3], labels, chunk_size=5)
    with pytest.raises(ValueError, match="chunk_size"):
        agreement_with_references(chunked_causal_lm_loss, hidden, weight, labels, chunk_size=0)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        agreement_with_references("chunked", hidden, weight, labels, chunk_size=5)


def test_transformers_causal_lm_loss_matches_the_eager_loss():
    hidden, weight, labels = _check_batch()
    hidden, weight, labels = torch.tensor(hidden), torch.tensor(weight), torch.tensor(labels)
    for num_items in (None, 40):
        got = transformers_causal_lm_loss(hidden, weight, labels, num_items_in_batch=num_items)
        want = eager_label_padding_loss(hidden, weight, labels, num_items_in_batch=num_items)
        # ForCausalLMLoss computes in float32 (logits.float()).
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="labels must lie in"):
        transformers_causal_lm_loss(hidden, weight, labels + 40)


# --------------------------------------------------------------------------
# The results file: finding it, reading it, the chapter's tables
# --------------------------------------------------------------------------


def test_results_directory_walks_up(tmp_path):
    results = tmp_path / "repository" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (tmp_path / "repository" / "book").mkdir()
    (tmp_path / "elsewhere").mkdir()
    assert results_directory(tmp_path / "repository" / "book") == results.resolve()
    assert results_directory(str(tmp_path / "repository")) == results.resolve()
    with pytest.raises(FileNotFoundError, match="no benchmarks/results"):
        results_directory(tmp_path / "elsewhere")
    with pytest.raises(TypeError, match="start must be"):
        results_directory(None)


def _sized_records() -> list[dict]:
    """Two sizes at V = 32000 and one at 128256, every value distinct."""
    records = []
    for time, vocab, scale in ((512, 32000, 1), (2048, 32000, 4), (512, 128256, 3)):
        rows = benchmark_records(900.0 * scale, 100.0 * scale, eager_s=2.0 * scale, chunked_s=1.0 * scale, time=time, vocab=vocab)
        for row in rows:
            row["peak_tensor_bytes"] = 0.9 * row["peak_bytes"]
            row["median_cpu_s"] = 1.5 * row["median_s"]
            row["batch"] = 1
        rows[0]["peak_bytes"] += 9.0 * scale  # shift_and_slice: 1 % more than label_padding
        rows[1]["median_s"] -= 0.5 * scale  # label_padding: the faster eager one
        records += rows
    return records


def test_find_record_and_best_eager():
    records = _sized_records()
    record = find_record(records, "chunked_function", 2048, 32000)
    assert record["peak_bytes"] == 400.0
    assert find_record(records, "chunked_function", 4096, 32000) is None
    # The better eager formulation: the smaller peak, the shorter time.
    assert best_eager(records, 2048, 32000, "peak_bytes") == 3600.0
    assert best_eager(records, 2048, 32000, "median_s") == 6.0
    records[1]["status"] = "oom"  # label_padding at 512, 32000 not measured
    assert best_eager(records, 512, 32000, "peak_bytes") == 909.0
    records[0]["status"] = "not_run"
    assert best_eager(records, 512, 32000, "peak_bytes") is None
    with pytest.raises(ValueError, match="at most one"):
        find_record(records + records[:1], "shift_and_slice", 512, 32000)
    with pytest.raises(TypeError, match=r"records\[0\] must be a dict"):
        find_record([("shift_and_slice", 512, 32000)], "shift_and_slice", 512, 32000)


def test_common_value():
    records = _sized_records()
    assert common_value(records, "batch") == 1
    with pytest.raises(ValueError, match="share one value of 'time'"):
        common_value(records, "time")
    with pytest.raises(ValueError, match="share one value"):
        common_value([], "batch")


def test_pivot_records_layout_and_values():
    records = _sized_records()
    records[6]["status"] = "oom"  # checkpointed at 2048, 32000
    table = pivot_records(records, "peak_bytes", scale=100.0, labels={"chunked_function": "Function"})
    assert list(table.index) == [512, 2048]
    assert list(table.columns) == [
        (32000, "shift_and_slice"), (32000, "label_padding"), (32000, "checkpointed_chunks"), (32000, "Function"),
        (128256, "shift_and_slice"), (128256, "label_padding"), (128256, "checkpointed_chunks"), (128256, "Function"),
    ]
    assert str(table.dtypes.iloc[0]) == "Int64"
    assert table.loc[512, (32000, "shift_and_slice")] == 9  # 909 / 100, rounded
    assert table.loc[2048, (32000, "Function")] == 4
    assert table.loc[2048, (32000, "checkpointed_chunks")] is pd.NA
    assert table.loc[2048, (128256, "Function")] is pd.NA  # no such record
    times = pivot_records(records, "median_s", digits=2)
    assert times.loc[2048, (32000, "label_padding")] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="scale must be"):
        pivot_records(records, "median_s", scale=0)
    with pytest.raises(ValueError, match="not in LOSS_VARIANTS"):
        pivot_records([dict(records[0], variant="fused")], "median_s")


def test_eager_peak_gap_and_rss_over_live():
    records = _sized_records()
    assert eager_peak_gap(records) == pytest.approx(0.01)
    ratios = rss_over_live(records, "chunked_function", 32000)
    assert ratios == {512: pytest.approx(1 / 0.9), 2048: pytest.approx(1 / 0.9)}
    records[3]["status"] = "oom"
    assert set(rss_over_live(records, "chunked_function", 32000)) == {2048}
    with pytest.raises(ValueError, match="no size where both"):
        eager_peak_gap([r for r in records if r["variant"] != "label_padding"])


def test_busy_share():
    record = {"median_s": 2.0, "median_cpu_s": 3.0}
    assert busy_share(record, 2) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="threads"):
        busy_share(record, 0)
    with pytest.raises(TypeError, match="record must be a dict"):
        busy_share([2.0, 3.0], 2)


def test_goal_ratio_rows():
    records = _sized_records()
    rows = goal_ratio_rows(records)
    assert [(row["T"], row["V"]) for row in rows] == [(512, 32000), (2048, 32000), (512, 128256)]
    middle = rows[1]
    assert middle["goal"] == "≥ 4" and rows[0]["goal"] == ""
    assert middle["memory"] == pytest.approx(3600.0 / 400.0)
    assert middle["live"] == pytest.approx(3600.0 / 400.0)
    assert middle["time"] == pytest.approx(4.0 / 6.0)  # the faster eager one
    assert middle["CPU"] == pytest.approx(6.0 / 12.0)  # CPU: 1.5 x 4, 1.5 x 8
    # A size where the chunked Function did not run has no row.
    records[11]["status"] = "oom"
    assert len(goal_ratio_rows(records)) == 2


@pytest.mark.parametrize("measure", [tracked_and_estimated_peaks, memory_timelines])
def test_small_measurements_check_their_inputs_first(measure):
    hidden, weight, labels = _small_problem()
    with pytest.raises(ValueError, match=r"weight must have shape \(V, d\)"):
        measure(hidden, weight[:, :3], labels, chunk_size=8)
    with pytest.raises(ValueError, match="labels must lie in"):
        measure(hidden, weight, labels + 500, chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        measure(hidden, weight, labels, chunk_size=0)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        kept_logits_peaks(hidden.detach().numpy(), weight, labels, torch.float32)
