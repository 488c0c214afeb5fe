"""A stateless stage with a watermark node is one Polars call a batch: its plan and
each watermark's observation (rows, largest event time) collected together, and the
operator or sink after it reads those rows without collecting again. The rows and the
observations are those of the unfused path (``StatelessStage.lower``), which a stage
falls back to when a watermark's input runs a user function or a static join."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.plan.nodes import OperatorContext, ScanNode, WatermarkNode, declared_width
from microstream.plan.physical import PhysicalPlan, StatelessStage, WatermarkObservation, compile
from microstream.runtime.stages import LocalStageExecutor

SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Int64, "unused": pl.Float64})
T0 = datetime(2024, 1, 1)
CTX = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0, output_mode="append")


def _us(t: datetime) -> int:
    return int((t - datetime(1970, 1, 1)).total_seconds() * 1_000_000)


def _batch(rows: list[tuple[datetime | None, str, int]]) -> pl.DataFrame:
    ts, k, v = zip(*rows) if rows else ((), (), ())
    # (the source read three of the four declared columns)
    columns = {"ts": list(ts), "k": list(k), "v": list(v)}
    return pl.DataFrame(columns, schema={c: SCHEMA[c] for c in columns})


def _inputs(plan: PhysicalPlan, *batches: pl.DataFrame) -> dict[ScanNode, pl.LazyFrame]:
    # (as the driver gives a batch: a source told to read fewer columns comes back at the
    # declared width, the unread ones as null placeholders)
    scans = plan.logical.scans()
    return {scan: declared_width(df, SCHEMA) for scan, df in zip(scans, batches)}


def _watermark_nodes(plan: PhysicalPlan) -> list[WatermarkNode]:
    return [n for n in plan.logical.walk() if isinstance(n, WatermarkNode)]


def _both_ways(
    plan: PhysicalPlan, *batches: pl.DataFrame
) -> tuple[Any, dict[WatermarkNode, WatermarkObservation], Any, dict[Any, Any]]:
    """The first stage's result evaluated fused and by ``lower`` (the unfused path)."""
    stage = plan.stages[0]
    assert isinstance(stage, StatelessStage)
    fused, fused_seen = stage.evaluate(_inputs(plan, *batches), [], CTX)
    lazy, seen = stage.lower(_inputs(plan, *batches), [], CTX)
    return fused, fused_seen, lazy.collect(), seen


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many times Polars was asked to run a plan (``collect``, ``collect_all``)."""
    calls = {"collect": 0, "collect_all": 0}
    collect, collect_all = pl.LazyFrame.collect, pl.collect_all

    def counting_collect(self: pl.LazyFrame, *args: Any, **kwargs: Any) -> Any:
        calls["collect"] += 1
        return collect(self, *args, **kwargs)

    def counting_collect_all(*args: Any, **kwargs: Any) -> Any:
        calls["collect_all"] += 1
        return collect_all(*args, **kwargs)

    monkeypatch.setattr(pl.LazyFrame, "collect", counting_collect)
    monkeypatch.setattr(pl, "collect_all", counting_collect_all)
    yield calls


def test_a_watermark_sees_the_rows_of_its_input_not_of_the_stage_output() -> None:
    frame = (
        ms.MemoryStream(SCHEMA, name="fused_a")
        .lazy()
        .filter(pl.col("v") > 0)  # before the watermark: not seen
        .with_watermark("ts", "10s")
        .filter(pl.col("v") < 100)  # after it: seen, then dropped
        .select("ts", "k", w=pl.col("v") * 2)
    )
    plan = compile(frame.plan)
    batch = _batch(
        [
            (T0 + timedelta(seconds=5), "a", 1),
            (T0 + timedelta(seconds=50), "b", -1),  # filtered before: not the max
            (T0 + timedelta(seconds=9), "c", 500),  # the max the watermark sees
            (None, "d", 3),
        ]
    )
    fused, fused_seen, unfused, seen = _both_ways(plan, batch)
    (node,) = _watermark_nodes(plan)
    expected = WatermarkObservation(rows=3, max_event_us=_us(T0 + timedelta(seconds=9)))
    assert fused_seen == seen == {node: expected}
    assert isinstance(fused, pl.DataFrame)
    assert fused.rows() == unfused.rows() == [(T0 + timedelta(seconds=5), "a", 2), (None, "d", 6)]
    assert fused.columns == ["ts", "k", "w"]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], WatermarkObservation(rows=0, max_event_us=None)),
        ([(None, "a", 1), (None, "b", 2)], WatermarkObservation(rows=2, max_event_us=None)),
        ([(T0, "a", 1)], WatermarkObservation(rows=1, max_event_us=_us(T0))),
    ],
    ids=["no rows", "null times only", "one row"],
)
def test_observations_of_empty_and_null_batches(
    rows: list[tuple[datetime | None, str, int]], expected: WatermarkObservation
) -> None:
    frame = ms.MemoryStream(SCHEMA, name="fused_b").lazy().with_watermark("ts", "0s")
    plan = compile(frame.plan)
    fused, fused_seen, unfused, seen = _both_ways(plan, _batch(rows))
    assert list(fused_seen.values()) == list(seen.values()) == [expected]
    assert fused.rows() == unfused.rows()


def test_two_watermarks_in_one_stage_each_see_their_own_input() -> None:
    left = ms.MemoryStream(SCHEMA, name="fused_l").lazy().with_watermark("ts", "1s")
    right = (
        ms.MemoryStream(SCHEMA, name="fused_r")
        .lazy()
        .filter(pl.col("k") != "x")
        .with_watermark("ts", "2s")
    )
    plan = compile(ms.concat([left, right]).plan)
    assert len(plan.stages) == 2  # (one stateless stage, the sink)
    a = _batch([(T0 + timedelta(seconds=3), "a", 1), (T0, "b", 2)])
    b = _batch([(T0 + timedelta(seconds=7), "x", 3), (T0 + timedelta(seconds=4), "c", 4)])
    fused, fused_seen, unfused, seen = _both_ways(plan, a, b)
    wm_left, wm_right = sorted(_watermark_nodes(plan), key=lambda n: n.delay_us)
    assert fused_seen == seen
    assert fused_seen[wm_left] == WatermarkObservation(2, _us(T0 + timedelta(seconds=3)))
    assert fused_seen[wm_right] == WatermarkObservation(1, _us(T0 + timedelta(seconds=4)))
    assert sorted(fused.rows()) == sorted(unfused.rows())
    assert sorted(fused.select("k", "v").rows()) == [("a", 1), ("b", 2), ("c", 4)]


def test_a_stage_with_a_watermark_is_one_polars_call_and_the_operator_does_not_collect(
    counted: dict[str, int], tmp_path: Path
) -> None:
    frame = (
        ms.MemoryStream(SCHEMA, name="fused_c")
        .lazy()
        .with_watermark("ts", "0s")
        .filter(pl.col("v") >= 0)
        .unique(subset=["k", "ts"])
    )
    plan = compile(frame.plan)
    executor = LocalStageExecutor()
    operators = executor.start_operators(plan, Storage(tmp_path), 4, None)
    batch = _batch([(T0, "a", 1), (T0, "a", 1), (T0 + timedelta(seconds=1), "b", 2)])
    counted.update(collect=0, collect_all=0)
    assert sum(isinstance(s, StatelessStage) for s in plan.stages) == 1
    stage_calls: dict[str, int] = {}
    original = StatelessStage.evaluate

    def spy(self: StatelessStage, *args: Any, **kwargs: Any) -> Any:
        before = dict(counted)
        out = original(self, *args, **kwargs)
        stage_calls.update({k: counted[k] - before[k] for k in counted})
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StatelessStage, "evaluate", spy)
        out = executor.run(plan, _inputs(plan, batch), CTX, operators)
    # the stage: one collect_all (its rows and the watermark's row), no collect of its own
    assert stage_calls == {"collect": 0, "collect_all": 1}
    assert sorted(out.rows.select("k", "v").rows()) == [("a", 1), ("b", 2)]
    (node,) = _watermark_nodes(plan)
    assert out.watermarks == {node: WatermarkObservation(3, _us(T0 + timedelta(seconds=1)))}


def test_a_user_function_before_the_watermark_runs_once_a_batch(tmp_path: Path) -> None:
    calls: list[int] = []

    def tag(df: pl.DataFrame) -> pl.DataFrame:
        calls.append(df.height)
        return df.with_columns(pl.col("v") + 1)

    source = ms.MemoryStream(SCHEMA, name="fused_udf")
    frame = (
        source.lazy()
        .map_batches(tag)
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("v").sum())
    )
    query = frame.sink_memory("fused_udf", checkpoint=str(tmp_path / "cp"), output_mode="append")
    try:
        source.add_data(
            {
                "ts": [T0, T0 + timedelta(seconds=30)],
                "k": ["a", "a"],
                "v": [1, 2],
                "unused": [0.0, 0.0],
            }
        )
        query.process_all_available(timeout=30)
        source.add_data({"ts": [T0 + timedelta(minutes=2)], "k": ["a"], "v": [5], "unused": [0.0]})
        query.process_all_available(timeout=30)
    finally:
        query.stop()
    assert [n for n in calls if n] == [2, 1]  # once per data batch (empties: planning, no-data)
    table = ms.table("fused_udf")
    assert table.select("k", "v").rows() == [("a", 5)]  # (1 + 1) + (2 + 1), window closed
