"""What RayRuntime refuses at start (with the reason and what to use), beyond the
refusals of test_ray_runtime.py (a stateful query's ``memory://`` checkpoint, an
unpicklable ``map_groups_with_state`` or ``map_batches`` function, Ray not installed);
and what looks as if it could not run on Ray but does, because the driver does it:
a ``MemoryStream`` fed from this process, ``sink_memory`` read back in this process,
a ``foreach_batch`` function that cannot be pickled, a stateless query with its
checkpoint in memory."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream.exceptions import PlanError

T0 = datetime(2026, 1, 1)
EVENT = pl.Schema({"user": pl.String(), "ts": pl.Datetime("us"), "v": pl.Int64()})


def _events(batch: int) -> pl.DataFrame:
    rows = [
        (f"u{(j * 7 + batch) % 5}", T0 + timedelta(seconds=4 * batch, milliseconds=j * 130), j)
        for j in range(30)
    ]
    return pl.DataFrame(rows, schema=EVENT, orient="row")


def _windowed(stream: ms.MemoryStream) -> ms.StreamFrame:
    return (
        stream.lazy()
        .with_watermark("ts", delay="2s")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
    )


def test_an_unpicklable_map_batches_with_state_function_is_refused_by_name(
    tmp_path: Path,
) -> None:
    pytest.importorskip("ray")
    lock = threading.Lock()

    def totals_with_lock(rows: pl.DataFrame, state: pl.DataFrame, ctx: Any) -> Any:
        with lock:
            return rows, state

    frame = (
        ms.MemoryStream(EVENT)
        .lazy()
        .group_by("user")
        .map_batches_with_state(
            totals_with_lock,
            state_schema={"total": pl.Int64},
            output_schema={"user": pl.String, "total": pl.Int64},
        )
    )
    with pytest.raises(PlanError) as refused:
        frame.sink_memory("ray_refused_mbws", checkpoint=tmp_path / "cp", runtime=ms.RayRuntime())
    message = str(refused.value)
    assert "RayRuntime cannot send function" in message
    assert "totals_with_lock" in message
    assert "cannot be pickled" in message
    assert "Define the function at module level" in message
    assert "or run the query on LocalRuntime" in message
    assert not (tmp_path / "cp" / "offsets").exists()  # refused before anything ran


def test_an_aggregation_whose_expression_cannot_be_pickled_is_refused(tmp_path: Path) -> None:
    # No user function of a stateful verb here: the operator itself (its aggregation
    # holds a Python function with a lock in its closure) cannot reach the workers.
    pytest.importorskip("ray")
    lock = threading.Lock()

    def locked_double(v: int) -> int:
        with lock:
            return 2 * v

    frame = (
        ms.MemoryStream(EVENT)
        .lazy()
        .with_watermark("ts", delay="2s")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.col("v").map_elements(locked_double, return_dtype=pl.Int64).sum())
    )
    with pytest.raises(PlanError) as refused:
        frame.sink_memory("ray_refused_expr", checkpoint=tmp_path / "cp", runtime=ms.RayRuntime())
    message = str(refused.value)
    assert message.startswith("RayRuntime cannot send group_by_dynamic")
    assert "to its workers: it cannot be pickled" in message
    assert "or run the query on LocalRuntime" in message


def _local_rows(name: str, tmp_path: Path, batches: int) -> list[tuple[Any, ...]]:
    stream = ms.MemoryStream(EVENT)
    query = _windowed(stream).sink_memory(name, checkpoint=tmp_path / f"cp-{name}")
    try:
        for b in range(batches):
            stream.add_data(_events(b))
            query.process_all_available()
    finally:
        query.stop()
    return sorted(ms.table(name).iter_rows())


def test_a_memory_stream_into_sink_memory_runs_on_ray_and_reads_back_here(
    ray_cluster: Any, tmp_path: Path
) -> None:
    # The driver reads the MemoryStream and writes the memory table: both stay in this
    # process (another process cannot see either, on any runtime), while the window's
    # state lives in the actors.
    stream = ms.MemoryStream(EVENT)
    query = _windowed(stream).sink_memory(
        "ray_memory_sink", checkpoint=tmp_path / "cp", runtime=ms.RayRuntime(num_workers=2)
    )
    try:
        for b in range(5):
            stream.add_data(_events(b))
            query.process_all_available()
        assert len(query._execution.executor.workers) == 2  # type: ignore[attr-defined]
        assert query.exception() is None
    finally:
        query.stop()
    rows = sorted(ms.table("ray_memory_sink").iter_rows())
    assert rows == _local_rows("ray_memory_sink_local", tmp_path, 5)
    assert len(rows) >= 10


def test_an_unpicklable_foreach_batch_function_runs_on_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    lock = threading.Lock()
    seen: list[tuple[int, int]] = []

    def collect(df: pl.DataFrame, batch_id: int) -> None:
        with lock:  # a lock: not picklable, and never pickled
            seen.append((batch_id, df.height))

    stream = ms.MemoryStream(EVENT)
    query = _windowed(stream).foreach_batch(
        collect, checkpoint=tmp_path / "cp", runtime=ms.RayRuntime(num_workers=2)
    )
    try:
        for b in range(4):
            stream.add_data(_events(b))
            query.process_all_available()
        assert query.exception() is None
    finally:
        query.stop()
    assert [batch_id for batch_id, _ in seen] == sorted({b for b, _ in seen})
    assert sum(n for _, n in seen) == len(_local_rows("ray_fb_local", tmp_path, 4)) > 0


def test_a_stateless_query_may_keep_its_checkpoint_in_memory(
    ray_cluster: Any, tmp_path: Path
) -> None:
    # Only stateful operators write from the workers; a stateless query starts none.
    stream = ms.MemoryStream(EVENT)
    query = (
        stream.lazy()
        .filter(pl.col("v") % 3 == 0)
        .sink_memory(
            "ray_memory_cp", checkpoint="memory://ray-stateless-cp", runtime=ms.RayRuntime()
        )
    )
    try:
        stream.add_data(_events(0))
        query.process_all_available()
        assert query.exception() is None
    finally:
        query.stop()
    assert ms.table("ray_memory_cp").equals(_events(0).filter(pl.col("v") % 3 == 0))
