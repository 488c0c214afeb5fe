"""Session windows and deduplication: exact rows, merging, late data, bounded state."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

import microstream as ms
from tests.test_windows import at, rows, run


def sessions(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", "0s")
        .group_by_session("ts", gap="10s", group_by="k")
        .agg(pl.col("v").sum(), n=pl.len(), med=pl.col("v").median())
    )


def emitted(out: dict[int, list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    return [r for b in sorted(out) for r in out[b]]


def test_sessions_close_at_watermark_and_merge(name: str) -> None:
    _, out = run(
        sessions,
        [
            rows((0, "a", 1), (20, "a", 2), (0, "b", 5)),  # a: [0,10) [20,30); b: [0,10); wm 20
            rows(
                (15, "a", 4)
            ),  # late? 15+10=25 > 20: no. Bridges [0,10)? 10<15 no; [15,25) touches [20,30) -> merge
            rows((60, "z", 0)),  # wm 60 closes everything
        ],
        name,
    )
    assert emitted(out) == [
        ("a", at(0), at(10), 1, 1, 1.0),
        ("b", at(0), at(10), 5, 1, 5.0),
        ("a", at(15), at(30), 6, 2, 3.0),
    ]


def test_event_bridging_two_sessions_merges_them(name: str) -> None:
    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "30s")
            .group_by_session("ts", gap="10s", group_by="k")
            .agg(pl.col("v").sum(), n=pl.len(), med=pl.col("v").median())
        )

    _, out = run(
        frame_fn,
        [
            rows((0, "a", 1), (18, "a", 2)),  # [0,10) and [18,28)
            rows((9, "a", 3)),  # [9,19) overlaps both: one session [0,28)
            rows((100, "z", 0)),  # wm 70 closes it
        ],
        name,
    )
    assert emitted(out) == [("a", at(0), at(28), 6, 3, 2.0)]


def test_bridge_within_one_batch_and_touching_sessions(name: str) -> None:
    _, out = run(
        sessions,
        [rows((0, "a", 1), (20, "a", 2), (10, "a", 4), (100, "z", 0))],
        name,
        output_mode="update",
    )
    # 0 -> [0,10), 10 touches it -> [0,20), 20 touches -> [0,30): one session of three events.
    assert out[0] == [("a", at(0), at(30), 7, 3, 2.0), ("z", at(100), at(110), 0, 1, 0.0)]


def test_late_session_rows_are_dropped(name: str) -> None:
    query, out = run(
        sessions,
        [rows((100, "a", 1)), rows((85, "a", 9), (95, "a", 2))],  # 85 + 10 <= 100: late
        name,
        output_mode="update",
    )
    assert ("a", at(95), at(110), 3, 2, 1.5) in emitted(out)
    late = [p.state_operators[0].num_rows_dropped_late for p in query.recent_progress]
    assert sum(late) == 1


def test_sessions_refuse_complete_mode(name: str) -> None:
    frame = sessions(
        ms.MemoryStream({"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Int64}).lazy()
    )
    with pytest.raises(ms.PlanError, match="append' and 'update'"):
        frame.sink_memory(name, output_mode="complete")


def test_unique_without_watermark_keeps_first_forever(name: str) -> None:
    query, out = run(
        lambda f: f.unique(subset="k"),
        [rows((1, "a", 1), (2, "a", 2), (3, "b", 3)), rows((4, "b", 4), (5, "c", 5))],
        name,
    )
    assert emitted(out) == [(at(1), "a", 1), (at(3), "b", 3), (at(5), "c", 5)]
    assert query.last_progress is not None
    assert query.last_progress.state_operators[0].num_rows_total == 3


def test_unique_with_event_time_in_subset_evicts_and_drops_late(name: str) -> None:
    query, out = run(
        lambda f: f.with_watermark("ts", "5s").unique(subset=["ts", "k"]),
        [
            rows((10, "a", 1), (10, "a", 2), (20, "b", 3)),  # wm -> 15
            rows((10, "a", 9), (16, "a", 4), (20, "b", 5)),  # 10 <= 15: late; (20,b) duplicate
        ],
        name,
    )
    assert emitted(out) == [(at(10), "a", 1), (at(20), "b", 3), (at(16), "a", 4)]
    # keys with ts <= wm are forgotten: after batch 2 (wm 15) only ts 16 and 20 remain.
    totals = [p.state_operators[0].num_rows_total for p in query.recent_progress]
    assert totals[-1] == 2


def test_unique_within_forgets_after_delay(name: str) -> None:
    _query, out = run(
        lambda f: f.with_watermark("ts", "0s").unique(subset="k", within="10s"),
        [
            rows((0, "a", 1)),  # a expires when 0 + 10 <= wm
            rows((5, "a", 2)),  # wm 0: duplicate
            rows((30, "b", 3)),  # wm -> 30: a forgotten
            rows((31, "a", 4)),  # a again: emitted
        ],
        name,
    )
    assert emitted(out) == [(at(0), "a", 1), (at(30), "b", 3), (at(31), "a", 4)]


def test_unique_keep_last_is_refused() -> None:
    frame = ms.MemoryStream({"k": pl.String}).lazy()
    with pytest.raises(ms.PlanError, match="keep='last'"):
        frame.unique(keep="last")  # type: ignore[arg-type]


def test_unique_on_a_key_drops_rows_behind_the_watermark(name: str) -> None:
    query, out = run(
        lambda f: f.with_watermark("ts", "0s").unique(subset="k"),
        [rows((50, "a", 1)), rows((10, "z", 2), (60, "b", 3))],  # (10, z) is late: 10 <= 50
        name,
    )
    assert emitted(out) == [(at(50), "a", 1), (at(60), "b", 3)]
    assert sum(p.state_operators[0].num_rows_dropped_late for p in query.recent_progress) == 1


def test_null_event_times_never_late_and_in_no_window(name: str) -> None:
    def with_nulls(*items: tuple[float | None, str, int]) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "ts": [None if s is None else at(s) for s, _, _ in items],
                "k": [k for _, k, _ in items],
                "v": [v for *_, v in items],
            },
            schema={"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Int64},
        )

    _, dedup = run(
        lambda f: f.with_watermark("ts", "0s").unique(subset=["k"]),
        [with_nulls((50, "a", 1)), with_nulls((None, "d", 5), (10, "z", 2))],
        name + "d",
    )
    assert emitted(dedup) == [(at(50), "a", 1), (None, "d", 5)]
    _, windows = run(
        lambda f: f.with_watermark("ts", "0s").group_by_dynamic("ts", every="1m").agg(pl.len()),
        [with_nulls((10, "a", 1), (None, "b", 2)), with_nulls((200, "c", 3))],
        name + "w",
    )
    assert emitted(windows) == [(at(0), 1)]
