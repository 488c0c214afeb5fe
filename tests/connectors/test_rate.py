from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import connectors.rate
from connectors.files import FileOffset
from connectors.rate import RateOffset, RateSource, RateSourceSpec
from microstream.exceptions import OffsetError
from microstream.protocols import Source, SourceContext

START = datetime(2024, 1, 1)
START_US = 1_704_067_200_000_000


class Clock:
    """A settable stand-in for the rate source's clock (microseconds since the epoch)."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        self.now_us += round(seconds * 1_000_000)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(START_US)
    monkeypatch.setattr(connectors.rate, "_now_us", clock)
    return clock


def rate(ctx: SourceContext, rows_per_second: int = 4, **options: Any) -> RateSource:
    options.setdefault("start_timestamp", START)
    return RateSourceSpec(rows_per_second, **options).build(ctx)


def expected(values: list[int], rows_per_second: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "timestamp": [START + timedelta(seconds=v / rows_per_second) for v in values],
            "value": values,
        },
        schema={"timestamp": pl.Datetime("us"), "value": pl.Int64},
    )


def test_rows_due_and_exact_values(clock: Clock, source_ctx: SourceContext) -> None:
    source = rate(source_ctx, 4)
    assert isinstance(source, Source)
    start = source.initial_offset()
    assert source.latest_offset(start, rate_limited=True) == RateOffset(rows=0)
    clock.advance(2.6)
    end = source.latest_offset(start, rate_limited=True)
    assert end == RateOffset(rows=10)
    assert_frame_equal(source.read(start, end), expected(list(range(10)), 4))
    clock.advance(0.5)
    nxt = source.latest_offset(end, rate_limited=True)
    assert nxt == RateOffset(rows=12)
    assert_frame_equal(source.read(end, nxt), expected([10, 11], 4))


def test_timestamps_are_floored_to_the_microsecond(source_ctx: SourceContext) -> None:
    source = rate(source_ctx, 3)
    got = source.read(RateOffset(rows=0), RateOffset(rows=4))["timestamp"].to_list()
    assert got == [
        START,
        START + timedelta(microseconds=333_333),
        START + timedelta(microseconds=666_666),
        START + timedelta(seconds=1),
    ]


def test_partitions_are_listed_one_after_the_other(source_ctx: SourceContext) -> None:
    source = rate(source_ctx, 1, num_partitions=3)
    got = source.read(RateOffset(rows=2), RateOffset(rows=9))
    assert got["value"].to_list() == [3, 6, 4, 7, 2, 5, 8]
    assert_frame_equal(got, expected([3, 6, 4, 7, 2, 5, 8], 1))
    empty = source.read(RateOffset(rows=5), RateOffset(rows=5))
    assert_frame_equal(empty, expected([], 1))


def test_start_time_is_kept_across_restarts(clock: Clock, source_ctx: SourceContext) -> None:
    first = RateSourceSpec(10).build(source_ctx)  # start = now
    assert first.start_us == START_US
    clock.advance(5)
    end = first.latest_offset(first.initial_offset(), rate_limited=True)
    assert end == RateOffset(rows=50)
    before = first.read(RateOffset(rows=0), end)

    clock.advance(100)
    again = RateSourceSpec(10).build(source_ctx)
    assert again.start_us == START_US
    assert_frame_equal(again.read(RateOffset(rows=0), end), before)
    assert before["timestamp"][-1] == START + timedelta(seconds=4.9)
    assert source_ctx.storage.exists("start.json")


def test_max_rows_per_trigger(clock: Clock, source_ctx: SourceContext) -> None:
    source = rate(source_ctx, 100, max_rows_per_trigger=30)
    clock.advance(1)
    start = source.initial_offset()
    assert source.latest_offset(start, rate_limited=True) == RateOffset(rows=30)
    assert source.latest_offset(RateOffset(rows=90), rate_limited=True) == RateOffset(rows=100)
    assert source.latest_offset(start, rate_limited=False) == RateOffset(rows=100)
    assert source.lag(RateOffset(rows=30)) == 70


def test_available_now_fixes_the_end(clock: Clock, source_ctx: SourceContext) -> None:
    source = rate(source_ctx, 10, max_rows_per_trigger=15)
    clock.advance(2)
    source.prepare_for_available_now()
    clock.advance(60)
    first = source.latest_offset(RateOffset(rows=0), rate_limited=True)
    second = source.latest_offset(first, rate_limited=True)
    assert (first, second) == (RateOffset(rows=15), RateOffset(rows=20))
    assert source.latest_offset(second, rate_limited=True) == second


def test_latest_offset_never_goes_back(clock: Clock, source_ctx: SourceContext) -> None:
    source = rate(source_ctx, 10)
    clock.advance(-30)  # the clock jumped back, or the start is in the future
    assert source.latest_offset(RateOffset(rows=7), rate_limited=True) == RateOffset(rows=7)
    assert source.latest_offset(RateOffset(rows=0), rate_limited=True) == RateOffset(rows=0)


def test_aware_start_timestamp_is_converted_to_utc(source_ctx: SourceContext) -> None:
    plus_two = timezone(timedelta(hours=2))
    source = rate(source_ctx, 1, start_timestamp=datetime(2024, 1, 1, 2, tzinfo=plus_two))
    assert source.start_us == START_US
    assert source.read(RateOffset(rows=0), RateOffset(rows=1))["timestamp"][0] == START


def test_large_ranges_are_vectorised(source_ctx: SourceContext) -> None:
    source = rate(source_ctx, 1000, num_partitions=4)
    got = source.read(RateOffset(rows=1_000), RateOffset(rows=2_001_000))
    assert got.height == 2_000_000
    assert got["value"].sum() == sum(range(1_000, 2_001_000))
    assert got["value"].head(2).to_list() == [1_000, 1_004]


def test_offsets(source_ctx: SourceContext) -> None:
    source = rate(source_ctx)
    assert source.parse_offset({"rows": 12}) == RateOffset(rows=12)
    with pytest.raises(OffsetError, match="is not a rate source offset"):
        source.parse_offset({"rows": -1})
    with pytest.raises(OffsetError, match="is not a rate source offset"):
        source.parse_offset({"log_index": 1})
    with pytest.raises(OffsetError, match=r"cannot read \(5, 3\]"):
        source.read(RateOffset(rows=5), RateOffset(rows=3))
    with pytest.raises(OffsetError, match="expected a RateOffset"):
        RateOffset(rows=1).follows_or_equals(FileOffset(log_index=0))
    assert RateOffset(rows=3).follows_or_equals(RateOffset(rows=3))
    assert RateOffset(rows=9).distance(RateOffset(rows=3)) == 6


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        ((0,), {}, "rows_per_second must be a positive int; got 0"),
        ((-5,), {}, "rows_per_second must be a positive int; got -5"),
        ((True,), {}, "rows_per_second must be a positive int; got True"),
        ((1.5,), {}, "rows_per_second must be a positive int; got 1.5"),
        ((1,), {"num_partitions": 0}, "num_partitions must be a positive int; got 0"),
        ((1,), {"max_rows_per_trigger": 0}, "max_rows_per_trigger must be a positive int"),
        ((1,), {"start_timestamp": "2024-01-01"}, "start_timestamp must be a datetime"),
    ],
)
def test_invalid_options(args: tuple[Any, ...], options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateSourceSpec(*args, **options)


def test_spec() -> None:
    spec = RateSourceSpec(5, num_partitions=2, start_timestamp=START)
    assert spec.kind == "rate"
    assert spec.schema == pl.Schema({"timestamp": pl.Datetime("us"), "value": pl.Int64()})
    assert spec.identity() == {"rows_per_second": 5, "start_us": START_US}
    assert spec.describe() == "RateSource[rows_per_second=5, num_partitions=2]"
    assert spec == RateSourceSpec(5, num_partitions=2, start_timestamp=START)
