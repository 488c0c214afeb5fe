"""Stream-stream joins: exact rows per join type, the batch oracle, eviction, restarts."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.exceptions import PlanError

T0 = datetime(2024, 1, 1)
IMPS = {"ad": pl.Int64, "imp_time": pl.Datetime("us"), "imp": pl.String}
CLICKS = {"ad": pl.Int64, "click_time": pl.Datetime("us"), "click": pl.String}


def t(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def canon(df: pl.DataFrame) -> pl.DataFrame:
    return df.sort(df.columns, nulls_last=True)


def rows(schema: dict[str, Any], *data: tuple[Any, ...]) -> pl.DataFrame:
    return pl.DataFrame(data, schema=schema, orient="row")


class Pair:
    """Two memory streams joined; batches fed side by side, output in memory tables.

    ``restart()`` stops the query and starts it again on the same checkpoint (the
    memory streams keep their data), as a process restart would.
    """

    def __init__(
        self,
        how: str,
        *,
        within: Any = ("0s", "5m"),
        delay: str = "1m",
        checkpoint: str | None = None,
        late: str | None = None,
        then: Any = None,
    ):
        self.imps = ms.MemoryStream(IMPS)
        self.clicks = ms.MemoryStream(CLICKS)
        self.late = late
        left = self.imps.lazy().with_watermark("imp_time", delay, on_late=late)
        right = self.clicks.lazy().with_watermark("click_time", delay, on_late=late)
        frame = left.join(right, on="ad", how=how, within=within)
        self.frame = frame if then is None else then(frame)
        self.checkpoint = checkpoint
        self.names: list[str] = []
        self.query = self._start(None)

    def _start(self, trigger: ms.Trigger | None) -> ms.StreamingQuery:
        self.names.append(f"join_{uuid.uuid4().hex[:8]}")
        return self.frame.sink_memory(self.names[-1], checkpoint=self.checkpoint, trigger=trigger)

    def batch(
        self, imps: list[tuple[Any, ...]] | None = None, clicks: list[tuple[Any, ...]] | None = None
    ) -> None:
        if imps:
            self.imps.add_data(rows(IMPS, *imps))
        if clicks:
            self.clicks.add_data(rows(CLICKS, *clicks))
        self.query.process_all_available()

    def restart(self, trigger: ms.Trigger | None = None) -> None:
        assert self.checkpoint is not None
        self.query.stop()
        self.query = self._start(trigger)
        if trigger is not None:
            self.query.await_termination()

    def output(self) -> pl.DataFrame:
        return pl.concat([ms.table(name) for name in self.names], how="vertical")

    def stop(self) -> None:
        self.query.stop()
        if self.query.exception() is not None:
            raise self.query.exception()  # type: ignore[misc]


def scenario(pair: Pair) -> None:
    """Out-of-order rows on both sides, a late click, a watermark that moves on.

    Bounds [0, 5m], watermark delay 1m. A no-data batch runs whenever the watermark
    moved, so rows expire one batch after the data that moved it:

    - i1 joins c1 (batch 0) and c1b (batch 1, a second click);
    - c4 arrives before its impression i4, which joins it from state;
    - i2 and i3 never match: they expire when the watermark reaches 9m;
    - the click at 0.5m arrives when lateness is judged by 9m: dropped;
    - c2 (21m, 20 minutes after i2) expires unmatched when the watermark reaches 29m;
    - i9 joins c9; both are still in state at the end.
    """
    pair.batch(imps=[(1, t(0), "i1"), (2, t(1), "i2"), (3, t(2), "i3")], clicks=[(1, t(3), "c1")])
    pair.batch(clicks=[(4, t(12), "c4"), (1, t(4), "c1b")])
    pair.batch(imps=[(4, t(10), "i4")], clicks=[(2, t(21), "c2")])
    pair.batch(imps=[(9, t(30), "i9")], clicks=[(3, t(0.5), "late")])
    pair.batch(clicks=[(9, t(33), "c9")])


def test_inner_join_exact_rows() -> None:
    pair = Pair("inner")
    scenario(pair)
    pair.stop()
    expected = rows(
        {**IMPS, "click_time": pl.Datetime("us"), "click": pl.String},
        (1, t(0), "i1", t(3), "c1"),
        (1, t(0), "i1", t(4), "c1b"),
        (4, t(10), "i4", t(12), "c4"),
        (9, t(30), "i9", t(33), "c9"),
    )
    assert_frame_equal(canon(pair.output()), canon(expected))


def test_late_rows_are_dropped_counted_and_routed() -> None:
    late = f"late_{uuid.uuid4().hex[:8]}"
    pair = Pair("inner", late=late)
    pair.batch(imps=[(1, t(10), "i1")], clicks=[(1, t(11), "c1")])
    pair.batch(imps=[(5, t(12), "i5")], clicks=[(5, t(12), "c5")])
    # a no-data batch follows (the watermark moved to 11m); the next data batch judges
    # lateness by 11m: the impression at 9m and the click at 8m are late, the click at
    # 12m is not and matches i1 (10m), still in state (10m + 5m > 11m)
    pair.batch(imps=[(1, t(9), "late-imp")], clicks=[(1, t(8), "late-click"), (1, t(12), "ok")])
    pair.stop()
    out = pair.output()
    assert sorted(out.get_column("click").to_list()) == ["c1", "c5", "ok"]
    progress = pair.query.recent_progress[-1] if pair.query.recent_progress else None
    dropped = sum(
        op.num_rows_dropped_late for p in pair.query.recent_progress for op in p.state_operators
    )
    assert progress is not None and dropped == 2
    routed = ms.table(late)
    assert sorted(routed.get_column("imp").drop_nulls().to_list()) == ["late-imp"]
    assert sorted(routed.get_column("click").drop_nulls().to_list()) == ["late-click"]
    assert set(routed.get_column("batch_id").to_list()) == {pair.query.last_progress.batch_id}


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (
            "left",
            [
                (1, t(0), "i1", t(3), "c1"),
                (1, t(0), "i1", t(4), "c1b"),
                (2, t(1), "i2", None, None),
                (3, t(2), "i3", None, None),
                (4, t(10), "i4", t(12), "c4"),
                (9, t(30), "i9", t(33), "c9"),
            ],
        ),
        (
            "right",
            [
                (t(0), "i1", 1, t(3), "c1"),
                (t(0), "i1", 1, t(4), "c1b"),
                (t(10), "i4", 4, t(12), "c4"),
                (t(30), "i9", 9, t(33), "c9"),
                (None, None, 2, t(21), "c2"),
            ],
        ),
        (
            "full",
            [
                (1, t(0), "i1", 1, t(3), "c1"),
                (1, t(0), "i1", 1, t(4), "c1b"),
                (2, t(1), "i2", None, None, None),
                (3, t(2), "i3", None, None, None),
                (4, t(10), "i4", 4, t(12), "c4"),
                (9, t(30), "i9", 9, t(33), "c9"),
                (None, None, None, 2, t(21), "c2"),
            ],
        ),
        ("semi", [(1, t(0), "i1"), (4, t(10), "i4"), (9, t(30), "i9")]),
        ("anti", [(2, t(1), "i2"), (3, t(2), "i3")]),
    ],
)
def test_outer_semi_anti_rows_appear_once_when_the_watermark_passes(
    how: str, expected: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    pair = Pair(how, checkpoint=str(tmp_path / "cp"))
    scenario(pair)
    out = pair.output()
    assert out.schema == pair.frame.collect_schema()
    want = pl.DataFrame(expected, schema=out.schema, orient="row")
    assert_frame_equal(canon(out), canon(want))
    # A flush (the watermark past everything) emits what still waits, once: only i9
    # and c9 are left in state, both matched, so nothing.
    pair.restart(ms.Trigger.available_now(flush=True))
    assert ms.table(pair.names[-1]).height == 0
    dropped = sum(
        op.num_rows_dropped_late for p in pair.query.recent_progress for op in p.state_operators
    )
    assert dropped == 0  # the restarted run's batches; the late click was before


def test_unmatched_rows_wait_for_the_watermark() -> None:
    pair = Pair("left")
    pair.batch(imps=[(2, t(1), "i2")])
    pair.batch(clicks=[(7, t(5), "c7")])  # runs with wm 0: i2 can still match
    assert pair.output().height == 0
    pair.batch(imps=[(8, t(5), "i8")], clicks=[(8, t(5), "c8")])  # wm now 4m: i2 waits
    assert pair.output().get_column("imp").to_list() == ["i8"]
    pair.batch(imps=[(8, t(30), "i8b")], clicks=[(8, t(30), "c8b")])  # wm 19m: i2 expires
    pair.stop()
    out = pair.output()
    assert out.filter(pl.col("imp") == "i2").get_column("click").to_list() == [None]
    assert out.height == 3


def test_plan_time_refusals(tmp_path: Path) -> None:
    imps = ms.MemoryStream(IMPS).lazy()
    clicks = ms.MemoryStream(CLICKS).lazy()
    wl, wr = imps.with_watermark("imp_time", "1m"), clicks.with_watermark("click_time", "1m")
    with pytest.raises(PlanError, match="needs a time bound"):
        wl.join(wr, on="ad", how="left")
    with pytest.raises(PlanError, match="event-time column on both sides"):
        wl.join(clicks, on="ad", within="5m")
    with pytest.raises(PlanError, match="same dtype"):
        wl.join(wr.with_columns(pl.col("ad").cast(pl.Int32)), on="ad", within="5m")
    with pytest.raises(PlanError, match="not supported"):
        wl.join(wr, on="ad", how="cross", within="5m")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="lower bound is above"):
        wl.join(wr, on="ad", within=("5m", "-5m"))
    with pytest.raises(PlanError, match="output_mode='update' is not supported"):
        wl.join(wr, on="ad", within="5m").sink_memory(f"x{uuid.uuid4().hex}", output_mode="update")
    joined = wl.join(wr, on="ad", within=("-1m", "5m"))
    explained = "\n".join(joined.plan.explain_lines())
    assert "stream join(how='inner', on=['ad'], click_time - imp_time in [-1m, 5m])" in explained


def test_inner_join_without_bound_warns_and_keeps_state(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="microstream"):
        pair = Pair("inner", within=None)
    assert "state forever" in caplog.text
    pair.batch(imps=[(1, t(0), "i1")])
    pair.batch(clicks=[(1, t(500), "c1")])  # hours later: still joins
    pair.stop()
    assert pair.output().get_column("click").to_list() == ["c1"]


def test_join_state_is_bounded_in_a_long_run() -> None:
    pair = Pair("full", within=("0s", "2m"), delay="30s")
    all_imps, all_clicks = [], []
    peak = 0
    for step in range(40):
        imps = [(a, t(step), f"i{step}-{a}") for a in range(20)]
        clicks = [(a, t(step + 1), f"c{step}-{a}") for a in range(0, 20, 2)]
        all_imps += imps
        all_clicks += clicks
        pair.batch(imps=imps, clicks=clicks)
        state_rows = sum(op.num_rows_total for op in pair.query.last_progress.state_operators)
        peak = max(peak, state_rows)
    pair.stop()
    # 40 batches of 30 rows: without eviction the state would end with 1200 rows; with
    # it, a few minutes' worth (2 minutes of bound plus the watermark's 30 s delay).
    assert 0 < peak <= 30 * 5, peak
    out = pair.output()
    pairs = (
        rows(IMPS, *all_imps)
        .join(rows(CLICKS, *all_clicks), on="ad")
        .filter(
            (pl.col("click_time") - pl.col("imp_time")).is_between(
                timedelta(0), timedelta(minutes=2)
            )
        )
    )
    assert out.filter(pl.col("click").is_not_null()).height == pairs.height > 400
    # every odd ad's impression expires unmatched, except the last ones still in state
    lonely = out.filter(pl.col("click").is_null())
    assert (lonely.get_column("ad") % 2 == 1).all()
    assert 10 * 36 <= lonely.height < 10 * 40


def test_restart_gives_the_output_of_an_uninterrupted_run(tmp_path: Path) -> None:
    batches = [
        ([(1, t(0), "i1"), (2, t(1), "i2")], [(1, t(3), "c1")]),
        ([(4, t(10), "i4")], [(2, t(2), "c2"), (4, t(9), "c4")]),
        ([(5, t(20), "i5")], [(5, t(21), "c5"), (4, t(14), "c4b")]),
        ([(6, t(40), "i6")], [(6, t(40), "c6")]),
    ]

    def run(restart: bool) -> pl.DataFrame:
        pair = Pair("full", checkpoint=str(tmp_path / uuid.uuid4().hex))
        for imps, clicks in batches:
            pair.batch(imps=imps, clicks=clicks)
            if restart:
                pair.restart()
        pair.restart(ms.Trigger.available_now(flush=True))
        return pair.output()

    clean = run(False)
    # c4 (9m) is a minute before i4: unmatched, emitted alone when it expires
    pairs = clean.select("imp", "click").rows()
    assert sorted(pairs, key=str) == sorted(
        [("i1", "c1"), ("i2", "c2"), ("i4", "c4b"), ("i5", "c5"), ("i6", "c6"), (None, "c4")],
        key=str,
    )
    assert_frame_equal(canon(run(True)), canon(clean))


def test_self_join_of_one_stream_reads_it_once() -> None:
    events = ms.MemoryStream({"user": pl.Int64, "ts": pl.Datetime("us"), "kind": pl.String})
    marked = events.lazy().with_watermark("ts", "1m")
    logins = marked.filter(pl.col("kind") == "login")
    buys = marked.filter(pl.col("kind") == "buy")
    name = f"self_{uuid.uuid4().hex[:8]}"
    query = logins.join(buys, on="user", within=("0s", "10m")).sink_memory(name)
    assert len(query._execution._sources) == 1  # type: ignore[attr-defined]
    events.add_data(
        {
            "user": [1, 1, 2, 2],
            "ts": [t(0), t(3), t(0), t(30)],
            "kind": ["login", "buy", "login", "buy"],
        }
    )
    query.process_all_available()
    query.stop()
    assert ms.table(name).select("user", "ts", "ts_right").rows() == [(1, t(0), t(3))]


def test_join_feeding_a_window_aggregation_uses_the_delayed_watermark() -> None:
    # Impressions and clicks per ad and 1-minute window of the impression, unmatched
    # impressions included (a left join). An unmatched impression is emitted when it
    # expires, after the watermark passed its time and its window's end: judged by the
    # query's watermark the aggregation would drop it as late (c at 3m, emitted in the
    # batch whose late watermark is 5m). Judged by the watermark delayed by the join's
    # bound (5m), it counts.
    pair = Pair(
        "left",
        within=("0s", "5m"),
        then=lambda joined: joined.group_by_dynamic("imp_time", every="1m", group_by="ad").agg(
            pl.len().alias("imps"), pl.col("click").count().alias("clicks")
        ),
    )
    pair.batch(
        imps=[(1, t(1), "a"), (1, t(2), "b"), (2, t(3), "c"), (5, t(6), "e0")],
        clicks=[(1, t(4), "x"), (6, t(7), "x2")],
    )
    pair.batch(imps=[(3, t(30), "d")], clicks=[(3, t(31), "y")])
    pair.batch(imps=[(3, t(60), "e")], clicks=[(3, t(61), "z")])
    pair.batch(imps=[(4, t(90), "f")], clicks=[(4, t(90), "w")])
    pair.stop()
    expected = pl.DataFrame(
        [
            (1, t(1), 1, 1),
            (1, t(2), 1, 1),
            (2, t(3), 1, 0),
            (5, t(6), 1, 0),
            (3, t(30), 1, 1),
            (3, t(60), 1, 1),
        ],
        schema={
            "ad": pl.Int64,
            "imp_time": pl.Datetime("us"),
            "imps": pl.UInt32,
            "clicks": pl.UInt32,
        },
        orient="row",
    )
    assert_frame_equal(canon(pair.output()), canon(expected))
    late = sum(
        op.num_rows_dropped_late for p in pair.query.recent_progress for op in p.state_operators
    )
    assert late == 0


# -- the batch oracle ---------------------------------------------------------------------------

events = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 3)),  # (minute, ad)
    min_size=0,
    max_size=25,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    left=events,
    right=events,
    cuts=st.lists(st.integers(0, 25), max_size=4),
    how=st.sampled_from(["inner", "left", "full"]),
    within=st.sampled_from([(0, 5), (-3, 3), (-10, 0)]),
    delay=st.sampled_from(["0s", "2m", "10m"]),
)
def test_oracle_over_random_batch_splits(
    tmp_path: Path,
    left: list[tuple[int, int]],
    right: list[tuple[int, int]],
    cuts: list[int],
    how: str,
    within: tuple[int, int],
    delay: str,
) -> None:
    """Streamed, then flushed == Polars' join of all non-late rows under the time condition."""
    late = f"late_{uuid.uuid4().hex[:8]}"
    lower, upper = within
    pair = Pair(
        how,
        within=(f"{lower}m" if lower >= 0 else f"-{-lower}m", f"{upper}m"),
        delay=delay,
        late=late,
        checkpoint=str(tmp_path / uuid.uuid4().hex),
    )
    imps = [(ad, t(m), f"i{i}") for i, (m, ad) in enumerate(left)]
    clicks = [(ad, t(m), f"c{i}") for i, (m, ad) in enumerate(right)]
    bounds = sorted({0, *cuts, max(len(imps), len(clicks))})
    for lo, hi in itertools.pairwise(bounds):
        pair.batch(imps=imps[lo:hi], clicks=clicks[lo:hi])
    pair.restart(ms.Trigger.available_now(flush=True))
    got = pair.output()

    dropped = ms.table(late)
    lefts = rows(IMPS, *imps) if imps else pl.DataFrame(schema=IMPS)
    rights = rows(CLICKS, *clicks) if clicks else pl.DataFrame(schema=CLICKS)
    if "imp" in dropped.columns:
        lefts = lefts.join(dropped.select("imp").drop_nulls(), on="imp", how="anti")
    if "click" in dropped.columns:
        rights = rights.join(dropped.select("click").drop_nulls(), on="click", how="anti")
    expected = lefts.join(rights, on="ad", how="inner", coalesce=False).filter(
        (pl.col("click_time") - pl.col("imp_time")).is_between(
            timedelta(minutes=lower), timedelta(minutes=upper)
        )
    )
    pairs = expected
    if how in ("left", "full"):
        lonely = lefts.join(pairs.select("imp"), on="imp", how="anti")
        expected = pl.concat([expected, lonely], how="diagonal_relaxed")
    if how == "full":
        lonely = rights.join(pairs.select("click"), on="click", how="anti")
        expected = pl.concat([expected, lonely.rename({"ad": "ad_right"})], how="diagonal_relaxed")
    expected = expected.select(got.columns)
    assert_frame_equal(canon(got), canon(expected), check_dtypes=False)


