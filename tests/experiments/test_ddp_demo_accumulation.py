"""Tests of companion.experiments.ddp_demo's accumulated step: DDP with
``no_sync`` and FSDP2 with ``set_requires_gradient_sync``, in two gloo
processes, against the single-process full batch."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time

import pytest

from companion.experiments.ddp_demo import (
    ACCUMULATION_WRAPPERS,
    DEFAULT_MICRO_BATCHES,
    main,
    run_accumulation_comparison,
)
from tests.experiments.test_ddp_demo import (
    _LOOPBACK_UP,
    DEADLINE_S,
    REPO_ROOT,
    _offline_command,
)


@pytest.fixture(scope="module", params=ACCUMULATION_WRAPPERS)
def result(request) -> dict:
    started = time.monotonic()
    outcome = run_accumulation_comparison(wrapper=request.param, timeout_s=DEADLINE_S)
    outcome["elapsed_s"] = time.monotonic() - started
    return outcome


def test_run_is_bounded_and_leaves_no_process(result):
    assert result["elapsed_s"] < DEADLINE_S
    assert multiprocessing.active_children() == []


def test_counts_are_per_micro_batch_and_global(result):
    # rows of lengths 3, 4 | 3, 5 on rank 0 and 41 | 9 on rank 1
    assert result["micro_batch_token_counts"] == [[2 + 3, 2 + 4], [40, 8]]
    assert result["global_token_count"] == 59
    assert result["mode"] == "accumulation"


def test_accumulated_step_equals_the_full_batch(result):
    assert result["relative_gradient_error"] < 1e-12
    assert result["relative_loss_error"] < 1e-12
    assert result["max_rank_disagreement"] == 0.0


def test_ddp_no_sync_keeps_gradients_local_until_the_last_micro_batch(result):
    if result["wrapper"] == "ddp":
        assert result["unsynced_rank_disagreement"] > 1e-3
        assert result["parameters_per_rank"] == [result["num_parameters"]] * 2
    else:
        assert result["unsynced_rank_disagreement"] is None
        # FSDP2 shards every parameter along its first dimension
        assert sum(result["parameters_per_rank"]) == result["num_parameters"]
        assert max(result["parameters_per_rank"]) < result["num_parameters"]


@pytest.mark.parametrize(
    ("micro_batches", "world_size", "match"),
    [
        ([[[3]], [[4]]], 3, "world_size=3 but micro_batches describes 2 rank"),
        ([[[3]], []], 2, r"micro_batches\[1\] must be a non-empty list"),
        ([[[3]], [[]]], 2, r"micro_batches\[1\]\[0\] must be a non-empty list"),
        ([[[3]], [[0]]], 2, r"micro_batches\[1\]\[0\]\[0\] must be >= 1"),
        ([[[1]], [[1]]], 2, "whole step has no scored token"),
        ([[[3]], [[500]]], 2, "config.max_length"),
    ],
)
def test_bad_input_is_rejected_before_any_process_starts(micro_batches, world_size, match):
    with pytest.raises(ValueError, match=match):
        run_accumulation_comparison(micro_batches, world_size=world_size)
    assert multiprocessing.active_children() == []


def test_other_argument_errors():
    with pytest.raises(ValueError, match="wrapper must be one of"):
        run_accumulation_comparison(wrapper="deepspeed")
    with pytest.raises(ValueError, match="timeout_s must be a positive"):
        run_accumulation_comparison(timeout_s=float("inf"))
    with pytest.raises(ValueError, match="start_method must be one of"):
        run_accumulation_comparison(start_method="forkserver")
    assert DEFAULT_MICRO_BATCHES == (((3, 4), (3, 5)), ((41,), (9,)))


def test_command_line_rejects_malformed_micro_batches(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--accumulate", "--shard", "3,4/x"])
    assert caught.value.code == 2
    assert "micro-batches separated by /" in capsys.readouterr().err


def test_command_line_runs_fsdp_offline_with_empty_stderr(tmp_path):
    """As chapter 7 runs it, in a network namespace with only loopback."""
    prefix = _offline_command()
    output = tmp_path / "fsdp.json"
    arguments = ["--accumulate", "--wrapper", "fsdp", "--shard", "3,4/3,5",
                 "--shard", "41/9", "--timeout", str(DEADLINE_S), "--output", str(output)]
    script = (
        _LOOPBACK_UP
        + "import sys\n"
        + "from companion.experiments.ddp_demo import main\n"
        + f"sys.exit(main({arguments!r}))\n"
    )
    completed = subprocess.run(
        [*prefix, sys.executable, "-c", script],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    written = json.loads(output.read_text())
    assert written["wrapper"] == "fsdp"
    assert written["relative_gradient_error"] < 1e-12
