"""Bounded state for ``group_by``: event-time keys, the unbounded-state warning, ``state_ttl``.

- a key that is a non-decreasing function of the watermarked column (``dt.truncate``,
  ``dt.round``, plus a constant, renames, chains) closes its groups with the watermark:
  exact rows, the state size, and the batch oracle over random batch splits;
- a query whose state can only grow warns at start (``ms.UnboundedStateWarning``), and
  a bounded one does not;
- ``group_by(..., state_ttl=)`` forgets idle keys by the batches' logged timestamps.
"""

from __future__ import annotations

import itertools
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.plan.event_time import monotone_root, trace_event_time
from microstream.runtime import driver as execution

T0 = datetime(2024, 1, 1)
SCHEMA = {"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Int64}


def at(hours: float = 0, minutes: float = 0, seconds: float = 0) -> datetime:
    return T0 + timedelta(hours=hours, minutes=minutes, seconds=seconds)


def state_rows(query: ms.StreamingQuery) -> int:
    assert query.last_progress is not None
    return sum(op.num_rows_total for op in query.last_progress.state_operators)


def hourly(frame: ms.StreamFrame, delay: str = "10m", **kwargs: Any) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", delay, **kwargs)
        .with_columns(hour=pl.col("ts").dt.truncate("1h"))
        .group_by("hour", "k")
        .agg(n=pl.len(), total=pl.col("v").sum())
    )


# -- (a) event-time keys ---------------------------------------------------------------


def test_the_issue_query_keeps_only_open_hours_in_state(name: str) -> None:
    """The issue's measurement: 100 keys an hour; after 5 hours of watermark the state
    held 600 rows (every hour forever); it now holds the one open hour."""
    source = ms.MemoryStream(SCHEMA)
    query = hourly(source.lazy()).sink_memory(name, output_mode="update")
    try:
        sizes = []
        for h in range(6):
            source.add_data(
                {"ts": [at(h, 30)] * 100, "k": [f"k{i}" for i in range(100)], "v": [1] * 100}
            )
            query.process_all_available(timeout=30)
            sizes.append(state_rows(query))
    finally:
        query.stop()
    # the watermark after hour h's rows is h:20, which closes every hour before h
    assert sizes == [100] * 6
    assert ms.table(name).height == 600  # update mode emitted each group once


def test_append_emits_each_hour_once_when_closed_exact_rows(name: str) -> None:
    source = ms.MemoryStream(SCHEMA)
    query = hourly(source.lazy(), "5m", on_late=f"{name}_late").sink_memory(name)
    steps = [
        # wm becomes 01:00 (01:05 - 5m): hour 00 closes
        ([at(0, 10), at(0, 50), at(1, 5)], ["a", "a", "a"], [1, 2, 4]),
        # 00:59 is late (its hour closed at 01:00); 01:59 is on time; wm -> 02:25
        ([at(0, 59), at(1, 59), at(2, 30)], ["a", "a", "b"], [8, 16, 32]),
        # 02:20 is before the watermark 02:25 but its hour is open: kept, as in a window
        ([at(2, 20), at(4, 0)], ["b", "b"], [64, 128]),
    ]
    emitted = []
    try:
        for ts, keys, values in steps:
            source.add_data({"ts": ts, "k": keys, "v": values})
            query.process_all_available(timeout=30)
            emitted.append(ms.table(name).height)
    finally:
        query.stop()
    assert ms.table(name).rows() == [
        (at(0), "a", 2, 3),
        (at(1), "a", 2, 20),
        (at(2), "b", 2, 96),
    ]
    assert emitted == [1, 2, 3]  # one hour closes after each step
    late = ms.table(f"{name}_late")
    assert late.select("ts", "k", "v", "late_watermark").rows() == [
        (at(0, 59), "a", 8, at(1)),
    ]
    assert [p.state_operators[0].num_rows_dropped_late for p in query.recent_progress] == [
        0, 0, 1, 0, 0, 0,
    ]  # fmt: skip
    assert state_rows(query) == 1  # hour 04:00 of b, still open (wm 03:55)


