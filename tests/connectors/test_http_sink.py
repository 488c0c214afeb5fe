"""``sink_http`` against a local HTTP server that records requests and fails on purpose."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

import microstream as ms
from connectors.http import HttpSinkSpec
from microstream.api.session import default_session
from microstream.checkpoint.storage import Storage
from microstream.protocols import SinkContext
from microstream.testing.http_server import RecordingHttpServer, Reply


@pytest.fixture(scope="session")
def http_server_session() -> Iterator[RecordingHttpServer]:
    with RecordingHttpServer() as server:
        yield server


@pytest.fixture
def http_server(http_server_session: RecordingHttpServer) -> Iterator[RecordingHttpServer]:
    """The session's server, with no requests recorded and no replies queued."""
    http_server_session.clear()
    yield http_server_session
    http_server_session.clear()


def sink_of(url: str, tmp_path: Path, query_id: str = "q1", **options: object) -> object:
    spec = HttpSinkSpec(url, **options)  # type: ignore[arg-type]
    return spec.build(
        SinkContext(
            query_id=query_id,
            query_name=None,
            output_mode="append",
            storage=Storage(str(tmp_path / "sink")),
            session=default_session,
            logger=logging.getLogger("test"),
        )
    )


def test_a_batch_is_posted_in_chunks_under_idempotency_keys(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    sink = sink_of(
        http_server.url("/in"), tmp_path, chunk_rows=2, headers={"Authorization": "Bearer t"}
    )
    sink.add_batch(7, pl.DataFrame({"id": [1, 2, 3], "name": ["a", None, "c"]}))  # type: ignore[attr-defined]
    sink.add_batch(
        8, pl.DataFrame({"id": [], "name": []}, schema={"id": pl.Int64, "name": pl.String})
    )  # type: ignore[attr-defined]
    requests = http_server.requests
    assert [(r.method, r.path) for r in requests] == [("POST", "/in"), ("POST", "/in")]
    assert [r.body for r in requests] == [
        b'{"id":1,"name":"a"}\n{"id":2,"name":null}\n',
        b'{"id":3,"name":"c"}\n',
    ]
    assert [r.headers["Idempotency-Key"] for r in requests] == ["q1-7-0", "q1-7-1"]
    assert {r.headers["Content-Type"] for r in requests} == {"application/x-ndjson"}
    assert {r.headers["Authorization"] for r in requests} == {"Bearer t"}


def test_json_format_posts_one_array_per_chunk(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    sink = sink_of(http_server.url(), tmp_path, format="json", chunk_rows=10)
    sink.add_batch(0, pl.DataFrame({"x": [1.5, 2.0]}))  # type: ignore[attr-defined]
    [request] = http_server.requests
    assert json.loads(request.body) == [{"x": 1.5}, {"x": 2.0}]
    assert request.headers["Content-Type"] == "application/json"


def test_5xx_replies_are_retried_with_the_same_key_and_body(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    http_server.respond(Reply(503, b"busy"), Reply(500, b"oops"))
    sink = sink_of(http_server.url(), tmp_path, query_id="q2")
    sink.add_batch(3, pl.DataFrame({"x": [1]}))  # type: ignore[attr-defined]
    requests = http_server.requests
    assert [r.status for r in requests] == [503, 500, 200]
    assert {r.headers["Idempotency-Key"] for r in requests} == {"q2-3-0"}
    assert {r.body for r in requests} == {b'{"x":1}\n'}


def test_a_timeout_is_retried(http_server: RecordingHttpServer, tmp_path: Path) -> None:
    http_server.respond(Reply(200, delay=1.0))
    sink = sink_of(http_server.url(), tmp_path, timeout="200ms")
    sink.add_batch(0, pl.DataFrame({"x": [1]}))  # type: ignore[attr-defined]
    assert len(http_server.requests) == 2


def test_a_4xx_reply_fails_at_once_naming_the_status_and_the_reply(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    http_server.respond(Reply(422, b'{"error": "amount must be positive"}'))
    sink = sink_of(http_server.url("/orders"), tmp_path)
    with pytest.raises(ms.SinkError) as raised:
        sink.add_batch(5, pl.DataFrame({"x": [1]}))  # type: ignore[attr-defined]
    message = str(raised.value)
    assert "chunk 0 of batch 5 (Idempotency-Key: q1-5-0)" in message
    assert "HTTP 422" in message
    assert """b'{"error": "amount must be positive"}'""" in message
    assert len(http_server.requests) == 1  # not retried


def test_a_long_error_reply_is_quoted_by_its_first_bytes(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    http_server.respond(Reply(400, b"A" * 150 + b"B" * 200))
    sink = sink_of(http_server.url(), tmp_path)
    with pytest.raises(ms.SinkError, match=r"HTTP 400 Bad Request: b'A{150}B{50}' \.\.\."):
        sink.add_batch(0, pl.DataFrame({"x": [1]}))  # type: ignore[attr-defined]


def test_a_chunk_failing_past_retry_timeout_fails_the_batch(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    http_server.respond(*[Reply(502, b"bad gateway")] * 50)
    sink = sink_of(http_server.url(), tmp_path, retry_timeout="300ms")
    with pytest.raises(
        ms.SinkError,
        match=r"chunk 0 of batch 0 .* failed (\d+) times within retry_timeout='300ms'; last error: "
        r"HTTP 502 Bad Gateway: b'bad gateway'",
    ) as raised:
        sink.add_batch(0, pl.DataFrame({"x": [1]}))  # type: ignore[attr-defined]
    # How many attempts fit in 300 ms depends on the machine's load; the count reported is the
    # count made, and the backoff keeps it from being a busy loop.
    attempts = int(re.search(r"failed (\d+) times", str(raised.value)).group(1))  # type: ignore[union-attr]
    assert attempts == len(http_server.requests) <= 8


def test_a_server_down_then_back_gets_the_batch(tmp_path: Path) -> None:
    server = RecordingHttpServer().start()
    try:
        server.stop()
        restart = threading.Timer(0.4, server.start)
        restart.start()
        sink = sink_of(server.url(), tmp_path, retry_timeout="10s")
        sink.add_batch(0, pl.DataFrame({"x": [1, 2]}))  # type: ignore[attr-defined]
        restart.join()
        assert [r.body for r in server.requests] == [b'{"x":1}\n{"x":2}\n']
    finally:
        server.stop()


def test_a_server_that_never_comes_back_fails_naming_the_connection_error(
    tmp_path: Path,
) -> None:
    server = RecordingHttpServer()  # never started: the port refuses connections
    sink = sink_of(server.url(), tmp_path, retry_timeout="200ms")
    with pytest.raises(ms.SinkError, match=r"last error: ConnectionRefusedError"):
        sink.add_batch(0, pl.DataFrame({"x": [1]}))  # type: ignore[attr-defined]


def test_a_replayed_batch_is_sent_again_with_the_same_keys_and_bodies(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    checkpoint = tmp_path / "cp"

    def start() -> ms.StreamingQuery:
        return stream.lazy().sink_http(http_server.url("/r"), chunk_rows=2, checkpoint=checkpoint)

    query = start()
    stream.add_data({"x": [1, 2, 3]})
    query.process_all_available()
    stream.add_data({"x": [4, 5]})
    query.process_all_available()
    query.stop()
    first = [(r.headers["Idempotency-Key"], r.body) for r in http_server.requests]
    query_id = query.id
    assert first == [
        (f"{query_id}-0-0", b'{"x":1}\n{"x":2}\n'),
        (f"{query_id}-0-1", b'{"x":3}\n'),
        (f"{query_id}-1-0", b'{"x":4}\n{"x":5}\n'),
    ]
    # A crash after the requests of batch 1 and before its commit: the restart re-runs it.
    (checkpoint / "commits" / "1.json").unlink()
    http_server.clear()
    query = start()
    query.process_all_available()
    query.stop()
    assert [(r.headers["Idempotency-Key"], r.body) for r in http_server.requests] == first[2:]


def test_a_4xx_fails_the_query_and_a_restart_sends_the_batch_again(
    http_server: RecordingHttpServer, tmp_path: Path
) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    checkpoint = tmp_path / "cp"
    http_server.respond(Reply(401, b"token expired"))
    query = stream.lazy().sink_http(http_server.url(), checkpoint=checkpoint)
    stream.add_data({"x": [1]})
    with pytest.raises(ms.SinkError, match=r"HTTP 401 Unauthorized: b'token expired'"):
        query.process_all_available()
    assert isinstance(query.exception(), ms.SinkError)
    query = stream.lazy().sink_http(http_server.url(), checkpoint=checkpoint)
    query.process_all_available()
    query.stop()
    keys = [r.headers["Idempotency-Key"] for r in http_server.requests]
    assert keys == [f"{query.id}-0-0", f"{query.id}-0-0"]
    assert [r.status for r in http_server.requests] == [401, 200]


def test_options_are_checked_when_the_spec_is_made() -> None:
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer; got 0"):
        HttpSinkSpec("http://h/x", chunk_rows=0)
    with pytest.raises(ValueError, match=r"headers may not set \['Idempotency-Key'\]"):
        HttpSinkSpec("http://h/x", headers={"Idempotency-Key": "mine"})
    with pytest.raises(ValueError, match="format must be 'ndjson' or 'json'; got 'csv'"):
        HttpSinkSpec("http://h/x", format="csv")  # type: ignore[arg-type]
    assert "secret" not in repr(HttpSinkSpec("http://h/x", headers={"Authorization": "secret"}))
