"""The RabbitMQ stream source and sink against a real broker (``rabbitmq_server``: a private
node with the stream plugin, started once per session), one stream per test."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from connectors.rabbitmq import (
    RabbitMQStreamOffset,
    RabbitMQStreamSinkSpec,
    RabbitMQStreamSourceSpec,
)
from connectors.rabbitmq.client import StreamConnection, StreamUrl, encode_messages
from connectors.rabbitmq.sink import publishing_id
from microstream.api.session import Session
from microstream.checkpoint.storage import Storage
from microstream.exceptions import DataLossError, SourceError
from microstream.protocols import SinkContext, SourceContext
from microstream.testing.rabbitmq import RabbitMQServer

pytestmark = pytest.mark.integration

SCHEMA = {"id": pl.Int64, "name": pl.String}


def connection(server: RabbitMQServer, retry_timeout_s: float = 10.0) -> StreamConnection:
    return StreamConnection(
        StreamUrl.parse(server.url), retry_timeout_s=retry_timeout_s, name="test"
    )


def publish(
    server: RabbitMQServer,
    stream: str,
    bodies: list[bytes],
    *,
    arguments: dict[str, Any] | None = None,
    producer: str = "test-producer",
) -> None:
    """Publish ``bodies`` (creating ``stream``), each confirmed before this returns."""
    conn = connection(server)
    try:
        conn.create_stream(stream, arguments or {})
        first = conn.publisher_sequence(stream, producer) + 1
        ids = list(range(first, first + len(bodies)))
        assert conn.publish(stream, producer, ids, encode_messages(bodies, {})) == []
    finally:
        conn.close()


def first_offset_after(server: RabbitMQServer, stream: str, offset: int, timeout_s: float) -> int:
    """Wait until retention has deleted ``offset``: the stream's first offset, once past it."""
    conn = connection(server)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            chunk = conn.edge(stream, last=False, wait_s=1.0)
            first = chunk.offsets[0] if chunk is not None else -1
            if first > offset:
                return first
            assert time.monotonic() < deadline, f"retention kept offset {offset} ({first = })"
            time.sleep(0.2)
    finally:
        conn.close()


def rows(ids: range) -> list[bytes]:
    return [json.dumps({"id": i, "name": f"n{i}"}).encode() for i in ids]


def source_of(spec: RabbitMQStreamSourceSpec, tmp_path: Path) -> Any:
    return spec.build(SourceContext(index=0, storage=Storage(str(tmp_path / "src")), query_id="q"))


def read_stream(
    server: RabbitMQServer, stream: str, tmp_path: Path, schema: dict[str, Any] = SCHEMA
) -> pl.DataFrame:
    """Every message of ``stream`` now, with its ``_offset``."""
    spec = RabbitMQStreamSourceSpec(server.url, stream, schema=schema, include_metadata=True)
    source = source_of(spec, tmp_path)
    try:
        start = source.initial_offset()
        end = source.latest_offset(start, rate_limited=False)
        return source.read(start, end).drop("_timestamp")
    finally:
        source.stop()


def collect(
    frame: ms.StreamFrame, checkpoint: Path, **options: Any
) -> tuple[ms.StreamingQuery, list[tuple[int, pl.DataFrame]]]:
    batches: list[tuple[int, pl.DataFrame]] = []
    query = frame.foreach_batch(
        lambda df, i: batches.append((i, df)), checkpoint=checkpoint, **options
    )
    return query, batches


# -- the source: exact rows, offsets, replay -------------------------------------------------------


