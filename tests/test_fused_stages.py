"""A stateless stage that ends at its watermark node (``with_watermark`` before an
operator or the sink) hands on the rows the watermark collected: one Polars call for
the stage, none for its consumer (before: the watermark's collect, a ``select`` of the
largest time, the consumer's collect of the same rows). The rows and the observations
are those of ``StatelessStage.lower``, which a cluster runtime still calls."""

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
    """How many times Polars was asked to run a lazy plan (``DataFrame.select`` is one)."""
    calls = {"collect": 0, "in-memory": 0}
    collect = pl.LazyFrame.collect

    def counting_collect(self: pl.LazyFrame, *args: Any, **kwargs: Any) -> Any:
        calls["collect"] += 1
        calls["in-memory"] += kwargs.get("engine") == "in-memory"
        return collect(self, *args, **kwargs)

    monkeypatch.setattr(pl.LazyFrame, "collect", counting_collect)
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
    assert isinstance(fused, pl.LazyFrame)  # (steps after the watermark: the consumer's)
    assert (
        fused.collect().rows()
        == unfused.rows()
        == [(T0 + timedelta(seconds=5), "a", 2), (None, "d", 6)]
    )
    assert fused.collect_schema().names() == ["ts", "k", "w"]


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
    assert isinstance(fused, pl.DataFrame)  # (the stage ends at the watermark: its rows)
    assert fused.equals(unfused)
    assert fused.columns == list(SCHEMA)  # (the declared width: the unread column as nulls)


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
    assert isinstance(fused, pl.LazyFrame)  # (a concat after the watermarks: the consumer's)
    assert sorted(fused.collect().rows()) == sorted(unfused.rows())
    assert sorted(fused.collect().select("k", "v").rows()) == [("a", 1), ("b", 2), ("c", 4)]


def test_a_stage_ending_at_its_watermark_is_one_polars_call_and_its_rows_go_on(
    counted: dict[str, int], tmp_path: Path
) -> None:
    frame = (
        ms.MemoryStream(SCHEMA, name="fused_c")
        .lazy()
        .filter(pl.col("v") >= 0)
        .with_watermark("ts", "0s")
        .unique(subset=["k", "ts"])
    )
    plan = compile(frame.plan)
    assert [type(s).__name__ for s in plan.stages] == [
        "StatelessStage",
        "ExchangeStage",
        "OperatorStage",
        "SinkStage",
    ]
    executor = LocalStageExecutor()
    operators = executor.start_operators(plan, Storage(tmp_path), 4, None)
    batch = _batch([(T0, "a", 1), (T0, "a", 1), (T0 + timedelta(seconds=1), "b", 2), (T0, "z", -1)])
    stage_out: list[Any] = []
    operator_in: list[Any] = []
    evaluate = StatelessStage.evaluate
    (operator,) = operators.values()
    process = operator.process

    def spy_evaluate(self: StatelessStage, *args: Any, **kwargs: Any) -> Any:
        before = counted["collect"]
        out = evaluate(self, *args, **kwargs)
        stage_out.append((out[0], counted["collect"] - before))
        return out

    def spy_process(batches: Any, ctx: OperatorContext) -> Any:
        operator_in.append(batches)
        return process(batches, ctx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StatelessStage, "evaluate", spy_evaluate)
        mp.setattr(operator, "process", spy_process)
        out = executor.run(plan, _inputs(plan, batch), CTX, operators)
    ((rows, collects),) = stage_out
    assert collects == 1  # the watermark's collect; its largest time without a query
    assert isinstance(rows, pl.DataFrame)
    assert operator_in[0][0] is rows  # the operator got those rows, not collected again
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


@pytest.mark.parametrize(
    "dtype",
    [pl.Datetime("us"), pl.Datetime("ns"), pl.Datetime("ms", "Europe/Paris"), pl.Date()],
    ids=str,
)
def test_the_largest_time_is_the_queries_for_every_time_dtype(dtype: pl.DataType) -> None:
    times = pl.Series(
        "t", [datetime(2024, 3, 1, 1, 2, 3, 456789), None, datetime(2023, 1, 1)]
    ).cast(dtype)
    node = WatermarkNode(None, "t", 0)  # type: ignore[arg-type]
    df = times.to_frame()
    expected = df.select(pl.col("t").dt.epoch("us").max()).item()
    assert node.observe(df) == expected
    assert node.observe(df.head(0)) is None
    assert node.observe(df.slice(1, 1)) is None  # (null times only)


def test_a_stage_and_its_consumers_collect_on_the_in_memory_engine(
    counted: dict[str, int],
) -> None:
    """A batch is rows in memory and a stage a few row-wise steps: the streaming engine's
    task scheduling would cost more than the plan (both collects here: the watermark's,
    and the sink's of the filter after it)."""
    frame = (
        ms.MemoryStream(SCHEMA, name="fused_e")
        .lazy()
        .with_watermark("ts", "0s")
        .filter(pl.col("v") > 1)
    )
    plan = compile(frame.plan)
    batch = _batch([(T0, "a", 1), (T0, "b", 2)])
    counted.update({"collect": 0, "in-memory": 0})
    out = LocalStageExecutor().run(plan, _inputs(plan, batch), CTX, {})
    assert out.rows.select("k", "v").rows() == [("b", 2)]
    assert counted == {"collect": 2, "in-memory": 2}
