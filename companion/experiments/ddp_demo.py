"""Data-parallel training on the CPU: which per-rank loss is right.

Run it as a module::

    python -m companion.experiments.ddp_demo --world-size 2 \\
        --shard 3,4,3,5 --shard 41 --output result.json

It starts ``world_size`` processes on this machine (``torch.multiprocessing``,
``fork`` on Linux, ``spawn`` elsewhere), joins them in a ``gloo`` process
group on the loopback interface and wraps the same
:class:`~companion.experiments.tiny_models.TinyCausalLM` in
``DistributedDataParallel``.  Rank ``r`` holds the rows whose lengths are
``--shard`` number ``r``.  DDP *averages* gradients over ranks, so the
per-rank loss decides what the step optimises.  Three per-rank losses are
compared with one process computing the token mean of all rows:

* ``"mean_of_means"``: ``S_r / n_r``, the rank's own token mean.  DDP's
  average makes the step a mean of per-rank means.
* ``"global_count_unscaled"``: ``S_r / N`` with ``N`` all-reduced over
  ranks.  Right denominator, but DDP's average then divides by the number
  of ranks ``R`` again.
* ``"token_mean"``: ``R * S_r / N``
  (:func:`companion.accumulation.micro_batch_loss`).  After DDP's average
  the gradient is ``sum_r grad S_r / N``, the full-batch gradient.

With ``--accumulate`` it runs one optimiser step of data parallelism and
gradient accumulation together (:func:`run_accumulation_comparison`)::

    python -m companion.experiments.ddp_demo --accumulate --wrapper fsdp \\
        --shard 3,4/3,5 --shard 41/9 --output result.json

Rank ``r`` holds the micro-batches of ``--shard`` number ``r`` (``/``
separates micro-batches, ``,`` rows).  The scored targets of every
micro-batch of every rank are counted and all-reduced before the first
forward pass, and each micro-batch back-propagates ``R * S_rk / N``.  With
``--wrapper ddp`` the model is wrapped in ``DistributedDataParallel`` and
every micro-batch but the last runs inside ``no_sync()``, so gradients
add up locally and are all-reduced once; with ``--wrapper fsdp`` it is
sharded with ``fully_shard`` (FSDP2: each rank stores a slice of every
parameter) and ``set_requires_gradient_sync(False)`` plays the part of
``no_sync``.  Either way the step's gradient is compared with the
single-process full-batch gradient.

The workers find each other through a ``FileStore`` in a private temporary
directory, not a TCP store, and gloo is bound to the loopback interface by
name: nothing depends on host names or a name server, so the run works, and
prints nothing, without any network.  (PyTorch's TCP store looks up the name
of the IPv4-mapped address ``::ffff:127.0.0.1`` on every connection; with no
name server it warns "The hostname of the client socket cannot be
retrieved".)

The parent process enforces a deadline, and stops every worker (SIGTERM, then
SIGKILL) when the deadline passes, when a worker fails, or on any exception.
When a worker fails, the others usually fail too, in the collective that
waited for it ("Connection closed by peer").  Each failing worker records
its traceback and the time (``time.monotonic_ns``) before it closes any
connection, so the parent reports the failure that came first, with its own
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch.nn.parallel import DistributedDataParallel

from companion import reference
from companion._checks import (
    require_nonempty_lists,
    require_one_of,
    require_positive_int,
    require_sequence,
)
from companion.accumulation import micro_batch_loss
from companion.causal_lm_loss import count_scored_targets, label_padding_loss
from companion.experiments.denominator import (
    flat_gradient,
    make_counting_batch,
    relative_difference,
    warm_up,
)
from companion.experiments.tiny_models import TinyLMConfig, build_tiny_lm

__all__ = [
    "ACCUMULATION_WRAPPERS",
    "COLLECTIVE_TIMEOUT_MARGIN_S",
    "DEFAULT_MICRO_BATCHES",
    "DEFAULT_SHARDS",
    "FAILURE_FILE",
    "INJECTED_FAILURE_DELAY_S",
    "LOOPBACK_INTERFACES",
    "RESULT_FILE",
    "STORE_FILE",
    "VARIANTS",
    "DemoSettings",
    "FailureInjection",
    "WorkerFailedError",
    "WorkersTimedOutError",
    "loopback_interface",
    "main",
    "run_accumulation_comparison",
    "run_accumulation_rank",
    "run_ddp_comparison",
    "run_rank",
]

VARIANTS: tuple[str, ...] = (
    "mean_of_means",
    "global_count_unscaled",
    "token_mean",
)
"""Per-rank losses the demo compares, in the order it runs them."""

DEFAULT_SHARDS: tuple[tuple[int, ...], ...] = ((3, 4, 3, 5), (41,))
"""Row lengths per rank: four short rows on rank 0, one long row on rank 1."""

DEFAULT_MICRO_BATCHES: tuple[tuple[tuple[int, ...], ...], ...] = (
    ((3, 4), (3, 5)),
    ((41,), (9,)),
)
"""Row lengths per micro-batch per rank for :func:`run_accumulation_comparison`:
rank 0 two micro-batches of two short rows, rank 1 one long row then a
short one."""

ACCUMULATION_WRAPPERS: tuple[str, ...] = ("ddp", "fsdp")
"""How :func:`run_accumulation_comparison` wraps the model:
``DistributedDataParallel`` with ``no_sync``, or FSDP2's ``fully_shard``
with ``set_requires_gradient_sync``."""

RESULT_FILE = "result.json"
STORE_FILE = "store"
FAILURE_FILE = "failure-rank{rank}.json"
COLLECTIVE_TIMEOUT_MARGIN_S = 10.0
INJECTED_FAILURE_DELAY_S = 0.05
LOOPBACK_INTERFACES = ("lo", "lo0")
"""Loopback interface names: Linux, then macOS and the BSDs."""


class WorkerFailedError(RuntimeError):
    """A worker process failed; every worker has been stopped.

    The message starts with ``worker rank R failed: <last line of its
    traceback>`` (or ``worker rank R exited with code C`` / ``was killed by
    SIGNAL`` when it died without a traceback), names the ranks that failed
    after it, and ends with the first failure's traceback.

    Attributes:
        rank: the rank that failed first.
        pids: process ids of all workers (none of them is running any more).
        worker_traceback: that rank's traceback, or ``None`` when it died
            without one.
        later_failures: ``{rank: last line of its traceback}`` of the ranks
            that failed after it, typically in the collective that waited
            for it.
    """

    def __init__(
        self,
        message: str,
        rank: int,
        pids: list[int],
        worker_traceback: str | None = None,
        later_failures: dict[int, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.pids = pids
        self.worker_traceback = worker_traceback
        self.later_failures = dict(later_failures or {})


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

    Every other rank first enters a collective (an all-reduce) that the
    failing rank never joins; the failing rank fails once all of them have
    announced it, and ``INJECTED_FAILURE_DELAY_S`` later.  So the others
    are waiting in a collective when it fails, as in a real run.

    Attributes:
        rank: the worker that fails.
        kind: ``"raise"`` raises an exception after joining the process
            group (the other ranks' collective then fails too, after it);
            ``"exit"`` ends the process abruptly with exit code 3 (no
            traceback, as an out-of-memory kill would); ``"hang"`` sleeps
            past any deadline.
    """

    rank: int
    kind: Literal["raise", "exit", "hang"]


