"""Tests of companion.experiments.loss_memory and the benchmark script: the
four formulations side by side, the results file and the verdicts on it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given

from companion import reference
from companion.causal_lm_loss import shift_labels_with_padding
from companion.chunked_loss import checkpointed_chunked_loss, chunked_causal_lm_loss
from companion.experiments.loss_memory import (
    CHUNKED_VARIANTS,
    LOSS_VARIANTS,
    MEMORY_FLOOR_FACTOR,
    accumulation_check,
    agreement_with_references,
    checkpointed_moments,
    eager_label_padding_loss,
    eager_shift_and_slice_loss,
    find_record,
    find_results_file,
    floor_bytes,
    goal_report,
    host_reads,
    kept_logits_peaks,
    low_precision_errors,
    measured,
    memory_timelines,
    results_directory,
    side_by_side,
    sizes_of,
    sweep_table,
    torchtune_style_peaks,
    tracked_and_estimated_peaks,
    tracker_disagreements,
    transformers_causal_lm_loss,
    variant_options,
)
from companion.memory import estimate_peak_bytes
from tests.shared import loss_problems

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


def test_find_results_file_prefers_full_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark results"):
        find_results_file(tmp_path)
    (tmp_path / "loss_memory_cpu_quick.json").write_text("{}")
    assert find_results_file(tmp_path).name == "loss_memory_cpu_quick.json"
    (tmp_path / "loss_memory_cpu.json").write_text("{}")
    assert find_results_file(tmp_path).name == "loss_memory_cpu.json"


def test_committed_results_file_is_complete():
    payload = json.loads(find_results_file(REPO_ROOT / "benchmarks" / "results").read_text())
    assert {"machine", "libraries", "method", "passes", "results", "duration_s"} <= set(payload)
    assert payload["libraries"]["torch"].startswith("2.13")
    assert payload["passes"] >= 5 and payload["machine"]["cpu_flags"]
    assert {"block", "variant", "status"} <= set(payload["results"][0])
    for record in payload["results"]:
        if record["status"] == "ok":
            assert record["peak_bytes"] >= 0 and record["input_bytes"] > 0
            assert len(record["times_s"]) == payload["passes"]
            assert record["time_spread_s"][0] <= record["median_s"] <= record["time_spread_s"][1]
    assert sizes_of(payload["results"], "sweep")


def _run_benchmark(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, check=False,
        timeout=timeout,
    )


def test_benchmark_quick_path_on_tiny_sizes(tmp_path):
    """The whole path, parent and workers, in seconds: no timing is asserted."""
    completed = _run_benchmark(
        "--quick", "--device", "cpu", "--sizes", "16x24x50",
        "--variants", "eager", "chunked", "chunked_masked", "liger_fused",
        "--results-dir", str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr
    payload = json.loads((tmp_path / "loss_memory_cpu_quick.json").read_text())
    by_block = {}
    for record in payload["results"]:
        by_block.setdefault(record["block"], []).append(record)
    main = {record["variant"]: record for record in by_block["main"]}
    assert main["liger_fused"]["status"] == "needs_gpu"
    for name in ("eager", "chunked", "chunked_masked"):
        record = main[name]
        assert record["status"] == "ok", record
        assert len(record["times_s"]) == 5 and record["peak_tensor_bytes"] > 0
        assert len(set(record["losses"])) == 1  # the same loss every pass
    # The chunked and eager losses agree on the same inputs.
    assert main["chunked"]["losses"][0] == pytest.approx(main["eager"]["losses"][0], rel=1e-5)
    assert {r["chunk_rows"] for r in by_block["sweep"]} and all(
        r["status"] == "ok" for r in by_block["sweep"]
    )
    assert "pass 5/5 chunked" in completed.stderr  # a progress line per variant and pass
    assert (tmp_path / "loss_memory_cpu_quick.csv").read_text().startswith("variant,")


def test_benchmark_skips_what_its_estimate_says_cannot_fit(tmp_path):
    completed = _run_benchmark(
        "--device", "cpu", "--sizes", "512x8192x128256", "--variants", "eager",
        "--no-sweep", "--memory-limit-gib", "0.5", "--results-dir", str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr
    (record,) = json.loads((tmp_path / "loss_memory_cpu.json").read_text())["results"]
    assert record["status"] == "not_run" and "peak_bytes" not in record
    assert record["needed_bytes"] > record["budget_bytes"]


def test_benchmark_worker_turns_allocation_failure_into_oom():
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--worker", "--variant", "eager", "--hidden-size", "64",
         "--time", "512", "--vocab", "32000", "--device", "cpu",
         "--budget-bytes", str(16 * 2**20)],
        input="pass\n", capture_output=True, text=True, check=False, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert lines[0]["status"] == "ready" and lines[-1]["status"] == "oom"


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


def test_memory_timelines_have_a_time_for_every_call():
    hidden, weight, labels = _small_problem(time=64, vocab=500)
    timelines = memory_timelines(hidden, weight, labels, chunk_size=16)
    assert list(timelines) == list(LOSS_VARIANTS)
    for line in timelines.values():
        assert len(line["bytes"]) == len(line["seconds"]) > 0
        assert line["seconds"] == sorted(line["seconds"])
        assert 0 < line["backward_start"] < line["seconds"][-1]
    assert hidden.grad is None and weight.grad is None
    eager = timelines["label_padding"]["bytes"]
    assert max(eager) >= 3 * 64 * 500 * 4


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


def _record(variant, size=(512, 2048, 32000), status="ok", **values):
    hidden_size, time, vocab = size
    record = {
        "variant": variant, "hidden_size": hidden_size, "time": time, "vocab": vocab,
        "batch": 1, "dtype": "bfloat16" if "bf16" in variant else "float32",
        "status": status, "block": values.pop("block", "main"), "label": variant,
    }
    if status == "ok":
        record.update(
            input_bytes=1000, peak_bytes=100, median_s=1.0, median_cpu_s=2.0,
            time_spread_s=[0.9, 1.2], median_minor_faults=3000, peak_tensor_bytes=100,
        )
    record.update(values)
    return record


def test_find_record_measured_and_sizes():
    records = [_record("eager"), _record("eager", (512, 8192, 128256)),
               _record("chunked", status="needs_gpu"), _record("chunked", block="sweep")]
    assert sizes_of(records) == [(512, 2048, 32000), (512, 8192, 128256)]
    assert sizes_of(records, "sweep") == [(512, 2048, 32000)]
    assert find_record(records, "eager", (512, 8192, 128256)) is records[1]
    assert find_record(records, "chunked", (512, 2048, 32000)) is records[2]
    assert not measured(records[2]) and measured(records[0]) and not measured(None)
    assert find_record(records, "eager", (1, 2, 3)) is None
    with pytest.raises(ValueError, match="expected at most one"):
        find_record(records + [_record("eager")], "eager", (512, 2048, 32000))


def test_floor_bytes_counts_inputs_gradients_block_and_the_float32_sum():
    record = _record("chunked", (4, 10, 100), chunk_bytes=400, chunk_rows=1)
    assert floor_bytes(record) == 2 * (10 + 100) * 4 * 4 + 400
    # a chunk of 20 rows when only 9 positions are scored: 9 rows
    wide = _record("chunked", (4, 10, 100), chunk_bytes=20 * 400, chunk_rows=20)
    assert floor_bytes(wide) == 2 * (10 + 100) * 4 * 4 + 9 * 400
    masked = _record("chunked", (4, 10, 100), chunk_bytes=20 * 400, chunk_rows=20, masked=0.5)
    assert floor_bytes(masked) == 2 * (10 + 100) * 4 * 4 + 5 * 400
    bf16 = _record("chunked_bf16", (4, 10, 100), chunk_bytes=400, chunk_rows=1)
    # inputs, hidden gradient, float32 sum, and the larger of block and weight gradient
    assert floor_bytes(bf16) == (10 + 100) * 4 * 2 + 10 * 4 * 2 + 4 * 100 * 4 + max(400, 100 * 4 * 2)
    big_block = _record("chunked_bf16", (4, 10, 100), chunk_bytes=5000, chunk_rows=1)
    assert floor_bytes(big_block) == (10 + 100) * 4 * 2 + 10 * 4 * 2 + 4 * 100 * 4 + 5000


def test_goal_report_verdicts():
    size = (4, 10, 100)
    floor = 2 * (10 + 100) * 4 * 4 + 400
    records = [
        _record("eager", size, median_s=2.0, median_cpu_s=4.0),
        _record("compiled_eager", size, median_s=1.0, median_cpu_s=2.0),
        # memory exactly at the goal; faster than eager, slower than compile
        _record("chunked", size, chunk_bytes=400, chunk_rows=1, input_bytes=0,
                peak_bytes=MEMORY_FLOOR_FACTOR * floor, median_s=1.5, median_cpu_s=3.0),
        _record("chunked_masked", size, chunk_bytes=400, chunk_rows=1, median_s=0.9),
    ]
    report = {(row["goal"], row["variant"]): row for row in goal_report(records)}
    assert report[("memory", "chunked")]["met"]
    assert report[("faster than eager", "chunked")]["ratio"] == pytest.approx(0.75)
    assert report[("faster than eager", "chunked")]["met"]
    assert not report[("no slower than compile", "chunked")]["met"]
    assert report[("no slower than compile", "chunked")]["cpu_ratio"] == pytest.approx(1.5)
    assert report[("masked", "chunked_masked")]["ratio"] == pytest.approx(0.6)
    assert report[("masked", "chunked_masked")]["met"]
    assert ("bfloat16", "chunked_bf16") not in report  # not measured: not judged
    assert ("0.6 × eager", "chunked") not in report  # only at the goal's size


def test_side_by_side_and_tracker_disagreements():
    records = [_record("eager", median_s=2.0), _record("chunked", tracker_disagrees=True),
               _record("liger_fused", status="needs_gpu")]
    table = side_by_side(records, ["eager", "chunked", "liger_fused"], {"chunked": "ours"})
    assert list(table.index.get_level_values(1)) == ["eager", "ours", "liger_fused"]
    assert table.loc[("512, 2048, 32000", "ours"), "× eager"] == pytest.approx(0.5)
    assert table.loc[("512, 2048, 32000", "liger_fused"), "status"] == "needs_gpu"
    assert math.isnan(table.loc[("512, 2048, 32000", "liger_fused"), "time (s)"])
    assert tracker_disagreements(records) == [records[1]]


def test_sweep_table_sorts_by_dtype_and_budget():
    sweep = [
        _record("chunked_64mib", (4, 10, 100), block="sweep", chunk_budget_bytes=64 * 2**20,
                chunk_rows=8, chunk_bytes=3200),
        _record("chunked_16mib", (4, 10, 100), block="sweep", chunk_budget_bytes=16 * 2**20,
                chunk_rows=2, chunk_bytes=800),
    ]
    table = sweep_table(sweep + [_record("eager")])
    assert list(table["budget (MiB)"]) == [16, 64] and list(table["rows"]) == [2, 8]
    with pytest.raises(ValueError, match="no measured record of the chunk-budget sweep"):
        sweep_table([_record("eager")])


def test_host_reads_counts_what_would_wait_for_a_gpu():
    hidden, weight, labels = _small_problem()
    assert host_reads(chunked_causal_lm_loss, hidden, weight, labels, validate=False) == {"nonzero": 1}
    assert host_reads(eager_label_padding_loss, hidden, weight, labels)["_local_scalar_dense"] >= 2
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        host_reads(None, hidden, weight, labels)


def test_low_precision_errors_rows_and_bounds():
    hidden, weight, labels = _small_problem(time=96, vocab=800, hidden_size=32)
    rows = {row["route"]: row for row in low_precision_errors(hidden, weight, labels, chunk_size=20)}
    assert set(rows) == {"chunked", "transformers eager", "float64 rounded"}
    assert rows["float64 rounded"]["loss"] == 0
    for row in rows.values():
        assert row["loss"] < 2e-3 and row["hidden"] < 2.0**-8 and row["weight"] < 2.0**-8
    with pytest.raises(ValueError, match="dtype must be narrower than float32"):
        low_precision_errors(hidden, weight, labels, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        low_precision_errors(hidden, weight, labels, dtype="bfloat16")


def test_accumulation_check_matches_eager_and_saves_a_gradient():
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 40, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 60, (3, 40), generator=generator)
    result = accumulation_check(hidden, weight, labels, micro_batches=3, chunk_size=9)
    assert result["difference"] < 1e-12
    first, *later = result["peaks"]
    assert all(first - peak == result["weight_grad_bytes"] == 60 * 8 * 8 for peak in later)
    with pytest.raises(ValueError, match="micro_batches must be >= 2 and divide"):
        accumulation_check(hidden, weight, labels, micro_batches=2)


def test_torchtune_style_peaks_hold_a_whole_float32_tensor_after_forward():
    hidden, weight, labels = _small_problem(time=128, vocab=1000, hidden_size=16)
    peaks = torchtune_style_peaks(hidden, weight, labels, num_output_chunks=8)
    assert round(peaks["after_forward"], 3) == 1.5  # bfloat16 chunks + float32 log-probs
    assert round(peaks["peak"], 3) == 1.75
    one_chunk = torchtune_style_peaks(hidden, weight, labels, num_output_chunks=1)
    assert round(one_chunk["peak"], 3) == 3.5  # the unchunked loss, for comparison


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


# --------------------------------------------------------------------------
# What the chapter says of the peers' sources, against the pinned releases
# (in .bench-deps, which `make benchmark` installs; skipped without it)
# --------------------------------------------------------------------------

BENCH_DEPS = REPO_ROOT / ".bench-deps"


def _peer_source(path: str) -> str:
    file = BENCH_DEPS / path
    if not file.is_file():
        pytest.skip(f"{file} is installed by `make benchmark`")
    return file.read_text()


def test_liger_fused_linear_cross_entropy_is_pytorch_around_one_triton_kernel():
    source = _peer_source("liger_kernel/ops/fused_linear_cross_entropy.py")
    assert (BENCH_DEPS / "liger_kernel-0.8.5.dist-info").is_dir()
    # The per-row loss-and-gradient step is the Triton kernel, launched over a chunk's rows ...
    assert "liger_cross_entropy_kernel[(end_idx - start_idx,)](" in source
    # ... the chunk loop and the products are PyTorch, in the input's dtype ...
    assert "for chunk_id in range(num_chunks):" in source
    assert "torch.mm(_input_chunk, weight.t(), out=logits_chunk)" in source
    assert "torch.mm(grad_logits_chunk, weight, out=grad_input[start_idx:end_idx])" in source
    # ... the weight gradient's sum has the parameter's dtype unless accum_dtype is set ...
    assert "if accum_dtype is None:\n            grad_weight = torch.zeros_like(weight, device=device)" in source
    # ... every row is multiplied, and the count of scored targets is read with .item().
    assert "grad_input = torch.zeros_like(_input, device=device)" in source
    assert "total_n_non_ignore = target_mask.sum().item()" in source


def test_cut_cross_entropy_cpu_path_is_torch_compile_of_the_eager_loss():
    source = _peer_source("cut_cross_entropy/torch_compile.py")
    assert "@torch.compile(fullgraph=True, dynamic=True)" in source
    assert "logits = e @ c.T" in source
    assert "F.cross_entropy(logits.float(), targets" in source
    assert "e = e[valids]" in source  # the ignored positions are dropped first


def test_torchtune_chunked_loss_upcasts_chunk_by_chunk():
    source = _peer_source("torchtune/modules/loss/ce_chunked_output_loss.py")
    assert "logits.float(), labels, ignore_index=self.ignore_index, reduction=\"sum\"" in source
    assert "for logits_chunk, labels_chunk in zip(logits, labels):" in source