def test_overwriting_the_watermark_column_with_its_truncation_drops_nothing_on_time(
    name: str,
) -> None:
    """``with_columns(ts=pl.col("ts").dt.truncate("1h"))`` after ``with_watermark``:
    the key named like the event time is its truncation, so rows after the watermark
    but in an hour that started before it are on time (they were dropped as late)."""
    source = ms.MemoryStream(SCHEMA)
    frame = (
        source.lazy()
        .with_watermark("ts", "10m")
        .with_columns(pl.col("ts").dt.truncate("1h"))
        .group_by("ts")
        .agg(pl.col("v").sum())
    )
    query = frame.sink_memory(name)
    try:
        for ts, v in [(at(1, 30), 1), (at(1, 40), 2), (at(2, 30), 4)]:
            source.add_data({"ts": [ts], "k": ["a"], "v": [v]})
            query.process_all_available(timeout=30)
    finally:
        query.stop()
    # wm 01:20 then 01:30: 01:40 is on time, hour 01 holds 1 + 2; wm 02:20 closes it
    assert ms.table(name).rows() == [(at(1), 3)]
    assert sum(p.state_operators[0].num_rows_dropped_late for p in query.recent_progress) == 0


@pytest.mark.parametrize(
    ("derive", "watermark", "closed_below"),
    [
        # the bound is f(first instant after the watermark)
        (pl.col("ts").dt.truncate("1h"), at(1, 59, 59.999999), at(2)),
        (pl.col("ts").dt.truncate("1h"), at(1, 59, 59.999998), at(1)),
        (pl.col("ts") + timedelta(minutes=15), at(1), at(1, 15, 0.000001)),
        (pl.col("ts") - pl.duration(minutes=15), at(1), at(0, 45, 0.000001)),
        (pl.col("ts").dt.round("1h"), at(1, 29, 59.999999), at(2)),
        (pl.col("ts").dt.round("1h"), at(1, 29, 59.999998), at(1)),
        ((pl.col("ts") + timedelta(minutes=30)).dt.truncate("1h"), at(1, 29, 59.999999), at(2)),
        (pl.col("ts").dt.offset_by("1d").dt.truncate("1d"), at(23, 59, 59.999999), at(48)),
        (pl.col("ts"), at(1), at(1, 0, 0.000001)),
    ],
)
def test_event_time_key_bound(derive: pl.Expr, watermark: datetime, closed_below: datetime) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s").with_columns(key=derive)
    key = trace_event_time(frame.plan, "key")
    assert key is not None
    groups = pl.DataFrame(
        {"key": [closed_below - timedelta(microseconds=1), closed_below]},
        schema={"key": pl.Datetime("us")},
    )
    wm_us = int((watermark - datetime(1970, 1, 1)) / timedelta(microseconds=1))
    closed = groups.select(key.closed(wm_us)).to_series().to_list()
    assert closed == [True, False]


def test_the_watermark_column_in_milliseconds_and_as_a_date() -> None:
    ms_frame = (
        ms.MemoryStream({"ts": pl.Datetime("ms")})
        .lazy()
        .with_watermark("ts", "0s")
        .rename({"ts": "t"})
    )
    key = trace_event_time(ms_frame.plan, "t")
    assert key is not None and key.is_event_time
    values = pl.DataFrame({"t": [1, 2]}, schema={"t": pl.Int64}).cast(pl.Datetime("ms"))
    # wm = 1000us: the millisecond 1 is entirely <= wm; 2 is not
    assert values.select(key.closed(1_000)).to_series().to_list() == [True, False]
    assert values.select(key.closed(1_999)).to_series().to_list() == [True, False]
    day = (
        ms.MemoryStream({"ts": pl.Datetime("us")})
        .lazy()
        .with_watermark("ts", "0s")
        .select(day=pl.col("ts").dt.date())
    )
    key = trace_event_time(day.plan, "day")
    assert key is not None
    days = pl.DataFrame({"day": [datetime(2024, 1, 1).date(), datetime(2024, 1, 2).date()]})
    last_us_of_jan_1 = int((at(23, 59, 59.999999) - datetime(1970, 1, 1)).total_seconds() * 1e6)
    assert days.select(key.closed(last_us_of_jan_1)).to_series().to_list() == [True, False]
    # no watermark yet (below every time) closes nothing; a flush (past every time) all
    assert days.select(key.closed(-(2**63))).to_series().to_list() == [False, False]
    assert days.select(key.closed(2**63 - 1)).to_series().to_list() == [True, True]


