"""Peak memory and time of the causal-LM loss at vocabulary scale, side by side.

Full run (B = 1; (d, T, V) in (512, 2048, 32000), (512, 2048, 128256),
(512, 8192, 128256), (2048, 2048, 32000); plus a sweep of the chunk
budget at (512, 1024, 128256); planned for under 25 minutes on an idle
2-core CPU machine with 24 GiB of memory, where the largest size keeps to
``LARGEST_ONLY``; the results file records ``duration_s``)::

    make benchmark          # installs the peers, then runs this
    .venv/bin/python benchmarks/loss_memory.py

Quick run (two small sizes, a short sweep; a few minutes)::

    make benchmark-quick
    .venv/bin/python benchmarks/loss_memory.py --quick

Results go to ``benchmarks/results/loss_memory_<device>[_quick].json`` and
``.csv``, with the machine, its CPU flags and the library versions.  A
progress line per variant and pass goes to stderr.

How it measures (``METHOD`` below is written into the results file):

* every variant (``benchmarks/peers.py``) runs in its own fresh Python
  process, started with ``MALLOC_MMAP_THRESHOLD_`` set so that glibc hands
  freed blocks of 1 MiB and more back to the kernel at once; inputs are made
  first and their bytes reported apart;
* each worker makes one untimed warm-up pass at full size (which also
  compiles the compiled variants), counting the live tensor bytes of that
  pass exactly with ``companion.memory.TensorMemoryTracker`` (not for
  compiled code, whose buffers the tracker cannot see);
* then the parent interleaves the timed passes: round after round, one
  forward + backward pass of every variant of the size, in an order that
  rotates each round, so that other load on the machine falls on all
  variants alike.  Each pass records wall time, CPU time (user and
  system), minor page faults and, on CPU, the growth of the resident set
  (``VmHWM`` after the pass minus ``VmRSS`` before it, the high-water mark
  reset through ``/proc/self/clear_refs`` just before the pass); on CUDA,
  ``max_memory_allocated`` and ``max_memory_reserved`` growth and the time
  between two CUDA events;
* the resident-set growth is compared with the tracker's count, and a
  disagreement above 5 % is flagged in the record (``tracker_gap``).

A size's variant whose estimated peak does not fit in the memory left is
not run (status ``not_run``, with the estimate); a peer that needs a GPU on
a CPU run has status ``needs_gpu``; one that does not import, status
``unavailable`` with the exact error; a worker that runs out of memory,
``oom``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from peers import ALL_VARIANTS, SWEEP_VARIANTS, VARIANTS, Variant  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 2**20
GIB = 2**30
BATCH = 1
MMAP_THRESHOLD = 1 * MIB
TRACKER_TOLERANCE = 0.05
# The interpreter, torch and the worker's own buffers, on top of the loss.
PROCESS_OVERHEAD_BYTES = 1 * GIB
# A worker that prints nothing for this long is stuck.
WORKER_TIMEOUT_S = 900

FULL_SIZES = ((512, 2048, 32000), (512, 2048, 128256), (512, 8192, 128256), (2048, 2048, 32000))
QUICK_SIZES = ((512, 512, 32000), (512, 1024, 32000))
FULL_SWEEP_SIZE = (512, 1024, 128256)
QUICK_SWEEP_SIZE = (512, 1024, 32000)
QUICK_SWEEP_MIB = (16, 64)
LARGEST_ONLY = (
    "eager", "compiled_eager", "chunked", "chunked_masked",
    "chunked_bf16", "chunked_bf16_masked", "liger_fused", "cce_kernel",
)
"""At the largest size the run keeps to these (the time goal's baseline,
its strongest peer and the package's variants), to stay under 25 minutes."""

METHOD = {
    "process": "each variant in a fresh Python process, MALLOC_MMAP_THRESHOLD_="
    f"{MMAP_THRESHOLD}; inputs made first, their bytes reported apart",
    "warm_up": "one untimed forward+backward pass at full size (compiles the compiled "
    "variants); live tensor bytes of that pass counted by "
    "companion.memory.TensorMemoryTracker (not for compiled variants)",
    "passes": "timed passes interleaved: each round runs one pass of every variant of "
    "the size, in an order rotated each round",
    "memory_cpu": "resident-set growth of the pass: VmHWM after minus VmRSS before, VmHWM "
    "reset by writing 5 to /proc/self/clear_refs just before the pass; gradients "
    "are set to None before each pass, so they count",
    "memory_cuda": "torch.cuda.max_memory_allocated() and max_memory_reserved() after "
    "reset_peak_memory_stats(), minus memory_allocated()/memory_reserved() before",
    "time": "wall time (time.perf_counter; CUDA events on a GPU) and CPU time "
    "(user + system, all threads) of each pass; median and spread over passes",
    "tracker_gap": f"flagged when resident-set growth and tracked tensors differ by "
    f"more than {TRACKER_TOLERANCE:.0%}",
}


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
# Worker: one variant at one size, in its own process
# --------------------------------------------------------------------------


def _emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def _inputs(args: argparse.Namespace, variant: Variant, device: Any) -> tuple[Any, Any, Any]:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, variant.dtype)
    # Filled in place, so that making the inputs leaves no freed temporaries.
    hidden = torch.empty(BATCH, args.time, args.hidden_size).normal_(generator=generator)
    weight = torch.empty(args.vocab, args.hidden_size).normal_(std=0.02, generator=generator)
    labels = torch.randint(0, args.vocab, (BATCH, args.time), generator=generator)
    prompt = int(round(variant.masked * args.time))
    labels[:, :prompt] = -100  # a masked prompt: the first positions
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_()
    weight = weight.to(device=device, dtype=dtype).requires_grad_()
    return hidden, weight, labels.to(device)


