"""``group_by(...).map_groups_with_state`` / ``map_batches_with_state``: exact rows, timers, TTL,
restarts and crashes, typed state, and the failure paths."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import microstream as ms
from microstream._typing import OutputMode
from microstream.checkpoint.log import Checkpoint
from tests.stateful_fn_pipeline import SCHEMA as LOGIN_SCHEMA
from tests.stateful_fn_pipeline import login_alerts, oracle

T0 = datetime(2024, 1, 1)
EVENTS = pl.Schema({"ts": pl.Datetime("us"), "k": pl.String(), "v": pl.Int64()})
PIPELINE = Path(__file__).with_name("stateful_fn_pipeline.py")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def events(*items: tuple[float, str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [at(s) for s, _, _ in items],
            "k": [k for _, k, _ in items],
            "v": [v for *_, v in items],
        },
        schema=EVENTS,
    )


Emitted = dict[int, list[tuple[Any, ...]]]


def run(
    build: Callable[[ms.StreamFrame], ms.StreamFrame],
    batches: list[pl.DataFrame],
    checkpoint: str,
    *,
    source: ms.MemoryStream | None = None,
    output_mode: OutputMode = "append",
    emitted: Emitted | None = None,
) -> tuple[ms.StreamingQuery, Emitted]:
    """Feed ``batches`` one by one (each then processed); the rows emitted per batch id."""
    source = source or ms.MemoryStream(batches[0].schema)
    out: Emitted = {} if emitted is None else emitted

    def collect(df: pl.DataFrame, batch_id: int) -> None:
        out[batch_id] = df.rows()

    query = build(source.lazy()).foreach_batch(
        collect, output_mode=output_mode, checkpoint=checkpoint
    )
    try:
        for batch in batches:
            source.add_data(batch)
            query.process_all_available(timeout=30)
    finally:
        query.stop()
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]
    return query, out


def flat(out: Emitted) -> list[tuple[Any, ...]]:
    return [row for batch_id in sorted(out) for row in out[batch_id]]


# -- a per-device state machine (pydantic state, event-time timers) ----------------------------


class Device(BaseModel):
    status: str
    since: datetime
    errors: int = 0


TRANSITIONS = pl.Schema(
    {
        "device": pl.String(),
        "from_status": pl.String(),
        "to_status": pl.String(),
        "at": pl.Datetime("us"),
        "errors": pl.Int64(),
    }
)
STATUS = pl.Schema({"ts": pl.Datetime("us"), "device": pl.String(), "status": pl.String()})
OFFLINE_AFTER = timedelta(minutes=1)


def device_machine(
    key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Device]
) -> pl.DataFrame:
    """Emit each status change; 'offline' when a device is silent for a minute of event time."""
    out: list[tuple[Any, ...]] = []
    current = state.get()
    if state.has_timed_out:  # state.timer: the timer that fired
        assert current is not None and rows.height == 0
        out.append((key[0], current.status, "offline", state.timer, current.errors))
        state.remove()
        return pl.DataFrame(out, schema=TRANSITIONS, orient="row")
    for ts, status in rows.select("ts", "status").iter_rows():
        if current is None:
            current = Device(status=status, since=ts)
            out.append((key[0], None, status, ts, 0))
            continue
        current.errors += status == "error"
        if status != current.status:
            out.append((key[0], current.status, status, ts, current.errors))
            current.status, current.since = status, ts
    assert current is not None
    state.update(current)
    last = rows.get_column("ts").max()
    assert isinstance(last, datetime)
    state.set_event_time_timer(last + OFFLINE_AFTER)
    return pl.DataFrame(out, schema=TRANSITIONS, orient="row")


def devices(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", "10s")
        .group_by("device")
        .map_groups_with_state(
            device_machine, state_schema=Device, output_schema=TRANSITIONS, timeout="event_time"
        )
    )


def status(*items: tuple[float, str, str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [at(s) for s, _, _ in items],
            "device": [d for _, d, _ in items],
            "status": [x for *_, x in items],
        },
        schema=STATUS,
    )


def test_device_state_machine_exact_rows(name: str) -> None:
    query, out = run(
        devices,
        [
            status(
                (0, "d1", "on"), (5, "d2", "on"), (3, "d1", "error")
            ),  # sorted: d1 on@0, error@3
            status((20, "d1", "on"), (15, "d1", "error")),  # out of order within the batch
            status((40, "d2", "off"), (2, "d2", "error")),  # 2 <= wm 10s: late, dropped
            status((200, "d3", "on")),  # wm 190s: d1 (timer 80s) and d2 (100s) go offline
        ],
        f"memory://{name}/cp",
    )
    assert flat(out) == [
        ("d1", None, "on", at(0), 0),
        ("d1", "on", "error", at(3), 1),
        ("d2", None, "on", at(5), 0),
        ("d1", "error", "on", at(20), 2),  # error@15 is no change (already error), counted
        ("d2", "on", "off", at(40), 0),
        ("d3", None, "on", at(200), 0),
        ("d1", "on", "offline", at(80), 2),
        ("d2", "off", "offline", at(100), 0),
    ]
    progress = query.recent_progress
    assert sum(p.state_operators[0].num_rows_dropped_late for p in progress) == 1
    # only d3 is left, with its timer a minute after its last event
    state = query.state()
    assert state.select("device", "status", "errors", "timer_us").rows() == [
        ("d3", "on", 0, int((at(260) - datetime(1970, 1, 1)).total_seconds() * 1_000_000))
    ]


def test_event_time_timers_fire_when_the_watermark_reaches_them(name: str) -> None:
    fired: list[tuple[int, datetime | None, datetime | None]] = []

    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]) -> None:
        if state.has_timed_out:
            fired.append((state.get()["n"], state.watermark, state.timer))  # type: ignore[index]
            state.remove()
            return
        if key == ("a",):
            state.update({"n": rows.height})
            state.set_event_time_timer(at(20))

    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by("k")
            .map_groups_with_state(
                fn,
                state_schema={"n": pl.Int64()},
                output_schema={"k": pl.String()},
                timeout="event_time",
            )
        )

    source = ms.MemoryStream(EVENTS)
    query = frame_fn(source.lazy()).foreach_batch(
        lambda df, b: None, checkpoint=f"memory://{name}/cp"
    )
    batch_of_fire: list[int] = []
    for batch in [events((10, "a", 1)), events((19, "z", 0)), events((20, "z", 0))]:
        source.add_data(batch)
        query.process_all_available(timeout=30)
        batch_of_fire.append(len(fired))
    query.stop()
    # wm 10s, then 19s: not yet; the no-data batch with wm 20s (== the timer) fires it
    assert batch_of_fire == [0, 0, 1]
    assert fired == [(1, at(20), at(20))]  # the watermark, and the timer that fired
    watermarks = [p.watermark for p in query.recent_progress if p.num_input_rows == 0]
    assert watermarks[-1] is not None and watermarks[-1].replace(tzinfo=None) == at(20)


# -- a sessionisation rule (Polars-schema state) ------------------------------------------------

CLICKS = pl.Schema({"ts": pl.Datetime("us"), "user": pl.String(), "page": pl.String()})
SESSIONS = pl.Schema(
    {
        "user": pl.String(),
        "start": pl.Datetime("us"),
        "end": pl.Datetime("us"),
        "clicks": pl.Int64(),
        "reason": pl.String(),
    }
)
GAP = timedelta(seconds=30)


def sessionise(
    key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]
) -> pl.DataFrame:
    """A session ends at a 'logout' click or after 30 s without clicks (event time)."""
    out: list[tuple[Any, ...]] = []
    session = state.get()
    if state.has_timed_out:
        assert session is not None
        out.append((key[0], session["start"], session["last"], session["clicks"], "timeout"))
        state.remove()
        return pl.DataFrame(out, schema=SESSIONS, orient="row")
    for ts, page in rows.select("ts", "page").iter_rows():
        if session is not None and ts - session["last"] > GAP:
            out.append((key[0], session["start"], session["last"], session["clicks"], "gap"))
            session = None
        if session is None:
            session = {"start": ts, "last": ts, "clicks": 0}
        session = {**session, "last": ts, "clicks": session["clicks"] + 1}
        if page == "logout":
            out.append((key[0], session["start"], ts, session["clicks"], "logout"))
            session = None
    if session is None:
        state.remove()
    else:
        state.update(session)
        state.set_event_time_timer(session["last"] + GAP)
    return pl.DataFrame(out, schema=SESSIONS, orient="row")


def sessions(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", "5s")
        .group_by("user")
        .map_groups_with_state(
            sessionise,
            state_schema={
                "start": pl.Datetime("us"),
                "last": pl.Datetime("us"),
                "clicks": pl.Int64(),
            },
            output_schema=SESSIONS,
            timeout="event_time",
        )
    )


def clicks(*items: tuple[float, str, str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [at(s) for s, _, _ in items],
            "user": [u for _, u, _ in items],
            "page": [p for *_, p in items],
        },
        schema=CLICKS,
    )


SESSION_BATCHES = [
    clicks((0, "u1", "home"), (10, "u1", "cart"), (12, "u2", "home")),
    clicks((20, "u1", "logout"), (25, "u2", "item")),  # u1: logout ends [0, 20]
    clicks((30, "u1", "home"), (90, "u2", "home")),  # u2: 90 - 25 > 30: gap ends [12, 25]
    clicks((200, "u3", "home")),  # wm 195: u1 (timer 60) and u2 (120) time out
]
SESSION_ROWS = [
    ("u1", at(0), at(20), 3, "logout"),
    ("u2", at(12), at(25), 2, "gap"),
    ("u1", at(30), at(30), 1, "timeout"),
    ("u2", at(90), at(90), 1, "timeout"),
]


def test_sessionisation_rule_exact_rows(name: str) -> None:
    _, out = run(sessions, SESSION_BATCHES, f"memory://{name}/cp")
    assert flat(out) == SESSION_ROWS


def test_state_survives_a_restart_like_an_uninterrupted_run(name: str) -> None:
    _, whole = run(sessions, SESSION_BATCHES, f"memory://{name}/whole")
    source = ms.MemoryStream(CLICKS)
    parts: Emitted = {}
    checkpoint = f"memory://{name}/parts"
    run(sessions, SESSION_BATCHES[:2], checkpoint, source=source, emitted=parts)
    before = ms.read_state(checkpoint)
    assert before.select("user", "clicks").rows() == [("u2", 2)]
    run(sessions, SESSION_BATCHES[2:], checkpoint, source=source, emitted=parts)
    assert parts == whole


# -- processing time and TTL ----------------------------------------------------------------


def wait_for(condition: Callable[[], bool], query: ms.StreamingQuery, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        query.process_all_available(timeout=30)
        time.sleep(0.02)


PT_OUT = pl.Schema({"k": pl.String(), "what": pl.String(), "batch_ms": pl.Int64()})


def test_processing_time_timers_fire_at_the_first_batch_at_or_after_them(name: str) -> None:
    def fn(
        key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]
    ) -> pl.DataFrame:
        batch_ms = int(state.batch_time.timestamp() * 1000)
        if state.has_timed_out:
            state.remove()
            return pl.DataFrame([(key[0], "fired", batch_ms)], schema=PT_OUT, orient="row")
        state.update({"n": rows.height})
        state.set_processing_time_timer(300 if key == ("a",) else "1h")
        return pl.DataFrame([(key[0], "set", batch_ms)], schema=PT_OUT, orient="row")

    source = ms.MemoryStream(EVENTS)
    got: Emitted = {}
    query = (
        source.lazy()
        .group_by("k")
        .map_groups_with_state(
            fn, state_schema={"n": pl.Int64()}, output_schema=PT_OUT, timeout="processing_time"
        )
        .foreach_batch(
            lambda df, b: got.__setitem__(b, df.rows()), checkpoint=f"memory://{name}/cp"
        )
    )
    source.add_data(events((0, "a", 1), (0, "b", 1)))
    query.process_all_available(timeout=30)
    wait_for(lambda: any(r[1] == "fired" for rows in got.values() for r in rows), query)
    query.stop()
    rows = flat(got)
    assert [(k, what) for k, what, _ in rows] == [("a", "set"), ("b", "set"), ("a", "fired")]
    set_ms, fired_ms = rows[0][2], rows[2][2]
    assert fired_ms >= set_ms + 300
    # ... and no batch in between was already at the timer: the first one at or after it fired
    stamps = {p.batch_id: p.batch_timestamp_ms for p in query.recent_progress}
    fired_batch = next(b for b, rs in got.items() if rs and rs[0][1] == "fired")
    assert stamps[fired_batch] == fired_ms
    assert all(stamps[b] < set_ms + 300 for b in stamps if b < fired_batch)
    # b's timer (1h) is still pending
    assert query.state().select("k").rows() == [("b",)]


def test_a_rerun_batch_judges_processing_timers_by_its_logged_time(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch re-run after a crash decides as the first run did, however late it runs."""
    fired_in: list[int] = []

    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]) -> None:
        if state.has_timed_out:
            fired_in.append(-1)
            state.remove()
        elif key == ("a",):
            state.update({"n": 1})
            state.set_processing_time_timer("1500ms")

    def start(source: ms.MemoryStream) -> ms.StreamingQuery:
        return (
            source.lazy()
            .group_by("k")
            .map_groups_with_state(
                fn,
                state_schema={"n": pl.Int64()},
                output_schema={"k": pl.String()},
                timeout="processing_time",
            )
            .foreach_batch(
                lambda df, b: fired_in.append(b) if fired_in and fired_in[-1] == -1 else None,
                checkpoint=f"memory://{name}/cp",
            )
        )

    source = ms.MemoryStream(EVENTS)
    query = start(source)
    source.add_data(events((0, "a", 1)))
    query.process_all_available(timeout=30)
    write_commit = Checkpoint.write_commit

    def crash_at_batch_1(self: Checkpoint, entry: Any) -> None:
        if entry.batch_id == 1:
            raise RuntimeError("simulated crash before commits/1")
        write_commit(self, entry)

    monkeypatch.setattr(Checkpoint, "write_commit", crash_at_batch_1)
    source.add_data(events((0, "b", 1)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        query.process_all_available(timeout=30)
    monkeypatch.setattr(Checkpoint, "write_commit", write_commit)
    logged = Checkpoint(f"memory://{name}/cp").read_offsets(1).batch_timestamp_ms
    time.sleep(1.6)  # now past the timer: a re-run judging by the clock would fire it in batch 1
    query = start(source)
    wait_for(lambda: -1 in fired_in, query)
    query.stop()
    # batch 1 re-ran at its logged time (before the timer): the timer fired in batch 2
    assert fired_in == [-1, 2]
    assert Checkpoint(f"memory://{name}/cp").read_offsets(1).batch_timestamp_ms == logged


def test_state_ttl_removes_keys_left_alone(name: str) -> None:
    seen: list[tuple[str, bool, int]] = []
    checkpoint = f"memory://{name}/cp"

    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]) -> None:
        seen.append((key[0], state.exists, int(state.batch_time.timestamp() * 1000)))
        state.update({"n": (state.get() or {"n": 0})["n"] + rows.height})

    source = ms.MemoryStream(EVENTS)
    query = (
        source.lazy()
        .group_by("k")
        .map_groups_with_state(
            fn, state_schema={"n": pl.Int64()}, output_schema={"k": pl.String()}, state_ttl="1s"
        )
        .foreach_batch(lambda df, b: None, checkpoint=checkpoint)
    )
    source.add_data(events((0, "a", 1), (0, "b", 1)))
    query.process_all_available(timeout=30)
    time.sleep(0.5)
    source.add_data(events((0, "b", 1)))  # b's clock restarts, a's does not
    query.process_all_available(timeout=30)
    # a expires first, in a batch without data; then b, half a second later
    wait_for(lambda: query.state().height == 0, query)
    removals = [
        (p.batch_id, p.batch_timestamp_ms, p.state_operators[0].num_rows_removed)
        for p in query.recent_progress
        if p.state_operators[0].num_rows_removed
    ]
    assert [n for *_, n in removals] == [1, 1]
    (gone_a, at_a, _), (_, at_b, _) = removals
    updated_a, updated_b = seen[0][2], seen[2][2]
    assert at_a >= updated_a + 1000 and at_b >= updated_b + 1000
    assert ms.read_state(checkpoint, version=gone_a).get_column("k").to_list() == ["b"]
    assert [(k, exists) for k, exists, _ in seen] == [("a", False), ("b", False), ("b", True)]
    source.add_data(events((1, "a", 1)))
    query.process_all_available(timeout=30)
    query.stop()
    assert seen[-1][:2] == ("a", False)  # a starts over


