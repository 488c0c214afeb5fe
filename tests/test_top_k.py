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


# -- running Top-N (no event-time key): update mode, keyed by (key, rank) ------------


def running(stream: ms.MemoryStream) -> ms.StreamFrame:
    return (
        stream.lazy()
        .group_by("item")
        .top_k(2, by="price", rank="rn")
        .select("item", "id", "price", "rn")
    )


def test_running_top_k_emits_changed_positions(tmp_path: Path) -> None:
    stream = ms.MemoryStream(SCHEMA)
    emitted: list[list[tuple]] = []
    query = running(stream).foreach_batch(
        lambda df, _b: emitted.append(sorted(df.rows())),
        output_mode="update",
        checkpoint=str(tmp_path / "cp"),
    )
    stream.add_data(bids([(1, 0, "a", 5), (2, 0, "a", 3), (3, 0, "b", 1)]))
    query.process_all_available()
    stream.add_data(bids([(4, 0, "a", 4), (5, 0, "b", 1), (6, 0, "a", 9)]))
    query.process_all_available()
    query.stop()
    # A restart reads the kept top rows back: id 7 ties id 1 at 5, and came later.
    stream.add_data(bids([(7, 0, "a", 5), (8, 0, "b", 2)]))
    restarted = running(stream).foreach_batch(
        lambda df, _b: emitted.append(sorted(df.rows())),
        output_mode="update",
        checkpoint=str(tmp_path / "cp"),
    )
    restarted.process_all_available()
    restarted.stop()
    assert [e for e in emitted if e] == [
        [("a", 1, 5, 1), ("a", 2, 3, 2), ("b", 3, 1, 1)],
        # a: 9 takes rank 1, 5 moves to rank 2; b: the tie keeps id 3 first
        [("a", 1, 5, 2), ("a", 6, 9, 1), ("b", 5, 1, 2)],
        [("b", 3, 1, 2), ("b", 8, 2, 1)],
    ]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 4)), min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=4),
)
def test_running_top_k_last_row_per_position_equals_batch(rows, cuts, tmp_path: Path) -> None:
    data = bids([(i, 0, item, price) for i, (item, price) in enumerate(rows)])
    bounds = sorted({0, *(c for c in cuts if c < data.height), data.height})
    stream = ms.MemoryStream(SCHEMA)
    for lo, hi in itertools.pairwise(bounds):
        stream.add_data(data.slice(lo, hi - lo))
    out: list[pl.DataFrame] = []
    query = running(stream).foreach_batch(
        lambda df, _b: out.append(df),
        output_mode="update",
        trigger=ms.Trigger.available_now(),
        checkpoint=tempfile.mkdtemp(dir=tmp_path),
    )
    query.await_termination()
    got = pl.concat(out).unique(subset=["item", "rn"], keep="last", maintain_order=True)
    expected = (
        data.sort("price", descending=True, maintain_order=True)
        .with_columns(rn=pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("item"))
        .filter(pl.col("rn") <= 2)
        .select("item", "id", "price", "rn")
    )
    assert sorted(got.rows()) == sorted(expected.rows())


def test_running_top_k_refusals() -> None:
    frame = running(ms.MemoryStream(SCHEMA))
    with pytest.raises(ms.PlanError, match=r"runs in output_mode='update'"):
        frame.sink_memory("running_top_k_append", output_mode="append")
    stream = ms.MemoryStream(SCHEMA).lazy()
    with pytest.raises(ms.PlanError, match="already has a column 'price'"):
        stream.group_by("item").top_k(1, by="price", rank="price")