def run_worker(args: argparse.Namespace) -> None:
    import resource

    import torch

    from companion.memory import TensorMemoryTracker

    variant = ALL_VARIANTS[args.variant]
    device = torch.device(args.device)
    try:
        loss_fn = variant.make(args.vocab)
    except Exception as error:  # noqa: BLE001 - the exact reason is the result
        _emit({"status": "unavailable", "detail": f"{type(error).__name__}: {error}"[:300]})
        return
    rss_start = _status_kib("VmRSS") * 1024
    hidden, weight, labels = _inputs(args, variant, device)
    input_bytes = sum(t.numel() * t.element_size() for t in (hidden, weight, labels))
    cuda = device.type == "cuda"

    def forward_backward() -> float:
        hidden.grad = None
        weight.grad = None
        out = loss_fn(hidden, weight, labels)
        loss, kept = out if isinstance(out, tuple) else (out, None)
        loss.backward()
        value = float(loss.detach())
        del out, loss, kept
        return value

    started = time.perf_counter()
    tracked = None
    if variant.compiled:
        forward_backward()
    else:
        with TensorMemoryTracker() as tracker:
            forward_backward()
        tracked = tracker.peak_bytes
    hidden.grad = weight.grad = None
    warm_up_s = time.perf_counter() - started

    if not cuda:
        # Cap further data allocations, so that running out of memory is a
        # catchable allocation failure, not the kernel's OOM killer.
        data_now = _status_kib("VmData") * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        limit = data_now + args.budget_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    _emit({
        "status": "ready",
        "input_bytes": input_bytes,
        "input_rss_bytes": _status_kib("VmRSS") * 1024 - rss_start,
        "peak_tensor_bytes": tracked,
        "warm_up_s": warm_up_s,
        "threads": torch.get_num_threads(),
    })

    for command in sys.stdin:
        if command.strip() != "pass":
            break
        result: dict[str, Any] = {"status": "ok"}
        # The previous pass's gradients go before the baseline is read, so
        # that every pass's growth counts the gradients it makes.
        hidden.grad = weight.grad = None
        try:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                allocated = torch.cuda.memory_allocated(device)
                reserved = torch.cuda.memory_reserved(device)
                start_event = torch.cuda.Event(enable_timing=True)
                end_event = torch.cuda.Event(enable_timing=True)
                wall, cpu = time.perf_counter(), time.process_time()
                start_event.record()
                result["loss"] = forward_backward()
                end_event.record()
                torch.cuda.synchronize(device)
                result["time_s"] = start_event.elapsed_time(end_event) / 1000
                result["wall_s"] = time.perf_counter() - wall
                result["cpu_s"] = time.process_time() - cpu
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - allocated
                result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device) - reserved
            else:
                before = _status_kib("VmRSS") * 1024
                reset = reset_rss_high_water_mark()
                wall, cpu = time.perf_counter(), time.process_time()
                result["loss"] = forward_backward()
                result["time_s"] = time.perf_counter() - wall
                result["cpu_s"] = time.process_time() - cpu
                result["peak_bytes"] = _status_kib("VmHWM") * 1024 - before
                result["hwm_reset"] = reset
            after = resource.getrusage(resource.RUSAGE_SELF)
            result["sys_s"] = after.ru_stime - usage.ru_stime
            result["minor_faults"] = after.ru_minflt - usage.ru_minflt
        except (MemoryError, torch.OutOfMemoryError) as error:
            _emit({"status": "oom", "detail": str(error).splitlines()[0][:200]})
            return
        except RuntimeError as error:
            message = str(error)
            if "can't allocate memory" in message or "out of memory" in message:
                _emit({"status": "oom", "detail": message.splitlines()[0][:200]})
                return
            raise
        _emit(result)