# -- typed state ------------------------------------------------------------------------------


class Point(BaseModel):
    x: int
    label: str | None = None


class Track(BaseModel):
    points: list[Point] = []
    first: Point | None = None
    total: float = 0.0


def test_pydantic_state_is_stored_as_columns_and_read_back(name: str) -> None:
    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Track]) -> None:
        track = state.get() or Track()
        for v in rows.get_column("v"):
            track.points.append(Point(x=v, label=f"p{v}"))
            track.first = track.first or Point(x=v)
            track.total += v
        state.update(track)

    checkpoint = f"memory://{name}/cp"
    run(
        lambda f: f.group_by("k").map_groups_with_state(
            fn, state_schema=Track, output_schema={"k": pl.String()}
        ),
        [events((0, "a", 1), (0, "a", 2)), events((0, "a", 3))],
        checkpoint,
    )
    state = ms.read_state(checkpoint)
    assert state.schema["points"] == pl.List(pl.Struct({"x": pl.Int64(), "label": pl.String()}))
    assert state.schema["first"] == pl.Struct({"x": pl.Int64(), "label": pl.String()})
    assert state.select("k", "points", "first", "total", "has_state").rows() == [
        (
            "a",
            [{"x": 1, "label": "p1"}, {"x": 2, "label": "p2"}, {"x": 3, "label": "p3"}],
            {"x": 1, "label": None},
            6.0,
            True,
        )
    ]
    assert Track.model_validate(state.row(0, named=True)).total == 6.0


