"""Peak memory and time of four causal-LM losses at vocabulary scale.

Full run (B=1, hidden width d=512, T in {512, 2048, 8192},
V in {32000, 128256}, 24 runs; about 14 minutes on a 2-core CPU machine
with 24 GiB of memory; the results file records its ``duration_s``)::

    .venv/bin/python benchmarks/loss_memory.py

Quick run (T in {512, 2048}, V=32000, 8 runs; about 1-2 minutes)::

    .venv/bin/python benchmarks/loss_memory.py --quick

Results go to ``benchmarks/results/loss_memory_<device>[_quick].json`` and
``.csv``, with the machine and library versions.  Progress is printed on
stderr.

What is measured, for each configuration and each variant (see
``companion.experiments.loss_memory.LOSS_VARIANTS``), in a fresh Python
process so that no variant inherits another's allocator state:

* peak memory of one forward + backward pass, beyond the inputs.  On CPU:
  the growth of the process's resident set, ``VmHWM`` after the pass minus
  ``VmRSS`` before it, with the high-water mark reset just before the pass
  (``echo 5 > /proc/self/clear_refs``, Linux).  On CUDA: the allocator's own
  figure, ``torch.cuda.max_memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()``, minus ``memory_allocated()``
  before the pass.  One-time costs (thread pools, math-library buffers,
  lazy imports) are paid first on an 8-token problem, so that no variant is
  charged for them; the measured pass is the first full-size one.  The same
  pass also counts the bytes of tensors alive at once, exactly
  (``companion.memory.TensorMemoryTracker``): the memory the loss
  needs, without what the C library's or CUDA's allocator keeps in reserve.
* median wall time of ``--repeats`` (>= 3) further forward + backward passes,
  and their median CPU time.

A configuration whose first-principles estimate
(``companion.memory.estimate_peak_bytes``) plus inputs does not fit in
the memory available (``MemAvailable``, capped at ``--memory-limit-gib``) is
not run: its record has status ``not_run``, the estimated need
(``needed_bytes``) and the budget (``budget_bytes``), and no measurement.
A worker that runs out of
memory (its data segment is capped at that budget with ``RLIMIT_DATA``, so
the allocation fails instead of waking the kernel's OOM killer), or that
dies, is reported as ``oom`` or ``error``; the benchmark carries on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 2**20
GIB = 2**30

FULL_TIMES = (512, 2048, 8192)
FULL_VOCABS = (32000, 128256)
QUICK_TIMES = (512, 2048)
QUICK_VOCABS = (32000,)
BATCH = 1
HIDDEN_SIZE = 512
# The interpreter, torch and the worker's own buffers, on top of the loss.
PROCESS_OVERHEAD_BYTES = 1 * GIB


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Memory readings (Linux)
# --------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field}")


def reset_rss_high_water_mark() -> bool:
    """Set ``VmHWM`` to the current ``VmRSS``; ``False`` where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# Worker: one variant, one configuration, in its own process