# --------------------------------------------------------------------------
# Parent: plan, launch workers, interleave their passes, write
# --------------------------------------------------------------------------


def estimate_need(variant: Variant, hidden_size: int, time_steps: int, vocab: int) -> int:
    """Bytes a variant's pass needs beyond its inputs, from first principles.

    The library's own count for its variants
    (``companion.memory.estimate_peak_bytes``); for the others, the logits
    tensors the eager loss holds (three float32 ``(B, T, V)`` tensors, four
    when the caller keeps the logits, a bfloat16 one more when it upcasts
    them): an upper bound for the compiled and chunked-output peers.
    """
    from companion.memory import estimate_peak_bytes

    size = 2 if variant.dtype == "bfloat16" else 4
    logits = BATCH * time_steps * vocab
    grads = (BATCH * time_steps + vocab) * hidden_size * size
    if variant.name.startswith("chunked"):
        from companion.chunked_loss import chunk_rows
        import torch

        rows = chunk_rows(vocab, hidden_size, getattr(torch, variant.dtype),
                          chunk_bytes=variant.chunk_bytes)
        return estimate_peak_bytes(
            "chunked_function", BATCH, time_steps, vocab, hidden_size,
            chunk_size=rows, element_size=size,
        )
    if variant.name == "checkpointed":
        return estimate_peak_bytes("checkpointed_chunks", BATCH, time_steps, vocab, hidden_size)
    if variant.name.startswith("transformers_eager"):
        return (4 * logits * 4 if size == 4 else 3 * logits * 4 + logits * 2) + grads
    return 3 * logits * 4 + grads


