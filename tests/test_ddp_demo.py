"""Tests of companion.ddp_demo: the two-process gloo run, its clean-up, and its input checks."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from companion.ddp_demo import (
    FailureInjection,
    WorkerFailedError,
    WorkersTimedOutError,
    find_free_port,
    main,
    run_ddp_comparison,
)

# The whole run, process start-up included, must end well inside a minute.
DEADLINE_S = 45.0


def _assert_gone(pids: list[int]) -> None:
    assert pids, "the error must report the workers' process ids"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []


@pytest.fixture(scope="module")
def result() -> dict:
    started = time.monotonic()
    outcome = run_ddp_comparison(timeout_s=DEADLINE_S)
    outcome["elapsed_s"] = time.monotonic() - started
    return outcome


def test_run_is_bounded_and_leaves_no_process(result):
    assert result["elapsed_s"] < DEADLINE_S
    assert multiprocessing.active_children() == []


def test_token_counts_per_rank(result):
    assert result["world_size"] == 2
    assert result["shard_lengths"] == [[3, 4, 3, 5], [41]]
    assert result["shard_token_counts"] == [2 + 3 + 2 + 4, 40]
    assert result["global_token_count"] == 51
    assert result["dtype"] == "float64"


def test_single_process_loss_matches_float64_reference(result):
    full = result["full_batch"]
    assert full["loss"] == pytest.approx(full["reference_loss"], rel=1e-12)


def test_fixed_reduction_equals_full_batch(result):
    fixed = result["variants"]["token_mean"]
    assert fixed["relative_gradient_error"] < 1e-12
    assert fixed["relative_loss_error"] < 1e-12
    assert fixed["gradient_norm_ratio"] == pytest.approx(1.0, abs=1e-12)


def test_per_rank_means_are_off(result):
    naive = result["variants"]["mean_of_means"]
    assert naive["relative_gradient_error"] > 0.2
    assert naive["relative_loss_error"] > 0.2


def test_global_count_without_rescaling_is_exactly_one_over_world_size(result):
    unscaled = result["variants"]["global_count_unscaled"]
    assert unscaled["gradient_norm_ratio"] == pytest.approx(0.5, rel=1e-12)
    assert unscaled["relative_gradient_error"] == pytest.approx(0.5, rel=1e-12)
    assert unscaled["loss"] == pytest.approx(result["full_batch"]["loss"] / 2, rel=1e-12)


def test_ranks_hold_identical_gradients_after_ddp(result):
    for variant in result["variants"].values():
        assert variant["max_rank_disagreement"] == 0.0


def test_command_line_writes_json(tmp_path):
    output = tmp_path / "ddp.json"
    status = main(["--shard", "2,3", "--shard", "9", "--timeout", str(DEADLINE_S), "--output", str(output)])
    assert status == 0
    written = json.loads(output.read_text())
    assert written["shard_token_counts"] == [1 + 2, 8]
    assert written["variants"]["token_mean"]["relative_gradient_error"] < 1e-12
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    ("kind", "message"),
    [("raise", "injected failure on rank 1"), ("exit", "exited with code 3")],
)
def test_failing_worker_stops_every_worker(kind, message):
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match=message) as caught:
        run_ddp_comparison(timeout_s=DEADLINE_S, failure=FailureInjection(rank=1, kind=kind))
    # Rank 0 was waiting for rank 1 in a collective: only the parent could end it.
    assert time.monotonic() - started < DEADLINE_S
    assert caught.value.rank == 1
    _assert_gone(caught.value.pids)


def test_hanging_worker_is_stopped_at_the_deadline():
    started = time.monotonic()
    with pytest.raises(WorkersTimedOutError, match="did not finish within 3 s") as caught:
        run_ddp_comparison(timeout_s=3.0, failure=FailureInjection(rank=0, kind="hang"))
    assert time.monotonic() - started < 3.0 + 10.0
    assert isinstance(caught.value, TimeoutError)
    _assert_gone(caught.value.pids)


@pytest.mark.parametrize(
    ("shards", "world_size", "match"),
    [
        ([[3, 4], [5]], 3, "world_size=3 but shard_lengths describes 2 shard"),
        ([[3, 4, 5]], 2, "world_size=2 but shard_lengths describes 1 shard"),
        ([[1, 1], [1]], 2, "whole batch has no scored token"),
        ([[1], [5]], 2, r"shard_lengths\[0\] has no scored token"),
        ([[3], []], 2, r"shard_lengths\[1\] must be a non-empty list"),
        ([[3], [0]], 2, r"shard_lengths\[1\]\[0\] must be >= 1"),
        ([[3], [500]], 2, "config.max_length"),
    ],
)
def test_bad_input_is_rejected_before_any_process_starts(shards, world_size, match):
    with pytest.raises(ValueError, match=match):
        run_ddp_comparison(shards, world_size=world_size)
    assert multiprocessing.active_children() == []


def test_other_argument_errors():
    with pytest.raises(TypeError, match="world_size must be an int"):
        run_ddp_comparison(world_size=2.0)
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        run_ddp_comparison(timeout_s=0)
    with pytest.raises(ValueError, match=r"failure.rank must lie in \[0, 2\)"):
        run_ddp_comparison(failure=FailureInjection(rank=2, kind="raise"))
    with pytest.raises(ValueError, match="start_method must be"):
        run_ddp_comparison(start_method="forkserver")


def test_command_line_reports_mismatched_world_size(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--world-size", "3", "--shard", "3", "--shard", "4"])
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert "world_size=3 but shard_lengths describes 2 shard(s)" in captured.err
    assert captured.out == ""
    assert multiprocessing.active_children() == []


def test_command_line_rejects_malformed_shard(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--shard", "3,x"])
    assert caught.value.code == 2
    assert "--shard takes comma-separated row lengths" in capsys.readouterr().err


def test_free_port_is_bindable():
    import socket

    port = find_free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", port))