@pytest.mark.parametrize(
    ("build", "column"),
    [
        (lambda f: f.with_columns(h=pl.col("ts").dt.hour()), "h"),  # wraps every day
        (lambda f: f.with_columns(h=timedelta(hours=1) - pl.col("ts")), "h"),  # decreasing
        (lambda f: f.with_columns(ts=pl.col("other")), "ts"),  # the name, not the time
        (lambda f: f.with_columns(h=pl.col("ts").dt.truncate(pl.col("every"))), "h"),
        (lambda f: f.with_columns(pl.col("ts", "other").dt.truncate("1h")), "ts"),
        (lambda f: f.map_batches(lambda df: df), "ts"),  # opaque
        (lambda f: f.cast({"ts": pl.Datetime("ms")}), "ts"),  # not recognised (yet)
        (lambda f: f.rename({"ts": "gone"}), "ts"),
    ],
)
def test_keys_not_known_to_be_monotone_are_not_event_time(
    build: Callable[[ms.StreamFrame], ms.StreamFrame], column: str
) -> None:
    schema = {"ts": pl.Datetime("us"), "other": pl.Datetime("us"), "every": pl.String}
    frame = build(ms.MemoryStream(schema).lazy().with_watermark("ts", "0s"))
    assert trace_event_time(frame.plan, column) is None


def test_monotone_root_on_chains_and_renames() -> None:
    chained = (
        ms.MemoryStream(SCHEMA)
        .lazy()
        .with_watermark("ts", "0s")
        .with_columns(shifted=pl.col("ts") + timedelta(minutes=30))
        .rename({"shifted": "s"})
        .filter(pl.col("v") > 0)
        .select(hour=pl.col("s").dt.truncate("1h"), k="k")
    )
    key = trace_event_time(chained.plan, "hour")
    assert key is not None and not key.is_event_time
    assert [column for column, _ in key.steps] == ["ts", "s"]
    assert monotone_root(pl.col("x").dt.truncate("1h").alias("y")) == "x"
    assert monotone_root(pl.col("x") + pl.col("y")) is None


def test_append_mode_is_allowed_for_a_derived_event_time_key_only(name: str) -> None:
    source = ms.MemoryStream(SCHEMA)
    hourly(source.lazy()).sink_memory(name).stop()  # accepted
    by_hour_of_day = (
        source.lazy()
        .with_watermark("ts", "10m")
        .with_columns(hour=pl.col("ts").dt.hour())
        .group_by("hour")
        .agg(pl.len())
    )
    with pytest.raises(ms.PlanError, match="output_mode='append' needs windows that close"):
        by_hour_of_day.sink_memory(f"{name}_2")


# the oracle: the stream equals Polars over all input minus the rows reported late

KEYS: dict[str, Callable[[], pl.Expr]] = {
    "truncate": lambda: pl.col("ts").dt.truncate("1m"),
    "round": lambda: pl.col("ts").dt.round("1m"),
    "shift_then_truncate": lambda: (pl.col("ts") - timedelta(seconds=20)).dt.truncate("30s"),
    "truncate_then_shift": lambda: pl.col("ts").dt.truncate("1m") + pl.duration(seconds=45),
    "identity": lambda: pl.col("ts"),
}
AGGS = [
    pl.len().alias("n"),
    pl.col("v").sum().alias("sum"),
    pl.col("v").first().alias("first"),
    pl.col("v").last().alias("last"),
    pl.col("id").sort().alias("ids"),
]