class Worker:
    """A running worker process and its pipe."""

    def __init__(self, variant: Variant, size: tuple[int, int, int], args: argparse.Namespace,
                 budget: int) -> None:
        hidden_size, time_steps, vocab = size
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), PYTHONHASHSEED="0")
        command = [
            sys.executable, str(Path(__file__).resolve()), "--worker",
            "--variant", variant.name, "--hidden-size", str(hidden_size),
            "--time", str(time_steps), "--vocab", str(vocab),
            "--device", args.device, "--budget-bytes", str(budget),
        ]
        self.variant = variant
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=REPO_ROOT,
        )

    def read(self) -> dict[str, Any]:
        stdout = self.process.stdout
        ready, _, _ = select.select([stdout], [], [], WORKER_TIMEOUT_S)
        line = stdout.readline() if ready else ""
        if line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return {"status": "error", "detail": f"worker printed {line[:200]!r}"}
        self.process.kill()
        self.process.wait()
        tail = (self.process.stderr.read() or "").strip().splitlines()[-1:] or [""]
        if self.process.returncode == -9 and ready:
            return {"status": "oom", "detail": "worker killed by SIGKILL"}
        return {
            "status": "error",
            "detail": f"exit code {self.process.returncode}: {tail[0][:200]}",
        }

    def run_pass(self) -> dict[str, Any]:
        try:
            self.process.stdin.write("pass\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {"status": "error", "detail": "worker exited"}
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": quartiles[0],
        "q3": quartiles[2],
    }


def finish_record(record: dict[str, Any], passes: list[dict[str, Any]]) -> None:
    """Medians, spreads and the tracker comparison, from the passes."""
    record["times_s"] = [p["time_s"] for p in passes]
    record["cpu_times_s"] = [p["cpu_s"] for p in passes]
    record["sys_times_s"] = [p["sys_s"] for p in passes]
    record["minor_faults"] = [p["minor_faults"] for p in passes]
    record["peaks_bytes"] = [p["peak_bytes"] for p in passes]
    record["losses"] = [p["loss"] for p in passes]
    times = _summary(record["times_s"])
    record["median_s"] = times["median"]
    record["time_spread_s"] = [times["min"], times["max"]]
    record["time_iqr_s"] = [times["q1"], times["q3"]]
    record["median_cpu_s"] = statistics.median(record["cpu_times_s"])
    record["median_sys_s"] = statistics.median(record["sys_times_s"])
    record["median_minor_faults"] = statistics.median(record["minor_faults"])
    record["peak_bytes"] = statistics.median(record["peaks_bytes"])
    record["peak_bytes_max"] = max(record["peaks_bytes"])
    if passes and "peak_reserved_bytes" in passes[0]:
        record["peak_reserved_bytes"] = max(p["peak_reserved_bytes"] for p in passes)
    tracked = record.get("peak_tensor_bytes")
    if tracked:
        gap = record["peak_bytes"] / tracked - 1
        record["tracker_gap"] = gap
        record["tracker_disagrees"] = abs(gap) > TRACKER_TOLERANCE


