"""Pipelines and a fault-injecting RayRuntime for the in-run worker-fault tests.

- ``window_into_delta``: the rescale pipeline's files (duplicates, disorder, late rows)
  through deduplication and a 10-second tumbling window per user into a Delta table.
- ``join_into_files``: two file streams (events, clicks; one file of each per batch)
  through a stream-stream interval join into the file sink (parquet + manifest).

Both run with ``Trigger.available_now(flush=True)`` and ``max_files_per_trigger=1``,
so batch boundaries do not depend on timing. :class:`FaultyRayRuntime` is RayRuntime
whose driver, at the n-th visit of named fault points, sends a signal to Ray worker
processes (SIGKILL: dies; SIGSTOP: hangs), found by the executor's actor handles.
"""

from __future__ import annotations

import os
import random
import signal
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from files_pipeline import SCHEMA, write_files

import microstream as ms

T0 = datetime(2026, 1, 1)
CLICKS = pl.Schema({"user": pl.String(), "click_ts": pl.Datetime("us"), "page": pl.Int64()})


Fault = tuple[str, int, int]
"""(fault point, visit, worker): at that visit of the point, signal that worker."""


class _WorkerFaults:
    """Stands for the driver's FaultInjector: at each fault's visit of its point it sends
    ``sig`` to the fault's worker (its pid asked through the executor's actor handles)."""

    armed = True

    def __init__(self, executor: Any, faults: list[Fault], sig: int) -> None:
        self.executor, self.faults, self.sig = executor, faults, sig
        self.visits: dict[str, int] = {}
        self.sent: list[int] = []

    def reach(self, point: str) -> None:
        if not any(point == p for p, _, _ in self.faults):
            return
        self.visits[point] = visit = self.visits.get(point, 0) + 1
        for p, nth, victim in self.faults:
            if (p, nth) == (point, visit):
                pid = self.executor.worker_pids()[victim]
                os.kill(pid, self.sig)
                self.sent.append(pid)


class FaultyRayRuntime(ms.RayRuntime):
    """RayRuntime whose driver signals Ray workers at fault points (:data:`Fault`);
    ``self.executions`` keeps every run's driver for the assertions."""

    def __init__(self, *faults: Fault, sig: int = signal.SIGKILL, **options: Any) -> None:
        super().__init__(**options)
        self.faults, self.sig = list(faults), sig
        self.executions: list[Any] = []

    def prepare(self, config: Any) -> Any:
        execution = super().prepare(config)
        execution.faults = _WorkerFaults(execution.executor, self.faults, self.sig)
        self.executions.append(execution)
        return execution


def write_clicks(directory: Path, first: int, count: int) -> None:
    """Click files ``first .. first+count-1``, 4 s of event time each, like the events."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        rnd = random.Random(7000 + i)
        data = [
            (f"u{rnd.randrange(12)}", T0 + timedelta(seconds=4 * i, milliseconds=j * 350), j)
            for j in range(20)
        ]
        path = directory / f"part-{i:04d}.parquet"
        pl.DataFrame(data, schema=CLICKS, orient="row").write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))


def write_inputs(root: Path, count: int) -> None:
    """``count`` files of events (``root/in``) and of clicks (``root/clicks``)."""
    write_files(root / "in", 0, count, rows=30)
    write_clicks(root / "clicks", 0, count)


def _events(root: Path) -> ms.StreamFrame:
    return ms.scan_files(root / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)


def window_into_delta(
    root: Path, runtime: ms.Runtime, late: list[tuple[Any, ...]] | None = None
) -> ms.StreamingQuery:
    """``late`` collects the late rows (with their batch id) the driver routes."""

    def on_late(rows: pl.DataFrame, batch_id: int) -> None:
        if late is not None:
            late.extend((batch_id, *row) for row in rows.iter_rows())

    return (
        _events(root)
        .with_watermark("ts", delay="5s", on_late=on_late)
        .unique(subset=["id", "ts"], keep="first")
        .group_by_dynamic("ts", every="10s", group_by="user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
        .sink_delta(
            root / "delta",
            checkpoint=root / "cp-delta",
            trigger=ms.Trigger.available_now(flush=True),
            runtime=runtime,
        )
    )


def join_into_files(
    root: Path, runtime: ms.Runtime, late: list[tuple[Any, ...]] | None = None
) -> ms.StreamingQuery:
    clicks = ms.scan_files(
        root / "clicks", format="parquet", schema=CLICKS, max_files_per_trigger=1
    ).with_watermark("click_ts", delay="4s")
    return (
        _events(root)
        .with_watermark("ts", delay="4s")
        .join(
            clicks,
            left_on="user",
            right_on="user",
            how="left",
            within=("0s", "3s"),
            left_time="ts",
            right_time="click_ts",
        )
        .sink_parquet(
            root / "files",
            checkpoint=root / "cp-files",
            trigger=ms.Trigger.available_now(flush=True),
            runtime=runtime,
        )
    )


PIPELINES = {"window_delta": window_into_delta, "join_files": join_into_files}


def output(root: Path, pipeline: str) -> list[tuple[Any, ...]]:
    """Every row the pipeline's sink committed, sorted (a multiset: a doubled row shows)."""
    if pipeline == "window_delta":
        frame = pl.read_delta(str(root / "delta"))
    else:
        frame = ms.read_file_sink(root / "files")
    return sorted(frame.iter_rows(), key=repr)


def run(
    root: Path,
    pipeline: str,
    runtime: ms.Runtime,
    late: list[tuple[Any, ...]] | None = None,
) -> list[tuple[Any, ...]]:
    """One run over the inputs already written; its output (late rows into ``late``)."""
    query = PIPELINES[pipeline](root, runtime, late)
    assert query.await_termination(timeout=120)
    assert query.exception() is None, query.exception()
    return output(root, pipeline)