@dataclass(frozen=True)
class DemoSettings:
    """Everything a worker needs besides its rank (picklable, sent to it)."""

    world_size: int
    loopback_interface: str
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
    #: ``"variants"`` (:func:`run_rank`) or ``"accumulation"``
    #: (:func:`run_accumulation_rank`).
    mode: str = "variants"
    #: For ``"accumulation"``: per rank, the ``(first, stop)`` rows of each
    #: of its micro-batches.
    micro_batch_rows: tuple[tuple[tuple[int, int], ...], ...] = ()
    #: For ``"accumulation"``: one of :data:`ACCUMULATION_WRAPPERS`.
    wrapper: str = "ddp"


def loopback_interface() -> str:
    """The name of this machine's loopback network interface.

    Gloo binds to it by name (``GLOO_SOCKET_IFNAME``), so it never resolves
    the host name to choose an address.

    Raises:
        RuntimeError: none of :data:`LOOPBACK_INTERFACES` exists.
    """
    names = {name for _, name in socket.if_nameindex()}
    for name in LOOPBACK_INTERFACES:
        if name in names:
            return name
    raise RuntimeError(
        "no loopback network interface: none of "
        f"{', '.join(LOOPBACK_INTERFACES)} among {sorted(names)}"
    )


def _check_shards(
    shard_lengths: Sequence[Sequence[int]], world_size: int
) -> list[list[int]]:
    require_positive_int(world_size, "world_size")
    require_sequence(
        shard_lengths,
        "shard_lengths",
        "a sequence with one list of row lengths per rank",
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


# The worker's store, for the failure injection's rendezvous (set by _worker).
_store: dist.Store | None = None


def _inject(failure: FailureInjection | None, rank: int) -> None:
    if failure is None:
        return
    if _store is None:
        raise RuntimeError("_inject runs in a worker, after _worker joined")
    world_size = dist.get_world_size()
    if failure.rank != rank:
        # Announce, then wait in a collective the failing rank never joins.
        _store.set(f"inject/waiting/{rank}", "1")
        _all_reduce_sum(torch.zeros(()))
        raise RuntimeError("the all-reduce completed without the failing rank")
    _store.wait(
        [f"inject/waiting/{r}" for r in range(world_size) if r != rank]
    )
    time.sleep(INJECTED_FAILURE_DELAY_S)  # from announced to waiting
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
    """One rank: DDP steps for every variant, or one accumulated step.

    Rank 0 also runs the full batch in one process and writes the JSON.
    A failure is recorded (:func:`_record_failure`) before the process
    group is destroyed, so before this rank's connections close.
    """
    global _store
    # Without it, gloo looks up the host name to pick a network interface.
    os.environ["GLOO_SOCKET_IFNAME"] = settings.loopback_interface
    # One intra-op thread per process: the ranks share the machine's cores.
    torch.set_num_threads(1)
    joined = False
    try:
        # A file store: no TCP store, so no host-name lookup.
        _store = dist.FileStore(
            str(Path(settings.result_dir) / STORE_FILE), settings.world_size
        )
        dist.init_process_group(
            "gloo",
            store=_store,
            rank=rank,
            world_size=settings.world_size,
            timeout=timedelta(seconds=settings.collective_timeout_s),
        )
        joined = True
        world_size = dist.get_world_size()
        if world_size != settings.world_size:
            raise RuntimeError(
                f"process group has world size {world_size}; "
                f"expected {settings.world_size}"
            )
        _inject(settings.failure, rank)
        if settings.mode == "accumulation":
            run_accumulation_rank(rank, settings)
        else:
            run_rank(rank, settings)
    except BaseException:
        _record_failure(settings.result_dir, rank)
        raise
    finally:
        if joined:
            dist.destroy_process_group()
        _store = None


def _record_failure(result_dir: str, rank: int) -> None:
    """Write this rank's traceback and the time, for the parent to compare.

    Called while the exception is handled, before the process group is
    destroyed: a peer's collective can only fail because of this failure
    after this file exists, and its own record holds a later time.  The
    file appears whole (written, then renamed) or not at all.
    """
    moment_ns = time.monotonic_ns()
    record = {
        "rank": rank,
        "monotonic_ns": moment_ns,
        "traceback": traceback.format_exc(),
    }
    target = Path(result_dir) / FAILURE_FILE.format(rank=rank)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    partial.replace(target)


def run_rank(rank: int, settings: DemoSettings) -> None:
    """One rank's work, inside the process group: every variant's DDP step.

    Each rank builds and warms up the same model, wraps it in
    ``DistributedDataParallel``, counts its scored targets and all-reduces
    the count, then back-propagates each per-rank loss of :data:`VARIANTS`
    and gathers the gradients.  Rank 0 also runs the full batch in one
    process and writes the comparison.
    """
    world_size = dist.get_world_size()
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
    rank_count = torch.tensor(count_scored_targets(rank_labels))
    global_count = int(_all_reduce_sum(rank_count))

    records: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        ddp_model.zero_grad(set_to_none=True)
        logits = ddp_model(rank_ids)
        if variant == "mean_of_means":
            rank_loss = label_padding_loss(logits, rank_labels)
        elif variant == "global_count_unscaled":
            rank_loss = label_padding_loss(
                logits, rank_labels, num_items_in_batch=global_count
            )
        else:
            rank_loss = micro_batch_loss(
                logits,
                rank_labels,
                num_items_in_batch=global_count,
                world_size=world_size,
            )
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
    full_loss = label_padding_loss(
        logits, labels, num_items_in_batch=global_count
    )
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
            count_scored_targets(labels[a:b]) for a, b in settings.shard_rows
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


def _write_json(result_dir: str, result: dict[str, Any]) -> None:
    target = Path(result_dir) / RESULT_FILE
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=2, sort_keys=True))
    partial.replace(target)