def run_size(size: tuple[int, int, int], names: list[str], args: argparse.Namespace,
             label: str) -> list[dict[str, Any]]:
    """Every variant of ``names`` at one size, passes interleaved."""
    import torch

    hidden_size, time_steps, vocab = size
    records: dict[str, dict[str, Any]] = {}
    workers: list[Worker] = []
    idle_bytes = 0
    for name in names:
        variant = ALL_VARIANTS[name]
        record: dict[str, Any] = {
            "variant": name, "label": variant.label, "batch": BATCH,
            "hidden_size": hidden_size, "time": time_steps, "vocab": vocab,
            "dtype": variant.dtype, "masked": variant.masked,
            "compiled": variant.compiled, "package": variant.package,
            "tags": list(variant.tags),
        }
        if variant.name.startswith("chunked"):
            from companion.chunked_loss import chunk_rows

            from companion.chunked_loss import logits_row_bytes

            record["chunk_rows"] = chunk_rows(
                vocab, hidden_size, getattr(torch, variant.dtype), chunk_bytes=variant.chunk_bytes
            )
            record["chunk_bytes"] = record["chunk_rows"] * logits_row_bytes(
                vocab, getattr(torch, variant.dtype))
            record["chunk_budget_bytes"] = variant.chunk_bytes
        records[name] = record
        if variant.needs_gpu and args.device != "cuda":
            record.update(status="needs_gpu", detail="needs a GPU (Triton kernels)")
            log(f"{label} {name}: needs a GPU, not run on {args.device}")
            continue
        need = estimate_need(variant, hidden_size, time_steps, vocab)
        record["estimate_bytes"] = need
        budget = available_bytes(args.device, args.memory_limit_gib) - idle_bytes
        if need + PROCESS_OVERHEAD_BYTES > budget:
            record.update(
                status="not_run", needed_bytes=need + PROCESS_OVERHEAD_BYTES,
                budget_bytes=budget,
                detail=f"not run: estimated {(need + PROCESS_OVERHEAD_BYTES) / GIB:.1f} GiB "
                f"> {budget / GIB:.1f} GiB left",
            )
            log(f"{label} {name}: {record['detail']}")
            continue
        worker = Worker(variant, size, args, budget)
        ready = worker.read()
        if ready.get("status") != "ready":
            worker.close()
            record.update(status=ready.get("status", "error"), detail=ready.get("detail", ""))
            log(f"{label} {name}: {record['status']} ({record['detail']})")
            continue
        record.update({k: v for k, v in ready.items() if k != "status"})
        log(f"{label} {name}: warmed up in {ready['warm_up_s']:.1f} s")
        workers.append(worker)
        idle_bytes += ready["input_rss_bytes"] + 400 * MIB
    passes: dict[str, list[dict[str, Any]]] = {w.variant.name: [] for w in workers}
    alive = list(workers)
    for round_index in range(args.passes):
        shift = round_index % max(len(alive), 1)
        for worker in alive[shift:] + alive[:shift]:
            name = worker.variant.name
            result = worker.run_pass()
            if result.get("status") != "ok":
                records[name].update(status=result.get("status", "error"),
                                     detail=result.get("detail", ""))
                log(f"{label} {name}: {records[name]['status']} ({records[name]['detail']})")
                worker.close()
                continue
            passes[name].append(result)
            log(
                f"{label} pass {round_index + 1}/{args.passes} {name}: "
                f"{result['time_s']:.3f} s wall, {result['cpu_s']:.3f} s CPU, "
                f"peak {result['peak_bytes'] / MIB:.0f} MiB"
            )
        alive = [w for w in alive if records[w.variant.name].get("status") is None]
    for worker in workers:
        worker.close()
        record = records[worker.variant.name]
        if record.get("status") is None:
            record["status"] = "ok"
            finish_record(record, passes[worker.variant.name])
    return list(records.values())


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def machine_and_libraries(device: str) -> dict[str, Any]:
    import importlib.metadata

    import numpy
    import torch

    from peers import BENCH_DEPS

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
        "cpu_flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _meminfo_bytes("MemTotal"),
        "libc": " ".join(platform.libc_ver()),
        "gpu": None,
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        machine["gpu"] = properties.name
        machine["gpu_memory_bytes"] = properties.total_memory
    libraries: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }
    paths = [*sys.path, str(BENCH_DEPS)]
    for package in ("transformers", "torchtune", "torchao", "cut-cross-entropy",
                    "liger-kernel", "triton"):
        found = [d.version for d in importlib.metadata.distributions(name=package, path=paths)]
        libraries[package] = found[0] if found else None
    return {"machine": machine, "libraries": libraries}


