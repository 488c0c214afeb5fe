"""Cumulative windows (``group_by_dynamic(..., cumulative=True)``, Flink's CUMULATE).

Exact rows per batch (each window emitted when the watermark passes its own end),
update mode with and without emit triggers, late (row, window) pairs, refusals,
and a brute-force oracle over random batch splits and out-of-order input.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microstream as ms
from microstream.exceptions import EventTimeError, PlanError
from microstream.plan.nodes import result_key_columns
from microstream.time.cumulate import CumulativeWindow
from tests.test_window_oracle import frame_of, run_stream
from tests.test_windows import SCHEMA, at, rows, run


def cumulative(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="10s", period="30s", group_by="k", cumulative=True)
        .agg(pl.col("v").sum(), n=pl.len())
    )


def test_each_window_is_emitted_when_the_watermark_passes_its_own_end(name: str) -> None:
    _, out = run(
        cumulative,
        [
            rows((1, "a", 1), (15, "a", 2), (12, "b", 4)),  # batch 0; no-data batch 1: wm 15s
            rows((25, "a", 8)),  # batch 2; batch 3: wm 25s
            rows((31, "a", 16)),  # batch 4; batch 5: wm 31s
            rows((75, "a", 32)),  # batch 6; batch 7: wm 75s
        ],
        name,
    )
    assert out == {
        0: [],
        # wm 15s: [0s, 10s) closed, the first window of [0s, 30s) (only row 1s is in it)
        1: [("a", at(0), at(10), at(0), 1, 1)],
        2: [],
        # wm 25s: [0s, 20s) closed: every row before 20s, for each key
        3: [("a", at(0), at(20), at(0), 3, 2), ("b", at(0), at(20), at(0), 4, 1)],
        4: [],
        # wm 31s: [0s, 30s) closed, with the 25s row; [30s, 40s) is still open
        5: [("a", at(0), at(30), at(0), 11, 3), ("b", at(0), at(30), at(0), 4, 1)],
        6: [],
        # wm 75s: the three windows of [30s, 60s), and [60s, 70s) which holds nothing
        7: [
            ("a", at(30), at(40), at(30), 16, 1),
            ("a", at(30), at(50), at(30), 16, 1),
            ("a", at(30), at(60), at(30), 16, 1),
        ],
    }


def test_output_schema_and_result_key_carry_both_bounds() -> None:
    frame = cumulative(ms.MemoryStream(SCHEMA).lazy())
    assert frame.collect_schema() == pl.Schema(
        {
            "k": pl.String,
            "_lower_boundary": pl.Datetime("us"),
            "_upper_boundary": pl.Datetime("us"),
            "ts": pl.Datetime("us"),
            "v": pl.Int64,
            "n": pl.UInt32,
        }
    )
    # Windows of one max-size window share the start: the end tells them apart.
    assert result_key_columns(frame.plan) == ("ts", "_upper_boundary", "k")
    assert frame.plan.describe().startswith(
        "group_by_dynamic(cumulative window on 'ts' step=10s max=30s offset=0s"
    )


def test_update_mode_emits_changed_windows_and_evicts_each_at_its_end(name: str) -> None:
    _, out = run(cumulative, [rows((1, "a", 1), (12, "a", 2)), rows((14, "a", 4))], name,
                 output_mode="update")  # fmt: skip
    assert out == {
        0: [
            ("a", at(0), at(10), at(0), 1, 1),
            ("a", at(0), at(20), at(0), 3, 2),
            ("a", at(0), at(30), at(0), 3, 2),
        ],
        1: [],  # wm 12s closes [0s, 10s) silently
        2: [("a", at(0), at(20), at(0), 7, 3), ("a", at(0), at(30), at(0), 7, 3)],
        3: [],
    }


def test_update_mode_with_every_n_rows_fires_per_window(name: str) -> None:
    def query(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by_dynamic("ts", every="10s", period="30s", cumulative=True, every_n_rows=2)
            .agg(pl.col("v").sum())
        )

    batches = [rows((1, "a", 1), (12, "a", 2)), rows((14, "a", 4)), rows((21, "a", 8))]
    _, out = run(query, batches, name, output_mode="update")
    assert out == {
        0: [(at(0), at(20), at(0), 3), (at(0), at(30), at(0), 3)],  # two rows each
        1: [(at(0), at(10), at(0), 1)],  # one row, but the watermark (12s) passed its end
        2: [],  # one more row in [0s, 20s) and [0s, 30s): pending
        3: [],
        4: [(at(0), at(30), at(0), 15)],  # the second row since its last emission
        5: [(at(0), at(20), at(0), 7)],  # pending, and the watermark (21s) passed its end
    }


def test_a_row_late_for_its_first_windows_still_counts_in_the_open_ones(name: str) -> None:
    late_table = f"{name}_late"

    def query(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s", on_late=late_table)
            .group_by_dynamic("ts", every="10s", period="30s", cumulative=True)
            .agg(pl.col("v").sum())
        )

    source = ms.MemoryStream(SCHEMA)
    emitted: list[list[tuple[Any, ...]]] = []

    def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
        return query(source.lazy()).foreach_batch(
            lambda df, _: emitted.append(df.rows()), checkpoint=f"memory://{name}", trigger=trigger
        )

    running = start(None)
    for batch in (rows((3, "a", 4), (22, "a", 1)), rows((5, "a", 2))):
        source.add_data(batch)
        running.process_all_available(timeout=30)
    running.stop()
    # wm 22s: [0s, 10s) and [0s, 20s) are closed for the 5s row; [0s, 30s) is not
    late = ms.table(late_table)
    assert late.select("ts", "window_start", "window_end").rows() == [
        (at(5), at(0), at(10)),
        (at(5), at(0), at(20)),
    ]
    assert [r for batch in emitted for r in batch] == [
        (at(0), at(10), at(0), 4),
        (at(0), at(20), at(0), 4),
    ]
    assert start(ms.Trigger.available_now(flush=True)).await_termination(timeout=60)
    assert emitted[-1] == [(at(0), at(30), at(0), 7)]


def test_offset_shifts_the_max_size_windows(name: str) -> None:
    def query(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by_dynamic("ts", every="10s", period="20s", offset="5s", cumulative=True)
            .agg(pl.col("v").sum())
        )

    _, out = run(query, [rows((3, "a", 1), (7, "a", 2), (16, "a", 4)), rows((40, "a", 8))], name)
    # max-size windows [-15s, 5s), [5s, 25s), [25s, 45s): the 40s row's stays open
    assert [r for batch in out.values() for r in batch] == [
        (at(-15), at(5), at(-15), 1),  # 3s: after the end of [-15s, -5s)
        (at(5), at(15), at(5), 2),
        (at(5), at(25), at(5), 6),
    ]


@pytest.mark.parametrize(
    ("every", "period", "message"),
    [
        ("10s", "25s", r"period \(25s\) must be a positive multiple of every \(10s\)"),
        ("10s", "5s", r"period \('5s'\) shorter than every \('10s'\) leaves gaps"),
    ],
)
def test_a_period_that_is_no_multiple_of_every_is_refused(
    every: str, period: str, message: str
) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s")
    with pytest.raises(PlanError, match=message):
        frame.group_by_dynamic("ts", every=every, period=period, cumulative=True)


def test_a_window_past_the_time_range_is_an_event_time_error(name: str) -> None:
    schema = {"ts": pl.Datetime("ns"), "v": pl.Int64}
    source = ms.MemoryStream(schema)
    query = (
        source.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1d", period="7d", cumulative=True)
        .agg(pl.col("v").sum())
        .sink_memory(name)
    )
    # 2262-04-10 is in a week that ends after 2262-04-11 23:47, the last nanosecond time.
    source.add_data(pl.DataFrame({"ts": [datetime(2262, 4, 10)], "v": [1]}, schema=schema))
    with pytest.raises(EventTimeError, match=r"window ending after the largest time .*'us'"):
        query.process_all_available(timeout=30)
    query.stop()


def test_changing_the_window_kind_is_a_plan_change(tmp_path: Path, name: str) -> None:
    source = ms.MemoryStream(SCHEMA)

    def start(cumulative: bool) -> ms.StreamingQuery:
        return (
            source.lazy()
            .with_watermark("ts", "0s")
            .group_by_dynamic("ts", every="10s", period="30s", cumulative=cumulative)
            .agg(pl.col("v").sum())
            .sink_memory(name, checkpoint=tmp_path / "cp")
        )

    start(False).stop()
    with pytest.raises(
        ms.PlanChangedError,
        match=r"sliding window on 'ts' every=10s period=30s offset=0s.*"
        r"cumulative window on 'ts' step=10s max=30s offset=0s",
    ):
        start(True)


def test_tumbling_and_sliding_plan_records_are_unchanged() -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s")
    records = [
        frame.group_by_dynamic("ts", every=every, period=period, offset=offset)
        .agg(pl.len())
        .plan.fingerprint()["window"]  # type: ignore[attr-defined]
        for every, period, offset in (("10s", None, None), ("1m", "3m", "20s"))
    ]
    # what checkpoints written before the Window protocol hold (tests/data/format1 too)
    assert records == [
        "tumbling window on 'ts' every=10s period=10s offset=0s",
        "sliding window on 'ts' every=1m period=3m offset=20s",
    ]


def test_assign_gives_each_row_the_windows_that_end_after_it() -> None:
    window = CumulativeWindow("ts", step_us=10, max_us=40, offset_us=5)
    assigned = window.assign(pl.DataFrame({"__t": [5, 14, 15, 44, 45, -1]}))
    assert assigned.rows() == [
        (5, 5, 15), (5, 5, 25), (5, 5, 35), (5, 5, 45),
        (14, 5, 15), (14, 5, 25), (14, 5, 35), (14, 5, 45),
        (15, 5, 25), (15, 5, 35), (15, 5, 45),
        (44, 5, 45),
        (45, 45, 55), (45, 45, 65), (45, 45, 75), (45, 45, 85),
        (-1, -35, 5),  # [-35, -25), [-35, -15), [-35, -5) end before it
    ]  # fmt: skip


# -- the oracle ---------------------------------------------------------------------------

STEP, MAX = 20, 60  # seconds
DELAY = 45  # seconds


def oracle(data: list[tuple[int, str, float | None]], offset: int) -> list[tuple[Any, ...]]:
    """Every window [s, s + j*STEP) with s = offset + a multiple of MAX that holds a row,
    by brute force over the rows: (k, lower, upper, ts, sum, n, distinct)."""
    windows: dict[tuple[str, int, int], list[float | None]] = {}
    for t, k, v in data:
        start = (t - offset) // MAX * MAX + offset
        for j in range(1, MAX // STEP + 1):
            if t < start + j * STEP:
                windows.setdefault((k, start, start + j * STEP), []).append(v)
    return sorted(
        (
            k,
            at(start),
            at(end),
            at(start),
            sum(v for v in vs if v is not None),
            len(vs),
            len(set(vs)),
        )
        for (k, start, end), vs in windows.items()
    )


def cumulative_query(offset: int) -> Any:
    def query_fn(frame: ms.StreamFrame, late_table: str) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", f"{DELAY}s", on_late=late_table)
            .group_by_dynamic(
                "ts",
                every=f"{STEP}s",
                period=f"{MAX}s",
                offset=timedelta(seconds=offset),
                group_by="k",
                cumulative=True,
            )
            .agg(pl.col("v").sum(), pl.len().alias("n"), pl.col("v").n_unique().alias("distinct"))
        )

    return query_fn


@st.composite
def disordered(draw: st.DrawFn) -> list[tuple[int, str, float | None]]:
    """Rows out of order by at most DELAY: each is at most DELAY before the latest
    so far, so none is ever late."""
    steps = draw(st.lists(st.integers(0, 30), min_size=1, max_size=40))
    out, latest = [], 0
    for step in steps:
        latest += step
        t = latest - draw(st.integers(0, DELAY))
        out.append((t, draw(st.sampled_from("ab")), draw(st.sampled_from([None, 1.0, 2.0, 5.0]))))
    return out


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    data=disordered(),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    offset=st.sampled_from([0, 7, 30]),
)
def test_append_equals_the_brute_force_oracle(
    data: list[tuple[int, str, float | None]], cuts: list[int], offset: int
) -> None:
    emitted, late = run_stream(frame_of(data), cuts, cumulative_query(offset), "append")
    assert late.height == 0
    got = pl.concat([df for _, df in emitted])
    assert sorted(got.rows()) == oracle(data, offset)
    # each window once, and every batch's windows closed (end <= that batch's watermark)
    assert got.select("k", "_upper_boundary").is_duplicated().sum() == 0


@SETTINGS
@given(data=disordered(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_update_mode_last_row_per_window_equals_the_oracle(
    data: list[tuple[int, str, float | None]], cuts: list[int]
) -> None:
    emitted, late = run_stream(frame_of(data), cuts, cumulative_query(0), "update")
    assert late.height == 0
    got = (
        pl.concat([df.with_columns(pl.lit(b).alias("__b")) for b, df in emitted])
        .sort("__b", maintain_order=True)
        .group_by("k", "ts", "_upper_boundary", maintain_order=True)
        .last()
        .drop("__b")
    )
    assert sorted(got.rows()) == oracle(data, 0)


@SETTINGS
@given(
    data=st.lists(
        st.tuples(st.integers(0, 300), st.sampled_from("ab"), st.just(1.0)), min_size=1, max_size=40
    ),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_append_equals_the_oracle_minus_the_late_pairs(
    data: list[tuple[int, str, float | None]], cuts: list[int]
) -> None:
    """Any disorder: a (row, window) pair is late when the window had closed, and the
    same row still counts in the windows of its max-size window that were open."""
    full = frame_of(data)
    emitted, late = run_stream(full, cuts, cumulative_query(0), "append")
    if "window_end" not in late.columns:  # no late rows at all
        late = pl.DataFrame(schema={"id": pl.UInt32, "window_start": pl.Datetime("us"),
                                    "window_end": pl.Datetime("us")})  # fmt: skip
    late_pairs = {(i, s, e) for i, s, e in late.select("id", "window_start", "window_end").rows()}
    windows: dict[tuple[str, datetime, datetime], list[float]] = {}
    for i, (t, k, v) in enumerate(data):
        start = t // MAX * MAX
        for j in range(1, MAX // STEP + 1):
            end = start + j * STEP
            if t < end and (i, at(start), at(end)) not in late_pairs:
                windows.setdefault((k, at(start), at(end)), []).append(v or 0.0)
    expected = sorted(
        (k, s, e, s, sum(vs), len(vs), len(set(vs))) for (k, s, e), vs in windows.items()
    )
    got = pl.concat([df for _, df in emitted])
    assert sorted(got.rows()) == expected
    # a late pair is one whose window the stream had already emitted, so never twice
    assert len(late_pairs) == late.height