def _max_rank_disagreement(gradient: torch.Tensor) -> float:
    """Largest difference between this gradient and rank 0's (a collective)."""
    gathered = [torch.zeros_like(gradient) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, gradient.contiguous())
    return max(float((other - gathered[0]).abs().max()) for other in gathered)


def run_accumulation_rank(rank: int, settings: DemoSettings) -> None:
    """One rank's accumulated step, inside the process group.

    The rank builds and warms up the same model as every rank, counts the
    scored targets of its micro-batches and all-reduces the count ``N``,
    then back-propagates each micro-batch's
    :func:`~companion.accumulation.micro_batch_loss` (``R * S_rk / N``).
    ``"ddp"``: every micro-batch but the last inside ``no_sync()``, and the
    gradients of the ranks compared after the first micro-batch (they
    differ: nothing was synchronised yet).  ``"fsdp"``: the model sharded
    with ``fully_shard``, and gradient synchronisation off
    (``set_requires_gradient_sync(False)``) for every micro-batch but the
    last.  Rank 0 also runs the full batch in one process and writes the
    comparison.
    """
    world_size = dist.get_world_size()
    model = build_tiny_lm(settings.config, seed=settings.seed)
    warm_up(model, steps=settings.warm_up_steps, seed=settings.seed + 1)
    single_process_model = copy.deepcopy(model)
    input_ids = torch.tensor(settings.input_ids, dtype=torch.long)
    labels = torch.tensor(settings.labels, dtype=torch.long)
    pieces = settings.micro_batch_rows[rank]
    counts = [count_scored_targets(labels[a:b]) for a, b in pieces]
    global_count = int(_all_reduce_sum(torch.tensor(sum(counts))))
    all_counts = [torch.zeros(len(pieces), dtype=torch.long) for _ in range(world_size)]
    dist.all_gather(all_counts, torch.tensor(counts))

    unsynced_gap = None
    if settings.wrapper == "ddp":
        wrapped: torch.nn.Module = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        # The module returns the LM head's output, a view; the loss applies
        # no in-place operation to it, which is what FSDP2 warns about.
        warnings.filterwarnings(
            "ignore", message="FSDP2-wrapped module .* returned a view tensor"
        )
        wrapped = fully_shard(model)
    local_parameters = sum(
        int(p.to_local().numel()) if hasattr(p, "to_local") else int(p.numel())
        for p in model.parameters()
    )
    step_loss = torch.zeros((), dtype=torch.float64)
    for index, (first, stop) in enumerate(pieces):
        last = index == len(pieces) - 1
        if settings.wrapper == "ddp":
            context = contextlib.nullcontext() if last else wrapped.no_sync()
        else:
            wrapped.set_requires_gradient_sync(last)
            context = contextlib.nullcontext()
        with context:
            loss = micro_batch_loss(
                wrapped(input_ids[first:stop]),
                labels[first:stop],
                num_items_in_batch=global_count,
                world_size=world_size,
            )
            loss.backward()
        step_loss += loss.detach()
        if settings.wrapper == "ddp" and index == 0 and not last:
            unsynced_gap = _max_rank_disagreement(flat_gradient(model))
    if settings.wrapper == "ddp":
        gradient = flat_gradient(model)
    else:
        gradient = torch.cat(
            [p.grad.full_tensor().reshape(-1) for p in model.parameters()]
        )
    synced_gap = _max_rank_disagreement(gradient)
    loss_value = float(_all_reduce_sum(step_loss)) / world_size
    local_counts = [
        int(x) for x in _all_reduce_sum(
            torch.zeros(world_size, dtype=torch.long).index_fill(
                0, torch.tensor([rank]), local_parameters
            )
        )
    ]
    if rank != 0:
        return
    single_process_model.zero_grad(set_to_none=True)
    full_loss = label_padding_loss(single_process_model(input_ids), labels)
    full_loss.backward()
    full_gradient = flat_gradient(single_process_model)
    full_value = full_loss.item()
    _write_json(
        settings.result_dir,
        {
            "mode": "accumulation",
            "wrapper": settings.wrapper,
            "world_size": world_size,
            "seed": settings.seed,
            "dtype": str(full_gradient.dtype).removeprefix("torch."),
            "num_parameters": int(full_gradient.numel()),
            "parameters_per_rank": local_counts,
            "micro_batch_token_counts": [c.tolist() for c in all_counts],
            "global_token_count": global_count,
            "full_batch": {
                "loss": full_value,
                "gradient_norm": float(torch.linalg.vector_norm(full_gradient)),
            },
            "step_loss": loss_value,
            "relative_loss_error": abs(loss_value - full_value) / abs(full_value),
            "relative_gradient_error": relative_difference(gradient, full_gradient),
            "max_rank_disagreement": synced_gap,
            "unsynced_rank_disagreement": unsynced_gap,
        },
    )


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