def test_polars_schema_state_is_a_dict_and_validated(name: str) -> None:
    got: list[Any] = []

    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]) -> None:
        got.append(state.get())
        state.update(pl.DataFrame({"n": [rows.height], "tags": [[key[0]]]}))

    run(
        lambda f: f.group_by("k").map_groups_with_state(
            fn,
            state_schema={"n": pl.Int32(), "tags": pl.List(pl.String())},
            output_schema={"k": pl.String()},
        ),
        [events((0, "a", 1)), events((0, "a", 2), (0, "a", 3))],
        f"memory://{name}/cp",
    )
    assert got == [None, {"n": 1, "tags": ["a"]}]


# -- the vectorised variant -------------------------------------------------------------------

SUMS = pl.Schema({"k": pl.String(), "kind": pl.String(), "total": pl.Int64(), "n": pl.Int64()})
SUM_STATE = pl.Schema({"total": pl.Int64(), "n": pl.Int64(), "last": pl.Datetime("us")})
QUIET = timedelta(seconds=10)


def sums_per_key(
    key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]
) -> pl.DataFrame:
    s = state.get()
    if state.has_timed_out:
        assert s is not None
        state.remove()
        return pl.DataFrame([(key[0], "final", s["total"], s["n"])], schema=SUMS, orient="row")
    s = s or {"total": 0, "n": 0, "last": rows.get_column("ts").max()}
    s = {
        "total": s["total"] + rows.get_column("v").sum(),
        "n": s["n"] + rows.height,
        "last": max(s["last"], rows.get_column("ts").max()),
    }
    state.update(s)
    state.set_event_time_timer(s["last"] + QUIET)
    return pl.DataFrame([(key[0], "update", s["total"], s["n"])], schema=SUMS, orient="row")


