"""Fixed per-batch overhead: 1-row batches, memory source -> memory sink, with a checkpoint.

Each of N batches: add one row, wait until the query has committed it. Reported
as medians next to a reference measured in the same run: one small Polars lazy
query (filter + with_columns + collect on a 1-row frame), since only ratios
compare on a shared, noisy machine.

    python benchmarks/batch_overhead.py [--batches 1000] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import polars as pl

import microstream as ms


def polars_reference(n: int) -> float:
    df = pl.DataFrame({"x": [1]})
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        df.lazy().filter(pl.col("x") > 0).with_columns(y=pl.col("x") * 2).collect()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def microstream_batches(n: int, checkpoint: str) -> tuple[float, float, dict[str, float]]:
    source = ms.MemoryStream({"x": pl.Int64})
    query = (
        source.lazy()
        .filter(pl.col("x") > 0)
        .with_columns(y=pl.col("x") * 2)
        .sink_memory("overhead", checkpoint=checkpoint)
    )
    row = pl.DataFrame({"x": [1]})
    wall = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            source.add_data(row)
            query.process_all_available(timeout=60)
            wall.append(time.perf_counter() - t0)
        progress = query.recent_progress  # the last 100 batches
    finally:
        query.stop()
    assert ms.table("overhead").height == n, "every batch must have landed exactly once"
    phases = {
        phase: statistics.median(getattr(p.durations_ms, phase) for p in progress)
        for phase in ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")
    }
    return statistics.median(wall) * 1000, phases["total"], phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir (default: a temp dir)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or tempfile.mkdtemp(prefix="ms-overhead-")
    reference_ms = polars_reference(args.batches)
    wall_ms, engine_ms, phases = microstream_batches(args.batches, checkpoint)
    result = {
        "batches": args.batches,
        "checkpoint": checkpoint,
        "polars_one_small_query_ms": round(reference_ms, 3),
        "batch_end_to_end_median_ms": round(wall_ms, 3),
        "batch_engine_total_median_ms": round(engine_ms, 3),
        "ratio_end_to_end_to_polars_query": round(wall_ms / reference_ms, 2),
        "phase_medians_ms (last 100 batches)": {k: round(v, 3) for k, v in phases.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