def available_bytes(device: str, limit_gib: float) -> int:
    """Memory the workers may use: what is free now, capped at ``limit_gib``."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return min(free, int(limit_gib * GIB))
    return min(_meminfo_bytes("MemAvailable"), int(limit_gib * GIB))


def write_results(payload: dict[str, Any], directory: Path, stem: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    csv_path = directory / f"{stem}.csv"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    columns = [
        "variant", "hidden_size", "time", "vocab", "dtype", "masked", "chunk_rows",
        "status", "input_bytes", "peak_bytes", "peak_bytes_max", "peak_reserved_bytes",
        "peak_tensor_bytes", "tracker_gap", "estimate_bytes", "median_s", "time_spread_s",
        "median_cpu_s", "median_sys_s", "median_minor_faults", "times_s", "detail",
    ]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in payload["results"]:
            row = dict(record)
            for key in ("times_s", "time_spread_s"):
                if key in row:
                    row[key] = " ".join(f"{t:.4f}" for t in row[key])
            writer.writerow(row)
    return json_path, csv_path


def plan(args: argparse.Namespace) -> list[tuple[tuple[int, int, int], list[str], str]]:
    """``(size, variant names, kind)`` blocks, in the order they run."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    main = args.variants or list(VARIANTS)
    blocks = []
    largest = max(sizes, key=lambda s: s[1] * s[2])
    for size in sizes:
        names = main
        if size == largest and not args.quick and not args.variants and len(sizes) > 1:
            names = [name for name in main if name in LARGEST_ONLY]
        blocks.append((size, names, "main"))
    if not args.no_sweep:
        sweep_size = QUICK_SWEEP_SIZE if args.quick or args.sizes else FULL_SWEEP_SIZE
        if args.sizes:
            sweep_size = args.sizes[0]
        budgets = QUICK_SWEEP_MIB if args.quick or args.sizes else None
        names = [
            name for name, v in SWEEP_VARIANTS.items()
            if budgets is None or v.chunk_bytes // MIB in budgets
        ]
        blocks.append((sweep_size, names, "sweep"))
    return blocks


def run_parent(args: argparse.Namespace) -> None:
    blocks = plan(args)
    log(
        f"{len(blocks)} blocks on {args.device}: "
        + "; ".join(f"{kind} (d, T, V) = {size}: {len(names)} variants"
                    for size, names, kind in blocks)
        + f"; {args.passes} timed passes each"
    )
    started = time.perf_counter()
    results = []
    left_out = []
    for index, (size, names, kind) in enumerate(blocks, start=1):
        label = f"[{index}/{len(blocks)} {kind} d={size[0]} T={size[1]} V={size[2]}]"
        for record in run_size(size, names, args, label):
            record["block"] = kind
            results.append(record)
        if kind == "main" and set(names) != set(args.variants or VARIANTS):
            left_out.append({"size": list(size), "variants": sorted(set(VARIANTS) - set(names))})
        log(f"    elapsed {(time.perf_counter() - started) / 60:.1f} min")
    payload = {
        "benchmark": "loss_memory",
        "quick": args.quick,
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
        "duration_s": round(time.perf_counter() - started, 1),
        "passes": args.passes,
        "method": METHOD,
        "left_out_for_time": left_out,
        "memory_budget_bytes": available_bytes(args.device, args.memory_limit_gib),
        **machine_and_libraries(args.device),
        "results": results,
    }
    stem = f"loss_memory_{args.device}" + ("_quick" if args.quick else "")
    json_path, csv_path = write_results(payload, Path(args.results_dir), stem)
    log(f"wrote {json_path} and {csv_path}")


def _size(text: str) -> tuple[int, int, int]:
    try:
        hidden_size, time_steps, vocab = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a size is DxTxV, e.g. 512x2048x32000; got {text!r}") from error
    if min(hidden_size, time_steps, vocab) < 1:
        raise argparse.ArgumentTypeError(f"every part of a size must be >= 1; got {text!r}")
    return hidden_size, time_steps, vocab


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes and a short sweep")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--passes", type=int, default=5, help="timed passes per variant, >= 5")
    parser.add_argument("--sizes", type=_size, nargs="+", default=None,
                        help="sizes DxTxV instead of the full or quick set")
    parser.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS),
                        help="a subset of the main comparison's variants")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the chunk-budget sweep")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR),
                        help="where the JSON and CSV files go (default: benchmarks/results)")
    parser.add_argument("--memory-limit-gib", type=float, default=22.0,
                        help="never plan to use more than this much memory")
    worker = parser.add_argument_group("worker (internal)")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--variant", help=argparse.SUPPRESS)
    worker.add_argument("--hidden-size", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--time", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.passes < 5:
        parser.error("--passes must be >= 5")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