def sums_vectorised(
    rows: pl.DataFrame, state: pl.DataFrame, ctx: ms.StateContext
) -> tuple[pl.DataFrame, pl.DataFrame]:
    if ctx.timed_out:
        out = state.select("k", kind=pl.lit("final"), total="total", n="n")
        return out, state.select("k", _remove=pl.lit(True))
    new = (
        rows.group_by("k")
        .agg(
            pl.col("v").sum(),
            pl.len().cast(pl.Int64()).alias("rows"),
            pl.col("ts").max().alias("max_ts"),
        )
        .join(state, on="k", how="left")
        .select(
            "k",
            total=pl.col("v") + pl.col("total").fill_null(0),
            n=pl.col("rows") + pl.col("n").fill_null(0),
            last=pl.max_horizontal("last", "max_ts"),
        )
        .with_columns(_timer=pl.col("last") + QUIET)
        .sort("k")
    )
    return new.select("k", kind=pl.lit("update"), total="total", n="n"), new


def with_sums(
    function: Callable[..., Any], vectorised: bool
) -> Callable[[ms.StreamFrame], ms.StreamFrame]:
    def build(frame: ms.StreamFrame) -> ms.StreamFrame:
        grouped = frame.with_watermark("ts", "5s").group_by("k")
        verb = grouped.map_batches_with_state if vectorised else grouped.map_groups_with_state
        return verb(function, state_schema=SUM_STATE, output_schema=SUMS, timeout="event_time")

    return build


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 60), st.sampled_from(["a", "b", "c"]), st.integers(0, 9)),
        min_size=1,
        max_size=25,
    ),
    cuts=st.lists(st.integers(0, 25), max_size=4),
)
def test_vectorised_variant_equals_per_key(
    name: str, rows: list[tuple[int, str, int]], cuts: list[int]
) -> None:
    data = events(*rows)
    bounds = sorted({0, len(rows), *(c for c in cuts if c < len(rows))})
    batches = [data[a:b] for a, b in itertools.pairwise(bounds)] + [events((1000, "z", 0))]
    suffix = uuid.uuid4().hex[:8]
    _, per_key = run(with_sums(sums_per_key, False), batches, f"memory://{name}/{suffix}/k")
    _, vectorised = run(with_sums(sums_vectorised, True), batches, f"memory://{name}/{suffix}/v")
    assert {b: sorted(r) for b, r in per_key.items()} == {
        b: sorted(r) for b, r in vectorised.items()
    }
    # every key that got a state (rows not all late) is finally emitted: once per quiet
    # spell (a key whose timer fired can start again with later rows, and end again)
    finals = [r[0] for r in flat(per_key) if r[1] == "final"]
    assert set(finals) == {r[0] for r in flat(per_key) if r[1] == "update"} - {"z"}


