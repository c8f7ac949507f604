"""Time ``companion.batch_check.check_batch`` on large batches, on the CPU.

    .venv/bin/python benchmarks/batch_check.py           # B x T up to 64 x 4096
    .venv/bin/python benchmarks/batch_check.py --quick   # up to 16 x 1024

For each size, two batches from
``companion.experiments.batch_check.benchmark_batch``: the batch as built,
which has no finding (every check runs to its end), and the same batch with
``labels = input_ids``, which has several (padding, placeholders, packed
boundaries, prompts), so that the cost of listing positions is included.
Every optional tensor is present (attention mask, position ids, assistant
mask) and the special ids, the vocabulary size and a micro-batch size are
given, so every check runs.  Each is timed ``--repeats`` times after one
untimed call; the results record the minimum and the median wall time, the
machine, the load average and the library versions, in
``benchmarks/results/batch_check_cpu[_quick].json``.

Time on a machine shared with other work varies from run to run; the
minimum is the closest to the cost on an idle machine, the median what a
busy one gives.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from loss_memory import machine_and_libraries  # noqa: E402  (benchmarks/)

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
FULL_SIZES = ((8, 512), (16, 1024), (64, 1024), (64, 4096))
QUICK_SIZES = ((8, 512), (16, 1024))
CHECK_OPTIONS = {
    "vocab_size": 32000,
    "pad_token_id": 0,
    "eos_token_id": 2,
    "micro_batch_size": 8,
}


def time_one(batch: dict, repeats: int) -> dict:
    from companion.batch_check import check_batch
    from companion.experiments.tiny_models import IMAGE_TOKEN_ID

    options = {**CHECK_OPTIONS, "placeholder_token_ids": [IMAGE_TOKEN_ID]}
    findings = check_batch(batch, **options)  # untimed: first-call costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        check_batch(batch, **options)
        times.append(time.perf_counter() - start)
    return {
        "findings": sorted({finding.code for finding in findings}),
        "times_s": times,
        "min_s": min(times),
        "median_s": statistics.median(times),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes up to 16 x 1024")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per batch (>= 3)")
    arguments = parser.parse_args(argv)
    if arguments.repeats < 3:
        parser.error("--repeats must be >= 3")
    import torch

    from companion.experiments.batch_check import benchmark_batch

    started = time.perf_counter()
    records = []
    for rows, columns in QUICK_SIZES if arguments.quick else FULL_SIZES:
        clean = benchmark_batch(rows, columns)
        labelled = {**clean, "labels": clean["input_ids"].clone()}
        for name, batch in (("no findings", clean), ("labels = input_ids", labelled)):
            record = {"batch": rows, "time": columns, "labels": name, **time_one(batch, arguments.repeats)}
            print(f"B={rows:3d} T={columns:5d} {name:20s} min {record['min_s'] * 1e3:8.2f} ms, "
                  f"median {record['median_s'] * 1e3:8.2f} ms", file=sys.stderr)
            records.append(record)
    payload = {
        "benchmark": "batch_check",
        "quick": arguments.quick,
        "device": "cpu",
        "date": datetime.date.today().isoformat(),
        "duration_s": round(time.perf_counter() - started, 1),
        "time_method": (
            f"wall time (time.perf_counter) of {arguments.repeats} calls of check_batch "
            "after one untimed call; min and median"
        ),
        "check_options": {**CHECK_OPTIONS, "placeholder_token_ids": "[63]"},
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        **machine_and_libraries("cpu"),
        "results": records,
    }
    payload["libraries"]["torch_threads"] = torch.get_num_threads()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"batch_check_cpu{'_quick' if arguments.quick else ''}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
