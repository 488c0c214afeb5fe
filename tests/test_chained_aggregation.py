"""Aggregations feeding another stateful operator: windows of windows, closed groups averaged."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.exceptions import PlanError
from microstream.plan.nodes import result_key_columns

T0 = datetime(2024, 1, 1)
SCHEMA = {"ts": pl.Datetime("us"), "k": pl.Int64, "v": pl.Int64}


def t(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def run(frame: ms.StreamFrame, batches: list[dict[str, Any]], stream: ms.MemoryStream, **kw: Any):
    name = f"chain_{id(frame)}"
    query = frame.sink_memory(name, **kw)
    for data in batches:
        stream.add_data(pl.DataFrame(data, schema=SCHEMA))
        query.process_all_available()
    query.stop()
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]
    return ms.table(name), query


def canon(df: pl.DataFrame) -> pl.DataFrame:
    return df.sort(df.columns, nulls_last=True)


def test_window_aggregation_feeding_a_window_aggregation() -> None:
    # Events per key and minute, then the busiest key-minute and the total per 5 minutes:
    # each 5-minute window is emitted once, from the final per-minute counts.
    stream = ms.MemoryStream(SCHEMA)
    frame = (
        stream.lazy()
        .with_watermark("ts", "1m")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(n=pl.len(), v=pl.col("v").sum())
        .group_by_dynamic("ts", every="5m")
        .agg(maxn=pl.col("n").max(), v=pl.col("v").sum())
    )
    minutes = [0, 1, 1.5, 2, 4, 5, 7, 11, 13, 20]
    batches = [{"ts": [t(m), t(m + 0.2)], "k": [1, int(m) % 2], "v": [int(m), 1]} for m in minutes]
    out, query = run(frame, batches, stream)
    all_rows = pl.concat([pl.DataFrame(b, schema=SCHEMA) for b in batches])
    expected = (
        all_rows.sort("ts")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(n=pl.len(), v=pl.col("v").sum())
        .sort("ts")
        .group_by_dynamic("ts", every="5m")
        .agg(maxn=pl.col("n").max(), v=pl.col("v").sum())
        .filter(pl.col("ts") < t(15))  # the last window stays open: watermark 19:12
    )
    assert_frame_equal(canon(out), canon(expected), check_dtypes=False)
    late = sum(op.num_rows_dropped_late for p in query.recent_progress for op in p.state_operators)
    assert late == 0


def test_closed_groups_feed_an_update_mode_aggregation() -> None:
    # Nexmark q4's shape: a maximum per (key, closing time), final once the watermark
    # passes the closing time, then the average of the final maxima per key in update mode.
    # The first operator runs as append whatever the query's mode: an open group's running
    # maximum never reaches the average.
    stream = ms.MemoryStream(SCHEMA)
    frame = (
        stream.lazy()
        .with_watermark("ts", "1m")
        .group_by("k", "ts")
        .agg(top=pl.col("v").max())
        .group_by("k")
        .agg(avg=pl.col("top").mean(), n=pl.len())
    )
    # After each batch a no-data batch runs with the watermark it moved to.
    batches = [
        {"ts": [t(1), t(1), t(2)], "k": [1, 1, 2], "v": [5, 7, 1]},  # wm 1m: (1, 1m) = 7
        {"ts": [t(2), t(3)], "k": [2, 1], "v": [9, 100]},  # wm 2m: (2, 2m) = 9, not 1
        {"ts": [t(3), t(4)], "k": [1, 2], "v": [1, 3]},  # wm 3m: (1, 3m) = 100
        {"ts": [t(10)], "k": [3], "v": [0]},  # wm 9m: (2, 4m) = 3; (3, 10m) stays open
    ]
    out, _ = run(frame, batches, stream, output_mode="update")
    assert out.rows() == [(1, 7.0, 1), (2, 9.0, 1), (1, 53.5, 2), (2, 6.0, 2)]


def test_complete_mode_chain_runs_no_data_batches() -> None:
    # Complete mode evicts nothing itself, but the windows feeding it close by watermark:
    # a batch without data must still run when the watermark moves.
    stream = ms.MemoryStream(SCHEMA)
    frame = (
        stream.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1m")
        .agg(n=pl.len())
        .group_by("n")
        .agg(windows=pl.len())
    )
    out, query = run(
        frame,
        [{"ts": [t(0), t(0.5), t(1)], "k": [0, 0, 0], "v": [0, 0, 0]}],
        stream,
        output_mode="complete",
    )
    # batch 0 (watermark epoch) emits nothing; the no-data batch (watermark 1m) closes 0m
    assert len(query.recent_progress) == 2
    assert out.rows() == [(2, 1)]


def test_update_sink_keys_are_the_last_aggregation_keys() -> None:
    stream = ms.MemoryStream(SCHEMA)
    frame = (
        stream.lazy()
        .with_watermark("ts", "0s")
        .group_by("k", "ts")
        .agg(top=pl.col("v").max())
        .group_by("k")
        .agg(pl.col("top").mean())
    )
    assert result_key_columns(frame.plan) == ("k",)


@pytest.mark.parametrize(
    ("first", "why"),
    [
        (lambda f: f.group_by("k").agg(n=pl.len()), "no watermark"),
        (
            lambda f: f.group_by_dynamic("ts", every="1m", every_n_rows=2).agg(n=pl.len()),
            "emit triggers",
        ),
        (lambda f: f.group_by_session("ts", gap="1m").agg(n=pl.len()), "sessions"),
    ],
)
def test_aggregations_whose_rows_are_revised_cannot_feed_another(first: Any, why: str) -> None:
    stream = ms.MemoryStream(SCHEMA)
    frame = first(stream.lazy().with_watermark("ts", "0s")).group_by("n").agg(pl.len())
    with pytest.raises(PlanError, match="cannot feed another stateful operator"):
        frame.sink_memory(f"refused_{why.replace(' ', '_')}", output_mode="update")
