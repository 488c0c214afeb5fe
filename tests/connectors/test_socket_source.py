"""``ms.scan_socket`` against a local line server (``LineServer``), one per test."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

import microstream as ms
from connectors.socket_source import SocketOffset, SocketSourceSpec
from microstream.checkpoint.storage import Storage
from microstream.protocols import SourceContext
from microstream.testing.line_server import LineServer


@pytest.fixture
def line_server() -> Iterator[LineServer]:
    with LineServer() as server:
        yield server


def wait_for_lines(query: ms.StreamingQuery, table: str, count: int) -> pl.DataFrame:
    """Run batches until ``table`` holds ``count`` rows (lines travel through a socket)."""
    deadline = time.monotonic() + 10
    while True:
        query.process_all_available()
        rows = ms.table(table)
        if rows.height >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def test_lines_become_rows_in_order(line_server: LineServer) -> None:
    frame = ms.scan_socket("127.0.0.1", line_server.port, include_timestamp=True)
    query = frame.sink_memory("socket_rows")
    line_server.wait_for_clients(1)
    before = time.time()
    line_server.send("first", "second\r", b"caf\xc3\xa9", b"bad \xff byte", "")
    rows = wait_for_lines(query, "socket_rows", 5)
    line_server.send("later")
    rows = wait_for_lines(query, "socket_rows", 6)
    query.stop()
    assert rows["value"].to_list() == ["first", "second", "café", "bad \ufffd byte", "", "later"]
    assert rows.schema == pl.Schema({"value": pl.String, "timestamp": pl.Datetime("us")})
    stamps = rows["timestamp"].dt.epoch("us").to_list()
    assert stamps == sorted(stamps)
    assert before - 1 < stamps[0] / 1e6 < time.time() + 1


def test_a_durable_sink_is_refused_without_the_acknowledgement(
    line_server: LineServer, tmp_path: Path
) -> None:
    frame = ms.scan_socket("127.0.0.1", line_server.port)
    with pytest.raises(
        ms.PlanError,
        match=r"SocketSource\[127.0.0.1:\d+\] cannot replay: .* so FileSink\[.*\] would not "
        r"hold every row exactly once.* acknowledge_not_replayable=True",
    ):
        frame.sink_parquet(tmp_path / "out", checkpoint=tmp_path / "cp")
    with pytest.raises(ms.PlanError, match="cannot replay"):
        frame.foreach_batch(lambda df, batch_id: None, checkpoint=tmp_path / "cp2")
    assert line_server.clients == 0  # refused before connecting


def test_an_acknowledged_query_writes_a_durable_sink(
    line_server: LineServer, tmp_path: Path
) -> None:
    frame = ms.scan_socket("127.0.0.1", line_server.port, acknowledge_not_replayable=True)
    query = frame.sink_parquet(tmp_path / "out", checkpoint=tmp_path / "cp")
    line_server.wait_for_clients(1)
    line_server.send("a", "b")
    deadline = time.monotonic() + 10
    while not (tmp_path / "cp" / "commits" / "0.json").exists() and time.monotonic() < deadline:
        query.process_all_available()
        time.sleep(0.02)
    query.stop()
    assert ms.read_file_sink(tmp_path / "out")["value"].to_list() == ["a", "b"]


def test_a_refused_connection_names_the_address(tmp_path: Path) -> None:
    server = LineServer()  # never started
    with pytest.raises(ms.SourceError, match=rf"cannot connect to 127.0.0.1:{server.port}.*nc -lk"):
        query = ms.scan_socket("127.0.0.1", server.port).sink_memory("socket_refused")
        query.process_all_available()


def test_a_rerun_after_a_crash_finds_its_lines_lost_and_numbering_goes_on(
    line_server: LineServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = ms.scan_socket("127.0.0.1", line_server.port, acknowledge_not_replayable=True)
    checkpoint = tmp_path / "cp"
    seen: dict[int, list[str]] = {}

    def keep(df: pl.DataFrame, batch_id: int) -> None:
        seen[batch_id] = df["value"].to_list()

    query = frame.foreach_batch(keep, checkpoint=checkpoint)
    line_server.wait_for_clients(1)
    line_server.send("x", "y", "z")
    deadline = time.monotonic() + 10
    while sum(map(len, seen.values())) < 3 and time.monotonic() < deadline:
        query.process_all_available()
        time.sleep(0.02)
    query.stop()
    last = max(seen)
    logged = json.loads((checkpoint / "offsets" / f"{last}.json").read_text())
    # The process died after the batch reached the sink and before commits/N.
    (checkpoint / "commits" / f"{last}.json").unlink()
    line_server.disconnect()
    seen.clear()
    with caplog.at_level(logging.WARNING, logger="microstream"):
        query = frame.foreach_batch(keep, checkpoint=checkpoint)
        line_server.wait_for_clients(1)
        query.process_all_available()
        assert seen == {last: []}  # the re-run: its lines were the dead run's
        line_server.send("after")
        deadline = time.monotonic() + 10
        while last + 1 not in seen and time.monotonic() < deadline:
            query.process_all_available()
            time.sleep(0.02)
        query.stop()
    assert seen[last + 1] == ["after"]
    assert "were received by an earlier run and are lost" in caplog.text
    end = json.dumps(logged, sort_keys=True)
    assert '"lines": 3' in end
    follow = json.loads((checkpoint / "offsets" / f"{last + 1}.json").read_text())
    assert '"lines": 4' in json.dumps(follow, sort_keys=True)


def test_committed_lines_are_forgotten_and_available_now_stops(
    line_server: LineServer, tmp_path: Path
) -> None:
    spec = SocketSourceSpec("127.0.0.1", line_server.port)
    context = SourceContext(index=0, storage=Storage(str(tmp_path / "s")), query_id="q")
    source = spec.build(context)
    try:
        line_server.wait_for_clients(1)
        line_server.send("a", "b", "c")
        deadline = time.monotonic() + 10
        start = SocketOffset(lines=10)  # a query that read 10 lines in earlier runs
        while source.latest_offset(start, rate_limited=False).lines < 13:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        source.prepare_for_available_now()
        line_server.send("d")
        time.sleep(0.2)
        end = source.latest_offset(start, rate_limited=False)
        assert end == SocketOffset(lines=13)
        assert source.read(start, end)["value"].to_list() == ["a", "b", "c"]
        assert source.read(SocketOffset(lines=11), end)["value"].to_list() == ["b", "c"]
        source.commit(SocketOffset(lines=12))
        assert source.read(SocketOffset(lines=12), end)["value"].to_list() == ["c"]
        assert source.lag(end) == 1  # "d" arrived after the available-now cut
    finally:
        source.stop()