# -- join_where -------------------------------------------------------------------------------


def test_join_where_equals_polars_join_where_on_all_rows() -> None:
    imps = ms.MemoryStream({"ad_id": pl.Int64, "ts": pl.Datetime("us"), "imp": pl.String})
    clicks = ms.MemoryStream({"ad_id": pl.Int64, "ts": pl.Datetime("us"), "click": pl.String})
    predicates = (
        pl.col("ad_id") == pl.col("ad_id_right"),
        pl.col("ts_right") > pl.col("ts"),  # strictly after
        pl.col("ts_right")
        <= pl.col("ts") + timedelta(minutes=1),  # Polars refuses pl.duration here
    )
    joined = (
        imps.lazy()
        .with_watermark("ts", "10s")
        .join_where(clicks.lazy().with_watermark("ts", "10s"), *predicates)
    )
    name = f"where_{uuid.uuid4().hex[:8]}"
    query = joined.sink_memory(name)
    left = pl.DataFrame(
        {"ad_id": [1, 1, 2, 3], "ts": [t(0), t(1), t(2), t(3)], "imp": ["a", "b", "c", "d"]},
        schema=imps.schema,
    )
    right = pl.DataFrame(
        {
            "ad_id": [1, 1, 2, 3, 3],
            # 1m after a (bound, kept), at b (not strictly after), 1m+1us after c (out),
            # 30 s after d, and 10 s before d
            "ts": [
                t(1),
                t(1),
                t(3) + timedelta(microseconds=1),
                t(3.5),
                t(3) - timedelta(seconds=10),
            ],
            "click": ["x", "y", "z", "w", "v"],
        },
        schema=clicks.schema,
    )
    for i in range(4):  # one row a side per batch, clicks of a batch before its impressions
        clicks.add_data(right.slice(i, 1))
        imps.add_data(left.slice(i, 1))
        query.process_all_available()
    clicks.add_data(right.slice(4, 1))
    query.process_all_available()
    query.stop()
    got = ms.table(name)
    expected = left.join_where(right, *predicates)
    assert (
        got.columns
        == expected.columns
        == ["ad_id", "ts", "imp", "ad_id_right", "ts_right", "click"]
    )
    assert_frame_equal(canon(got), canon(expected))
    assert sorted(got.get_column("click").to_list()) == ["w", "x", "y"]


