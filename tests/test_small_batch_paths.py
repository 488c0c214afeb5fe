"""The stateful operators' fast paths for small and empty batches give the rows the full
passes give: a batch that pairs, evicts or closes nothing skips them, so each test here
makes the batch after one that skipped do the work, and checks exactly what it emits."""

from __future__ import annotations

import math
import uuid
from datetime import date, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.operators.base import lowest_us
from tests.test_stream_join import CLICKS, IMPS, Pair, canon, t
from tests.test_windows import at, rows, run

JOINED = {**IMPS, "click_time": pl.Datetime("us"), "click": pl.String}


def joined(*data: tuple[Any, ...]) -> pl.DataFrame:
    return pl.DataFrame(data, schema=JOINED, orient="row")


def state_rows(query: ms.StreamingQuery) -> int:
    progress = query.last_progress
    assert progress is not None
    return sum(op.num_rows_total for op in progress.state_operators)


# -- stream-stream join ------------------------------------------------------------------------


def test_join_eviction_sees_a_buffered_row_older_than_the_rest() -> None:
    """Row b arrives after row a with an earlier time (still on time): the side's floor of
    buffered times must drop to b's, or the batch whose watermark expires b but not a
    would skip the eviction and never emit b's unmatched row."""
    pair = Pair("left")  # within [0, 5m], watermark delay 1m
    # Clicks with keys of their own keep the two watermarks moving together.
    pair.batch(imps=[(1, t(10), "a")], clicks=[(101, t(10), "x1")])  # wm -> 9m
    pair.batch(imps=[(2, t(9.5), "b")])  # on time (9.5m > 9m); wm stays 9m
    assert pair.output().height == 0
    pair.batch(imps=[(3, t(15.6), "c")], clicks=[(103, t(15.6), "x3")])  # wm -> 14.6m
    # b expires (9.5 + 5 <= 14.6), a does not (10 + 5 > 14.6).
    assert_frame_equal(pair.output(), joined((2, t(9.5), "b", None, None)))
    # The floor is unknown after an eviction: found again from the buffer, a expires now.
    pair.batch(imps=[(4, t(16), "d")], clicks=[(104, t(16), "x4")])  # wm -> 15m
    assert_frame_equal(
        canon(pair.output()),
        canon(joined((2, t(9.5), "b", None, None), (1, t(10), "a", None, None))),
    )
    assert state_rows(pair.query) == 4  # c, d and the clicks x3, x4
    pair.stop()


def test_join_batches_with_one_side_empty_pair_with_the_buffer() -> None:
    """A batch with rows on one side only still pairs them with the other side's buffer;
    a batch that pairs nothing and evicts nothing emits nothing."""
    pair = Pair("inner")
    pair.batch(clicks=[(1, t(1), "c1")])  # no left rows: no pair
    assert pair.output().height == 0
    pair.batch(imps=[(1, t(0.5), "i1"), (2, t(0.6), "i2")])  # c1 from the buffer
    assert_frame_equal(pair.output(), joined((1, t(0.5), "i1", t(1), "c1")))
    pair.batch(clicks=[(1, t(2), "c2"), (3, t(2), "c3")])  # i1 from the buffer
    expected = joined((1, t(0.5), "i1", t(1), "c1"), (1, t(0.5), "i1", t(2), "c2"))
    assert_frame_equal(canon(pair.output()), canon(expected))
    pair.batch(imps=[(5, t(2.5), "i5")])  # no key in the other buffer: nothing
    assert_frame_equal(canon(pair.output()), canon(expected))
    pair.stop()


@pytest.mark.parametrize("unit", ["ns", "ms"])
def test_join_late_rows_at_the_watermark_in_other_time_units(unit: str) -> None:
    """The late check compares a lower bound of the batch's times with the watermark
    before it filters: a row at the watermark (equal is late; in nanoseconds, one that
    truncates to it) is dropped, a row just after it is kept."""
    time = pl.Datetime(unit)  # type: ignore[arg-type]
    left_schema = {**IMPS, "imp_time": time}
    right_schema = {**CLICKS, "click_time": time}
    imps, clicks = ms.MemoryStream(left_schema), ms.MemoryStream(right_schema)
    frame = (
        imps.lazy()
        .with_watermark("imp_time", "1m")
        .join(clicks.lazy().with_watermark("click_time", "1m"), on="ad", within=("0s", "5m"))
    )
    name = f"j_{uuid.uuid4().hex[:8]}"
    query = frame.sink_memory(name)

    def batch(left: list[tuple[Any, ...]], right: list[tuple[Any, ...]]) -> None:
        imps.add_data(pl.DataFrame(left, schema=left_schema, orient="row"))
        clicks.add_data(pl.DataFrame(right, schema=right_schema, orient="row"))
        query.process_all_available()

    batch([(9, t(11), "w")], [(9, t(11), "wc")])  # wm -> 10m
    wm = t(10)
    just_in = wm + (timedelta(microseconds=1) if unit == "ns" else timedelta(milliseconds=1))
    truncates_to_wm = wm + timedelta(microseconds=0.5) if unit == "ns" else wm
    batch(
        [(1, wm, "at"), (2, truncates_to_wm, "trunc"), (3, just_in, "in")],
        [(1, t(10.5), "c1"), (2, t(10.5), "c2"), (3, t(10.5), "c3")],
    )
    query.stop()
    out = ms.table(name)
    assert sorted(out.get_column("imp").to_list()) == ["in", "w"]
    late = sum(op.num_rows_dropped_late for p in query.recent_progress for op in p.state_operators)
    assert late == 2