events = st.lists(
    st.tuples(st.integers(0, 400), st.sampled_from(["a", "b"]), st.integers(-5, 5)),
    min_size=1,
    max_size=40,
)


def keyed_query(frame: Any, key: str) -> Any:
    return frame.with_columns(g=KEYS[key]()).group_by("g", "k").agg(AGGS)


def run_keyed(
    full: pl.DataFrame, cuts: list[int], key: str, delay: str, mode: str
) -> tuple[list[pl.DataFrame], pl.DataFrame, ms.StreamingQuery]:
    """One batch per slice (each processed before the next arrives), then a restart with
    ``available_now(flush=True)`` that closes every group."""
    name = f"keys_{uuid.uuid4().hex[:8]}"
    source = ms.MemoryStream(full.schema)
    bounds = sorted({0, full.height, *(c for c in cuts if c < full.height)})
    emitted: list[pl.DataFrame] = []
    late_rows: list[pl.DataFrame] = []
    frame = keyed_query(
        source.lazy().with_watermark("ts", delay, on_late=lambda df, _: late_rows.append(df)),
        key,
    )

    def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
        return frame.foreach_batch(
            lambda df, batch_id: emitted.append(df),
            output_mode=mode,  # type: ignore[arg-type]
            trigger=trigger,
            checkpoint=f"memory://{name}",
        )

    query = start(None)
    try:
        for a, b in itertools.pairwise(bounds):
            source.add_data(full.slice(a, b - a))
            query.process_all_available(timeout=30)
    finally:
        query.stop()
    query = start(ms.Trigger.available_now(flush=True))
    assert query.await_termination(timeout=60)
    late = (
        pl.concat(late_rows)
        if late_rows
        else pl.DataFrame(schema={**full.schema, "late_watermark": pl.Datetime("us")})
    )
    return emitted, late, query


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# a row after the watermark, in the minute the watermark is in: on time, never dropped
@example(data=[(10, "a", 1), (20, "a", 2), (70, "b", 4)], cuts=[1], key="truncate",
         delay="0s", mode="append")  # fmt: skip
@given(
    data=events,
    cuts=st.lists(st.integers(0, 40), max_size=6),
    key=st.sampled_from(sorted(KEYS)),
    delay=st.sampled_from(["0s", "15s", "1m"]),
    mode=st.sampled_from(["append", "update"]),
)
def test_stream_equals_batch_minus_late_rows(
    data: list[tuple[int, str, int]], cuts: list[int], key: str, delay: str, mode: str
) -> None:
    full = pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=s) for s, _, _ in data],
            "k": [k for _, k, _ in data],
            "v": [v for *_, v in data],
        },
        schema=SCHEMA,
    ).with_row_index("id")
    emitted, late, query = run_keyed(full, cuts, key, delay, mode)
    got = pl.concat(emitted) if emitted else pl.DataFrame()
    if mode == "append":
        assert got.select("g", "k").is_duplicated().sum() == 0  # each group once
    else:  # the last row emitted per group is its result
        got = got.group_by("g", "k", maintain_order=True).last()
    kept = full.join(late.select("id"), on="id", how="anti")
    expected = keyed_query(kept.lazy(), key).collect()
    assert_frame_equal(
        got.sort("g", "k"), expected.select(got.columns).sort("g", "k"), check_dtypes=False
    )
    # only rows behind the watermark were dropped, and the flush left no state behind
    assert (late["ts"] <= late["late_watermark"]).all()
    assert state_rows(query) == 0


# -- (b) the warning --------------------------------------------------------------------