# -- a complex-event pattern (tests/stateful_fn_pipeline.py) -----------------------------------


def logins(*items: tuple[float, str, bool]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [at(s) for s, _, _ in items],
            "user": [u for _, u, _ in items],
            "ok": [ok for *_, ok in items],
        },
        schema=LOGIN_SCHEMA,
    )


LOGIN_BATCHES = [
    # alice's success arrives before the failures that precede it in event time
    logins((30, "alice", True), (0, "carol", False), (5, "carol", False)),
    logins((20, "alice", False), (0, "alice", False), (10, "alice", False), (15, "carol", False)),
    logins((10, "carol", False), (50, "carol", True), (0, "bob", False), (40, "bob", False)),
    logins((70, "bob", False), (75, "bob", True), (0, "dave", False), (10, "dave", False)),
    logins((20, "dave", True), (30, "dave", False), (40, "dave", False), (50, "dave", False)),
    logins((55, "dave", True), (95, "erin", False), (100, "erin", False), (100, "erin", False)),
    logins((100, "erin", True)),  # failures first at the same instant: alert
    logins((100_000, "sentinel", True)),  # moves the watermark past everything
]
LOGIN_ALERTS = [
    ("alice", at(0), at(30)),  # 3 failures 0, 10, 20 then success 30
    ("carol", at(5), at(50)),  # the last three of 0, 5, 10, 15: 50 - 5 <= 1 min
    ("dave", at(30), at(55)),  # 0, 10 then success: too few; 30, 40, 50 then 55
    ("erin", at(95), at(100)),
]  # bob: 0, 40, 70 then 75: 75 s > 1 min


