"""Tests of companion.experiments.ddp_demo: the two-process gloo run, its clean-up, and its input checks."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from companion.experiments.ddp_demo import (
    LOOPBACK_INTERFACES,
    FailureInjection,
    WorkerFailedError,
    WorkersTimedOutError,
    loopback_interface,
    main,
    run_ddp_comparison,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# A guard against a hung run, not a timing: two workers that import torch
# and transformers on a loaded 2-core machine can take a minute to start.
DEADLINE_S = 180.0


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


@pytest.mark.parametrize(("rank", "runs"), [(1, 20), (0, 10)])
def test_first_failure_is_reported_not_the_peers_collective_error(rank, runs):
    """The failing rank raises while the other waits in an all-reduce.

    The waiting rank then fails too ("Connection closed by peer"), often
    before the parent looks; rank order used to report it about half the
    time.  Every run must name the injected rank and its own message.
    """
    for run in range(runs):
        with pytest.raises(WorkerFailedError) as caught:
            run_ddp_comparison(timeout_s=DEADLINE_S, failure=FailureInjection(rank=rank, kind="raise"))
        error = caught.value
        summary = str(error).splitlines()[0]
        assert (error.rank, summary) == (
            rank,
            f"worker rank {rank} failed: RuntimeError: injected failure on rank {rank}",
        ), f"run {run}: {error}"
        assert error.worker_traceback.rstrip().endswith(f"RuntimeError: injected failure on rank {rank}")
        assert "in _inject" in error.worker_traceback
        assert f"traceback of rank {rank}:\n" in str(error)
        assert set(error.later_failures) <= {1 - rank}
        _assert_gone(error.pids)


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


def test_loopback_interface_exists():
    name = loopback_interface()
    assert name in LOOPBACK_INTERFACES
    assert name in {interface for _, interface in socket.if_nameindex()}


# Brings the loopback interface of a new network namespace up, as
# `ip link set lo up` does, without needing iproute2.
_LOOPBACK_UP = """
import fcntl, socket, struct
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sH22x", b"lo", 0)
    flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
names = sorted(name for _, name in socket.if_nameindex())
assert names == ["lo"], names
"""


def _offline_command() -> list[str]:
    """The prefix that runs a command in a new network namespace.

    Skips the test, with the reason, where no namespace can be made.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    prefix = [unshare, "--net"]
    if os.geteuid() != 0:
        prefix.append("--map-root-user")
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", _LOOPBACK_UP], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot run in a new network namespace: {probe.stderr.strip() or probe.returncode}")
    return prefix


def test_command_line_runs_offline_with_empty_stderr(tmp_path):
    """As chapter 5 runs it, in a network namespace with only loopback (up).

    No name server is reachable there.  A TCP store printed "The hostname
    of the client socket cannot be retrieved" to stderr.
    """
    prefix = _offline_command()
    output = tmp_path / "ddp.json"
    script = (
        _LOOPBACK_UP
        + "import sys\n"
        + "from companion.experiments.ddp_demo import main\n"
        + f"sys.exit(main(['--timeout', '{DEADLINE_S}', '--output', {str(output)!r}]))\n"
    )
    completed = subprocess.run(
        [*prefix, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    written = json.loads(output.read_text())
    assert written["shard_token_counts"] == [11, 40]
    assert written["variants"]["token_mean"]["relative_gradient_error"] < 1e-12
    assert written["variants"]["global_count_unscaled"]["gradient_norm_ratio"] == pytest.approx(0.5, rel=1e-12)


def test_workers_are_spawned_from_a_threaded_or_tensorflow_process(monkeypatch):
    """Forking copies the locks other threads hold: a process that runs
    threads, or has imported TensorFlow (whose pools threading cannot see),
    spawns its workers instead."""
    import sys
    import threading

    from companion.experiments import ddp_demo

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert ddp_demo._default_start_method() == "fork"
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert ddp_demo._default_start_method() == "spawn"
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    assert ddp_demo._default_start_method() == "spawn"
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delitem(sys.modules, "tensorflow")
    assert ddp_demo._default_start_method() == "spawn"