# Exit codes of a worker that finished, or that _stop_workers stopped.
_STOPPED_EXIT_CODES = (
    0,
    -signal.SIGTERM,
    -getattr(signal, "SIGKILL", signal.SIGTERM),
)


def _failure_path(result_dir: str, rank: int) -> Path:
    return Path(result_dir) / FAILURE_FILE.format(rank=rank)


def _read_failures(result_dir: str, world_size: int) -> dict[int, dict]:
    """The failure records the workers wrote, by rank."""
    records = {}
    for rank in range(world_size):
        path = _failure_path(result_dir, rank)
        if path.exists():
            records[rank] = json.loads(path.read_text())
    return records


def _last_line(trace: str) -> str:
    lines = trace.strip().splitlines()
    return lines[-1] if lines else "(empty traceback)"


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


def _first_failure(
    settings: DemoSettings,
    silent_exits: dict[int, int],
    pids: list[int],
) -> WorkerFailedError:
    """The error for the failure that came first; call once all stopped.

    ``silent_exits`` maps the ranks that had exited with a failure but no
    record when the parent noticed (killed by a signal, ``os._exit``) to
    their exit codes.  A peer's failure caused by such a death is an
    exception, which leaves a record, so a silent death came first.
    Otherwise the first failure is the record with the earliest time (a
    worker that exited with a failure and no record is in ``silent_exits``,
    so there is at least one).
    """
    records = _read_failures(settings.result_dir, settings.world_size)
    if silent_exits:
        rank = min(silent_exits)
        summary = f"worker rank {rank} {_describe_exit(silent_exits[rank])}"
        trace = None
    else:
        rank = min(records, key=lambda r: records[r]["monotonic_ns"])
        trace = records[rank]["traceback"]
        summary = f"worker rank {rank} failed: {_last_line(trace)}"
    later = {
        other: _last_line(record["traceback"])
        for other, record in sorted(records.items())
        if other != rank
    }
    parts = [summary]
    if later:
        parts.append(
            "after it: "
            + "; ".join(
                f"rank {other} failed: {line}" for other, line in later.items()
            )
        )
    if trace is not None:
        parts.append(f"traceback of rank {rank}:\n{trace.rstrip()}")
    return WorkerFailedError("\n".join(parts), rank, pids, trace, later)