def alert_rows(out: Emitted) -> list[tuple[Any, ...]]:
    return sorted(flat(out))


def test_login_pattern_exact_alerts(name: str) -> None:
    _, out = run(login_alerts, LOGIN_BATCHES, f"memory://{name}/cp")
    assert alert_rows(out) == LOGIN_ALERTS == oracle(pl.concat(LOGIN_BATCHES[:-1]))


def test_login_pattern_across_a_restart(name: str) -> None:
    _, whole = run(login_alerts, LOGIN_BATCHES, f"memory://{name}/whole")
    source, checkpoint = ms.MemoryStream(LOGIN_SCHEMA), f"memory://{name}/parts"
    parts: Emitted = {}
    for start, end in ((0, 3), (3, 5), (5, len(LOGIN_BATCHES))):
        run(login_alerts, LOGIN_BATCHES[start:end], checkpoint, source=source, emitted=parts)
    assert parts == whole


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_login_pattern_equals_the_oracle_for_any_split_and_order(
    name: str, data: st.DataObject
) -> None:
    everything = pl.concat(LOGIN_BATCHES[:-1])
    order = data.draw(st.permutations(range(everything.height)))
    cuts = data.draw(st.lists(st.integers(1, everything.height - 1), max_size=6))
    shuffled = everything[list(order)]
    bounds = sorted({0, everything.height, *cuts})
    batches = [shuffled[a:b] for a, b in itertools.pairwise(bounds)] + LOGIN_BATCHES[-1:]
    suffix = uuid.uuid4().hex[:8]
    _, out = run(lambda f: login_alerts(f, delay="10m"), batches, f"memory://{name}/{suffix}")
    assert alert_rows(out) == LOGIN_ALERTS


# -- crashes: SIGKILL at fault points, restart, identical output -------------------------------

LOGIN_FILES = [
    LOGIN_BATCHES[0],
    LOGIN_BATCHES[1],
    pl.concat(LOGIN_BATCHES[2:4]),
    LOGIN_BATCHES[4],
    pl.concat(LOGIN_BATCHES[5:7]),
]


def write_login_files(directory: Path) -> Path:
    directory.mkdir(parents=True)
    mtime = time.time() - 100
    for i, frame in enumerate(LOGIN_FILES):
        path = directory / f"part-{i:03d}.parquet"
        frame.write_parquet(path)
        os.utime(path, (mtime + i, mtime + i))
    return directory


