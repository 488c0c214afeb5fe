"""Checkpoints on S3 (moto): write-once files are conditional puts, never overwrites."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import s3fs

import microstream as ms
from microstream.checkpoint import storage as storage_module
from microstream.checkpoint.checksums import seal
from microstream.checkpoint.log import Checkpoint, CommitEntry, OffsetEntry
from microstream.checkpoint.storage import Storage
from microstream.cli.main import main as cli_main
from microstream.exceptions import CheckpointConflictError, CheckpointError
from microstream.testing.moto_s3 import S3Bucket

pytestmark = pytest.mark.integration


def other_client(s3: S3Bucket) -> s3fs.S3FileSystem:
    """A second writer: its own s3fs instance, sharing no cache with the query's."""
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3.fsspec_options)


def entry(batch_id: int) -> OffsetEntry:
    return OffsetEntry(batch_id=batch_id, batch_timestamp_ms=1_700_000_000_000, sources=[])


def test_wal_entry_written_by_another_writer_is_never_overwritten(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = Checkpoint(s3.url("cp"), s3.fsspec_options)
    cp.write_offsets(entry(0))
    assert cp.latest_offsets() == entry(0)  # this writer has listed offsets/: 0 only
    other = other_client(s3)
    theirs = seal(  # as another microstream writes it: with its checksum
        entry(1).model_copy(update={"batch_timestamp_ms": 42}).model_dump_json(indent=1).encode()
    )
    other.pipe_file(f"{s3.name}/cp/offsets/1.json", theirs)
    # Even a client that believes the file is absent cannot replace it: the store refuses.
    monkeypatch.setattr(cp.storage.fs, "exists", lambda *args, **kwargs: False)
    expected = (
        f"checkpoint file {s3.url('cp/offsets/1.json')} already exists: another writer "
        "created it first, and it was not overwritten"
    )
    with pytest.raises(CheckpointConflictError, match=re.escape(expected)):
        cp.write_offsets(entry(1))
    assert other.cat_file(f"{s3.name}/cp/offsets/1.json") == theirs
    assert cp.read_offsets(1).batch_timestamp_ms == 42


def test_commit_entry_is_write_once(s3: S3Bucket) -> None:
    cp = Checkpoint(s3.url("cp"), s3.fsspec_options)
    commit = CommitEntry(
        batch_id=0, committed_at=datetime(2026, 1, 1, tzinfo=timezone.utc), num_output_rows=3
    )
    cp.write_commit(commit)
    with pytest.raises(CheckpointConflictError, match=re.escape(s3.url("cp/commits/0.json"))):
        cp.write_commit(commit.model_copy(update={"num_output_rows": 99}))
    assert cp.latest_commit() == commit


def test_overwritable_files_are_plain_puts(s3: S3Bucket) -> None:
    store = Storage(s3.url("cp"), s3.fsspec_options)
    store.write_bytes("state/op0/versions/3.json", b"first")
    store.write_bytes("state/op0/versions/3.json", b"re-run")  # a re-run batch's state
    assert store.read_bytes("state/op0/versions/3.json") == b"re-run"
    assert store.list_numbered("state/op0/versions") == [3]


def test_listing_sees_files_written_by_another_process(s3: S3Bucket) -> None:
    cp = Checkpoint(s3.url("cp"), s3.fsspec_options)
    assert cp.latest_offsets() is None  # s3fs caches this (empty) listing
    theirs = seal(entry(0).model_dump_json(indent=1).encode())  # another microstream's entry
    other_client(s3).pipe_file(f"{s3.name}/cp/offsets/0.json", theirs)
    assert cp.latest_offsets() == entry(0)
    assert cp.storage.exists("offsets/0.json")


def test_lock_on_s3_refuses_a_second_owner(s3: S3Bucket) -> None:
    first = Checkpoint(s3.url("cp"), s3.fsspec_options)
    first.acquire_lock("run-1")
    try:
        with pytest.raises(ms.CheckpointLockedError, match="is in use by run run-1"):
            Checkpoint(s3.url("cp"), s3.fsspec_options).acquire_lock("run-2")
    finally:
        first.release_lock()
    assert not first.storage.exists("lock.json")


def test_missing_bucket_is_an_error_naming_the_file(s3: S3Bucket) -> None:
    cp = Checkpoint(f"s3://{s3.name}-missing/cp", s3.fsspec_options)
    with pytest.raises(CheckpointError, match=rf"s3://{s3.name}-missing/cp/offsets/0.json: "):
        cp.write_offsets(entry(0))
    assert not other_client(s3).exists(f"{s3.name}-missing")  # no bucket made on the side


def test_cli_status_reads_an_s3_checkpoint_with_credentials_from_the_environment(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    query = stream.lazy().foreach_batch(
        lambda df, batch_id: None, checkpoint=s3.url("cp"), checkpoint_options=s3.fsspec_options
    )
    stream.add_data({"x": [1, 2, 3]})
    query.process_all_available(timeout=30)
    query.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3.region)
    # A filesystem built from the environment, not one cached with other options.
    monkeypatch.setattr(s3fs.S3FileSystem, "cachable", False)
    assert cli_main(["status", s3.url("cp"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == s3.url("cp")
    assert report["id"] == query.id
    assert (report["last_batch"], report["last_committed_batch"]) == (0, 0)
    assert report["recent_batches"] == 1  # read from progress/<run>.jsonl on S3
    assert report["recent_input_rows"] == 3
    assert report["running"] is False


def test_append_line_rolls_over_to_a_new_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_module, "APPEND_SEGMENT_BYTES", 30)
    store = Storage("memory://s3-tests-append-line")
    for i in range(5):
        store.append_line("progress/run.jsonl", f'{{"batch": {i}}}')
    names = sorted(store.fs.ls(store.path("progress"), detail=False))
    assert [n.rsplit("/", 1)[1] for n in names] == ["run.1.jsonl", "run.2.jsonl", "run.jsonl"]
    lines = [
        line
        for name in ("run.jsonl", "run.1.jsonl", "run.2.jsonl")
        for line in store.read_bytes(f"progress/{name}").decode().splitlines()
    ]
    assert lines == [f'{{"batch": {i}}}' for i in range(5)]


def test_checkpoint_options_need_a_checkpoint() -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    with pytest.raises(ms.PlanError, match=r"checkpoint_options .* no checkpoint"):
        stream.lazy().foreach_batch(lambda df, b: None, checkpoint_options={"key": "k"})


FAST_FAILURE = {
    "config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 0}}
}
"""botocore options so that an unreachable endpoint fails in about a second, not after retries."""


class Relay:
    """A TCP relay to the S3 server that can be cut, as a network that goes down.

    The query talks to :attr:`endpoint_url`; :meth:`cut` closes the listening
    port and every open connection, so the next request finds nothing there.
    """

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").rsplit(":", 1)
        self._target = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._connections += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self._server.close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


def unreachable_message(url: str, endpoint: str) -> str:
    """The start of the error for a file of ``url`` on an S3 endpoint that is gone."""
    return (
        rf"cannot (?:write|read|look up|list) checkpoint (?:file|directory) {re.escape(url)}\S*: "
        rf"the S3 endpoint {re.escape(endpoint)} failed or cannot be reached \(\w+: .*\)\. "
        r"Check that it is up and reachable from this machine, that endpoint_url in the storage "
        r"options \(checkpoint_options= of a query\) or AWS_ENDPOINT_URL names it, and the "
        r"credentials"
    )


def test_unreachable_endpoint_at_start_is_a_checkpoint_error_naming_url_and_endpoint(
    s3: S3Bucket,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    options = {**s3.fsspec_options, "endpoint_url": endpoint, **FAST_FAILURE}
    stream = ms.MemoryStream({"x": pl.Int64})
    started = time.monotonic()
    with pytest.raises(
        ms.CheckpointStorageError, match=unreachable_message(s3.url("cp"), endpoint)
    ):
        stream.lazy().foreach_batch(
            lambda df, batch_id: None, checkpoint=s3.url("cp"), checkpoint_options=options
        )
    assert time.monotonic() - started < 20


def test_endpoint_lost_mid_run_fails_by_name_and_a_restart_is_exactly_once(
    s3: S3Bucket, tmp_path: Path
) -> None:
    for i, ids in enumerate([[1, 2], [3], [4, 5, 6]]):
        path = tmp_path / "in" / f"part-{i}.parquet"
        path.parent.mkdir(exist_ok=True)
        pl.DataFrame({"id": ids}, schema={"id": pl.Int64}).write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))
    relay = Relay(s3.endpoint_url)

    def start(options: dict[str, Any]) -> ms.StreamingQuery:
        frame = ms.scan_files(
            tmp_path / "in", format="parquet", schema={"id": pl.Int64}, max_files_per_trigger=1
        )
        return frame.sink_parquet(
            tmp_path / "out",
            checkpoint=s3.url("cp"),
            checkpoint_options=options,
            trigger=ms.Trigger.available_now(),
        )

    class CutAfterFirstBatch:
        def on_query_progress(self, event: Any) -> None:
            if event.progress.batch_id == 0:
                relay.cut()

    listener = CutAfterFirstBatch()
    ms.add_listener(listener)
    try:
        query = start({**s3.fsspec_options, "endpoint_url": relay.endpoint_url, **FAST_FAILURE})
        with pytest.raises(ms.CheckpointStorageError) as info:
            query.await_termination(timeout=60)
    finally:
        ms.remove_listener(listener)
    assert re.match(unreachable_message(s3.url("cp"), relay.endpoint_url), str(info.value))
    assert sorted(ms.read_file_sink(tmp_path / "out")["id"].to_list()) == [1, 2]

    # The failed run could not release its lock (the network was down). A new process
    # takes over the lock of a dead one; this test restarts in the same process, so the
    # lock is removed as if it had expired.
    other_client(s3).rm_file(f"{s3.name}/cp/lock.json")
    # The network is back (here: the endpoint itself): the query continues after batch 0.
    assert start(s3.fsspec_options).await_termination(timeout=60)
    assert sorted(ms.read_file_sink(tmp_path / "out")["id"].to_list()) == [1, 2, 3, 4, 5, 6]
    committed = other_client(s3).ls(f"{s3.name}/cp/commits", detail=False)
    assert sorted(name.rsplit("/", 1)[1] for name in committed) == ["0.json", "1.json", "2.json"]