def test_join_where_refusals() -> None:
    left = ms.MemoryStream(IMPS).lazy().with_watermark("imp_time", "1m")
    right = ms.MemoryStream(CLICKS).lazy().with_watermark("click_time", "1m")
    key = pl.col("ad") == pl.col("ad_right")
    after = pl.col("click_time") >= pl.col("imp_time")
    before = pl.col("click_time") <= pl.col("imp_time") + pl.duration(hours=1)
    with pytest.raises(PlanError, match="needs an equality predicate"):
        left.join_where(right, after, before)
    with pytest.raises(PlanError, match="needs a lower and an upper bound"):
        left.join_where(right, key, after)
    with pytest.raises(PlanError, match="cannot use the predicate"):
        left.join_where(right, key, after, before, pl.col("imp") != pl.col("click"))
    with pytest.raises(PlanError, match="cannot use"):
        left.join_where(right, key, after, pl.col("click_time") <= pl.col("imp_time") * 2)
    with pytest.raises(PlanError, match="neither stream"):
        left.join_where(right, key, after, pl.col("nope") <= pl.col("imp_time"))
    unmarked = ms.MemoryStream(CLICKS).lazy().with_watermark("click_time", "1m")
    with pytest.raises(PlanError, match="not its with_watermark column"):
        left.with_columns(pl.col("imp_time").alias("t2")).join_where(
            unmarked,
            key,
            pl.col("click_time") >= pl.col("t2"),
            pl.col("click_time") <= pl.col("t2") + pl.duration(hours=1),
        )
    joined = left.join_where(right, key, after, before)
    assert "click_time - imp_time in [0s, 1h]" in "\n".join(joined.plan.explain_lines())