def _default_start_method() -> str:
    """``"fork"`` on Linux in a single-threaded process, else ``"spawn"``.

    A forked child inherits every lock that another thread of the parent
    held at the moment of the fork, and waits on it for ever.  Python
    threads show in ``threading.active_count()``; TensorFlow's thread pools
    do not, so a process that has imported TensorFlow counts as threaded
    (a test run that built a Keras model first hung its forked workers).
    """
    import threading

    if not sys.platform.startswith("linux"):
        return "spawn"
    if threading.active_count() > 1 or "tensorflow" in sys.modules:
        return "spawn"
    return "fork"


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
            :func:`companion.experiments.denominator.warm_up`).
        timeout_s: deadline for the whole run, start-up included.  A worker
            waits in a collective for ``timeout_s + 10`` s before giving up.
        failure: make one worker fail, to test the clean-up path.
        start_method: how workers start.  ``"fork"`` (the default on Linux,
            in a process that runs no other thread) copies this process, so
            the workers skip importing PyTorch again; ``"spawn"`` starts
            fresh interpreters (the only safe choice on macOS, and the
            default where this process runs other threads: see
            :func:`_default_start_method`).  Forking a process that runs other threads,
            such as a Jupyter kernel, is fragile: from a notebook, run
            ``python -m companion.experiments.ddp_demo`` as a program, as
            the book does.

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
        start_method = _default_start_method()
    if start_method not in ("fork", "spawn"):
        raise ValueError(
            f"start_method must be 'fork' or 'spawn'; got {start_method!r}"
        )
    require_positive_int(warm_up_steps, "warm_up_steps")
    _check_timeout(timeout_s)
    if failure is not None and not 0 <= failure.rank < world_size:
        raise ValueError(
            f"failure.rank must lie in [0, {world_size}); got {failure.rank}"
        )
    input_ids, labels = _counting_batch(
        [length for shard in shards for length in shard], config, seed
    )
    shard_rows, first = [], 0
    for shard in shards:
        shard_rows.append((first, first + len(shard)))
        first += len(shard)

    with tempfile.TemporaryDirectory(prefix="ddp-demo-") as result_dir:
        settings = DemoSettings(
            world_size=world_size,
            loopback_interface=loopback_interface(),
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
        return _launch_and_read(settings, timeout_s)


def _check_micro_batches(
    micro_batches: Sequence[Sequence[Sequence[int]]], world_size: int
) -> list[list[list[int]]]:
    require_positive_int(world_size, "world_size")
    require_sequence(
        micro_batches,
        "micro_batches",
        "a sequence with one list of micro-batches (lists of row lengths) per rank",
    )
    if len(micro_batches) != world_size:
        raise ValueError(
            f"world_size={world_size} but micro_batches describes "
            f"{len(micro_batches)} rank(s): give one list of micro-batches "
            "per rank"
        )
    require_nonempty_lists(micro_batches, "micro_batches", "micro-batches")
    checked = []
    for rank, pieces in enumerate(micro_batches):
        require_nonempty_lists(pieces, f"micro_batches[{rank}]", "row lengths")
        rank_pieces = []
        for index, lengths in enumerate(pieces):
            for row, length in enumerate(lengths):
                require_positive_int(
                    length, f"micro_batches[{rank}][{index}][{row}]"
                )
            rank_pieces.append([int(length) for length in lengths])
        checked.append(rank_pieces)
    if all(length == 1 for p in checked for lengths in p for length in lengths):
        raise ValueError(
            "the whole step has no scored token (every row has length 1): "
            "the token mean is 0/0"
        )
    return checked


def _counting_batch(
    lengths: list[int], config: TinyLMConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting rows of ``lengths`` for the demo; each fits the model."""
    if max(lengths) > config.max_length:
        raise ValueError(
            f"the longest row has {max(lengths)} tokens; "
            f"config.max_length is {config.max_length}"
        )
    return make_counting_batch(lengths, vocab_size=config.vocab_size, seed=seed)


def _check_timeout(timeout_s: float) -> None:
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ValueError(
            "timeout_s must be a positive number of seconds; "
            f"got {timeout_s!r}"
        )


def run_accumulation_comparison(
    micro_batches: Sequence[Sequence[Sequence[int]]] = DEFAULT_MICRO_BATCHES,
    *,
    wrapper: Literal["ddp", "fsdp"] = "ddp",
    world_size: int = 2,
    config: TinyLMConfig | None = None,
    seed: int = 0,
    warm_up_steps: int = 40,
    timeout_s: float = 60.0,
    start_method: Literal["fork", "spawn"] | None = None,
) -> dict[str, Any]:
    """Launch ``world_size`` gloo workers for one accumulated step.

    Args:
        micro_batches: per rank, its micro-batches, each a list of row
            lengths (tokens per row, ``>= 1``); every row of the step is
            padded to the longest.
        wrapper: ``"ddp"`` (``DistributedDataParallel`` and ``no_sync``)
            or ``"fsdp"`` (``fully_shard`` and
            ``set_requires_gradient_sync``).
        world_size: number of processes; ``len(micro_batches)``.
        config, seed, warm_up_steps, timeout_s, start_method: as in
            :func:`run_ddp_comparison`.

    Returns:
        The JSON-ready dict rank 0 wrote: the scored targets of every
        micro-batch, the global count, the single-process full-batch loss,
        the step's loss and its relative loss and gradient errors against
        the full batch, the largest difference between the ranks'
        gradients after the step (``max_rank_disagreement``) and, for
        ``"ddp"``, after the first micro-batch inside ``no_sync``
        (``unsynced_rank_disagreement``), and the parameters each rank
        stores (``parameters_per_rank``).

    Raises:
        ValueError: a bad argument (checked before any process starts).
        WorkerFailedError, WorkersTimedOutError: as in
            :func:`run_ddp_comparison`.
    """
    pieces = _check_micro_batches(micro_batches, world_size)
    require_one_of(wrapper, ACCUMULATION_WRAPPERS, "wrapper")
    config = config or TinyLMConfig()
    if start_method is None:
        start_method = _default_start_method()
    require_one_of(start_method, ("fork", "spawn"), "start_method")
    require_positive_int(warm_up_steps, "warm_up_steps")
    _check_timeout(timeout_s)
    input_ids, labels = _counting_batch(
        [n for rank in pieces for lengths in rank for n in lengths], config, seed
    )
    rows, first = [], 0
    for rank in pieces:
        rank_rows = []
        for piece in rank:
            rank_rows.append((first, first + len(piece)))
            first += len(piece)
        rows.append(tuple(rank_rows))
    with tempfile.TemporaryDirectory(prefix="ddp-demo-") as result_dir:
        settings = DemoSettings(
            world_size=world_size,
            loopback_interface=loopback_interface(),
            shard_rows=tuple((r[0][0], r[-1][1]) for r in rows),
            input_ids=tuple(tuple(row) for row in input_ids.tolist()),
            labels=tuple(tuple(row) for row in labels.tolist()),
            config=config,
            seed=seed,
            warm_up_steps=warm_up_steps,
            collective_timeout_s=float(timeout_s) + COLLECTIVE_TIMEOUT_MARGIN_S,
            result_dir=result_dir,
            failure=None,
            start_method=start_method,
            mode="accumulation",
            micro_batch_rows=tuple(rows),
            wrapper=wrapper,
        )
        return _launch_and_read(settings, timeout_s)


def _launch_and_read(settings: DemoSettings, timeout_s: float) -> dict[str, Any]:
    """Run the workers; return the JSON that rank 0 wrote."""
    _launch_and_wait(settings, timeout_s)
    result_path = Path(settings.result_dir) / RESULT_FILE
    if not result_path.exists():
        raise WorkerFailedError("rank 0 exited without writing its result", 0, [])
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
            # One look at every worker: read again below, a worker that
            # failed in between would count as running now and finished then.
            exitcodes = [process.exitcode for process in processes]
            failed = [
                (rank, code)
                for rank, code in enumerate(exitcodes)
                if code not in (None, 0)
            ]
            if failed:
                # Exits without a record, taken before stopping anyone:
                # SIGTERM leaves no record either.
                silent = {
                    rank: int(code)
                    for rank, code in failed
                    if not _failure_path(settings.result_dir, rank).exists()
                }
                _stop_workers(processes)
                # A death the parent did not cause, seen only now.
                for rank, process in enumerate(processes):
                    code = process.exitcode
                    path = _failure_path(settings.result_dir, rank)
                    if code not in _STOPPED_EXIT_CODES and not path.exists():
                        silent.setdefault(rank, int(code))
                raise _first_failure(settings, silent, pids)
            running = [
                process
                for process, code in zip(processes, exitcodes)
                if code is None
            ]
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


def _parse_micro_batches(text: str) -> list[list[int]]:
    try:
        return [_parse_shard(piece) for piece in text.split("/")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "with --accumulate, --shard takes micro-batches separated by / "
            f"and row lengths by commas, such as 3,4/3,5; got {text!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print or write the result as JSON.

    Returns the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m companion.experiments.ddp_demo",
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
        action="append",
        help=(
            "row lengths of one rank, e.g. 3,4,3,5 (with --accumulate: "
            "micro-batches separated by /, e.g. 3,4/3,5); repeat once per rank"
        ),
    )
    parser.add_argument(
        "--accumulate",
        action="store_true",
        help="one step of data parallelism with gradient accumulation",
    )
    parser.add_argument(
        "--wrapper",
        choices=ACCUMULATION_WRAPPERS,
        default="ddp",
        help="with --accumulate: DistributedDataParallel or FSDP2",
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
    parse = _parse_micro_batches if args.accumulate else _parse_shard
    try:
        shards = None if args.shard is None else [parse(s) for s in args.shard]
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    try:
        if args.accumulate:
            result = run_accumulation_comparison(
                shards if shards is not None else DEFAULT_MICRO_BATCHES,
                wrapper=args.wrapper,
                world_size=args.world_size,
                seed=args.seed,
                warm_up_steps=args.warm_up_steps,
                timeout_s=args.timeout,
            )
        else:
            result = run_ddp_comparison(
                shards
                if shards is not None
                else [list(s) for s in DEFAULT_SHARDS],
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
    # as companion.experiments.ddp_demo._worker, which the spawned processes
    # can import.
    from companion.experiments.ddp_demo import main as package_main

    sys.exit(package_main())
