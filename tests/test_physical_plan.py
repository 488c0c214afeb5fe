"""The compiled physical plan: stages, exchanges with each operator's partition keys,
operators that return values, and the stage executor the runtime plugs in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
import microstream.runtime.driver as driver_module
from microstream.checkpoint.storage import Storage
from microstream.operators.dedup import DedupNode
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    OperatorContext,
    OperatorOutput,
    PartitionKeys,
    StatefulOperator,
)
from microstream.plan.physical import (
    Exchange,
    ExchangeStage,
    OperatorStage,
    PhysicalPlan,
    SinkStage,
    StatelessStage,
    compile,
)
from microstream.runtime.driver import ExecutionConfig, StreamExecution
from microstream.runtime.stages import LocalStageExecutor

EVENTS = {"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Int64}


def events(name: str = "ev") -> ms.StreamFrame:
    return ms.MemoryStream(EVENTS, name=name).lazy()


def lines(frame: ms.StreamFrame) -> list[str]:
    return compile(frame.plan).explain_lines()


def exchange_keys(frame: ms.StreamFrame) -> list[PartitionKeys]:
    return [stage.exchange.keys for stage in compile(frame.plan).exchanges()]


# -- partition keys, one operator kind at a time ------------------------------------------


def test_aggregation_partitions_by_its_group_keys() -> None:
    frame = events().filter(pl.col("v") > 0).group_by("k").agg(pl.col("v").sum())
    assert lines(frame) == [
        '[0] Scan MemoryStream[ev] -> filter([(col("v")) > (dyn int: 0)])',
        "[1] Exchange(hash ['k']) <- [0]",
        "[2] op0 group_by(['k']).agg(col(\"v\").sum()) <- [1]",
        "[3] Sink <- [2]",
    ]
    assert exchange_keys(frame) == [("k",)]


def test_window_aggregation_partitions_by_group_keys_not_the_window() -> None:
    watermarked = events().with_watermark("ts", "10s")
    keyed = watermarked.group_by_dynamic("ts", every="1m", group_by="k").agg(pl.len())
    assert exchange_keys(keyed) == [("k",)]
    assert lines(keyed) == [
        "[0] Scan MemoryStream[ev] -> with_watermark('ts', delay=10s)",
        "[1] Exchange(hash ['k']) <- [0]",
        "[2] op0 group_by_dynamic(tumbling window on 'ts' every=1m period=1m offset=0s, "
        "group_by=['k']).agg(len()) <- [1]",
        "[3] Sink <- [2]",
    ]
    # (group_by needs keys on a stream; a window without them is the keyless aggregation)
    unkeyed = watermarked.group_by_dynamic("ts", every="1m").agg(pl.len())
    assert exchange_keys(unkeyed) == [SINGLE_PARTITION]
    assert lines(unkeyed)[1] == "[1] Exchange(single partition) <- [0]"


def test_an_event_time_key_is_a_partition_key() -> None:
    frame = (
        events()
        .with_watermark("ts", "10s")
        .with_columns(hour=pl.col("ts").dt.truncate("1h"))
        .group_by("hour", "k")
        .agg(pl.len())
    )
    assert exchange_keys(frame) == [("hour", "k")]


def test_sessions_partition_by_group_keys() -> None:
    watermarked = events().with_watermark("ts", "10s")
    keyed = watermarked.group_by_session("ts", gap="5m", group_by="k").agg(pl.len())
    assert exchange_keys(keyed) == [("k",)]
    unkeyed = watermarked.group_by_session("ts", gap="5m").agg(pl.len())
    assert exchange_keys(unkeyed) == [SINGLE_PARTITION]


def test_dedup_partitions_by_its_subset_or_every_column() -> None:
    assert exchange_keys(events().unique(subset=["k", "ts"])) == [("k", "ts")]
    assert exchange_keys(events().unique()) == [("ts", "k", "v")]


def test_stream_join_has_one_exchange_per_side_on_its_keys() -> None:
    left = events("left").with_watermark("ts", "10s")
    right = (
        ms.MemoryStream({"t": pl.Datetime("us"), "key": pl.String, "w": pl.Int64}, name="right")
        .lazy()
        .with_watermark("t", "10s")
    )
    joined = left.join(right, left_on="k", right_on="key", within="1m")
    assert lines(joined) == [
        "[0] Scan MemoryStream[left] -> with_watermark('ts', delay=10s)",
        "[1] Scan MemoryStream[right] -> with_watermark('t', delay=10s)",
        "[2] Exchange(hash ['k']) <- [0]",
        "[3] Exchange(hash ['key']) <- [1]",
        "[4] op0 stream join(how='inner', left_on=['k'], right_on=['key'], t - ts in "
        "[-1m, 1m]) <- [2], [3]",
        "[5] Sink <- [4]",
    ]


def test_asof_join_partitions_by_its_by_keys() -> None:
    left = events("trades").with_watermark("ts", "10s")
    right = (
        ms.MemoryStream({"qt": pl.Datetime("us"), "sym": pl.String, "bid": pl.Int64}, name="q")
        .lazy()
        .with_watermark("qt", "10s")
    )
    joined = left.join_asof(right, left_on="ts", right_on="qt", by_left="k", by_right="sym")
    assert exchange_keys(joined) == [("k",), ("sym",)]


def test_map_groups_with_state_partitions_by_group_keys() -> None:
    def count(key: tuple[Any, ...], rows: pl.DataFrame, state: Any) -> pl.DataFrame:
        return pl.DataFrame({"k": [key[0]], "n": [rows.height]})

    frame = (
        events()
        .group_by("k")
        .map_groups_with_state(
            count, state_schema={"n": pl.Int64}, output_schema={"k": pl.String, "n": pl.Int64}
        )
    )
    assert exchange_keys(frame) == [("k",)]


# -- chains, shared inputs, steps after an operator -----------------------------------------


def test_join_then_aggregation_exchanges_before_each_operator() -> None:
    left = events("l").with_watermark("ts", "10s")
    right = events("r").with_watermark("ts", "10s").rename({"k": "k2", "v": "w"})
    frame = (
        left.join(right, left_on="k", right_on="k2", within="1m")
        .with_columns(total=pl.col("v") + pl.col("w"))
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("total").sum())
    )
    plan = compile(frame.plan)
    kinds = [type(stage).__name__ for stage in plan.stages]
    assert kinds == [
        "StatelessStage",
        "StatelessStage",
        "ExchangeStage",
        "ExchangeStage",
        "OperatorStage",
        "StatelessStage",
        "ExchangeStage",
        "OperatorStage",
        "SinkStage",
    ]
    assert [e.exchange.keys for e in plan.exchanges()] == [("k",), ("k2",), ("k",)]
    assert [e.input for e in plan.exchanges()] == [0, 1, 5]
    join, agg = plan.operators()
    assert (join.operator_id, join.append_only, join.delay_us) == ("op0", True, 0)
    # the join emits pairs up to 1m older than the watermark: the aggregation judges later
    assert (agg.operator_id, agg.append_only, agg.delay_us) == ("op1", False, 60_000_000)
    after = plan.stages[5]
    assert isinstance(after, StatelessStage)
    assert after.describe() == '[4] -> with_columns(total=[(col("v")) + (col("w"))])'
    assert plan.explain_lines()[7] == (
        "[7] op1 group_by_dynamic(tumbling window on 'ts' every=1m period=1m offset=0s, "
        "group_by=['k']).agg(col(\"total\").sum()) (watermark held back 1m) <- [6]"
    )


def test_dedup_feeding_an_aggregation_has_two_exchanges() -> None:
    frame = (
        events()
        .with_watermark("ts", "10s")
        .unique(subset=["k", "ts"])
        .group_by_dynamic("ts", every="1m")
        .agg(pl.len())
    )
    assert lines(frame) == [
        "[0] Scan MemoryStream[ev] -> with_watermark('ts', delay=10s)",
        "[1] Exchange(hash ['k', 'ts']) <- [0]",
        "[2] op0 unique(subset=['k', 'ts'], keep='first') (append mode: feeds another "
        "operator) <- [1]",
        "[3] Exchange(single partition) <- [2]",
        "[4] op1 group_by_dynamic(tumbling window on 'ts' every=1m period=1m offset=0s)"
        ".agg(len()) <- [3]",
        "[5] Sink <- [4]",
    ]


def test_self_join_reads_one_stage_twice() -> None:
    watermarked = events().with_watermark("ts", "10s")
    joined = watermarked.join(watermarked, on="k", within="1m", suffix="_r")
    assert lines(joined) == [
        "[0] Scan MemoryStream[ev] -> with_watermark('ts', delay=10s)",
        "[1] Exchange(hash ['k']) <- [0]",
        "[2] Exchange(hash ['k']) <- [0]",
        "[3] op0 stream join(how='inner', on=['k'], ts - ts in [-1m, 1m]) <- [1], [2]",
        "[4] Sink <- [3]",
    ]


def test_a_node_feeding_two_branches_runs_once_per_batch(tmp_path: Path) -> None:
    calls: list[int] = []

    def tag(df: pl.DataFrame) -> pl.DataFrame:
        calls.append(df.height)
        return df

    source = ms.MemoryStream(EVENTS, name="self_join_once")
    shared = source.lazy().map_batches(tag).with_watermark("ts", "0s")
    left = shared.filter(pl.col("v") < 10)
    right = shared.filter(pl.col("v") >= 10).select("ts", "k", w="v")
    plan = compile(left.join(right, on="k", within="1m").plan)
    assert plan.explain_lines()[:3] == [
        "[0] Scan MemoryStream[self_join_once] -> map_batches(test_a_node_feeding_two_branches_"
        "runs_once_per_batch.<locals>.tag) -> with_watermark('ts', delay=0s)",
        '[1] [0] -> filter([(col("v")) < (dyn int: 10)])',
        "[2] [0] -> filter([(col(\"v\")) >= (dyn int: 10)]) -> select('ts', 'k', w='v')",
    ]
    query = left.join(right, on="k", within="1m").sink_memory(
        "self_join_once", checkpoint=str(tmp_path / "cp")
    )
    try:
        source.add_data({"ts": [datetime(2024, 1, 1, 0, 0, 1)] * 2, "k": ["a", "a"], "v": [1, 10]})
        query.process_all_available(timeout=30)
    finally:
        query.stop()
    # the shared stage (map_batches and watermark) ran once for the batch's two rows
    # (the empty calls are planning's and the no-data batch's)
    assert [n for n in calls if n] == [2]
    assert ms.table("self_join_once").select("k", "v", "w").rows() == [("a", 1, 10)]


# -- failure paths ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _NoKeys(DedupNode):
    keys: tuple[PartitionKeys, ...] = ((),)

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        return self.keys


def _no_keys(keys: tuple[PartitionKeys, ...]) -> _NoKeys:
    node = events().unique(subset="k").plan
    assert isinstance(node, DedupNode)
    fields = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    return _NoKeys(**fields, keys=keys)


def test_an_operator_without_keys_must_say_single_partition() -> None:
    with pytest.raises(ms.PlanError, match=r"declares no partition keys for its input 0"):
        compile(_no_keys(((),)))
    with pytest.raises(ms.PlanError, match=r"declares 2 partitionings for 1 inputs"):
        compile(_no_keys((("k",), ("k",))))
    assert compile(_no_keys((SINGLE_PARTITION,))).exchanges()[0].exchange == Exchange(
        SINGLE_PARTITION
    )


# -- operators return values ------------------------------------------------------------------


def test_an_operator_returns_its_rows_and_late_rows(tmp_path: Path) -> None:
    node = events().with_watermark("ts", "0s").unique(subset=["k", "ts"]).plan
    assert isinstance(node, DedupNode)
    operator: StatefulOperator = node.build_operator("op0", Storage(tmp_path).sub("state/op0"))
    operator.load(None)
    at = [datetime(2024, 1, 1, 0, 0, s) for s in (5, 20, 20)]
    batch = pl.DataFrame({"ts": at, "k": ["a", "b", "b"], "v": [1, 2, 3]}, schema=EVENTS)
    ten_s = int(datetime(2024, 1, 1, 0, 0, 10).timestamp() * 1_000_000)
    ctx = OperatorContext(batch_id=7, late_watermark_us=ten_s, watermark_us=ten_s,
                          output_mode="append")  # fmt: skip
    output = operator.process((batch,), ctx)
    assert isinstance(output, OperatorOutput)
    assert output.rows.rows() == [(at[1], "b", 2)]
    [late] = output.late_rows
    assert late.select("k", "v", "batch_id", "operator", "reason").rows() == [
        ("a", 1, 7, "op0", "late")
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.watermark_us = 0  # type: ignore[misc]
    # nothing is left behind for the next batch: its output has only its own late rows
    again = operator.process((batch.head(0),), ctx)
    assert again.rows.height == 0 and again.late_rows == ()


# -- the driver and the executor seam ----------------------------------------------------------


class RecordingExecutor(LocalStageExecutor):
    """A runtime's executor: local, and it records the exchanges it routes."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def exchange(self, frame: pl.LazyFrame, exchange: Exchange) -> pl.LazyFrame:
        self.exchanges.append(exchange)
        return frame


