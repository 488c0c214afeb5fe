"""Event times at the edges: before 1970, the epoch itself, the end of time, and nulls.

Before any event was seen there is no watermark, so nothing in the first batch is
late whatever its times; ``available_now(flush=True)`` emits every window, the one
ending in year 10000 included; a null event time is counted and routed like a late
row. Every operator is checked against the batch oracle or exact rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms

SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Int64})
Y1960 = datetime(1960, 1, 1)
EPOCH = datetime(1970, 1, 1)
END_OF_TIME = datetime(9999, 12, 31, 23, 59, 30)


def rows(*items: tuple[datetime | None, str, int]) -> pl.DataFrame:
    return pl.DataFrame(items, schema=SCHEMA, orient="row")


def s(base: datetime, seconds: float) -> datetime:
    return base + timedelta(seconds=seconds)


class Run:
    """Feed batches one by one, then an ``available_now(flush=True)`` run on the checkpoint."""

    def __init__(
        self,
        build: Callable[[ms.StreamFrame], ms.StreamFrame],
        batches: list[pl.DataFrame],
        *,
        output_mode: str = "append",
        flush: bool = True,
        late: str | None = None,
    ):
        source = ms.MemoryStream(batches[0].schema)
        checkpoint = f"memory://edges_{uuid.uuid4().hex[:8]}"
        self.emitted: list[pl.DataFrame] = []
        self.progress: list[ms.QueryProgress] = []

        def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
            return build(source.lazy()).foreach_batch(
                lambda df, _: self.emitted.append(df),
                output_mode=output_mode,  # type: ignore[arg-type]
                trigger=trigger,
                checkpoint=checkpoint,
            )

        query = start(None)
        try:
            for batch in batches:
                source.add_data(batch)
                query.process_all_available(timeout=30)
        finally:
            query.stop()
        self.progress += query.recent_progress
        if query.exception() is not None:
            raise query.exception()  # type: ignore[misc]
        if flush:
            query = start(ms.Trigger.available_now(flush=True))
            query.await_termination(timeout=60)
            self.progress += query.recent_progress
            if query.exception() is not None:
                raise query.exception()  # type: ignore[misc]
        self.late = ms.table(late) if late else None

    def output(self) -> pl.DataFrame:
        return pl.concat(self.emitted, how="vertical")

    def dropped_late(self) -> int:
        return sum(op.num_rows_dropped_late for p in self.progress for op in p.state_operators)


def windows(frame: Any) -> Any:
    if isinstance(frame, ms.StreamFrame):
        frame = frame.with_watermark("ts", "0s")
    return frame.group_by_dynamic("ts", every="1m", group_by="k").agg(
        pl.len().alias("n"), pl.col("v").sum()
    )


def window_oracle(batches: list[pl.DataFrame]) -> pl.DataFrame:
    return windows(pl.concat(batches).sort("ts").lazy()).collect()


BATCHES = {
    # three 1960 rows in the first batch (two windows), more 1960 rows later
    "before 1970": [
        rows((s(Y1960, 10), "a", 1), (s(Y1960, 20), "a", 2), (s(Y1960, 70), "a", 3)),
        rows((s(Y1960, 75), "a", 4), (s(Y1960, 130), "b", 5)),
        rows((s(Y1960, 200), "b", 6)),
    ],
    # the epoch itself: judged late against a watermark of 0 before
    "at the epoch": [
        rows((EPOCH, "a", 1), (EPOCH, "b", 2)),
        rows((EPOCH, "a", 3), (s(EPOCH, 61), "a", 4)),
    ],
    "across the epoch": [
        rows((s(EPOCH, -30), "a", 1), (s(EPOCH, 0), "a", 2)),
        rows((s(EPOCH, 30), "a", 3), (s(EPOCH, 90), "a", 4)),
    ],
}


@pytest.mark.parametrize("case", list(BATCHES))
def test_windows_keep_every_row_of_the_first_batch_whatever_its_time(case: str) -> None:
    batches = BATCHES[case]
    run = Run(windows, batches)
    assert run.dropped_late() == 0
    assert_frame_equal(run.output().sort("k", "ts"), window_oracle(batches).sort("k", "ts"))


def test_three_1960_rows_give_two_windows() -> None:
    batch = BATCHES["before 1970"][0]
    run = Run(windows, [batch])
    assert run.output().sort("ts").rows() == [
        ("a", s(Y1960, 0), 2, 3),
        ("a", s(Y1960, 60), 1, 3),
    ]
    # the watermark moved from "none" to 1960, reported as such
    marks = [p.watermark for p in run.progress]
    assert marks[0] is None
    assert marks[1] == s(Y1960, 70).replace(tzinfo=marks[1].tzinfo)


def test_rows_behind_a_1960_watermark_are_still_late() -> None:
    run = Run(
        windows,
        [rows((s(Y1960, 130), "a", 1)), rows((s(Y1960, 10), "a", 2), (s(Y1960, 140), "a", 3))],
    )
    assert run.dropped_late() == 1  # 1960 00:00:10 is behind the 1960 00:02:10 watermark
    assert run.output().rows() == [("a", s(Y1960, 120), 2, 4)]


def test_dedup_keeps_epoch_and_1960_rows_of_the_first_batch() -> None:
    def dedup(frame: Any) -> Any:
        if isinstance(frame, ms.StreamFrame):
            frame = frame.with_watermark("ts", "0s")
        return frame.unique(subset=["k", "ts"], keep="first", maintain_order=True)

    batches = [
        rows((EPOCH, "a", 1), (EPOCH, "a", 2), (s(Y1960, 5), "b", 3)),
        rows((EPOCH, "a", 4), (s(EPOCH, 1), "c", 5)),
    ]
    run = Run(dedup, batches)
    expected = dedup(pl.concat(batches).lazy()).collect()
    assert (
        run.output().rows()
        == expected.rows()
        == [
            (EPOCH, "a", 1),
            (s(Y1960, 5), "b", 3),
            (s(EPOCH, 1), "c", 5),
        ]
    )
    assert run.dropped_late() == 1  # (epoch, a) of batch 1 is at the epoch watermark: late


def test_sessions_before_1970() -> None:
    def sessions(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by_session("ts", gap="30s", group_by="k")
            .agg(pl.len().alias("n"))
        )

    run = Run(
        sessions,
        [rows((s(Y1960, 0), "a", 1), (s(Y1960, 10), "a", 2)), rows((s(Y1960, 60), "a", 3))],
    )
    assert run.dropped_late() == 0
    assert run.output().sort("session_start").rows() == [
        ("a", s(Y1960, 0), s(Y1960, 40), 2),
        ("a", s(Y1960, 60), s(Y1960, 90), 1),
    ]


def test_stream_join_before_1970() -> None:
    clicks = ms.MemoryStream(pl.Schema({"ad": pl.String, "click_time": pl.Datetime("us")}))
    imps_schema = pl.Schema({"ad": pl.String, "imp_time": pl.Datetime("us")})
    imps = ms.MemoryStream(imps_schema)
    name = f"join_{uuid.uuid4().hex[:8]}"
    query = (
        imps.lazy()
        .with_watermark("imp_time", "0s")
        .join(
            clicks.lazy().with_watermark("click_time", "0s"),
            on="ad",
            how="inner",
            within=("0s", "5m"),
        )
        .sink_memory(name)
    )
    try:
        imps.add_data(pl.DataFrame({"ad": ["x", "y"], "imp_time": [Y1960, EPOCH]}))
        clicks.add_data(
            pl.DataFrame({"ad": ["x", "y"], "click_time": [s(Y1960, 60), s(EPOCH, 60)]})
        )
        query.process_all_available(timeout=30)
    finally:
        query.stop()
    assert query.exception() is None
    assert ms.table(name).sort("ad").rows() == [
        ("x", Y1960, s(Y1960, 60)),
        ("y", EPOCH, s(EPOCH, 60)),
    ]
    assert sum(op.num_rows_dropped_late for op in query.last_progress.state_operators) == 0


def test_stateful_function_sees_1960_rows_and_a_1960_watermark() -> None:
    seen: list[tuple[str, int, datetime | None]] = []

    def count(key: tuple[Any, ...], group: pl.DataFrame, state: ms.GroupState[Any]) -> pl.DataFrame:
        seen.append((key[0], group.height, state.watermark))
        return pl.DataFrame({"k": [key[0]], "n": [group.height]})

    def build(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by("k")
            .map_groups_with_state(
                count, state_schema={"x": pl.Int64}, output_schema={"k": pl.String, "n": pl.Int64}
            )
        )

    run = Run(
        build,
        [rows((Y1960, "a", 1), (EPOCH, "a", 2)), rows((s(EPOCH, 1), "a", 3))],
        flush=False,
    )
    assert run.output().rows() == [("a", 2), ("a", 1)]
    assert run.dropped_late() == 0
    assert [(k, n) for k, n, _ in seen] == [("a", 2), ("a", 1)]
    assert seen[0][2] == datetime.min  # no watermark before the first event: below every time
    assert seen[1][2] is not None and seen[1][2].replace(tzinfo=None) == EPOCH


# -- the end of time -----------------------------------------------------------------------------


def test_flush_emits_the_window_ending_in_year_10000() -> None:
    def last_minute(frame: Any) -> Any:
        if isinstance(frame, ms.StreamFrame):
            frame = frame.with_watermark("ts", "0s")
        return frame.group_by_dynamic("ts", every="1m", include_boundaries=True).agg(pl.len())

    batch = rows((END_OF_TIME, "a", 1), (s(END_OF_TIME, -120), "a", 2))
    run = Run(last_minute, [batch])
    got = run.output().sort("ts")
    assert_frame_equal(got, last_minute(batch.sort("ts").lazy()).collect())
    assert got.get_column("ts").to_list() == [s(END_OF_TIME, -150), s(END_OF_TIME, -30)]
    assert got.get_column("_upper_boundary").dt.year().to_list() == [9999, 10000]


def test_a_window_past_the_dtype_range_is_an_error_naming_column_and_value() -> None:
    schema = pl.Schema({"ts": pl.Datetime("ns"), "k": pl.String, "v": pl.Int64})
    source = ms.MemoryStream(schema)
    source.add_data(
        pl.DataFrame({"ts": [datetime(2262, 4, 11, 12)], "k": ["a"], "v": [1]}, schema=schema)
    )
    checkpoint = f"memory://edges_{uuid.uuid4().hex[:8]}"
    query = (
        source.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1d")
        .agg(pl.len())
        .foreach_batch(lambda df, _: None, checkpoint=checkpoint)
    )
    with pytest.raises(
        ms.EventTimeError, match=r"'ts'.*ts=2262-04-11 12:00:00.*pl.Datetime\('us'\)"
    ):
        query.process_all_available(timeout=30)
    query.stop()
    # nothing was committed: the batch is still pending, not silently skipped
    assert query.last_progress is None


# -- null event times ----------------------------------------------------------------------------


def test_null_event_times_are_counted_and_routed_with_the_reason() -> None:
    late = f"late_{uuid.uuid4().hex[:8]}"

    def build(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s", on_late=late)
            .group_by_dynamic("ts", every="1m", group_by="k")
            .agg(pl.len().alias("n"))
        )

    run = Run(
        build,
        [
            rows((s(EPOCH, 70), "a", 1), (None, "b", 2), (None, "c", 3)),
            rows((s(EPOCH, 5), "a", 4), (None, "d", 5)),  # 5s is late: wm is 70s
        ],
        late=late,
    )
    assert run.output().rows() == [("a", s(EPOCH, 60), 1)]
    per_batch = [
        (p.batch_id, op.num_rows_dropped_null_time, op.num_rows_dropped_late)
        for p in run.progress
        for op in p.state_operators
        if op.num_rows_dropped_null_time or op.num_rows_dropped_late
    ]
    assert per_batch == [(0, 2, 0), (2, 1, 1)]  # batch 1: the no-data batch for wm 70s
    assert sum(p.flat()["rows_dropped_null_time"] for p in run.progress) == 3
    assert run.late is not None
    routed = run.late.sort("v").select("v", "batch_id", "reason").rows()
    assert routed == [
        (2, 0, "null event time: has no window"),
        (3, 0, "null event time: has no window"),
        (4, 2, "late"),
        (5, 2, "null event time: has no window"),
    ]


def test_null_event_times_in_sessions_and_joins_are_counted() -> None:
    def sessions(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by_session("ts", gap="30s", group_by="k")
            .agg(pl.len().alias("n"))
        )

    run = Run(sessions, [rows((EPOCH, "a", 1), (None, "a", 2))])
    assert run.progress[0].state_operators[0].num_rows_dropped_null_time == 1
    assert run.output().rows() == [("a", EPOCH, s(EPOCH, 30), 1)]

    schema = pl.Schema({"ad": pl.String, "imp_time": pl.Datetime("us")})
    imps = ms.MemoryStream(schema)
    clicks = ms.MemoryStream(pl.Schema({"ad": pl.String, "click_time": pl.Datetime("us")}))
    query = (
        imps.lazy()
        .with_watermark("imp_time", "0s")
        .join(clicks.lazy().with_watermark("click_time", "0s"), on="ad", within=("0s", "5m"))
        .sink_memory(f"join_{uuid.uuid4().hex[:8]}")
    )
    try:
        imps.add_data(pl.DataFrame({"ad": ["x", "y"], "imp_time": [EPOCH, None]}, schema=schema))
        clicks.add_data(pl.DataFrame({"ad": ["x", "y"], "click_time": [None, s(EPOCH, 9)]}))
        query.process_all_available(timeout=30)
    finally:
        query.stop()
    assert query.exception() is None
    first = query.recent_progress[0].state_operators[0]
    assert first.num_rows_dropped_null_time == 2  # one per side


@pytest.mark.parametrize("output_mode", ["append", "update"])
def test_a_null_event_time_key_is_counted_not_kept_forever(output_mode: str) -> None:
    late = f"late_{uuid.uuid4().hex[:8]}"

    def hourly(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s", on_late=late)
            .with_columns(hour=pl.col("ts").dt.truncate("1h"))
            .group_by("hour", "k")
            .agg(pl.col("v").sum())
        )

    run = Run(
        hourly,
        [rows((s(EPOCH, 10), "a", 1), (None, "a", 2)), rows((s(EPOCH, 4000), "a", 4))],
        output_mode=output_mode,
        late=late,
    )
    got = run.output().group_by("hour", "k").agg(pl.col("v").last()).sort("hour")
    assert got.rows() == [(EPOCH, "a", 1), (s(EPOCH, 3600), "a", 4)]
    assert sum(op.num_rows_dropped_null_time for p in run.progress for op in p.state_operators) == 1
    assert run.late is not None
    assert run.late.select("v", "reason").rows() == [
        (2, "null event time: its event-time key 'hour' is null, a group that never closes")
    ]
    # nothing is left in state once the flush closed every hour
    assert run.progress[-1].state_operators[0].num_rows_total == 0


def test_the_late_table_shows_no_watermark_as_null_and_prints() -> None:
    """Null-time rows of the first batch missed no watermark: the column is null, and the
    table prints (the Int64 sentinel used to be shown as a datetime Polars cannot format)."""
    late = f"late_{uuid.uuid4().hex[:8]}"

    def build(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s", on_late=late)
            .group_by_dynamic("ts", every="1m")
            .agg(pl.len())
        )

    run = Run(build, [rows((None, "a", 1), (EPOCH, "a", 2))], flush=False, late=late)
    assert run.late is not None
    assert run.late.select("v", "late_watermark", "reason").rows() == [
        (1, None, "null event time: has no window")
    ]
    assert "null event time" in str(run.late)