def run_login_pipeline(root: Path, source: Path, fault: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MICROSTREAM_FAULTS"}
    if fault is not None:
        env["MICROSTREAM_FAULTS"] = fault
    root.mkdir(parents=True, exist_ok=True)
    args = ["--input", str(source), "--output", str(root / "out"), "--checkpoint", str(root / "cp")]
    done = subprocess.run(
        [sys.executable, str(PIPELINE), *args],
        check=False,
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, -9), done.stderr
    return done.returncode


def outputs(root: Path) -> dict[int, list[tuple[Any, ...]]]:
    return {
        int(p.stem): pl.read_parquet(p).rows() for p in sorted((root / "out").glob("*.parquet"))
    }


@pytest.mark.integration
def test_sigkill_at_fault_points_then_restart_gives_identical_alerts(tmp_path: Path) -> None:
    source = write_login_files(tmp_path / "in")
    clean = tmp_path / "clean"
    assert run_login_pipeline(clean, source) == 0
    expected = outputs(clean)
    assert sorted(r for rows in expected.values() for r in rows) == oracle(pl.concat(LOGIN_FILES))
    states = committed_states(clean)
    assert len(states) == len(expected) and any(s.height for s in states.values())
    for fault in ("batch.after_sink@3", "batch.before_commit@4", "batch.after_commit@2"):
        root = tmp_path / fault.replace("@", "-")
        assert run_login_pipeline(root, source, fault) == -9, fault
        assert run_login_pipeline(root, source) == 0, fault
        assert outputs(root) == expected, fault
        got = committed_states(root)
        assert got.keys() == states.keys(), fault
        for version, state in states.items():
            assert got[version].equals(state), (fault, version)


def committed_states(root: Path) -> dict[int, pl.DataFrame]:
    """The state after every committed batch (the time of the last change left out)."""
    last = Checkpoint(str(root / "cp")).latest_commit()
    assert last is not None
    return {
        v: ms.read_state(root / "cp", version=v).drop("updated_at_ms").sort("user")
        for v in range(last.batch_id + 1)
    }


# -- plan-time checks and failure paths -------------------------------------------------------


def noop(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Any]) -> None:
    return None


def test_complete_mode_is_refused() -> None:
    frame = (
        ms.MemoryStream(EVENTS)
        .lazy()
        .group_by("k")
        .map_groups_with_state(
            noop, state_schema={"n": pl.Int64()}, output_schema={"k": pl.String()}
        )
    )
    with pytest.raises(ms.PlanError, match="'append' and 'update'"):
        frame.sink_memory("never", output_mode="complete")


def test_event_time_timeout_needs_a_watermark() -> None:
    with pytest.raises(ms.PlanError, match="needs with_watermark"):
        ms.MemoryStream(EVENTS).lazy().group_by("k").map_groups_with_state(
            noop,
            state_schema={"n": pl.Int64()},
            output_schema={"k": pl.String()},
            timeout="event_time",
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"state_schema": {"k": pl.Int64()}}, "clash with the group keys"),
        ({"state_schema": dict}, "pydantic model class or a Polars schema"),
        ({"timeout": "wall_clock"}, "timeout must be None"),
        ({"state_ttl": "soon"}, "state_ttl must be a duration"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "state_schema": {"n": pl.Int64()},
        "output_schema": {"k": pl.String()},
        **kwargs,
    }
    with pytest.raises((ms.PlanError, ValueError), match=match):
        ms.MemoryStream(EVENTS).lazy().group_by("k").map_groups_with_state(noop, **args)


def test_explain_shows_the_operator() -> None:
    frame = sessions(ms.MemoryStream(CLICKS).lazy())
    lines = frame.plan.explain_lines()
    assert lines[0].startswith("map_groups_with_state(sessionise, keys=['user'], state_schema=")
    assert "  · event-time timers fire when timer <= watermark" in lines
    assert "  · rows with ts <= previous watermark are late" in lines


def failing_query(
    name: str, function: Callable[..., Any], *, vectorised: bool = False, **kwargs: Any
) -> BaseException:
    source = ms.MemoryStream(EVENTS)
    grouped = source.lazy().group_by("k")
    verb = grouped.map_batches_with_state if vectorised else grouped.map_groups_with_state
    query = verb(
        function,
        **{
            "state_schema": {"n": pl.Int64()},
            "output_schema": {"k": pl.String(), "n": pl.Int64()},
            **kwargs,
        },
    ).sink_memory(name)
    source.add_data(events((0, "a", 1), (0, "b", 2)))
    with pytest.raises(ms.MicrostreamError) as info:
        query.process_all_available(timeout=30)
    query.stop()
    return info.value


def test_wrong_output_columns_name_the_operator_and_key(name: str) -> None:
    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Any]) -> pl.DataFrame:
        return pl.DataFrame({"k": [key[0]], "count": [1]})

    error = failing_query(name, fn)
    assert isinstance(error, ms.SchemaMismatchError)
    assert "map_groups_with_state (operator op0) for key ('a',)" in str(error)
    assert "missing ['n'], unexpected ['count']" in str(error)


