"""The Kinesis source and sink against moto's server (``moto_server``, one per session)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream.testing.moto_s3 import MotoS3Server
from microstream.testing.tcp_proxy import TcpProxy

boto3 = pytest.importorskip("boto3")

pytestmark = pytest.mark.integration

SCHEMA = {"user": pl.Int64, "amount": pl.Float64}
# explicit hash keys that land in the first and the second half of a two-shard stream
LOW, HIGH = str(1), str(2**127 + 1)


class Stream:
    """A fresh stream on the session's moto server, with a client to fill and read it."""

    def __init__(self, server: MotoS3Server, shards: int = 1) -> None:
        self.server = server
        self.name = f"s-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("kinesis", **server.aws_options())
        self.client.create_stream(StreamName=self.name, ShardCount=shards)

    @property
    def options(self) -> dict[str, Any]:
        return self.server.aws_options()

    def put(self, rows: list[dict[str, Any]], *, hash_key: str = LOW) -> list[str]:
        """Put each row as one JSON record; their sequence numbers."""
        return [
            self.client.put_record(
                StreamName=self.name,
                Data=json.dumps(row).encode(),
                PartitionKey=str(row.get("user", "k")),
                ExplicitHashKey=hash_key,
            )["SequenceNumber"]
            for row in rows
        ]

    def put_raw(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            self.client.put_record(
                StreamName=self.name, Data=payload, PartitionKey="k", ExplicitHashKey=LOW
            )

    def shard_ids(self) -> list[str]:
        return [s["ShardId"] for s in self.client.list_shards(StreamName=self.name)["Shards"]]

    def records(self) -> list[dict[str, Any]]:
        """Every record of every shard, shard by shard."""
        out = []
        for shard in self.shard_ids():
            iterator = self.client.get_shard_iterator(
                StreamName=self.name, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            out += self.client.get_records(ShardIterator=iterator, Limit=10000)["Records"]
        return out


@pytest.fixture
def stream(moto_server: MotoS3Server) -> Stream:
    return Stream(moto_server)


@pytest.fixture
def proxy(moto_server: MotoS3Server) -> Iterator[TcpProxy]:
    host, port = moto_server.endpoint_url.removeprefix("http://").split(":")
    with TcpProxy((host, int(port))) as proxy:
        yield proxy


def logged_end(checkpoint: Path, batch_id: int) -> dict[str, Any]:
    """The per-shard positions ``offsets/<batch_id>`` logged as the batch's end."""
    entry = json.loads((checkpoint / "offsets" / f"{batch_id}.json").read_text())
    shards: dict[str, Any] = entry["sources"][0]["end"]["shards"]
    return shards


def rows(n: int, first: int = 0) -> list[dict[str, Any]]:
    return [{"user": i, "amount": i / 2} for i in range(first, first + n)]


def test_exact_rows_with_metadata_shard_by_shard(moto_server: MotoS3Server) -> None:
    two = Stream(moto_server, shards=2)
    high = two.put(rows(2, 10), hash_key=HIGH)
    low = two.put(rows(3), hash_key=LOW)
    frame = ms.scan_kinesis(two.name, schema=SCHEMA, include_metadata=True, options=two.options)
    query = frame.sink_memory("kinesis_exact")
    query.process_all_available()
    query.stop()
    out = ms.table("kinesis_exact")
    [first, second] = two.shard_ids()
    assert out.select("user", "amount", "shard_id", "sequence_number", "partition_key").rows() == [
        (0, 0.0, first, low[0], "0"),
        (1, 0.5, first, low[1], "1"),
        (2, 1.0, first, low[2], "2"),
        (10, 5.0, second, high[0], "10"),
        (11, 5.5, second, high[1], "11"),
    ]
    assert out.schema["arrival_time"] == pl.Datetime("ms", "UTC")
    assert out["arrival_time"].null_count() == 0


def test_positions_per_shard_are_logged_and_a_restart_goes_on(
    stream: Stream, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "cp"
    sequences = stream.put(rows(5))

    def start() -> ms.StreamingQuery:
        return ms.scan_kinesis(
            stream.name, schema=SCHEMA, max_records_per_trigger=2, options=stream.options
        ).sink_parquet(tmp_path / "out", checkpoint=checkpoint, trigger=ms.Trigger.available_now())

    query = start()
    query.await_termination(30)
    [shard] = stream.shard_ids()
    positions = [logged_end(checkpoint, n)[shard] for n in range(3)]
    assert [(p["sequence"], p["records"]) for p in positions] == [
        (sequences[1], 2),
        (sequences[3], 4),
        (sequences[4], 5),
    ]
    stream.put(rows(2, 5))
    query = start()
    query.await_termination(30)
    out = ms.read_file_sink(tmp_path / "out")
    assert out["user"].to_list() == list(range(7))


def test_a_rerun_batch_reads_exactly_its_logged_range(stream: Stream, tmp_path: Path) -> None:
    checkpoint = tmp_path / "cp"
    seen: dict[int, list[tuple[Any, ...]]] = {}

    def keep(df: pl.DataFrame, batch_id: int) -> None:
        seen.setdefault(batch_id, []).append(tuple(df["user"].to_list()))

    def run() -> None:
        # available-now: one batch of what is there, so batches do not depend on timing
        frame = ms.scan_kinesis(stream.name, schema=SCHEMA, options=stream.options)
        frame.foreach_batch(
            keep, checkpoint=checkpoint, trigger=ms.Trigger.available_now()
        ).await_termination(30)

    stream.put(rows(2))
    run()
    stream.put(rows(3, 2))
    run()
    assert seen == {0: [(0, 1)], 1: [(2, 3, 4)]}
    # a crash after the sink, before commits/1; more records arrived meanwhile
    (checkpoint / "commits" / "1.json").unlink()
    stream.put(rows(1, 5))
    run()
    assert seen == {0: [(0, 1)], 1: [(2, 3, 4), (2, 3, 4)], 2: [(5,)]}


def test_latest_starts_after_the_records_present_at_the_first_start(
    stream: Stream, tmp_path: Path
) -> None:
    stream.put(rows(2))
    frame = ms.scan_kinesis(
        stream.name, schema=SCHEMA, starting_position="latest", options=stream.options
    )
    query = frame.sink_memory("kinesis_latest")
    query.process_all_available()
    stream.put(rows(2, 100))
    query.process_all_available()
    query.stop()
    assert ms.table("kinesis_latest")["user"].to_list() == [100, 101]


def test_bad_records_follow_the_policy(stream: Stream) -> None:
    stream.put_raw([b'{"user": 1, "amount": 1.0}', b"not json", b'{"user": 2, "amount": 2.0}'])
    fail = ms.scan_kinesis(stream.name, schema=SCHEMA, options=stream.options)
    query = fail.sink_memory("kinesis_bad_fail")
    with pytest.raises(ms.SourceError, match=r"bad record at shard shardId-\d+ sequence number 2"):
        query.process_all_available()
    skip = ms.scan_kinesis(stream.name, schema=SCHEMA, on_bad_record="skip", options=stream.options)
    query = skip.sink_memory("kinesis_bad_skip")
    query.process_all_available()
    query.stop()
    assert ms.table("kinesis_bad_skip")["user"].to_list() == [1, 2]
    dead = ms.scan_kinesis(
        stream.name,
        schema=SCHEMA,
        on_bad_record="dead_letter",
        dead_letter="kinesis_dead",
        options=stream.options,
    )
    query = dead.sink_memory("kinesis_bad_dead")
    query.process_all_available()
    query.stop()
    assert ms.table("kinesis_dead").select("sequence_number", "value", "batch_id").rows() == [
        ("2", b"not json", 0)
    ]


def test_a_replayed_range_the_stream_no_longer_holds_is_data_loss(
    stream: Stream, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "cp"
    stream.put(rows(4))

    def start() -> ms.StreamingQuery:
        frame = ms.scan_kinesis(stream.name, schema=SCHEMA, options=stream.options)
        return frame.foreach_batch(lambda df, batch_id: None, checkpoint=checkpoint)

    query = start()
    query.process_all_available()
    query.stop()
    (checkpoint / "commits" / "0.json").unlink()
    # the stream is deleted and created again: its records (and sequence numbers) are new
    stream.client.delete_stream(StreamName=stream.name)
    stream.client.create_stream(StreamName=stream.name, ShardCount=1)
    stream.put(rows(2, 50))
    with pytest.raises(
        ms.DataLossError,
        match=r"records after sequence number \(the start\) up to \d+: the log says 4 records, "
        r"the stream now has 2 of them",
    ):
        start().process_all_available()


def test_a_deleted_stream_is_data_loss(stream: Stream, tmp_path: Path) -> None:
    checkpoint = tmp_path / "cp"
    stream.put(rows(1))
    frame = ms.scan_kinesis(stream.name, schema=SCHEMA, options=stream.options)
    query = frame.foreach_batch(lambda df, batch_id: None, checkpoint=checkpoint)
    query.process_all_available()
    stream.client.delete_stream(StreamName=stream.name)
    with pytest.raises(ms.DataLossError, match=rf"stream '{stream.name}' does not exist any more"):
        query.process_all_available()


def test_a_missing_stream_at_the_first_start_is_named(moto_server: MotoS3Server) -> None:
    frame = ms.scan_kinesis("no-such-stream", schema=SCHEMA, options=moto_server.aws_options())
    with pytest.raises(ms.SourceError, match="stream 'no-such-stream' does not exist: create it"):
        frame.sink_memory("kinesis_missing").process_all_available()


def test_a_server_down_then_back_is_waited_for(
    stream: Stream, proxy: TcpProxy, moto_server: MotoS3Server
) -> None:
    stream.put(rows(2))
    frame = ms.scan_kinesis(stream.name, schema=SCHEMA, options=moto_server.aws_options(proxy.url))
    query = frame.sink_memory("kinesis_down")
    query.process_all_available()
    proxy.cut()
    stream.put(rows(2, 2))
    back = threading.Timer(0.5, proxy.restore)
    back.start()
    query.process_all_available()
    back.join()
    query.stop()
    assert ms.table("kinesis_down")["user"].to_list() == [0, 1, 2, 3]


def test_a_server_down_past_retry_timeout_fails_the_query(
    stream: Stream, proxy: TcpProxy, moto_server: MotoS3Server
) -> None:
    frame = ms.scan_kinesis(
        stream.name,
        schema=SCHEMA,
        retry_timeout="300ms",
        options=moto_server.aws_options(proxy.url),
    )
    query = frame.sink_memory("kinesis_down_long")
    query.process_all_available()
    proxy.cut()
    with pytest.raises(ms.SourceError, match=r"failed \d+ times within retry_timeout=0.3s"):
        query.process_all_available()


def test_records_before_and_after_a_split_and_a_merge_are_read_once(
    stream: Stream, tmp_path: Path
) -> None:
    # moto keeps every record in the first shard (it routes to closed shards too), so this
    # shows that closed shards are read to their end and their children listed, once each;
    # the order of parents before children is shown by readable_shards' doctest.
    checkpoint = tmp_path / "cp"

    def start() -> ms.StreamingQuery:
        frame = ms.scan_kinesis(stream.name, schema=SCHEMA, options=stream.options)
        return frame.sink_parquet(tmp_path / "out", checkpoint=checkpoint)

    stream.put(rows(2))
    query = start()
    query.process_all_available()
    [parent] = stream.shard_ids()
    stream.client.split_shard(
        StreamName=stream.name, ShardToSplit=parent, NewStartingHashKey=str(2**127)
    )
    stream.put(rows(2, 2))
    query.process_all_available()
    children = stream.shard_ids()[1:]
    stream.client.merge_shards(
        StreamName=stream.name, ShardToMerge=children[0], AdjacentShardToMerge=children[1]
    )
    query.process_all_available()
    query.stop()
    assert ms.read_file_sink(tmp_path / "out")["user"].to_list() == [0, 1, 2, 3]
    last = max(int(p.stem) for p in (checkpoint / "offsets").glob("*.json"))
    shards = logged_end(checkpoint, last)
    assert shards[parent]["exhausted"] is True
    assert {s: shards[s]["exhausted"] for s in children} == dict.fromkeys(children, True)


# -- the sink ----------------------------------------------------------------------------------


def test_the_sink_writes_rows_with_the_batch_identity(stream: Stream, tmp_path: Path) -> None:
    source = ms.MemoryStream({"user": pl.Int64, "amount": pl.Float64})
    query = source.lazy().sink_kinesis(
        stream.name, partition_key="user", options=stream.options, checkpoint=tmp_path / "cp"
    )
    source.add_data({"user": [1, 2], "amount": [0.5, 1.5]})
    query.process_all_available()
    source.add_data({"user": [3], "amount": [2.5]})
    query.process_all_available()
    query.stop()
    written = [(r["PartitionKey"], json.loads(r["Data"])) for r in stream.records()]
    qid = query.id
    assert written == [
        ("1", {"user": 1, "amount": 0.5, "microstream_query_id": qid, "microstream_batch_id": 0, "microstream_row": 0}),
        ("2", {"user": 2, "amount": 1.5, "microstream_query_id": qid, "microstream_batch_id": 0, "microstream_row": 1}),
        ("3", {"user": 3, "amount": 2.5, "microstream_query_id": qid, "microstream_batch_id": 1, "microstream_row": 0}),
    ]  # fmt: skip
    # round trip: the source reads back what the sink wrote
    back = ms.scan_kinesis(stream.name, schema=SCHEMA, options=stream.options)
    query = back.sink_memory("kinesis_round_trip")
    query.process_all_available()
    query.stop()
    assert ms.table("kinesis_round_trip").rows() == [(1, 0.5), (2, 1.5), (3, 2.5)]


def test_a_replayed_batch_is_sent_again_with_the_same_identity(
    stream: Stream, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "cp"
    source = ms.MemoryStream({"user": pl.Int64})

    def start() -> ms.StreamingQuery:
        return source.lazy().sink_kinesis(
            stream.name, partition_key="user", options=stream.options, checkpoint=checkpoint
        )

    query = start()
    source.add_data({"user": [1, 2]})
    query.process_all_available()
    query.stop()
    (checkpoint / "commits" / "0.json").unlink()
    query = start()
    query.process_all_available()
    query.stop()
    identities = [
        (d["user"], d["microstream_batch_id"], d["microstream_row"])
        for d in (json.loads(r["Data"]) for r in stream.records())
    ]
    assert identities == [(1, 0, 0), (2, 0, 1), (1, 0, 0), (2, 0, 1)]  # at least once


def test_the_sink_waits_for_a_server_down_then_back(
    stream: Stream, proxy: TcpProxy, moto_server: MotoS3Server, tmp_path: Path
) -> None:
    source = ms.MemoryStream({"user": pl.Int64})
    query = source.lazy().sink_kinesis(
        stream.name,
        partition_key="user",
        options=moto_server.aws_options(proxy.url),
        checkpoint=tmp_path / "cp",
    )
    proxy.cut()
    back = threading.Timer(0.5, proxy.restore)
    back.start()
    source.add_data({"user": [9]})
    query.process_all_available()
    back.join()
    query.stop()
    assert [json.loads(r["Data"])["user"] for r in stream.records()] == [9]


def test_the_sink_refuses_a_null_partition_key_and_a_missing_stream(
    stream: Stream, tmp_path: Path
) -> None:
    source = ms.MemoryStream({"user": pl.Int64})
    query = source.lazy().sink_kinesis(
        stream.name, partition_key="user", options=stream.options, checkpoint=tmp_path / "a"
    )
    source.add_data({"user": [1, None]})
    with pytest.raises(ms.SinkError, match="batch 0 row 1 has a null or empty partition key"):
        query.process_all_available()
    other = ms.MemoryStream({"user": pl.Int64})
    query = other.lazy().sink_kinesis(
        "no-such-stream", partition_key="user", options=stream.options, checkpoint=tmp_path / "b"
    )
    other.add_data({"user": [1]})
    with pytest.raises(
        ms.SinkError, match=r"KinesisSink\[no-such-stream\]: batch 0: .*ResourceNotFound"
    ):
        query.process_all_available()