class ExecutorRuntime:
    def __init__(self, executor: RecordingExecutor) -> None:
        self.executor = executor

    def prepare(self, config: ExecutionConfig) -> StreamExecution:
        return StreamExecution(config, executor=self.executor)


def test_the_plan_is_compiled_once_and_run_by_the_runtimes_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[PhysicalPlan] = []
    real = driver_module.compile_plan

    def counting(plan: Any) -> PhysicalPlan:
        compiled.append(real(plan))
        return compiled[-1]

    monkeypatch.setattr(driver_module, "compile_plan", counting)
    executor = RecordingExecutor()
    source = ms.MemoryStream(EVENTS, name="compiled_once")
    frame = source.lazy().group_by("k").agg(pl.col("v").sum())
    query = frame.sink_memory(
        "compiled_once",
        output_mode="complete",
        checkpoint=str(tmp_path / "cp"),
        runtime=ExecutorRuntime(executor),
    )
    try:
        for v in (1, 2, 3):
            source.add_data({"ts": [datetime(2024, 1, 1)], "k": ["a"], "v": [v]})
            query.process_all_available(timeout=30)
    finally:
        query.stop()
    assert len(compiled) == 1
    assert executor.exchanges == [Exchange(("k",))] * 3
    assert ms.table("compiled_once").rows() == [("a", 6)]
    [stage] = [s for s in compiled[0].stages if isinstance(s, OperatorStage)]
    assert stage.operator_id == "op0" and isinstance(compiled[0].stages[-1], SinkStage)
    assert isinstance(compiled[0].stages[1], ExchangeStage)


def test_explain_prints_the_physical_plan_after_the_logical_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    events("xs").filter(pl.col("v") > 1).unique(subset="k").explain()
    assert capsys.readouterr().out.splitlines() == [
        "unique(subset=['k'], keep='first')",
        "  · keys are kept forever (no watermark on the subset)",
        '  filter([(col("v")) > (dyn int: 1)])',
        "    Scan MemoryStream[xs]",
        "",
        "Physical plan:",
        '  [0] Scan MemoryStream[xs] -> filter([(col("v")) > (dyn int: 1)])',
        "  [1] Exchange(hash ['k']) <- [0]",
        "  [2] op0 unique(subset=['k'], keep='first') <- [1]",
        "  [3] Sink <- [2]",
    ]
