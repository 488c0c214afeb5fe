"""Window Top-N: ``group_by(window).top_k(k, by=...)`` against a batch oracle over
random batch splits, over a window aggregation's output, and its refusals."""

from __future__ import annotations

import itertools
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microstream as ms

T0 = datetime(2024, 1, 1)
SCHEMA = {"id": pl.Int64, "ts": pl.Datetime("us"), "item": pl.String, "price": pl.Int64}


def bids(rows: list[tuple[int, int, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "ts": [T0 + timedelta(seconds=r[1]) for r in rows],
            "item": [r[2] for r in rows],
            "price": [r[3] for r in rows],
        },
        schema=SCHEMA,
    )


def run(frame: ms.StreamFrame, stream: ms.MemoryStream, batches: list[pl.DataFrame], tmp: Path):
    out: list[pl.DataFrame] = []
    for batch in batches:
        stream.add_data(batch)
    query = frame.foreach_batch(
        lambda df, _b: out.append(df),
        trigger=ms.Trigger.available_now(flush=True),
        checkpoint=tempfile.mkdtemp(dir=tmp),
    )
    query.await_termination()
    return pl.concat(out) if out else pl.DataFrame(schema=frame.collect_schema())


def windowed(stream: ms.MemoryStream) -> ms.StreamFrame:
    return (
        stream.lazy()
        .with_watermark("ts", "0s")
        .with_columns(window=pl.col("ts").dt.truncate("10s"))
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 45), st.sampled_from("abc"), st.integers(0, 4)),
        min_size=1,
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 30), max_size=4),
    k=st.integers(1, 4),
    reverse=st.booleans(),
)
def test_top_k_per_window_equals_batch(rows, cuts, k, reverse, tmp_path: Path) -> None:
    # In event-time order (nothing late); ids are unique, so (price, id) has no ties.
    data = bids([(i, *r) for i, r in enumerate(sorted(rows))])
    bounds = sorted({0, len(rows), *(min(c, len(rows)) for c in cuts)})
    batches = [data.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    stream = ms.MemoryStream(SCHEMA)
    frame = (
        windowed(stream).group_by("window").top_k(k, by=["price", "id"], reverse=reverse, rank="rn")
    )
    assert frame.columns == ["window", "id", "ts", "item", "price", "rn"]
    got = run(frame, stream, batches, tmp_path)
    expected = (
        data.with_columns(window=pl.col("ts").dt.truncate("10s"))
        .sort("price", "id", descending=not reverse)
        .with_columns(rn=pl.int_range(1, pl.len() + 1).over("window"))
        .filter(pl.col("rn") <= k)
        .select(frame.columns)
    )
    assert sorted(got.rows()) == sorted(expected.rows())


def test_top_k_of_a_window_aggregation(tmp_path: Path) -> None:
    stream = ms.MemoryStream(SCHEMA)
    totals = (
        stream.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="10s", group_by="item")
        .agg(total=pl.col("price").sum())
    )
    frame = totals.group_by("ts").top_k(2, by="total", rank="rn")
    rows = [(0, 1, "a", 5), (1, 2, "b", 3), (2, 3, "c", 9), (3, 4, "b", 4), (4, 12, "a", 1)]
    data = bids([*rows, (5, 13, "c", 2), (6, 25, "a", 7)])
    got = run(frame, stream, [data.head(3), data.slice(3, 2), data.tail(2)], tmp_path)
    w = [T0 + timedelta(seconds=s) for s in (0, 10, 20)]
    # [0, 10): c 9, b 7, a 5; [10, 20): c 2, a 1; [20, 30): a 7.
    expected = [(w[0], "c", 9, 1), (w[0], "b", 7, 2), (w[1], "c", 2, 1), (w[1], "a", 1, 2)]
    assert sorted(got.rows()) == sorted([*expected, (w[2], "a", 7, 1)])


def test_top_k_refuses_update_mode() -> None:
    frame = windowed(ms.MemoryStream(SCHEMA)).group_by("window").top_k(1, by="price")
    with pytest.raises(ms.PlanError, match=r"top_k\(\) emits each group's rows once"):
        frame.sink_memory("top_k_update", output_mode="update")


def test_top_k_needs_an_event_time_key() -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s")
    with pytest.raises(ms.PlanError, match=r"group_by\(item\)\.top_k\(\) needs an event-time key"):
        frame.group_by("item").top_k(1, by="price")
    with pytest.raises(ms.PlanError, match="k must be a positive number of rows; got 0"):
        windowed(ms.MemoryStream(SCHEMA)).group_by("window").top_k(0, by="price")