def test_lowest_us_is_a_lower_bound_of_epoch_microseconds() -> None:
    times = [datetime(1969, 12, 31, 23, 59, 59, 999_999), datetime(2024, 1, 1, 0, 0, 1)]
    for unit in ("ns", "us", "ms"):
        for zone in (None, "Europe/Paris"):
            series = pl.Series(times).cast(pl.Datetime(unit, zone))  # type: ignore[arg-type]
            exact = series.dt.epoch("us").min()
            assert lowest_us(series) == exact
    dates = pl.Series([date(2024, 1, 2), None, date(1969, 5, 1)])
    assert lowest_us(dates) == dates.dt.epoch("us").min()
    assert lowest_us(pl.Series("t", [None, None], dtype=pl.Datetime("us"))) == math.inf
    assert lowest_us(pl.Series([7, 3], dtype=pl.Int64)) == 3
    # Nanoseconds round down: the bound may be 1 us below, never above.
    for raw, bound in ((-1, -1), (1_001, 1), (999, 0)):
        ns = pl.Series([raw, 5_000_000]).cast(pl.Datetime("ns"))
        assert lowest_us(ns) == bound
        assert bound <= ns.dt.epoch("us").min()  # type: ignore[operator]


# -- windowed aggregation ----------------------------------------------------------------------


def slow_tumbling(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", "90s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("v").sum(), n=pl.len())
    )


def test_window_that_closes_first_arrives_after_a_later_one(name: str) -> None:
    """The earliest stored window end must drop when a row opens an earlier window, or the
    watermark that closes it would find 'nothing closes' and emit nothing; after an
    eviction the floor is found again from the state."""
    query, out = run(
        slow_tumbling,
        [
            rows((130, "a", 1)),  # batch 0: window [120, 180); wm -> 40s (no-data batch 1)
            rows((50, "b", 2)),  # batch 2: window [0, 60), on time (60 > 40)
            rows((155, "a", 4)),  # batch 3; wm -> 65s: batch 4 closes [0, 60)
            rows((170, "a", 8)),  # batch 5; wm -> 80s: batch 6 closes nothing
            rows((300, "c", 1)),  # batch 7; wm -> 210s: batch 8 closes [120, 180)
        ],
        name,
    )
    assert out == {
        0: [],
        1: [],
        2: [],
        3: [],
        4: [("b", at(0), 2, 1)],
        5: [],
        6: [],
        7: [],
        8: [("a", at(120), 13, 3)],
    }
    assert state_rows(query) == 1  # window [300, 360) of c


def test_update_mode_evicts_the_earlier_window_silently(name: str) -> None:
    query, out = run(
        slow_tumbling,
        [
            rows((130, "a", 1)),  # batch 0; wm -> 40s
            rows((50, "b", 2)),  # batch 2 (after no-data batch 1)
            rows((155, "a", 4)),  # batch 3; wm -> 65s: batch 4 evicts [0, 60)
            rows((56, "b", 7), (170, "a", 8)),  # batch 5: b's window is closed: late
        ],
        name,
        output_mode="update",
    )
    assert out == {
        0: [("a", at(120), 1, 1)],
        1: [],
        2: [("b", at(0), 2, 1)],
        3: [("a", at(120), 5, 2)],
        4: [],
        5: [("a", at(120), 13, 3)],
        6: [],
    }
    assert state_rows(query) == 1  # only a's window [120, 180)
    dropped = sum(
        op.num_rows_dropped_late for p in query.recent_progress for op in p.state_operators
    )
    assert dropped == 1


def test_window_late_rows_mixed_with_on_time_ones(name: str) -> None:
    """A batch whose windows are all open skips the late filter; one with a closed window
    drops exactly its rows."""
    query, out = run(
        slow_tumbling,
        [
            rows((130, "a", 1)),  # wm -> 40s
            rows((30, "a", 5), (59, "b", 6), (61, "b", 7)),  # [0, 60) is open (60 > 40)
            rows((215, "c", 1)),  # wm -> 125s: batch 4 closes [0, 60), [60, 120)
            rows((110, "b", 9), (125, "a", 2)),  # [60, 120) closed: late
        ],
        name,
    )
    assert out[4] == [("a", at(0), 5, 1), ("b", at(0), 6, 1), ("b", at(60), 7, 1)]
    assert out[5] == []
    dropped = sum(
        op.num_rows_dropped_late for p in query.recent_progress for op in p.state_operators
    )
    assert dropped == 1
    assert state_rows(query) == 2  # a's [120, 180) (rows at 130 s and 125 s), c's [180, 240)
