"""Fixed per-batch overhead: 1-row batches through a query, with a checkpoint.

Each of N batches: add one row, wait until the query has committed it. Reported
as medians next to a reference measured in the same run, since only ratios
compare on a shared, noisy machine. Two pipelines (``--pipeline``):

- ``memory`` (default): memory source -> filter + with_columns -> memory sink;
  reference: one small Polars lazy query (filter + with_columns + collect on a
  1-row frame);
- ``files-window-delta``: parquet files (one row each, one file per batch, renamed
  into the source directory: written beforehand, so the producer costs nothing)
  -> ``with_watermark`` + tumbling 1-minute ``group_by_dynamic`` (count, sum) ->
  Delta sink, append; every row one second of event time later, so a window
  closes (and the sink writes rows) every 60 batches, and every batch commits
  the window state, the WAL and a Delta version. Reference: one small Polars
  query, reading one such file and aggregating it the same way.

    python benchmarks/batch_overhead.py [--batches 1000] [--checkpoint DIR]
        [--pipeline memory|files-window-delta]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

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


WINDOW_SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "key": pl.Int64(), "v": pl.Float64()})


def window_files(directory: Path, n: int) -> list[Path]:
    """``n`` one-row parquet files, one second of event time apart, in ``directory``."""
    start = dt.datetime(2024, 1, 1)
    paths = []
    for i in range(n):
        row = pl.DataFrame(
            {"ts": [start + dt.timedelta(seconds=i)], "key": [i % 3], "v": [float(i)]},
            schema=WINDOW_SCHEMA,
        )
        path = directory / f"part-{i:06d}.parquet"
        row.write_parquet(path)
        paths.append(path)
    return paths


def window_reference(path: Path, n: int) -> float:
    """One small Polars query: read a one-row file, aggregate it as the stream does."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        (
            pl.scan_parquet(path)
            .group_by("key", pl.col("ts").dt.truncate("1m"))
            .agg(pl.len(), pl.col("v").sum())
            .collect()
        )
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def window_delta_batches(
    n: int, checkpoint: str, work: Path
) -> tuple[float, float, dict[str, float], float]:
    """Median wall ms per batch, median engine ms, phase medians, and the reference ms."""
    staging, landing, table = work / "staging", work / "landing", work / "table"
    staging.mkdir()
    landing.mkdir()
    files = window_files(staging, n)
    reference_ms = window_reference(files[0], n)
    query = (
        ms.scan_files(str(landing), format="parquet", schema=WINDOW_SCHEMA)
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="key")
        .agg(pl.len(), pl.col("v").sum())
        .sink_delta(str(table), output_mode="append", checkpoint=checkpoint)
    )
    wall = []
    try:
        for path in files:
            t0 = time.perf_counter()
            os.rename(path, landing / path.name)
            query.process_all_available(timeout=60)
            wall.append(time.perf_counter() - t0)
        progress = query.recent_progress  # the last 100 batches
    finally:
        query.stop()
    assert query.exception() is None, query.exception()
    # Every closed window landed exactly once: the first n - 11 s of rows (the watermark
    # trails the newest row by 10 s; a window closes when its end passes it).
    written = pl.read_delta(str(table)).select(pl.col("len").sum()).item()
    closed_rows = (n - 11) // 60 * 60
    assert written == closed_rows, (written, closed_rows)
    phases = {
        phase: statistics.median(getattr(p.durations_ms, phase) for p in progress)
        for phase in ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")
    }
    return statistics.median(wall) * 1000, phases["total"], phases, reference_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir (default: a temp dir)")
    parser.add_argument("--pipeline", choices=("memory", "files-window-delta"), default="memory")
    args = parser.parse_args()
    checkpoint = args.checkpoint or tempfile.mkdtemp(prefix="ms-overhead-")
    if args.pipeline == "memory":
        reference_ms = polars_reference(args.batches)
        wall_ms, engine_ms, phases = microstream_batches(args.batches, checkpoint)
    else:
        work = Path(tempfile.mkdtemp(prefix="ms-overhead-files-"))
        try:
            wall_ms, engine_ms, phases, reference_ms = window_delta_batches(
                args.batches, checkpoint, work
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "pipeline": args.pipeline,
        "batches": args.batches,
        "checkpoint": checkpoint,
        "polars_one_small_query_ms": round(reference_ms, 3),
        "batch_end_to_end_median_ms": round(wall_ms, 3),
        "batch_engine_total_median_ms": round(engine_ms, 3),
        "ratio_end_to_end_to_polars_query": round(wall_ms / reference_ms, 2),
        "ratio_engine_total_to_polars_query": round(engine_ms / reference_ms, 2),
        "phase_medians_ms (last 100 batches)": {k: round(v, 3) for k, v in phases.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