def growing_queries(source: ms.MemoryStream) -> dict[str, tuple[ms.StreamFrame, str, str]]:
    frame = source.lazy()
    marked = frame.with_watermark("ts", "1m")
    return {
        "global group_by": (frame.group_by("k").agg(pl.len()), "update", "state_ttl="),
        "hour of day": (
            marked.with_columns(h=pl.col("ts").dt.hour()).group_by("h").agg(pl.len()),
            "update",
            "Truncate before with_watermark",
        ),
        "unwatermarked window": (
            frame.group_by_dynamic("ts", every="1m").agg(pl.len()),
            "update",
            "add with_watermark('ts', delay)",
        ),
        "complete mode": (
            marked.group_by_dynamic("ts", every="1m").agg(pl.len()),
            "complete",
            "output_mode='append' or 'update'",
        ),
        "unique without time": (frame.unique(subset="k"), "append", "within="),
        "session without watermark": (
            frame.group_by_session("ts", gap="1m").agg(pl.len()),
            "update",
            "add with_watermark('ts', delay)",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "global group_by",
        "hour of day",
        "unwatermarked window",
        "complete mode",
        "unique without time",
        "session without watermark",
    ],
)
def test_growing_state_warns_at_start_naming_the_operator_and_the_fix(case: str, name: str) -> None:
    frame, mode, fix = growing_queries(ms.MemoryStream(SCHEMA))[case]
    with pytest.warns(ms.UnboundedStateWarning) as record:
        query = frame.sink_memory(name, output_mode=mode)  # type: ignore[arg-type]
    query.stop()
    (warning,) = record.list
    message = str(warning.message)
    assert message.startswith("state can only grow: ")
    assert frame.plan.stateful_nodes()[-1].describe() in message
    assert fix in message
    assert warning.filename == __file__  # points at the user's sink_* line


@pytest.mark.parametrize(
    "case",
    ["window", "time key", "derived time key", "state_ttl", "unique with time", "unique within"],
)
def test_bounded_state_does_not_warn(case: str, name: str) -> None:
    marked = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "1m")
    frame, mode = {
        "window": (marked.group_by_dynamic("ts", every="1m").agg(pl.len()), "append"),
        "time key": (marked.group_by("ts", "k").agg(pl.len()), "update"),
        "derived time key": (hourly(ms.MemoryStream(SCHEMA).lazy()), "append"),
        "state_ttl": (marked.group_by("k", state_ttl="1h").agg(pl.len()), "complete"),
        "unique with time": (marked.unique(subset=["k", "ts"]), "append"),
        "unique within": (marked.unique(subset="k", within="1h"), "append"),
    }[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ms.UnboundedStateWarning)
        frame.sink_memory(name, output_mode=mode).stop()  # type: ignore[arg-type]


def test_the_warning_can_be_filtered(name: str) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().group_by("k").agg(pl.len())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=ms.UnboundedStateWarning)
        frame.sink_memory(name, output_mode="update").stop()
    assert [w for w in record if issubclass(w.category, ms.UnboundedStateWarning)] == []
    assert issubclass(ms.UnboundedStateWarning, UserWarning)


# -- (c) state_ttl ----------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The batch timestamps: the engine's wall clock, set by the test (seconds)."""
    now = [1_700_000_000.0]
    fake = types.SimpleNamespace(**{n: getattr(execution.time, n) for n in dir(execution.time)})
    fake.time = lambda: now[0]
    monkeypatch.setattr(execution, "time", fake)
    yield now


def ttl_query(source: ms.MemoryStream, name: str, mode: str) -> ms.StreamingQuery:
    frame = source.lazy().group_by("k", state_ttl="10s").agg(n=pl.len(), total=pl.col("v").sum())
    return frame.sink_memory(name, output_mode=mode, checkpoint=f"memory://{name}")  # type: ignore[arg-type]


def add(source: ms.MemoryStream, query: ms.StreamingQuery, *rows: tuple[str, int]) -> None:
    source.add_data({"ts": [T0] * len(rows), "k": [k for k, _ in rows], "v": [v for _, v in rows]})
    query.process_all_available(timeout=30)