# -- join_asof --------------------------------------------------------------------------------

TRADES = {"sym": pl.String, "t": pl.Datetime("us"), "qty": pl.Int64}
QUOTES = {"sym": pl.String, "qt": pl.Datetime("us"), "px": pl.Float64}


def asof_query(tolerance: str | None = None, late: str | None = None) -> tuple[Any, Any, Any]:
    trades = ms.MemoryStream(TRADES)
    quotes = ms.MemoryStream(QUOTES)
    joined = (
        trades.lazy()
        .with_watermark("t", "1m", on_late=late)
        .join_asof(
            quotes.lazy().with_watermark("qt", "1m", on_late=late),
            left_on="t",
            right_on="qt",
            by="sym",
            tolerance=tolerance,
        )
    )
    return trades, quotes, joined


def test_join_asof_waits_for_the_watermark_then_takes_the_latest_quote(tmp_path: Path) -> None:
    trades, quotes, joined = asof_query()
    name = f"asof_{uuid.uuid4().hex[:8]}"
    query = joined.sink_memory(name, checkpoint=str(tmp_path / "cp"))
    # a trade at 10m; its quotes arrive later, out of order
    trades.add_data(rows(TRADES, ("A", t(10), 1)))
    quotes.add_data(rows(QUOTES, ("A", t(2), 100.0)))
    query.process_all_available()
    assert ms.table(name).height == 0  # the watermark (min of both sides) is not at 10m
    quotes.add_data(rows(QUOTES, ("A", t(9), 109.0), ("A", t(11), 111.0), ("B", t(5), 5.0)))
    trades.add_data(rows(TRADES, ("B", t(4), 2), ("A", t(30), 3)))
    query.process_all_available()
    # watermark now min(30 - 1, 11 - 1) = 10m: the trade at 10m takes the 9m quote, B's
    # trade at 4m has no quote at or before it; the trade at 30m waits
    quotes.add_data(rows(QUOTES, ("A", t(40), 140.0)))
    query.process_all_available()
    query.stop()
    got = ms.table(name)
    expected = pl.DataFrame(
        [("A", t(10), 1, t(9), 109.0), ("B", t(4), 2, None, None)],
        schema=got.schema,
        orient="row",
    )
    assert_frame_equal(canon(got), canon(expected))
    # right state, pruned when a key's quotes arrive (the 40m quote's batch ran with
    # watermark 10m): A keeps the latest quote at or before it (9m) and the later ones;
    # the 2m quote is gone
    state = query.state("op0/right")
    assert sorted(state.get_column("px").to_list()) == [5.0, 109.0, 111.0, 140.0]
    # the watermark past everything: the trade at 30m takes the 11m quote
    flush = joined.sink_memory(
        f"{name}_flush",
        checkpoint=str(tmp_path / "cp"),
        trigger=ms.Trigger.available_now(flush=True),
    )
    flush.await_termination()
    assert ms.table(f"{name}_flush").rows() == [("A", t(30), 3, t(11), 111.0)]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    left=st.lists(st.tuples(st.integers(0, 60), st.sampled_from("AB")), max_size=20),
    right=st.lists(st.tuples(st.integers(0, 60), st.sampled_from("AB")), max_size=20),
    cuts=st.lists(st.integers(0, 20), max_size=4),
    tolerance=st.sampled_from([None, "5m"]),
)
def test_join_asof_oracle_over_random_batch_splits(
    tmp_path: Path,
    left: list[tuple[int, str]],
    right: list[tuple[int, str]],
    cuts: list[int],
    tolerance: str | None,
) -> None:
    late = f"late_{uuid.uuid4().hex[:8]}"
    trades, quotes, joined = asof_query(tolerance, late)
    checkpoint = str(tmp_path / uuid.uuid4().hex)
    names = [f"asof_{uuid.uuid4().hex[:8]}", f"asof_{uuid.uuid4().hex[:8]}"]
    query = joined.sink_memory(names[0], checkpoint=checkpoint)
    left_rows = [(s, t(m), i) for i, (m, s) in enumerate(left)]
    right_rows = [(s, t(m), float(i)) for i, (m, s) in enumerate(right)]
    bounds = sorted({0, *cuts, max(len(left_rows), len(right_rows))})
    for lo, hi in itertools.pairwise(bounds):
        if left_rows[lo:hi]:
            trades.add_data(rows(TRADES, *left_rows[lo:hi]))
        if right_rows[lo:hi]:
            quotes.add_data(rows(QUOTES, *right_rows[lo:hi]))
        query.process_all_available()
    query.stop()
    flush = joined.sink_memory(
        names[1], checkpoint=checkpoint, trigger=ms.Trigger.available_now(flush=True)
    )
    flush.await_termination()
    got = pl.concat([ms.table(n) for n in names])

    dropped = ms.table(late)
    lefts = rows(TRADES, *left_rows) if left_rows else pl.DataFrame(schema=TRADES)
    rights = rows(QUOTES, *right_rows) if right_rows else pl.DataFrame(schema=QUOTES)
    if "qty" in dropped.columns:
        lefts = lefts.join(dropped.select("qty").drop_nulls(), on="qty", how="anti")
    if "px" in dropped.columns:
        rights = rights.join(dropped.select("px").drop_nulls(), on="px", how="anti")
    # ties: Polars takes the last right row of equal time in its sorted order; compare
    # the matched times, not which of several equal-time quotes
    expected = lefts.sort("t").join_asof(
        rights.sort("qt"),
        left_on="t",
        right_on="qt",
        by="sym",
        tolerance=None if tolerance is None else timedelta(minutes=5),
        check_sortedness=False,
    )
    assert_frame_equal(canon(got.drop("px")), canon(expected.drop("px")), check_row_order=False)


