"""Where a batch of the files -> window -> Delta pipeline spends its time (target 3).

The pipeline of ``batch_overhead.py --pipeline files-window-delta`` (one 1-row parquet
file per batch), with every batch's phases kept and split by kind: a *data* batch
(the file's row) and the *no-data* batch after it (the watermark moved). Each step
below a phase is timed by wrapping the method (``--steps``; it adds ~1 us a call):
the median and the mean over the batches of that kind, so a step that runs every few
batches (a state snapshot, the retention) shows in the mean.

    python benchmarks/fixed_cost_phases.py [--batches 1000] [--steps]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

import microstream as ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batch_overhead

PHASES = ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")


class StepTimer:
    """Wraps methods to time each call, filed under the kind of batch running."""

    def __init__(self) -> None:
        self.kind = "trigger"
        self.times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        method: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.times[(self.kind, label)].append(time.perf_counter() - t0)

        setattr(owner, name, timed)

    def install(self) -> None:
        from connectors.files import FileSource
        from microstream.checkpoint.log import Checkpoint
        from microstream.checkpoint.storage import Storage
        from microstream.operators.aggregation import AggregationOperator
        from microstream.plan.physical import StatelessStage
        from microstream.runtime.driver import StreamExecution
        from microstream.state.store import StateStore

        trigger, attempt = StreamExecution._trigger_once, StreamExecution._attempt_batch

        def on_trigger(execution: StreamExecution) -> bool:
            self.kind = "trigger"
            return trigger(execution)

        def on_batch(execution: StreamExecution, entry: Any, **kwargs: Any) -> None:
            data = any(s.start != s.end for s in entry.sources)
            self.kind = "data" if data else "no-data"
            attempt(execution, entry, **kwargs)

        StreamExecution._trigger_once = on_trigger  # type: ignore[method-assign]
        StreamExecution._attempt_batch = on_batch  # type: ignore[method-assign]
        for owner, name, label in (
            (FileSource, "latest_offset", "latest_offset: the file source"),
            (FileSource, "_new_files", "latest_offset: its listing"),
            (Checkpoint, "write_offsets", "wal: offsets/N"),
            (FileSource, "read", "read: the file source"),
            (StatelessStage, "evaluate", "compute: stateless stage"),
            (AggregationOperator, "_process", "compute: operator"),
            (AggregationOperator, "_prepare", "compute: operator _prepare"),
            (AggregationOperator, "_update_state", "compute: operator _update_state"),
            (StateStore, "fold", "compute: StateStore.fold"),
            (AggregationOperator, "_emit", "compute: operator _emit"),
            (StateStore, "commit", "commit: StateStore.commit"),
            (StateStore, "_write_snapshot", "commit: its snapshot files"),
            (StateStore, "_remove_unneeded_files", "commit: its retention"),
            (Checkpoint, "write_commit", "commit: commits/N"),
            (Storage, "write_bytes", "any: one checkpoint file write"),
            (StreamExecution, "_publish_progress", "after: progress record"),
        ):
            self.wrap(owner, name, label)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            f"{kind} | {label}": {
                "calls": len(times),
                "median_ms": round(statistics.median(times) * 1000, 3),
                "mean_ms": round(statistics.mean(times) * 1000, 3),
            }
            for (kind, label), times in sorted(self.times.items())
        }


def run(n: int, work: Path) -> dict[str, Any]:
    staging, landing, table = work / "staging", work / "landing", work / "table"
    staging.mkdir()
    landing.mkdir()
    files = batch_overhead.window_files(staging, n)
    reference_ms = batch_overhead.window_reference(files[0], min(n, 200))
    query = (
        ms.scan_files(str(landing), format="parquet", schema=batch_overhead.WINDOW_SCHEMA)
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="key")
        .agg(pl.len(), pl.col("v").sum())
        .sink_delta(str(table), output_mode="append", checkpoint=str(work / "checkpoint"))
    )
    progress = {}
    wall = []
    try:
        for path in files:
            t0 = time.perf_counter()
            os.rename(path, landing / path.name)
            query.process_all_available(timeout=60)
            wall.append(time.perf_counter() - t0)
            for p in query.recent_progress[-4:]:
                progress[p.batch_id] = p
    finally:
        query.stop()
    assert query.exception() is None, query.exception()
    kept = [progress[b] for b in sorted(progress)[-n:]]  # the second half of the files
    result: dict[str, Any] = {
        "batches": n,
        "polars_one_small_query_ms": round(reference_ms, 3),
        "end_to_end_per_file_median_ms (second half)": round(
            statistics.median(wall[n // 2 :]) * 1000, 3
        ),
    }
    for kind in ("data", "no-data", "all"):
        chosen = [p for p in kept if kind == "all" or (p.num_input_rows > 0) == (kind == "data")]
        result[f"{kind} batches: phase medians ms"] = {
            phase: round(statistics.median(getattr(p.durations_ms, phase) for p in chosen), 3)
            for phase in PHASES
        } | {"batches": len(chosen)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000, help="files, one per data batch")
    parser.add_argument("--steps", action="store_true", help="time the steps of each phase")
    args = parser.parse_args()
    timer = StepTimer()
    if args.steps:
        timer.install()
    work = Path(tempfile.mkdtemp(prefix="ms-fixed-cost-"))
    try:
        result = run(args.batches, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.steps:
        result["steps"] = timer.summary()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