def test_state_ttl_forgets_idle_keys_in_update_mode(clock: list[float], name: str) -> None:
    source = ms.MemoryStream(SCHEMA)
    query = ttl_query(source, name, "update")
    try:
        add(source, query, ("a", 1), ("b", 2))  # t=0
        clock[0] += 6
        add(source, query, ("b", 4))  # t=6: b's clock restarts
        clock[0] += 5
        add(source, query, ("c", 8))  # t=11: a (last 0) expired before this batch
        assert query.state().sort("k").get_column("k").to_list() == ["b", "c"]
        clock[0] += 5
        add(source, query, ("a", 16), ("b", 32))  # t=16: b (last 6) expired; a starts anew
    finally:
        query.stop()
    assert ms.table(name).rows() == [
        ("a", 1, 1), ("b", 1, 2),
        ("b", 2, 6),
        ("c", 1, 8),
        ("a", 1, 16), ("b", 1, 32),
    ]  # fmt: skip
    removed = [p.state_operators[0].num_rows_removed for p in query.recent_progress]
    # each expired key counted once, in the batch that forgot it: the data batch, or a no-data
    # batch the trigger loop ran for the expiry when the test moved the clock while it was idle
    assert removed[:2] == [0, 0] and sorted(removed[2:]) == [0] * (len(removed) - 4) + [1, 1]


def test_state_ttl_in_complete_mode_expires_without_new_rows(clock: list[float], name: str) -> None:
    source = ms.MemoryStream(SCHEMA)
    query = ttl_query(source, name, "complete")
    try:
        add(source, query, ("a", 1), ("b", 2))
        clock[0] += 8
        add(source, query, ("b", 4))
        assert ms.table(name).rows() == [("a", 1, 1), ("b", 2, 6)]
        clock[0] += 3  # a is 11s idle: a batch runs without rows and drops it
        query.process_all_available(timeout=30)
        assert ms.table(name).rows() == [("b", 2, 6)]
        assert query.last_progress is not None and query.last_progress.num_input_rows == 0
        clock[0] += 10
        query.process_all_available(timeout=30)
        assert ms.table(name).rows() == []
        assert query.state().height == 0
    finally:
        query.stop()


def test_state_ttl_rerun_batch_forgets_the_same_keys(clock: list[float], name: str) -> None:
    """The batch's timestamp is logged before it runs: after a crash it is re-run with
    the same timestamp, whatever the clock says then."""
    source = ms.MemoryStream(SCHEMA)
    query = ttl_query(source, name, "update")
    add(source, query, ("a", 1))
    clock[0] += 20
    add(source, query, ("b", 2))  # forgets a at t=20
    query.stop()
    logged = ms.Checkpoint(f"memory://{name}").read_offsets(1).batch_timestamp_ms
    assert logged == int(clock[0] * 1000)
    state_after = ms.read_state(f"memory://{name}", version=1).get_column("k").to_list()
    assert state_after == ["b"]


def test_state_ttl_options_are_checked(name: str) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy()
    with pytest.raises(ms.PlanError, match="state_ttl must be positive"):
        frame.group_by("k", state_ttl="0s")
    with pytest.raises(ms.PlanError, match="output_mode='append' emits a group only when"):
        frame.with_watermark("ts", "1m").group_by("ts", state_ttl="1h").agg(pl.len()).sink_memory(
            name
        )
    with pytest.raises(ms.PlanError, match="give map_groups_with_state its own state_ttl"):
        frame.group_by("k", state_ttl="1h").map_groups_with_state(
            lambda key, rows, state: None, state_schema={"n": pl.Int64}, output_schema={}
        )


def test_explain_says_how_state_is_evicted() -> None:
    source = ms.MemoryStream(SCHEMA)
    lines = hourly(source.lazy()).plan.explain_lines()
    assert lines[1] == (
        "  · state evicted when hour < col('ts').dt.truncate([\"1h\"]) at the first instant "
        "after the watermark (an event-time key)"
    )
    ttl = source.lazy().group_by("k", state_ttl="90s").agg(pl.len()).plan.explain_lines()
    assert ttl[1] == (
        "  · a key not updated for 1m30s of batch timestamps is removed (state_ttl, "
        "processing time)"
    )
