"""Windowed aggregation: exact rows for hand-built cases of each window kind and mode."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms

T0 = datetime(2024, 1, 1)
SCHEMA = {"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Int64}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rows(*items: tuple[float, str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [at(s) for s, _, _ in items],
            "k": [k for _, k, _ in items],
            "v": [v for *_, v in items],
        },
        schema=SCHEMA,
    )


def run(
    frame_fn: Any,
    batches: list[pl.DataFrame],
    name: str,
    *,
    output_mode: str = "append",
    trigger: ms.Trigger | None = None,
) -> tuple[ms.StreamingQuery, dict[int, list[tuple[Any, ...]]]]:
    """Run batches one by one; returns the query and the rows emitted per batch id."""
    source = ms.MemoryStream(SCHEMA)
    emitted: dict[int, list[tuple[Any, ...]]] = {}

    def collect(df: pl.DataFrame, batch_id: int) -> None:
        emitted[batch_id] = df.rows()

    query = frame_fn(source.lazy()).foreach_batch(
        collect, output_mode=output_mode, checkpoint=f"memory://{name}/cp", trigger=trigger
    )
    for batch in batches:
        source.add_data(batch)
        query.process_all_available(timeout=30)
    query.stop()
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]
    return query, emitted


def tumbling(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("v").sum(), n=pl.len())
    )


def test_tumbling_append_emits_each_window_once_when_closed(name: str) -> None:
    query, out = run(
        tumbling,
        [
            rows((5, "a", 1), (30, "a", 2), (65, "b", 3)),  # batch 0: wm 0
            rows((1, "a", 10), (200, "b", 4)),  # batch 2 (after no-data batch 1, wm 55s)
        ],
        name,
    )
    # batch 1 is the no-data batch for wm 55s; batch 3 the one for wm 190s.
    assert out == {
        0: [],
        1: [],
        2: [],
        3: [("a", at(0), 13, 3), ("b", at(60), 3, 1)],
    }
    marks = [(p.batch_id, p.watermark, p.late_watermark) for p in query.recent_progress]
    assert [m[1] and m[1].replace(tzinfo=None) for m in marks] == [
        None,  # no event seen before batch 0: no watermark
        at(55),
        at(55),
        at(190),
    ]


def test_late_rows_dropped_counted_and_routed(name: str) -> None:
    late_table = f"{name}_late"

    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "10s", on_late=late_table)
            .group_by_dynamic("ts", every="1m", group_by="k")
            .agg(pl.col("v").sum())
        )

    query, out = run(
        frame_fn,
        [
            rows((130, "a", 1)),  # wm after: 120s
            rows((119, "a", 5), (120, "a", 6), (121, "b", 7)),  # window [60,120) is late
        ],
        name,
    )
    assert out[2] == []  # batch 1 is the no-data batch at wm 120s
    late = ms.table(late_table)
    assert late.select("ts", "k", "v", "batch_id").rows() == [(at(119), "a", 5, 2)]
    assert late["late_watermark"].to_list() == [at(120)]
    assert late.select("window_start", "window_end").rows() == [(at(60), at(120))]
    batch2 = next(p for p in query.recent_progress if p.batch_id == 2)
    assert batch2.state_operators[0].num_rows_dropped_late == 1
    # Equality counts as late: window end 120s <= watermark 120s.
    assert (at(120), "a", 6) not in late.select("ts", "k", "v").rows()


def test_sliding_windows_late_for_old_windows_only(name: str) -> None:
    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by_dynamic("ts", every="10s", period="30s", include_boundaries=True)
            .agg(pl.col("v").sum())
        )

    _, out = run(
        frame_fn,
        [
            rows((25, "a", 1)),  # windows [0,30) [10,40) [20,50); wm -> 25
            rows((19, "a", 10)),  # windows [0,30) [10,40) only ([-10,20) ends <= 25: late)
            rows((100, "a", 100)),  # closes everything up to 100
        ],
        name,
        trigger=None,
    )
    emitted = [r for batch in sorted(out) for r in out[batch]]
    assert emitted == [
        (at(0), at(30), at(0), 11),
        (at(10), at(40), at(10), 11),
        (at(20), at(50), at(20), 1),
        # windows [80,110) [90,120) [100,130) stay open
    ]


def test_update_mode_emits_changed_groups_every_batch(name: str) -> None:
    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "0s")
            .group_by_dynamic("ts", every="1m", group_by="k")
            .agg(pl.col("v").sum())
        )

    _, out = run(
        frame_fn,
        [rows((1, "a", 1), (2, "b", 2)), rows((3, "a", 3)), rows((70, "a", 5))],
        name,
        output_mode="update",
    )
    assert out[0] == [("a", at(0), 1), ("b", at(0), 2)]
    assert out[2] == [("a", at(0), 4)]  # only the changed group (batch 1: no-data)
    changed = [b for b in out if out[b] and b > 2]
    assert out[changed[0]] == [("a", at(60), 5)]


def test_global_group_by_complete_and_update(name: str) -> None:
    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return frame.group_by("k").agg(pl.col("v").sum(), pl.col("v").median().alias("med"))

    _, complete = run(frame_fn, [rows((1, "a", 1), (2, "b", 2)), rows((3, "a", 5))], name + "c",
                      output_mode="complete")  # fmt: skip
    assert complete == {0: [("a", 1, 1.0), ("b", 2, 2.0)], 1: [("a", 6, 3.0), ("b", 2, 2.0)]}
    _, update = run(frame_fn, [rows((1, "a", 1), (2, "b", 2)), rows((3, "a", 5))], name + "u",
                    output_mode="update")  # fmt: skip
    assert update == {0: [("a", 1, 1.0), ("b", 2, 2.0)], 1: [("a", 6, 3.0)]}


def test_append_over_global_aggregation_is_refused(name: str) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().group_by("k").agg(pl.len())
    with pytest.raises(ms.PlanError, match="output_mode='append' needs windows that close"):
        frame.sink_memory(name)


def test_window_without_watermark_cannot_append(name: str) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().group_by_dynamic("ts", every="1m").agg(pl.len())
    with pytest.raises(ms.PlanError, match="with_watermark"):
        frame.sink_memory(name)


def test_group_by_on_watermarked_time_key_appends(name: str) -> None:
    def frame_fn(frame: ms.StreamFrame) -> ms.StreamFrame:
        return frame.with_watermark("ts", "5s").group_by("ts", "k").agg(pl.col("v").sum())

    _, out = run(frame_fn, [rows((1, "a", 1), (1, "a", 2)), rows((20, "b", 3))], name)
    emitted = [r for b in sorted(out) for r in out[b]]
    assert emitted == [(at(1), "a", 3)]


def test_available_now_flush_emits_every_window(name: str, tmp_path: Path) -> None:
    source = ms.MemoryStream(SCHEMA)
    for batch in (rows((5, "a", 1)), rows((65, "a", 2)), rows((130, "b", 3))):
        source.add_data(batch)
    frame = tumbling(source.lazy())
    query = frame.sink_memory(name, trigger=ms.Trigger.available_now(flush=True),
                              checkpoint=tmp_path / "cp")  # fmt: skip
    assert query.await_termination(timeout=30)
    assert ms.table(name).rows() == [("a", at(0), 1, 1), ("a", at(60), 2, 1), ("b", at(120), 3, 1)]
    last = query.recent_progress[-1]
    assert last.num_input_rows == 0 and last.watermark is not None
    assert last.watermark.year == 9999


def test_available_now_without_flush_ends_with_one_no_data_batch(name: str, tmp_path: Path) -> None:
    source = ms.MemoryStream(SCHEMA)
    source.add_data(rows((5, "a", 1), (130, "b", 3)))
    query = tumbling(source.lazy()).sink_memory(
        name, trigger=ms.Trigger.available_now(), checkpoint=tmp_path / "cp"
    )
    assert query.await_termination(timeout=30)
    assert [(p.batch_id, p.num_input_rows) for p in query.recent_progress] == [(0, 2), (1, 0)]
    assert ms.table(name).rows() == [("a", at(0), 1, 1)]  # [120,180) stays open: wm 120s


def test_state_survives_restart(name: str, tmp_path: Path) -> None:
    batches = [rows((5, "a", 1), (30, "b", 2)), rows((40, "a", 3)), rows((200, "a", 4))]

    def run_split(split: int, cp: Path) -> list[tuple[Any, ...]]:
        source = ms.MemoryStream(SCHEMA, name="src")
        table = f"{name}_{split}"
        query = tumbling(source.lazy()).sink_memory(table, checkpoint=cp)
        for i, batch in enumerate(batches):
            if i == split:  # stop, and restart from the checkpoint: state must come back
                query.stop()
                query = tumbling(source.lazy()).sink_memory(table, checkpoint=cp)
            source.add_data(batch)
            query.process_all_available(timeout=30)
        query.stop()
        return ms.table(table).rows()

    expected = [("a", at(0), 4, 2), ("b", at(0), 2, 1)]
    assert run_split(-1, tmp_path / "cp0") == expected
    assert run_split(2, tmp_path / "cp1") == expected
    state = list((tmp_path / "cp1" / "state" / "op0").rglob("*.arrow"))
    assert state, "state is persisted as Arrow IPC files"


def test_explain_shows_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    frame = (
        ms.MemoryStream(SCHEMA)
        .lazy()
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m")
        .agg(pl.col("v").mean(), pl.col("v").quantile(0.9).alias("p90"))
    )
    frame.explain()
    out = capsys.readouterr().out
    assert "v: incremental partials [mean]" in out
    assert "p90: keeps rows, evaluated at emit" in out
    assert "state evicted when window end <= watermark" in out


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("closed", "right", "left"), ("label", "right", "left"), ("start_by", "datapoint", "window")],
)
def test_batch_only_alignment_options_are_refused(option: str, value: str, expected: str) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy()
    with pytest.raises(
        ms.PlanError, match=rf"group_by_dynamic\({option}='{value}'\) has no meaning on a stream"
    ) as info:
        frame.group_by_dynamic("ts", every="1m", **{option: value})
    assert str(info.value).endswith(f"use {option}='{expected}'")