# --------------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch

    from companion.experiments.loss_memory import CHUNKED_VARIANTS, LOSS_VARIANTS
    from companion.memory import TensorMemoryTracker

    device = torch.device(args.device)
    loss_fn = LOSS_VARIANTS[args.variant]
    kwargs: dict[str, Any] = {}
    if args.variant in CHUNKED_VARIANTS:
        kwargs["chunk_size"] = args.chunk_size

    generator = torch.Generator(device="cpu").manual_seed(0)
    # Filled in place, so that creating the inputs leaves no freed temporaries.
    hidden = torch.empty(BATCH, args.time, HIDDEN_SIZE).normal_(generator=generator)
    weight = torch.empty(args.vocab, HIDDEN_SIZE).normal_(std=0.02, generator=generator)
    labels = torch.randint(0, args.vocab, (BATCH, args.time), generator=generator)
    hidden = hidden.to(device).requires_grad_()
    weight = weight.to(device).requires_grad_()
    labels = labels.to(device)

    # One-time costs (lazy imports the tracker triggers, thread pools, BLAS
    # buffers) belong to no variant: pay them on a tiny problem first.
    with TensorMemoryTracker():
        loss_fn(hidden[:, :8].detach(), weight.detach(), labels[:, :8], **kwargs)

    if device.type == "cpu":
        # Cap further data allocations at the budget the parent computed, so
        # that running out of memory is a catchable allocation failure.
        data_now = _status_kib("VmData") * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        limit = data_now + args.budget_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))

    def forward_backward() -> float:
        hidden.grad = None
        weight.grad = None
        loss = loss_fn(hidden, weight, labels, **kwargs)
        loss.backward()
        return float(loss.detach())

    def measured_forward_backward() -> float:
        # The untimed first pass also counts live tensor bytes exactly.
        with TensorMemoryTracker() as tracker:
            loss = forward_backward()
        result["peak_tensor_bytes"] = tracker.peak_bytes
        return loss

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result: dict[str, Any] = {"status": "ok"}
    try:
        if device.type == "cuda":
            synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            result["loss"] = measured_forward_backward()
            synchronize()
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        else:
            hwm_reset = reset_rss_high_water_mark()
            before = _status_kib("VmRSS") * 1024 if hwm_reset else _status_kib("VmHWM") * 1024
            result["loss"] = measured_forward_backward()
            result["peak_bytes"] = _status_kib("VmHWM") * 1024 - before
            result["hwm_reset"] = hwm_reset
        times, cpu_times = [], []
        for _ in range(args.repeats):
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            forward_backward()
            synchronize()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        result["times_s"] = times
        result["median_s"] = statistics.median(times)
        # CPU time of all the process's threads: less sensitive than wall
        # time to other processes competing for the cores.
        result["cpu_times_s"] = cpu_times
        result["median_cpu_s"] = statistics.median(cpu_times)
    except (MemoryError, torch.OutOfMemoryError) as error:
        result = {"status": "oom", "detail": str(error).splitlines()[0][:200]}
    except RuntimeError as error:
        message = str(error)
        if "can't allocate memory" in message or "out of memory" in message:
            result = {"status": "oom", "detail": message.splitlines()[0][:200]}
        else:
            raise
    return result


# --------------------------------------------------------------------------
# Parent: plan, launch workers, collect, write
# --------------------------------------------------------------------------


def machine_and_libraries(device: str) -> dict[str, Any]:
    import numpy
    import torch

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _meminfo_bytes("MemTotal"),
        "libc": " ".join(platform.libc_ver()),
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        machine["gpu"] = properties.name
        machine["gpu_memory_bytes"] = properties.total_memory
    return {
        "machine": machine,
        "libraries": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "cuda": torch.version.cuda,
        },
    }