# -- SIGKILL and restart --------------------------------------------------------------------

JOIN_PIPELINE = Path(__file__).parent / "join_pipeline.py"


def write_join_files(root: Path, files: int = 6) -> tuple[Path, Path]:
    """Out-of-order impressions and clicks, one file per side per batch, some late."""
    imps_dir, clicks_dir = root / "imps", root / "clicks"
    imps_dir.mkdir(parents=True)
    clicks_dir.mkdir(parents=True)
    for f in range(files):
        base = f * 4
        imps = [(ad, t(base + (ad % 3)), f"i{f}-{ad}") for ad in range(f % 2, 8, 2)]
        clicks = [
            (ad, t(base + 2 + (ad % 4) - 3 * (f == 3)), f"c{f}-{ad}") for ad in range(0, 8, 3)
        ]
        for directory, data, schema in ((imps_dir, imps, IMPS), (clicks_dir, clicks, CLICKS)):
            path = directory / f"part-{f:03d}.parquet"
            rows(schema, *data).write_parquet(path)
            os.utime(path, (1_700_000_000 + f, 1_700_000_000 + f))
    return imps_dir, clicks_dir


def run_join_pipeline(root: Path, inputs: tuple[Path, Path], fault: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MICROSTREAM_FAULTS"}
    if fault is not None:
        env["MICROSTREAM_FAULTS"] = fault
    args = ["--imps", str(inputs[0]), "--clicks", str(inputs[1])]
    args += ["--output", str(root / "out"), "--checkpoint", str(root / "cp")]
    done = subprocess.run(
        [sys.executable, str(JOIN_PIPELINE), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, -9), done.stderr
    return done.returncode


def join_outputs(root: Path) -> dict[int, pl.DataFrame]:
    return {
        int(p.stem): canon(pl.read_parquet(p)) for p in sorted((root / "out").glob("*.parquet"))
    }


@pytest.mark.integration
def test_sigkill_at_fault_points_then_restart_gives_identical_output(tmp_path: Path) -> None:
    inputs = write_join_files(tmp_path / "in")
    clean = tmp_path / "clean"
    assert run_join_pipeline(clean, inputs) == 0
    expected = join_outputs(clean)
    every = pl.concat(list(expected.values()))
    assert every.filter(pl.col("imp").is_not_null() & pl.col("click").is_not_null()).height > 0
    assert every.filter(pl.col("imp").is_null()).height > 0  # unmatched clicks
    assert every.filter(pl.col("click").is_null()).height > 0  # unmatched impressions
    for fault in (
        "batch.after_wal@3",
        "batch.after_compute@4",
        "batch.after_sink@2",
        "batch.before_commit@5",
        "batch.after_commit@3",
        "batch.after_sink@2,batch.after_wal@1",
    ):
        root = tmp_path / fault.replace("@", "-").replace(",", "+")
        first, _, second = fault.partition(",")
        assert run_join_pipeline(root, inputs, first) == -9, fault
        if second:  # killed again while recovering
            assert run_join_pipeline(root, inputs, second) == -9, fault
        assert run_join_pipeline(root, inputs) == 0, fault
        got = join_outputs(root)
        assert got.keys() == expected.keys(), fault
        for batch_id, frame in expected.items():
            assert got[batch_id].equals(frame), (fault, batch_id)


@pytest.mark.parametrize("nulls_equal", [False, True])
def test_null_keys_pair_with_buffered_rows_only_when_nulls_equal(nulls_equal: bool) -> None:
    """A null-key impression buffered in batch 0 meets null-key clicks in later batches
    (found in the buffer by the join's semi join): paired only with ``nulls_equal``,
    otherwise emitted unmatched once the watermark passes its bound, as Polars does."""
    imps, clicks = ms.MemoryStream(IMPS), ms.MemoryStream(CLICKS)
    left = imps.lazy().with_watermark("imp_time", "1m")
    right = clicks.lazy().with_watermark("click_time", "1m")
    name = f"join_nulls_{uuid.uuid4().hex[:8]}"
    query = left.join(
        right, on="ad", how="left", within=("0s", "5m"), nulls_equal=nulls_equal
    ).sink_memory(name)
    imps.add_data(rows(IMPS, (None, t(0), "i0"), (1, t(0), "i1")))
    query.process_all_available()
    clicks.add_data(rows(CLICKS, (None, t(1), "c0"), (1, t(2), "c1")))
    query.process_all_available()
    clicks.add_data(rows(CLICKS, (None, t(3), "c0b")))
    query.process_all_available()
    # Both sides move on (the query's watermark is the lower of the two): past i0's bound.
    imps.add_data(rows(IMPS, (2, t(30), "i2")))
    clicks.add_data(rows(CLICKS, (2, t(30), "c2")))
    query.process_all_available()
    query.stop()
    out = ms.table(name).select("imp", "click")
    paired = [("i0", "c0"), ("i0", "c0b")] if nulls_equal else [("i0", None)]
    want = pl.DataFrame(
        [*paired, ("i1", "c1"), ("i2", "c2")],
        schema={"imp": pl.String, "click": pl.String},
        orient="row",
    )
    assert_frame_equal(canon(out), canon(want))