def test_wrong_output_dtypes_and_types_are_refused(name: str) -> None:
    def text(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Any]) -> pl.DataFrame:
        return pl.DataFrame({"k": [key[0]], "n": ["many"]})

    assert "do not cast to output_schema" in str(failing_query(name, text))

    def listy(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Any]) -> Any:
        return [{"k": key[0], "n": 1}]

    assert "must return a polars DataFrame or None; got list" in str(
        failing_query(name + "2", listy)
    )


def test_state_not_matching_the_schema_names_the_field(name: str) -> None:
    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Any]) -> None:
        state.update({"n": "lots"})

    error = failing_query(name, fn)
    assert isinstance(error, ms.SchemaMismatchError)
    assert "for key ('a',): state.update() the value does not match {'n': Int64}: n:" in str(error)

    def model_fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Any]) -> None:
        state.update(Point(x=1))

    error = failing_query(name + "2", model_fn, state_schema=Track)
    assert "the state is a Track; got a Point instead" in str(error)


def test_timer_without_timeout_is_refused(name: str) -> None:
    def fn(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[Any]) -> None:
        state.set_event_time_timer(at(0))

    assert "needs timeout='event_time'; this operator has timeout=None" in str(
        failing_query(name, fn)
    )


def test_vectorised_new_state_is_checked(name: str) -> None:
    def extra_column(rows: pl.DataFrame, state: pl.DataFrame, ctx: ms.StateContext) -> Any:
        return None, rows.select("k", n="v", oops=pl.lit(1))

    assert "new_state has unexpected columns ['oops']" in str(
        failing_query(name, extra_column, vectorised=True)
    )

    def stranger(rows: pl.DataFrame, state: pl.DataFrame, ctx: ms.StateContext) -> Any:
        return None, pl.DataFrame({"k": ["zz"], "n": [1]})

    assert "keys the function was not called for: [('zz',)]" in str(
        failing_query(name + "2", stranger, vectorised=True)
    )

    def not_a_pair(rows: pl.DataFrame, state: pl.DataFrame, ctx: ms.StateContext) -> Any:
        return rows

    assert "must return (output, new_state)" in str(
        failing_query(name + "3", not_a_pair, vectorised=True)
    )


def test_cli_state_shows_the_functions_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from microstream.cli.main import main

    checkpoint = str(tmp_path / "cp")
    run(sessions, SESSION_BATCHES[:2], checkpoint)
    assert main(["state", checkpoint]) == 0
    printed = capsys.readouterr().out
    assert "op0/state: 1 rows" in printed
    assert "has_state" in printed and "timer_us" in printed and "u2" in printed


def test_composite_and_null_keys_and_timer_only_keys(name: str) -> None:
    schema = pl.Schema({"ts": pl.Datetime("us"), "a": pl.String(), "b": pl.Int64()})
    out_schema = pl.Schema(
        {"a": pl.String(), "b": pl.Int64(), "what": pl.String(), "n": pl.Int64()}
    )

    def fn(
        key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]
    ) -> pl.DataFrame:
        if state.has_timed_out:  # a timer without a state: it was set after remove()
            what, n = f"timer, state {state.exists}", -1
        else:
            what, n = "rows", rows.height
            state.remove()
            last: datetime = rows.get_column("ts").max()  # type: ignore[assignment]
            state.set_event_time_timer(last + timedelta(seconds=5))
        return pl.DataFrame([(*key, what, n)], schema=out_schema, orient="row")

    batch = pl.DataFrame(
        [
            (at(0), "x", 1),
            (at(1), None, 1),
            (at(2), "x", None),
            (at(3), None, None),
            (at(4), "x", 1),
        ],
        schema=schema,
        orient="row",
    )
    _, out = run(
        lambda f: (
            f.with_watermark("ts", "0s")
            .group_by("a", "b")
            .map_groups_with_state(
                fn, state_schema={"n": pl.Int64}, output_schema=out_schema, timeout="event_time"
            )
        ),
        [batch, pl.DataFrame([(at(100), "z", 0)], schema=schema, orient="row")],
        f"memory://{name}/cp",
    )
    assert out[0] == [  # keys in key order, nulls last
        ("x", 1, "rows", 2),
        ("x", None, "rows", 1),
        (None, 1, "rows", 1),
        (None, None, "rows", 1),
    ]
    # timers in timer order: (None, 1) at 6 s, (x, None) 7 s, (None, None) 8 s, (x, 1) 9 s
    fired = [r for b in sorted(out) if b > 0 for r in out[b] if r[2].startswith("timer")]
    assert fired == [
        (None, 1, "timer, state False", -1),
        ("x", None, "timer, state False", -1),
        (None, None, "timer, state False", -1),
        ("x", 1, "timer, state False", -1),
    ]
