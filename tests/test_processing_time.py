"""``with_processing_time``: the batch's logged timestamp as a column, stable across re-runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

import microstream as ms

SCHEMA = {"k": pl.String, "x": pl.Int64}


def _stamps(df: pl.DataFrame, column: str = "processing_time") -> list[int]:
    return df[column].dt.epoch("ms").to_list()


def test_every_row_gets_its_batch_logged_timestamp(tmp_path: Path) -> None:
    seen: dict[int, pl.DataFrame] = {}
    source = ms.MemoryStream(SCHEMA)
    frame = source.lazy().with_processing_time()
    assert frame.schema["processing_time"] == pl.Datetime("ms")
    query = frame.foreach_batch(lambda df, b: seen.__setitem__(b, df), checkpoint=tmp_path / "cp")
    source.add_data({"k": ["a", "b"], "x": [1, 2]})
    query.process_all_available(timeout=30)
    time.sleep(0.01)  # the second batch gets a later timestamp
    source.add_data({"k": ["c"], "x": [3]})
    query.process_all_available(timeout=30)
    query.stop()
    logged = {
        b: json.loads((tmp_path / "cp" / "offsets" / f"{b}.json").read_text())["batch_timestamp_ms"]
        for b in (0, 1)
    }
    assert {p.batch_id: p.batch_timestamp_ms for p in query.recent_progress} == logged
    assert _stamps(seen[0]) == [logged[0]] * 2
    assert _stamps(seen[1]) == [logged[1]]
    assert logged[1] > logged[0]
    assert seen[0].columns == ["k", "x", "processing_time"]


def test_rerun_of_an_uncommitted_batch_gets_the_logged_time(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    source = ms.MemoryStream(SCHEMA, name="s")
    first_run: list[pl.DataFrame] = []

    def fail_on_second(df: pl.DataFrame, batch_id: int) -> None:
        if batch_id == 1:
            first_run.append(df)
            raise RuntimeError("disk full")

    def start(sink: Callable[[pl.DataFrame, int], object]) -> ms.StreamingQuery:
        return source.lazy().with_processing_time("seen_at").foreach_batch(sink, checkpoint=cp)

    query = start(fail_on_second)
    source.add_data({"k": ["a"], "x": [1]})
    query.process_all_available(timeout=30)
    source.add_data({"k": ["b", "c"], "x": [2, 3]})
    with pytest.raises(ms.SinkError, match="disk full"):
        query.await_termination(timeout=30)
    logged = json.loads((cp / "offsets" / "1.json").read_text())["batch_timestamp_ms"]
    assert not (cp / "commits" / "1.json").exists()

    time.sleep(0.05)  # a re-run reading the clock would see a later time
    calls: dict[int, pl.DataFrame] = {}
    query = start(lambda df, b: calls.__setitem__(b, df))
    query.process_all_available(timeout=30)
    query.stop()
    assert query.recent_progress[0].recovered
    assert list(calls) == [1]
    assert _stamps(first_run[0], "seen_at") == [logged, logged]
    assert _stamps(calls[1], "seen_at") == [logged, logged]


def test_processing_time_windows(tmp_path: Path) -> None:
    """The intended use: tumbling windows on the processing-time column, in append mode."""
    cp = tmp_path / "cp"
    source = ms.MemoryStream(SCHEMA, name="s")
    out: list[pl.DataFrame] = []

    def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
        return (
            source.lazy()
            .with_processing_time("p")
            .with_watermark("p", "0s")
            .group_by_dynamic("p", every="10s", group_by="k")
            .agg(n=pl.len())
            .foreach_batch(lambda df, _b: out.append(df), checkpoint=cp, trigger=trigger)
        )

    query = start(None)
    source.add_data({"k": ["a", "b", "a"], "x": [1, 2, 3]})
    query.process_all_available(timeout=30)
    source.add_data({"k": ["a"], "x": [4]})
    query.process_all_available(timeout=30)
    query.stop()
    stamps = [p.batch_timestamp_ms for p in query.recent_progress if p.num_input_rows]
    assert len(stamps) == 2
    # A restart with available_now(flush=True) closes the windows still open.
    query = start(ms.Trigger.available_now(flush=True))
    query.await_termination(timeout=30)
    late = [op.num_rows_dropped_late for p in query.recent_progress for op in p.state_operators]
    assert sum(late) == 0

    window = [s - s % 10_000 for s in stamps]
    expected = (
        pl.DataFrame({"k": ["a", "b", "a", "a"], "start": [window[0]] * 3 + [window[1]]})
        .group_by("k", "start")
        .agg(n=pl.len())
    )
    got = pl.concat(out).select("k", pl.col("p").dt.epoch("ms").alias("start"), "n")
    assert got.sort("k", "start").rows() == expected.sort("k", "start").cast(got.schema).rows()


def test_plan_time_errors() -> None:
    frame = ms.MemoryStream(SCHEMA).lazy()
    with pytest.raises(ms.PlanError, match="already has a column 'x'"):
        frame.with_processing_time("x")
    with pytest.raises(ms.PlanError, match="non-empty column name"):
        frame.with_processing_time("")
    twice = frame.with_processing_time("p1").with_processing_time("p2")
    assert twice.columns == ["k", "x", "p1", "p2"]


def test_explain_and_plan_fingerprint() -> None:
    frame = ms.MemoryStream(SCHEMA, name="xs").lazy().with_processing_time("p")
    assert frame.plan.explain_lines() == ["with_processing_time('p')", "  Scan MemoryStream[xs]"]
    assert frame.plan.stateless_steps() == ["with_processing_time('p')"]
