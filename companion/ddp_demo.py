"""Data-parallel training on the CPU: which per-rank loss is right.

Run it as a module::

    python -m companion.ddp_demo --world-size 2 \\
        --shard 3,4,3,5 --shard 41 --output result.json

It starts ``world_size`` processes on this machine (``torch.multiprocessing``,
``fork`` on Linux, ``spawn`` elsewhere), joins them in a ``gloo`` process
group on ``127.0.0.1`` and wraps the same
:class:`~companion.accumulation.TinyCausalLM` in
``DistributedDataParallel``.  Rank ``r`` holds the rows whose lengths are
``--shard`` number ``r``.  DDP *averages* gradients over ranks, so the
per-rank loss decides what the step optimises.  Three per-rank losses are
compared with one process computing the token mean of all rows:

* ``"mean_of_means"``: ``S_r / n_r``, the rank's own token mean.  DDP's
  average makes the step a mean of per-rank means.
* ``"global_count_unscaled"``: ``S_r / N`` with ``N`` all-reduced over
  ranks.  Right denominator, but DDP's average then divides by the number
  of ranks ``R`` again.
* ``"token_mean"``: ``R * S_r / N``.  After DDP's average the gradient is
  ``sum_r grad S_r / N``, the full-batch gradient.

The parent process enforces a deadline, and stops every worker (SIGTERM, then
SIGKILL) when the deadline passes, when a worker fails, or on any exception.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import multiprocessing.connection
import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.nn.parallel import DistributedDataParallel

from companion import reference
from companion._checks import require_nonempty_lists, require_positive_int
from companion.accumulation import (
    TinyLMConfig,
    build_tiny_lm,
    count_scored_tokens,
    flat_gradient,
    make_counting_batch,
    relative_difference,
    token_loss_sum,
    warm_up,
)

VARIANTS: tuple[str, ...] = (
    "mean_of_means",
    "global_count_unscaled",
    "token_mean",
)
"""Per-rank losses the demo compares, in the order it runs them."""

DEFAULT_SHARDS: tuple[tuple[int, ...], ...] = ((3, 4, 3, 5), (41,))
"""Row lengths per rank: four short rows on rank 0, one long row on rank 1."""

MASTER_ADDR = "127.0.0.1"
RESULT_FILE = "result.json"
COLLECTIVE_TIMEOUT_MARGIN_S = 10.0


class WorkerFailedError(RuntimeError):
    """A worker process failed; every worker has been stopped.

    Attributes:
        rank: the rank that failed first.
        pids: process ids of all workers (none of them is running any more).
    """

    def __init__(self, message: str, rank: int, pids: list[int]) -> None:
        super().__init__(message)
        self.rank = rank
        self.pids = pids


class WorkersTimedOutError(TimeoutError):
    """The run passed its deadline; every worker has been stopped.

    Attributes:
        pids: process ids of all workers (none of them is running any more).
    """

    def __init__(self, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.pids = pids


@dataclass(frozen=True)
class FailureInjection:
    """Make one worker fail on purpose, to exercise the clean-up path.

    Attributes:
        rank: the worker that fails.
        kind: ``"raise"`` raises an exception after joining the process
            group (the other ranks then wait in a collective); ``"exit"``
            ends the process abruptly with exit code 3 (no traceback, as an
            out-of-memory kill would); ``"hang"`` sleeps past any deadline.
    """

    rank: int
    kind: Literal["raise", "exit", "hang"]


@dataclass(frozen=True)
class DemoSettings:
    """Everything a worker needs besides its rank (picklable, sent to it)."""

    world_size: int
    port: int
    shard_rows: tuple[tuple[int, int], ...]
    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]
    config: TinyLMConfig
    seed: int
    warm_up_steps: int
    collective_timeout_s: float
    result_dir: str
    failure: FailureInjection | None
    start_method: str


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The OS picks it: the probe socket binds to port 0.

    Another program could take it before rank 0 binds it; the window is tiny
    on a test machine and a clash fails loudly in ``init_process_group``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((MASTER_ADDR, 0))
        return int(probe.getsockname()[1])


def _check_shards(
    shard_lengths: Sequence[Sequence[int]], world_size: int
) -> list[list[int]]:
    require_positive_int(world_size, "world_size")
    if isinstance(shard_lengths, (str, bytes)) or not isinstance(
        shard_lengths, Sequence
    ):
        raise TypeError(
            "shard_lengths must be a sequence with one list of row lengths "
            "per rank; "
            f"got {type(shard_lengths).__name__}"
        )
    if len(shard_lengths) != world_size:
        raise ValueError(
            f"world_size={world_size} but shard_lengths describes "
            f"{len(shard_lengths)} "
            "shard(s): give exactly one list of row lengths per rank"
        )
    shards = []
    require_nonempty_lists(shard_lengths, "shard_lengths", "row lengths")
    for rank, lengths in enumerate(shard_lengths):
        for index, length in enumerate(lengths):
            require_positive_int(length, f"shard_lengths[{rank}][{index}]")
        shards.append([int(length) for length in lengths])
    scored = [sum(length - 1 for length in lengths) for lengths in shards]
    if sum(scored) == 0:
        raise ValueError(
            "the whole batch has no scored token (every row has length 1, "
            "so no position "
            "has a next token): the token mean is 0/0"
        )
    for rank, count in enumerate(scored):
        if count == 0:
            raise ValueError(
                f"shard_lengths[{rank}] has no scored token "
                "(all rows of length 1): that "
                "rank's own mean, used by the mean_of_means variant, is 0/0"
            )
    return shards


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


def _inject(failure: FailureInjection | None, rank: int) -> None:
    if failure is None or failure.rank != rank:
        return
    if failure.kind == "raise":
        raise RuntimeError(f"injected failure on rank {rank}")
    if failure.kind == "exit":
        os._exit(3)
    time.sleep(3600.0)


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def _worker(rank: int, settings: DemoSettings) -> None:
    """One rank: DDP steps for every variant.

    Rank 0 also runs the full batch in one process and writes the JSON.
    """
    os.environ["MASTER_ADDR"] = MASTER_ADDR
    os.environ["MASTER_PORT"] = str(settings.port)
    # Gloo looks up the host name to pick a network interface; pinning it
    # to loopback keeps the run on this machine whatever the host name
    # resolves to.
    if "GLOO_SOCKET_IFNAME" not in os.environ and any(
        name == "lo" for _, name in socket.if_nameindex()
    ):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # One intra-op thread per process: the ranks share the machine's cores.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=settings.world_size,
        timeout=timedelta(seconds=settings.collective_timeout_s),
    )
    try:
        _run_rank(rank, settings)
    finally:
        dist.destroy_process_group()


def _run_rank(rank: int, settings: DemoSettings) -> None:
    world_size = dist.get_world_size()
    if world_size != settings.world_size:
        raise RuntimeError(
            f"process group has world size {world_size}; "
            f"expected {settings.world_size}"
        )
    _inject(settings.failure, rank)
    model = build_tiny_lm(settings.config, seed=settings.seed)
    warm_up(model, steps=settings.warm_up_steps, seed=settings.seed + 1)
    # DDP copies rank 0's parameters to every rank when it wraps the model,
    # so rank 0's copy taken here is the starting point of every rank.
    single_process_model = copy.deepcopy(model)
    ddp_model = DistributedDataParallel(model)

    input_ids = torch.tensor(settings.input_ids, dtype=torch.long)
    labels = torch.tensor(settings.labels, dtype=torch.long)
    first, stop = settings.shard_rows[rank]
    rank_ids, rank_labels = input_ids[first:stop], labels[first:stop]
    rank_count = torch.tensor(count_scored_tokens(rank_labels))
    global_count = int(_all_reduce_sum(rank_count))

    records: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        ddp_model.zero_grad(set_to_none=True)
        rank_sum = token_loss_sum(ddp_model(rank_ids), rank_labels)
        if variant == "mean_of_means":
            rank_loss = rank_sum / int(rank_count)
        elif variant == "global_count_unscaled":
            rank_loss = rank_sum / global_count
        else:
            rank_loss = rank_sum * world_size / global_count
        rank_loss.backward()
        # DDP's gradient is the gradient of the mean over ranks of rank_loss.
        step_loss = float(_all_reduce_sum(rank_loss)) / world_size
        gradient = flat_gradient(model)
        gathered = [torch.zeros_like(gradient) for _ in range(world_size)]
        dist.all_gather(gathered, gradient)
        records[variant] = {
            "loss": step_loss,
            "gradient": gradient,
            "max_rank_disagreement": max(
                float((other - gathered[0]).abs().max()) for other in gathered
            ),
        }
    if rank == 0:
        _write_result(
            settings,
            single_process_model,
            input_ids,
            labels,
            global_count,
            records,
        )


def _write_result(
    settings: DemoSettings,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    global_count: int,
    records: dict[str, dict[str, Any]],
) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids)
    full_loss = token_loss_sum(logits, labels) / global_count
    full_loss.backward()
    full_gradient = flat_gradient(model)
    full_value = full_loss.item()
    reference_loss = reference.causal_lm_loss(
        logits.detach().numpy(), labels.numpy()
    )
    full_norm = float(torch.linalg.vector_norm(full_gradient))
    result: dict[str, Any] = {
        "world_size": settings.world_size,
        "seed": settings.seed,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_parameters": int(full_gradient.numel()),
        "shard_lengths": [
            [int((row != -100).sum()) for row in labels[first:stop]]
            for first, stop in settings.shard_rows
        ],
        "shard_token_counts": [
            count_scored_tokens(labels[a:b]) for a, b in settings.shard_rows
        ],
        "global_token_count": global_count,
        "full_batch": {
            "loss": full_value,
            "reference_loss": reference_loss,
            "gradient_norm": full_norm,
        },
        "variants": {},
    }
    for variant, record in records.items():
        gradient = record["gradient"]
        result["variants"][variant] = {
            "loss": record["loss"],
            "relative_loss_error": abs(record["loss"] - full_value)
            / abs(full_value),
            "relative_gradient_error": relative_difference(
                gradient, full_gradient
            ),
            "gradient_norm_ratio": float(torch.linalg.vector_norm(gradient))
            / full_norm,
            "max_rank_disagreement": record["max_rank_disagreement"],
        }
    target = Path(settings.result_dir) / RESULT_FILE
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=2, sort_keys=True))
    partial.replace(target)


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


def _stop_workers(processes: Sequence[Any], grace_s: float = 2.0) -> None:
    """SIGTERM every live worker, SIGKILL those alive after ``grace_s``.

    Every worker is reaped (joined) before this returns.
    """
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


def _failure_message(rank: int, process: Any, error_file: str) -> str:
    if os.path.exists(error_file):
        with open(error_file, "rb") as handle:
            trace = pickle.load(handle)
        last_line = trace.strip().splitlines()[-1]
        return f"worker rank {rank} failed: {last_line}"
    return f"worker rank {rank} exited with code {process.exitcode}"


def run_ddp_comparison(
    shard_lengths: Sequence[Sequence[int]] = DEFAULT_SHARDS,
    *,
    world_size: int = 2,
    config: TinyLMConfig | None = None,
    seed: int = 0,
    warm_up_steps: int = 40,
    timeout_s: float = 60.0,
    failure: FailureInjection | None = None,
    start_method: Literal["fork", "spawn"] | None = None,
) -> dict[str, Any]:
    """Launch ``world_size`` gloo workers, run the three variants.

    Returns the comparison that rank 0 wrote.

    Args:
        shard_lengths: one list per rank of row lengths (tokens per row,
            each ``>= 1``); every row of the batch is padded to the longest.
        world_size: number of processes; must equal ``len(shard_lengths)``.
        config: model sizes (default :class:`TinyLMConfig`).
        seed: seeds the model's weights, its warm-up and the data.
        warm_up_steps: Adam steps before the compared step (see
            :func:`companion.accumulation.warm_up`).
        timeout_s: deadline for the whole run, start-up included.  A worker
            waits in a collective for ``timeout_s + 10`` s before giving up.
        failure: make one worker fail, to test the clean-up path.
        start_method: how workers start.  ``"fork"`` (the default on Linux)
            copies this process, so the workers skip importing PyTorch
            again; ``"spawn"`` starts fresh interpreters (the only safe
            choice on macOS).  Forking a process that runs other threads,
            such as a Jupyter kernel, is fragile: from a notebook, run
            ``python -m companion.ddp_demo`` as a program, as the book does.

    Returns:
        The JSON-ready dict rank 0 wrote: token counts, the single-process
        full-batch loss (and its float64 NumPy reference), and per variant
        the loss, relative loss and gradient errors, the gradient-norm ratio
        and the largest difference between ranks' gradients.

    Raises:
        ValueError: ``world_size`` differs from the number of shards, a row
            length ``< 1``, no scored token in the whole batch, or a rank
            without a scored token.
        WorkerFailedError: a worker failed (all workers are stopped first).
        WorkersTimedOutError: the deadline passed (all workers are stopped
            first); a subclass of ``TimeoutError``.
    """
    shards = _check_shards(shard_lengths, world_size)
    config = config or TinyLMConfig()
    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    if start_method not in ("fork", "spawn"):
        raise ValueError(
            f"start_method must be 'fork' or 'spawn'; got {start_method!r}"
        )
    require_positive_int(warm_up_steps, "warm_up_steps")
    if (
        not isinstance(timeout_s, (int, float))
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ValueError(
            "timeout_s must be a positive number of seconds; "
            f"got {timeout_s!r}"
        )
    if failure is not None and not 0 <= failure.rank < world_size:
        raise ValueError(
            f"failure.rank must lie in [0, {world_size}); got {failure.rank}"
        )
    lengths = [length for shard in shards for length in shard]
    if max(lengths) > config.max_length:
        raise ValueError(
            f"the longest row has {max(lengths)} tokens; "
            f"config.max_length is {config.max_length}"
        )
    input_ids, labels = make_counting_batch(
        lengths, vocab_size=config.vocab_size, seed=seed
    )
    shard_rows, first = [], 0
    for shard in shards:
        shard_rows.append((first, first + len(shard)))
        first += len(shard)

    with tempfile.TemporaryDirectory(prefix="ddp-demo-") as result_dir:
        settings = DemoSettings(
            world_size=world_size,
            port=find_free_port(),
            shard_rows=tuple(shard_rows),
            input_ids=tuple(tuple(row) for row in input_ids.tolist()),
            labels=tuple(tuple(row) for row in labels.tolist()),
            config=config,
            seed=seed,
            warm_up_steps=warm_up_steps,
            # Longer than the parent's deadline, so that a stuck run ends by
            # the parent stopping every worker, not by one worker's
            # collective failing.
            collective_timeout_s=float(timeout_s)
            + COLLECTIVE_TIMEOUT_MARGIN_S,
            result_dir=result_dir,
            failure=failure,
            start_method=start_method,
        )
        _launch_and_wait(settings, timeout_s)
        result_path = Path(result_dir) / RESULT_FILE
        if not result_path.exists():
            raise WorkerFailedError(
                "rank 0 exited without writing its result", 0, []
            )
        return json.loads(result_path.read_text())


def _launch_and_wait(settings: DemoSettings, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    if settings.start_method == "fork":
        # DistributedDataParallel imports torch._dynamo when it wraps a model:
        # seconds per process.  Imported once here, forked workers inherit it.
        importlib.import_module("torch._dynamo")
    context = torch_mp.start_processes(
        _worker,
        args=(settings,),
        nprocs=settings.world_size,
        join=False,
        start_method=settings.start_method,
    )
    processes, error_files = context.processes, context.error_files
    pids = [int(process.pid) for process in processes]
    try:
        while True:
            for rank, process in enumerate(processes):
                if process.exitcode not in (None, 0):
                    _stop_workers(processes)
                    raise WorkerFailedError(
                        _failure_message(rank, process, error_files[rank]),
                        rank,
                        pids,
                    )
            running = [p for p in processes if p.exitcode is None]
            if not running:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _stop_workers(processes)
                raise WorkersTimedOutError(
                    f"the {settings.world_size} workers did not finish "
                    f"within {timeout_s:g} s; "
                    "all were stopped",
                    pids,
                )
            multiprocessing.connection.wait(
                [process.sentinel for process in running],
                timeout=min(remaining, 0.5),
            )
    finally:
        _stop_workers(processes)
        for error_file in error_files:
            if os.path.exists(error_file):
                os.unlink(error_file)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parse_shard(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "--shard takes comma-separated row lengths such as 3,4,5; "
            f"got {text!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print or write the result as JSON.

    Returns the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m companion.ddp_demo",
        description=(
            "Compare per-rank loss reductions under "
            "DistributedDataParallel (gloo, CPU)."
        ),
    )
    parser.add_argument(
        "--world-size", type=int, default=2, help="number of processes"
    )
    parser.add_argument(
        "--shard",
        type=_parse_shard,
        action="append",
        help="row lengths of one rank, e.g. 3,4,3,5; repeat once per rank",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-up-steps", type=int, default=40)
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds for the whole run",
    )
    parser.add_argument(
        "--output", type=Path, help="write the JSON here instead of stdout"
    )
    args = parser.parse_args(argv)
    if args.shard is not None:
        shards = args.shard
    else:
        shards = [list(s) for s in DEFAULT_SHARDS]
    try:
        result = run_ddp_comparison(
            shards,
            world_size=args.world_size,
            seed=args.seed,
            warm_up_steps=args.warm_up_steps,
            timeout_s=args.timeout,
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    except (WorkerFailedError, WorkersTimedOutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.output is None:
        print(text)
    else:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    # Re-import under the package name so that the worker function pickles
    # as companion.ddp_demo._worker, which the spawned processes can import.
    from companion.ddp_demo import main as package_main

    sys.exit(package_main())
