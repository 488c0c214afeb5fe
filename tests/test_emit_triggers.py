"""Emit triggers in update mode (Flink's taxonomy) and allowed lateness."""

from __future__ import annotations

import polars as pl
import pytest

import microstream as ms
from tests.test_windows import SCHEMA, at, rows, run


def windows(**emit: object) -> object:
    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by_dynamic("ts", every="1m", group_by="k", **emit)  # type: ignore[arg-type]
            .agg(pl.col("v").sum())
        )

    return frame_fn


def test_every_n_rows_emits_after_n_rows_and_at_window_end(name: str) -> None:
    _, out = run(
        windows(every_n_rows=2),
        [rows((1, "a", 1)), rows((2, "a", 2)), rows((3, "a", 4)), rows((70, "z", 0))],
        name,
        output_mode="update",
    )
    fired = [(b, r) for b in sorted(out) for r in out[b] if r[0] == "a"]
    # rows 1 and 2 -> fires with 3; row 3 pending -> fires when the watermark passes 1m
    assert [r for _, r in fired] == [("a", at(0), 3), ("a", at(0), 7)]


def test_emit_on_change_fires_when_the_aggregate_moved_enough(name: str) -> None:
    _, out = run(
        windows(emit_on_change={"v": 5.0}),
        [rows((1, "a", 1)), rows((2, "a", 2)), rows((3, "a", 3)), rows((4, "a", 1))],
        name,
        output_mode="update",
    )
    emitted = [r for b in sorted(out) for r in out[b]]
    # first value always; 3 (moved 2) no; 6 (moved 5) no: threshold is "more than"; 7 yes
    assert emitted == [("a", at(0), 1), ("a", at(0), 7)]


def test_early_every_limits_emissions_by_batch_time(name: str) -> None:
    _, out = run(
        windows(early_every="1h"),
        [rows((1, "a", 1)), rows((2, "a", 2)), rows((70, "a", 4))],
        name,
        output_mode="update",
    )
    emitted = [r for b in sorted(out) for r in out[b]]
    # the first change fires; the second waits (< 1h later) until the window closes
    assert [r for r in emitted if r[1] == at(0)] == [("a", at(0), 1), ("a", at(0), 3)]
    assert [r for r in emitted if r[1] == at(60)] == [("a", at(60), 4)]


def test_allowed_lateness_emits_corrections(name: str) -> None:
    query, out = run(
        windows(allowed_lateness="30s"),
        [
            rows((10, "a", 1)),
            rows((65, "a", 2)),  # wm 65s: window [0,60) ended, kept for 30s more
            rows((20, "a", 5)),  # late but within lateness: correction 6
            rows((100, "a", 0)),  # wm 100s: [0,60) + 30s <= 100: evicted
            rows((30, "a", 9)),  # beyond lateness: dropped
        ],
        name,
        output_mode="update",
    )
    emitted = [r for b in sorted(out) for r in out[b] if r[1] == at(0)]
    assert emitted == [("a", at(0), 1), ("a", at(0), 6)]
    assert sum(p.state_operators[0].num_rows_dropped_late for p in query.recent_progress) == 1


@pytest.mark.parametrize(
    "emit", [{"every_n_rows": 5}, {"early_every": "1s"}, {"allowed_lateness": "1m"}]
)
def test_emit_triggers_need_update_mode(name: str, emit: dict[str, object]) -> None:
    frame = windows(**emit)(ms.MemoryStream(SCHEMA).lazy())  # type: ignore[operator]
    with pytest.raises(ms.PlanError, match="output_mode='update'"):
        frame.sink_memory(name)


def test_emit_on_change_must_name_an_aggregate() -> None:
    frame = windows(emit_on_change={"nope": 1.0})(ms.MemoryStream(SCHEMA).lazy())  # type: ignore[operator]
    with pytest.raises(ms.PlanError, match="'nope' is not an aggregate"):
        frame.sink_memory("x", output_mode="update")
