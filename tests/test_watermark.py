"""Watermarks: the tracker's rules, several inputs, idle inputs, the WAL record."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

import microstream as ms
from microstream.time.watermark import NO_WATERMARK_US, WatermarkInput, WatermarkTracker
from tests.test_windows import SCHEMA, at, rows

S = 1_000_000


def test_watermark_never_goes_back_and_truncates_to_ms() -> None:
    tracker = WatermarkTracker([WatermarkInput(delay_us=10 * S)])
    tracker.observe([100 * S + 999], now=0)
    assert tracker.advance(now=0) == 90 * S  # 100.000999s truncated to 100.000s, minus 10s
    tracker.observe([50 * S], now=1)
    assert tracker.advance(now=1) == 90 * S


def test_min_and_max_policies() -> None:
    def tracker(policy: str) -> WatermarkTracker:
        t = WatermarkTracker([WatermarkInput(0), WatermarkInput(0)], policy=policy)  # type: ignore[arg-type]
        t.observe([10 * S, 30 * S], now=0)
        return t

    assert tracker("min").advance(now=0) == 10 * S
    assert tracker("max").advance(now=0) == 30 * S


def test_input_without_data_holds_min_watermark_until_idle() -> None:
    t = WatermarkTracker([WatermarkInput(0), WatermarkInput(0, idle_timeout_us=1 * S)])
    t.inputs[1].last_active = 0.0
    t.observe([10 * S, None], now=0.5)
    # input 1 has sent nothing and is not idle yet: still no watermark at all
    assert t.advance(now=0.5) == NO_WATERMARK_US
    assert t.advance(now=1.5) == 10 * S  # idle for 1.5 s > 1 s: no longer holds it back


def concat_query(
    name: str, idle_timeout: str | None
) -> tuple[ms.MemoryStream, ms.MemoryStream, ms.StreamingQuery]:
    a, b = ms.MemoryStream(SCHEMA), ms.MemoryStream(SCHEMA)
    frame = ms.concat(
        [
            a.lazy().with_watermark("ts", "0s"),
            b.lazy().with_watermark("ts", "0s", idle_timeout=idle_timeout),
        ]
    )
    query = (
        frame.group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("v").sum())
        .sink_memory(name)
    )
    return a, b, query


@pytest.mark.parametrize("idle_timeout", [None, "300ms"])
def test_idle_input_stops_holding_windows_back(name: str, idle_timeout: str | None) -> None:
    a, b, query = concat_query(name, idle_timeout)
    a.add_data(rows((10, "a", 1)))
    b.add_data(rows((20, "b", 2)))
    query.process_all_available(timeout=30)
    time.sleep(0.5)  # b goes quiet
    a.add_data(rows((130, "a", 3)))
    query.process_all_available(timeout=30)
    a.add_data(rows((131, "a", 4)))  # one more trigger after the watermark moved
    query.process_all_available(timeout=30)
    query.stop()
    closed = ms.table(name).rows()
    if idle_timeout is None:
        assert closed == []  # b's watermark (20s) holds every window open
    else:
        assert closed == [("a", at(0), 1), ("b", at(0), 2)]


def test_watermark_logged_in_wal_and_commit(tmp_path: Path, name: str) -> None:
    source = ms.MemoryStream(SCHEMA, name="s")
    frame = (
        source.lazy().with_watermark("ts", "5s").group_by_dynamic("ts", every="1m").agg(pl.len())
    )
    query = frame.sink_memory(name, checkpoint=tmp_path / "cp")
    source.add_data(rows((65, "a", 1)))
    query.process_all_available(timeout=30)
    query.stop()
    wal = json.loads((tmp_path / "cp" / "offsets" / "1.json").read_text())
    assert wal["watermark_us"] == epoch_us(at(60))  # 65s - 5s
    assert wal["late_watermark_us"] == NO_WATERMARK_US  # batch 0 ran before any event
    commit = json.loads((tmp_path / "cp" / "commits" / "0.json").read_text())
    assert commit["max_event_us"] == [epoch_us(at(65))]


def epoch_us(value: datetime) -> int:
    return (value - datetime(1970, 1, 1)) // timedelta(microseconds=1)