def available_bytes(device: str, limit_gib: float) -> int:
    """Memory the workers may use: what is free now, capped at ``limit_gib``."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return min(free, int(limit_gib * GIB))
    return min(_meminfo_bytes("MemAvailable"), int(limit_gib * GIB))


def launch_worker(
    variant: str, time_steps: int, vocab: int, args: argparse.Namespace, budget: int
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--variant", variant,
        "--time", str(time_steps),
        "--vocab", str(vocab),
        "--chunk-size", str(args.chunk_size),
        "--repeats", str(args.repeats),
        "--device", args.device,
        "--budget-bytes", str(budget),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode == 0:
        try:
            return json.loads(completed.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            return {"status": "error", "detail": "worker printed no result"}
    stderr_tail = completed.stderr.strip().splitlines()[-1:] or [""]
    if completed.returncode == -9:
        # SIGKILL with no traceback: the kernel's out-of-memory killer.
        return {"status": "oom", "detail": "worker killed by SIGKILL"}
    return {
        "status": "error",
        "detail": f"exit code {completed.returncode}: {stderr_tail[0][:200]}",
    }


def write_results(payload: dict[str, Any], directory: Path, stem: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    csv_path = directory / f"{stem}.csv"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    columns = [
        "variant", "batch", "time", "vocab", "hidden_size", "chunk_size",
        "status", "peak_bytes", "peak_tensor_bytes", "estimate_bytes",
        "needed_bytes", "budget_bytes", "median_s", "times_s",
        "median_cpu_s", "cpu_times_s", "detail",
    ]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in payload["results"]:
            row = dict(record)
            for key in ("times_s", "cpu_times_s"):
                if key in row:
                    row[key] = " ".join(f"{t:.4f}" for t in row[key])
            writer.writerow(row)
    return json_path, csv_path


def run_parent(args: argparse.Namespace) -> None:
    from companion.experiments.loss_memory import LOSS_VARIANTS
    from companion.memory import estimate_peak_bytes

    times = QUICK_TIMES if args.quick else FULL_TIMES
    vocabs = QUICK_VOCABS if args.quick else FULL_VOCABS
    variants = list(LOSS_VARIANTS)
    plan = [(t, v, name) for v in vocabs for t in times for name in variants]
    budget = available_bytes(args.device, args.memory_limit_gib)
    log(
        f"{len(plan)} runs on {args.device}; memory budget {budget / GIB:.1f} GiB; "
        f"{args.repeats} timed passes each"
    )

    started = time.perf_counter()
    results = []
    for index, (time_steps, vocab, variant) in enumerate(plan, start=1):
        estimate = estimate_peak_bytes(
            variant, BATCH, time_steps, vocab, HIDDEN_SIZE, chunk_size=args.chunk_size
        )
        inputs = 4 * (BATCH * time_steps * HIDDEN_SIZE + vocab * HIDDEN_SIZE)
        record: dict[str, Any] = {
            "variant": variant,
            "batch": BATCH,
            "time": time_steps,
            "vocab": vocab,
            "hidden_size": HIDDEN_SIZE,
            "chunk_size": args.chunk_size,
            "estimate_bytes": estimate,
        }
        label = f"[{index}/{len(plan)}] T={time_steps} V={vocab} {variant}"
        needed = estimate + inputs + PROCESS_OVERHEAD_BYTES
        if needed > budget:
            # An estimate, not a measurement: the record says so.
            record.update(
                status="not_run",
                needed_bytes=needed,
                budget_bytes=budget,
                detail=(
                    f"not run: estimated {needed / GIB:.1f} GiB "
                    f"> budget {budget / GIB:.1f} GiB"
                ),
            )
            log(f"{label}: {record['detail']}")
        else:
            record.update(launch_worker(variant, time_steps, vocab, args, budget))
            if record["status"] == "ok":
                log(
                    f"{label}: peak {record['peak_bytes'] / MIB:.0f} MiB, "
                    f"median {record['median_s']:.3f} s"
                )
            else:
                log(f"{label}: {record['status']} ({record.get('detail', '')})")
        results.append(record)
        elapsed = time.perf_counter() - started
        log(f"    elapsed {elapsed / 60:.1f} min")

    payload = {
        "benchmark": "loss_memory",
        "quick": args.quick,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
        "duration_s": round(time.perf_counter() - started, 1),
        "memory_method": (
            "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
            "memory_allocated() before the pass"
            if args.device == "cuda"
            else "resident-set growth: VmHWM after the pass minus VmRSS before it, "
            "with VmHWM reset by writing 5 to /proc/self/clear_refs just before the pass"
        ),
        "tensor_memory_method": "peak bytes of tensor storage alive at once during the same "
        "pass, counted operator by operator (companion.memory.TensorMemoryTracker)",
        "time_method": f"median wall time (time.perf_counter) of {args.repeats} forward+backward "
        "passes, after one untimed pass",
        "memory_budget_bytes": budget,
        **machine_and_libraries(args.device),
        "results": results,
    }
    stem = f"loss_memory_{args.device}" + ("_quick" if args.quick else "")
    json_path, csv_path = write_results(payload, Path(args.results_dir), stem)
    log(f"wrote {json_path} and {csv_path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in {512, 2048}, V=32000 only")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="positions per chunk (default: companion's DEFAULT_CHUNK_SIZE)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, >= 3")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR),
                        help="where the JSON and CSV files go (default: benchmarks/results)")
    parser.add_argument("--memory-limit-gib", type=float, default=24.0,
                        help="never plan to use more than this much memory")
    worker = parser.add_argument_group("worker (internal)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--variant", help=argparse.SUPPRESS)
    worker.add_argument("--time", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    if args.chunk_size is None:
        from companion.chunked_loss import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