def test_messages_arrive_in_offset_order_within_the_rate_limit(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    publish(rabbitmq_server, rabbitmq_stream, rows(range(10)))
    frame = ms.scan_rabbitmq_stream(
        rabbitmq_server.url,
        rabbitmq_stream,
        schema=SCHEMA,
        max_messages_per_trigger=4,
        include_metadata=True,
    )
    assert frame.schema == pl.Schema(
        {**SCHEMA, "_offset": pl.Int64, "_timestamp": pl.Datetime("ms", "UTC")}
    )
    query, batches = collect(frame, tmp_path / "cp")
    query.process_all_available(timeout=30)
    query.stop()
    assert [(i, df.height) for i, df in batches] == [(0, 4), (1, 4), (2, 2)]
    out = pl.concat([df for _, df in batches])
    assert out.select("id", "name", "_offset").rows() == [(i, f"n{i}", i) for i in range(10)]
    logged = (tmp_path / "cp" / "offsets" / "1.json").read_text()
    assert '"offset":7' in logged.replace(" ", "")  # batch 1 is (3, 7]
    source = source_of(
        RabbitMQStreamSourceSpec(rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA), tmp_path
    )
    try:
        # A logged range reads exactly its messages, with later ones in the stream.
        publish(rabbitmq_server, rabbitmq_stream, rows(range(10, 12)))
        again = source.read(RabbitMQStreamOffset(offset=3), RabbitMQStreamOffset(offset=7))
        assert again["id"].to_list() == [4, 5, 6, 7]
    finally:
        source.stop()


def test_restart_continues_from_the_checkpoint_and_a_replay_reads_the_logged_range(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    publish(rabbitmq_server, rabbitmq_stream, rows(range(5)))
    checkpoint = tmp_path / "cp"

    def run() -> list[tuple[int, pl.DataFrame]]:
        frame = ms.scan_rabbitmq_stream(rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA)
        query, batches = collect(frame, checkpoint, trigger=ms.Trigger.available_now())
        query.await_termination(timeout=60)
        return batches

    first = run()
    assert [(i, df["id"].to_list()) for i, df in first] == [(0, [0, 1, 2, 3, 4])]
    publish(rabbitmq_server, rabbitmq_stream, rows(range(5, 8)))
    second = run()
    assert [(i, df["id"].to_list()) for i, df in second] == [(1, [5, 6, 7])]
    # Batch 1 "crashed" before its commit: its re-run reads the logged (4, 7], not the new 8, 9.
    (checkpoint / "commits" / "1.json").unlink()
    publish(rabbitmq_server, rabbitmq_stream, rows(range(8, 10)))
    third = run()
    assert [(i, df["id"].to_list()) for i, df in third] == [(1, [5, 6, 7]), (2, [8, 9])]


def test_starting_offset_next_and_an_explicit_offset(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    publish(rabbitmq_server, rabbitmq_stream, rows(range(3)))
    late = ms.scan_rabbitmq_stream(
        rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA, starting_offset="next"
    )
    query, batches = collect(late, tmp_path / "next")
    query.process_all_available(timeout=30)  # starts the query at offset 2
    publish(rabbitmq_server, rabbitmq_stream, rows(range(3, 5)))
    query.process_all_available(timeout=30)
    query.stop()
    assert pl.concat([df for _, df in batches])["id"].to_list() == [3, 4]

    middle = ms.scan_rabbitmq_stream(
        rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA, starting_offset=2
    )
    query, batches = collect(middle, tmp_path / "two", trigger=ms.Trigger.available_now())
    query.await_termination(timeout=60)
    assert pl.concat([df for _, df in batches])["id"].to_list() == [2, 3, 4]


def test_bad_messages_fail_naming_the_offset_or_are_skipped(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    publish(rabbitmq_server, rabbitmq_stream, [*rows(range(2)), b"{not json", *rows(range(2, 3))])
    failing = ms.scan_rabbitmq_stream(rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA)
    query, _ = collect(failing, tmp_path / "fail", trigger=ms.Trigger.available_now())
    with pytest.raises(SourceError, match="bad message at offset 2"):
        query.await_termination(timeout=60)

    skipping = ms.scan_rabbitmq_stream(
        rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA, on_bad_record="skip"
    )
    query, batches = collect(skipping, tmp_path / "skip", trigger=ms.Trigger.available_now())
    query.await_termination(timeout=60)
    assert pl.concat([df for _, df in batches])["id"].to_list() == [0, 1, 2]


# -- the source: lost data, missing streams --------------------------------------------------------


def test_messages_deleted_by_retention_are_a_data_loss_error(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    small = {"max-length-bytes": 3000, "stream-max-segment-size-bytes": 1000}
    publish(rabbitmq_server, rabbitmq_stream, rows(range(3)), arguments=small)
    checkpoint = tmp_path / "cp"
    frame = ms.scan_rabbitmq_stream(rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA)
    query, batches = collect(frame, checkpoint, trigger=ms.Trigger.available_now())
    query.await_termination(timeout=60)
    assert pl.concat([df for _, df in batches])["id"].to_list() == [0, 1, 2]
    # Enough messages that the broker deletes the segments holding offsets 3, 4, ...
    for _ in range(8):
        publish(rabbitmq_server, rabbitmq_stream, [b"x" * 100] * 50)
    # The broker applies retention in its own time (later on a loaded machine): wait for it.
    first_offset_after(rabbitmq_server, rabbitmq_stream, 3, timeout_s=60)
    query, _ = collect(frame, checkpoint, trigger=ms.Trigger.available_now())
    with pytest.raises(DataLossError) as info:
        query.await_termination(timeout=60)
    assert "no longer holds offsets 3 to" in str(info.value) and "retention" in str(info.value)


def test_a_deleted_stream_is_a_data_loss_error_and_a_missing_one_a_source_error(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    frame = ms.scan_rabbitmq_stream(rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA)
    with pytest.raises(SourceError) as info:  # when the query starts
        collect(frame, tmp_path / "missing", trigger=ms.Trigger.available_now())
    assert type(info.value) is SourceError
    assert f"there is no stream {rabbitmq_stream!r}" in str(info.value)

    publish(rabbitmq_server, rabbitmq_stream, rows(range(2)))
    checkpoint = tmp_path / "cp"
    query, _ = collect(frame, checkpoint, trigger=ms.Trigger.available_now())
    query.await_termination(timeout=60)
    conn = connection(rabbitmq_server)
    try:
        conn.delete_stream(rabbitmq_stream)
    finally:
        conn.close()
    query, _ = collect(frame, checkpoint, trigger=ms.Trigger.available_now())
    with pytest.raises(DataLossError, match="does not exist any more"):
        query.await_termination(timeout=60)


# -- the sink: exactly once by publishing id -------------------------------------------------------


def sink_of(server: RabbitMQServer, stream: str, tmp_path: Path, **options: Any) -> Any:
    spec = RabbitMQStreamSinkSpec(server.url, stream, **options)
    return spec.build(
        SinkContext(
            query_id="q1",
            query_name=None,
            output_mode="append",
            storage=Storage(str(tmp_path / "sink")),
            session=Session(),
        )
    )


def test_the_sink_writes_each_row_once_across_replays_and_partial_batches(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    sink = sink_of(rabbitmq_server, rabbitmq_stream, tmp_path)
    try:
        assert sink.committed_batch() is None
        batch0 = pl.DataFrame({"id": [0, 1, 2], "name": ["a", "b", None]})
        sink.add_batch(0, batch0)
        sink.add_batch(0, batch0)  # a replay: skipped
        assert sink.committed_batch() == 0
        # Batch 1 was half published when the process died: the same producer's ids 1..2.
        batch1 = pl.DataFrame({"id": [3, 4, 5, 6], "name": ["c", "d", "e", "f"]})
        half = encode_messages([b'{"id":3,"name":"c"}', b'{"id":4,"name":"d"}'], {})
        conn = connection(rabbitmq_server)
        try:
            ids = [publishing_id(1, 0), publishing_id(1, 1)]
            assert conn.publish(rabbitmq_stream, "microstream-q1", ids, half) == []
        finally:
            conn.close()
        sink.add_batch(1, batch1)  # the re-run: only rows 2 and 3 are new
        sink.add_batch(1, batch1)
        sink.add_batch(2, pl.DataFrame({"id": [], "name": []}, schema=SCHEMA))
        assert sink.committed_batch() == 1
    finally:
        sink.stop()
    assert read_stream(rabbitmq_server, rabbitmq_stream, tmp_path).rows() == [
        (0, "a", 0),
        (1, "b", 1),
        (2, None, 2),
        (3, "c", 3),
        (4, "d", 4),
        (5, "e", 5),
        (6, "f", 6),
    ]


def test_a_query_into_the_sink_restarts_without_duplicates(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    """An aggregation in update mode: rows in key order, each batch once, a replayed one skipped."""
    clicks = ms.MemoryStream({"user": pl.String, "n": pl.Int64})
    checkpoint = tmp_path / "cp"

    def start() -> ms.StreamingQuery:
        return (
            clicks.lazy()
            .group_by("user")
            .agg(pl.col("n").sum())
            .sink_rabbitmq_stream(
                rabbitmq_server.url, rabbitmq_stream, output_mode="update", checkpoint=checkpoint
            )
        )

    query = start()
    clicks.add_data({"user": ["b", "a", "c", "a"], "n": [1, 2, 3, 4]})
    query.process_all_available(timeout=30)
    clicks.add_data({"user": ["c"], "n": [10]})
    query.process_all_available(timeout=30)
    query.stop()
    (checkpoint / "commits" / "1.json").unlink()  # batch 1 re-runs on restart
    query = start()
    query.process_all_available(timeout=30)
    query.stop()
    out = read_stream(
        rabbitmq_server, rabbitmq_stream, tmp_path, {"user": pl.String, "n": pl.Int64}
    )
    # Batch 0 in key order, batch 1 once (its re-run was skipped by publishing id).
    assert out.rows() == [("a", 6, 0), ("b", 1, 1), ("c", 3, 2), ("c", 13, 3)]


# -- a broker that goes away and comes back --------------------------------------------------------


def test_a_broker_down_fails_after_retry_timeout_and_is_waited_for_within_it(
    rabbitmq_server: RabbitMQServer, rabbitmq_stream: str, tmp_path: Path
) -> None:
    publish(rabbitmq_server, rabbitmq_stream, rows(range(2)))
    patient = RabbitMQStreamSourceSpec(
        rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA, retry_timeout="60s"
    )
    impatient = RabbitMQStreamSourceSpec(
        rabbitmq_server.url, rabbitmq_stream, schema=SCHEMA, retry_timeout="0.5s"
    )
    source = source_of(patient, tmp_path / "a")
    quick = source_of(impatient, tmp_path / "b")
    sink = sink_of(rabbitmq_server, rabbitmq_stream, tmp_path, retry_timeout="60s")
    try:
        start = RabbitMQStreamOffset(offset=-1)
        assert source.latest_offset(start, rate_limited=False).offset == 1
        rabbitmq_server._shutdown()
        with pytest.raises(SourceError, match=r"did not answer for 0.5 s \(retry_timeout\)"):
            quick.latest_offset(start, rate_limited=False)
        results: list[object] = []

        def waits() -> None:  # both wait for the broker: the batch is read, then published, once
            try:
                end = source.latest_offset(start, rate_limited=False)
                sink.add_batch(0, source.read(start, end))
                results.append("done")
            except Exception as exc:
                results.append(exc)

        waiting = threading.Thread(target=waits)
        waiting.start()
        time.sleep(1.0)
        rabbitmq_server.start()  # from this thread: the broker dies with the thread that starts it
        waiting.join(timeout=60)
        assert results == ["done"]
    finally:
        source.stop()
        quick.stop()
        sink.stop()
    assert read_stream(rabbitmq_server, rabbitmq_stream, tmp_path / "c")["id"].to_list() == [
        0,
        1,
        0,
        1,
    ]
