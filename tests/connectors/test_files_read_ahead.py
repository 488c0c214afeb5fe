"""The file source's read-ahead (``connectors/_prefetch.py``): the next batch's files are
read while a batch runs, used only when the log names exactly them, and never change
what a batch reads or how its failures are reported."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from connectors._file_listing import LoggedFile
from connectors._file_reading import FileFailed, FileRead
from connectors._prefetch import ReadAhead
from connectors.files import FileSource, FileSourceSpec, SkippedFiles
from microstream.checkpoint.storage import Storage
from microstream.exceptions import SourceError
from microstream.protocols import SourceContext

SCHEMA = pl.Schema({"id": pl.Int64(), "name": pl.String()})


def rows(*ids: int) -> pl.DataFrame:
    return pl.DataFrame({"id": list(ids), "name": [f"n{i}" for i in ids]}, schema=SCHEMA)


def put(directory: Path, name: str, df: pl.DataFrame, mtime: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    df.write_parquet(path)
    os.utime(path, (mtime, mtime))
    return path


def corrupt(directory: Path, name: str, mtime: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"PAR1 not a parquet file")
    os.utime(path, (mtime, mtime))
    return path


def build(ctx: SourceContext, directory: Path, **options: object) -> FileSource:
    options.setdefault("max_files_per_trigger", 1)
    return FileSourceSpec(str(directory), schema=SCHEMA, **options).build(ctx)  # type: ignore[arg-type]


def batch(source: FileSource, start: int) -> tuple[int, pl.DataFrame]:
    """One trigger: the next log entry after ``start`` and its rows."""
    begin = source.parse_offset({"log_index": start})
    end = source.latest_offset(begin, rate_limited=True)
    return end.log_index, source.read(begin, end)  # type: ignore[attr-defined]


def expect(source: FileSource, start: int, k: int, expected: pl.DataFrame) -> None:
    end, got = batch(source, start)
    assert end == k
    assert_frame_equal(got, expected)


def test_the_next_batch_takes_the_files_read_ahead(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    for i in range(3):
        put(data, f"f{i}.parquet", rows(2 * i, 2 * i + 1), mtime=1000 + i)
    source = build(source_ctx, data)
    try:
        expect(source, -1, 0, rows(0, 1))  # not known ahead: read by the batch
        assert (source.read_ahead.used, source.read_ahead.discarded) == (0, 0)
        end, got = batch(source, 0)
        assert end == 1
        assert_frame_equal(got, rows(2, 3))
        assert (source.read_ahead.used, source.read_ahead.discarded) == (1, 0)
        end, got = batch(source, 1)
        assert end == 2
        assert_frame_equal(got, rows(4, 5))
        assert (source.read_ahead.used, source.read_ahead.discarded) == (2, 0)
    finally:
        source.stop()


def test_a_file_rewritten_after_its_read_ahead_is_read_again(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    put(data, "a.parquet", rows(1), mtime=1000)
    put(data, "b.parquet", rows(2), mtime=1001)
    source = build(source_ctx, data)
    try:
        batch(source, -1)  # reads a, starts reading b ahead
        put(data, "b.parquet", rows(7, 8, 9), mtime=1002)  # replaced: another size and mtime
        end, got = batch(source, 0)
        assert end == 1
        assert_frame_equal(got, rows(7, 8, 9))  # what the log recorded, not the old b
        assert (source.read_ahead.used, source.read_ahead.discarded) == (0, 1)
    finally:
        source.stop()


def test_a_read_ahead_the_next_listing_overtakes_is_discarded(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    put(data, "a.parquet", rows(1), mtime=1000)
    put(data, "c.parquet", rows(3), mtime=1003)
    source = build(source_ctx, data)
    try:
        batch(source, -1)  # reads a, reads c ahead
        put(data, "b.parquet", rows(2), mtime=1001)  # arrives late, but older: taken before c
        expect(source, 0, 1, rows(2))
        expect(source, 1, 2, rows(3))
        # c, read ahead for batch 1, is what batch 2 takes: kept, not read again (batch 1
        # read b itself). Before the read-ahead of several batches, c was dropped and read
        # ahead again for batch 2: (1, 1).
        assert (source.read_ahead.used, source.read_ahead.discarded) == (1, 0)
    finally:
        source.stop()


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_bad_file_read_ahead_fails_in_its_batch_as_without_read_ahead(
    tmp_path: Path, source_ctx: SourceContext, policy: str
) -> None:
    data = tmp_path / "in"
    put(data, "a.parquet", rows(1), mtime=1000)
    bad = corrupt(data, "b.parquet", mtime=1001)
    put(data, "c.parquet", rows(3), mtime=1002)
    source = build(source_ctx, data, on_bad_file=policy)
    try:
        batch(source, -1)  # reads b ahead: it fails there, silently
        assert source.metrics() == {}
        if policy == "fail":
            with pytest.raises(SourceError) as raised:
                batch(source, 0)
            message = str(raised.value)
            where = f"cannot read file {bad} (source log entry "
            assert where in message and "1.json) as parquet" in message
            assert "restart the query with on_bad_file='skip' or 'dead_letter'" in message
        else:
            expect(source, 0, 1, rows().clear())
            assert source.metrics() == {"files_skipped_bad": 1}
            record = source_ctx.storage.read_model("skipped/1.json", SkippedFiles)
            assert [f.name for f in record.files] == ["b.parquet"]
            assert record.files[0].reason.startswith("cannot read it as parquet")
        assert (source.read_ahead.used, source.read_ahead.discarded) == (0, 1)
    finally:
        source.stop()


def test_a_restart_replays_logged_batches_with_the_same_rows(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    for i in range(3):
        put(data, f"f{i}.parquet", rows(i), mtime=1000 + i)
    first = build(source_ctx, data)
    end = first.initial_offset()
    for _ in range(3):  # logs entries 0, 1, 2, then "crashes" before reading any
        end = first.latest_offset(end, rate_limited=True)
    first.stop()
    put(data, "f3.parquet", rows(3), mtime=1003)  # arrived meanwhile: not in the replay

    again = FileSourceSpec(str(data), schema=SCHEMA, max_files_per_trigger=1).build(
        SourceContext(
            index=0, storage=Storage(str(tmp_path / "cp" / "sources" / "0")), query_id="q"
        )
    )
    try:
        got = [batch(again, k) for k in (-1, 0, 1)]
        assert [k for k, _ in got] == [0, 1, 2]
        assert_frame_equal(pl.concat([df for _, df in got]), rows(0, 1, 2))
        # Entries 1 and 2 were logged before the crash: both read ahead from the log.
        assert (again.read_ahead.used, again.read_ahead.discarded) == (2, 0)
        expect(again, 2, 3, rows(3))
    finally:
        again.stop()


def test_stop_drops_what_was_read_ahead(tmp_path: Path, source_ctx: SourceContext) -> None:
    data = tmp_path / "in"
    put(data, "a.parquet", rows(1), mtime=1000)
    put(data, "b.parquet", rows(2), mtime=1001)
    source = build(source_ctx, data)
    batch(source, -1)
    source.stop()
    assert (source.read_ahead.used, source.read_ahead.discarded) == (0, 1)
    b = LoggedFile(name="b.parquet", size=(data / "b.parquet").stat().st_size, mtime=1001)
    assert source.read_ahead.take(b) is None


def test_read_ahead_is_bounded_in_bytes_and_waits_for_a_running_read() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def read(logged: LoggedFile, k: int) -> FileRead | FileFailed:
        calls.append(logged.name)
        started.set()
        release.wait(5)
        return FileRead(logged, logged.name, rows(k), [], ())

    files = [LoggedFile(name=f"{i}.parquet", size=40, mtime=1.0) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        ahead = ReadAhead(read, pool.submit, max_bytes=100, max_running=4)
        ahead.start([(f, 5) for f in files])
        assert started.wait(5)
        # Two files of 40 bytes are held; a third would pass the 100-byte bound.
        assert ahead.planned() == ["0.parquet", "1.parquet"]
        assert ahead.held_bytes() == 80
        release.set()
        got = ahead.take(files[0])  # waits for the running read rather than reading twice
        assert got is not None
        assert_frame_equal(got.frame, rows(5))
        assert ahead.planned() == ["1.parquet", "2.parquet"]  # taken: room for the next
        assert ahead.take(files[1]) is not None
        assert ahead.planned() == ["2.parquet", "3.parquet"]
        assert ahead.take(files[2]) is not None
        assert ahead.take(files[3]) is not None
    assert sorted(calls) == ["0.parquet", "1.parquet", "2.parquet", "3.parquet"]  # once each
    assert (ahead.used, ahead.discarded) == (4, 0)


def test_a_windowed_query_over_files_read_ahead_gives_the_one_shot_rows(tmp_path: Path) -> None:
    data = tmp_path / "in"
    frames = []
    for i in range(5):
        df = pl.DataFrame(
            {
                "ts": [datetime(2026, 1, 1, 0, i, 10 * j) for j in range(3)],
                "key": ["a", "b", "a"],
                "v": [i, 10 * i, 100 * i],
            }
        ).select(pl.col("ts"), "key", "v")
        frames.append(df)
        path = data / f"f{i}.parquet"
        data.mkdir(exist_ok=True)
        df.write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))
    schema = frames[0].schema
    stream = ms.scan_files(data, schema=schema, max_files_per_trigger=1)
    result = (
        stream.with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1m", group_by="key")
        .agg(pl.col("v").sum().alias("total"))
    )
    query = result.sink_memory(
        "read_ahead_windows",
        checkpoint=tmp_path / "cp",
        output_mode="append",
        trigger=ms.Trigger.available_now(flush=True),
    )
    assert query.await_termination(timeout=60)
    assert query.exception() is None
    source = query._execution._sources[0]  # type: ignore[attr-defined]
    assert source.read_ahead.used == 4  # every file after the first
    got = ms.table("read_ahead_windows").sort("ts", "key")
    assert got.select("key", "total").rows() == [
        ("a", 0 + 0),
        ("b", 0),
        ("a", 1 + 100),
        ("b", 10),
        ("a", 2 + 200),
        ("b", 20),
        ("a", 3 + 300),
        ("b", 30),
        ("a", 4 + 400),
        ("b", 40),
    ]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_the_bound_counts_decoded_frames_not_file_sizes() -> None:
    big = pl.DataFrame({"id": range(1000), "name": ["x" * 20] * 1000}, schema=SCHEMA)

    def read(logged: LoggedFile, k: int) -> FileRead | FileFailed:
        return FileRead(logged, logged.name, big, [], ())

    files = [LoggedFile(name=f"{i}.parquet", size=100, mtime=1.0) for i in range(3)]
    bound = int(big.estimated_size() * 1.5)
    with ThreadPoolExecutor(2) as pool:
        ahead = ReadAhead(read, pool.submit, max_bytes=bound, max_running=1)
        ahead.start([(f, 0) for f in files])
        wait_for(lambda: ahead.finished() == ["0.parquet"], "the first read")
        # 100-byte files, but a read frame holds ~37 kB: a second would pass the bound.
        assert ahead.planned() == ["0.parquet"]
        assert ahead.held_bytes() == big.estimated_size()
        assert ahead.take(files[0]) is not None
        wait_for(lambda: ahead.finished() == ["1.parquet"], "the second read")
        assert ahead.planned() == ["1.parquet"]
        assert ahead.take(files[1]) is not None
        assert ahead.take(files[2]) is not None
    assert (ahead.used, ahead.discarded) == (3, 0)


def test_several_batches_are_read_ahead(tmp_path: Path, source_ctx: SourceContext) -> None:
    data = tmp_path / "in"
    for i in range(5):
        put(data, f"f{i}.parquet", rows(i), mtime=1000 + i)
    source = build(source_ctx, data)
    try:
        expect(source, -1, 0, rows(0))
        # The listing left four files for four later batches: all are read ahead now, two
        # at a time (the read threads), before batch 1 asks for its file.
        later = [f"f{i}.parquet" for i in range(1, 5)]
        wait_for(lambda: source.read_ahead.finished() == later, "four batches read ahead")
        for k in range(1, 5):
            expect(source, k - 1, k, rows(k))
        assert (source.read_ahead.used, source.read_ahead.discarded) == (4, 0)
    finally:
        source.stop()


@pytest.mark.parametrize("bound", [0, 1])
def test_read_ahead_bytes_bounds_the_read_ahead(
    tmp_path: Path, source_ctx: SourceContext, bound: int
) -> None:
    data = tmp_path / "in"
    for i in range(4):
        put(data, f"f{i}.parquet", rows(i), mtime=1000 + i)
    source = build(source_ctx, data, read_ahead_bytes=bound)
    try:
        for k in range(4):
            expect(source, k - 1, k, rows(k))
            if bound:  # one file always, however large; never two
                nxt = [f"f{k + 1}.parquet"] if k < 3 else []
                wait_for(lambda nxt=nxt: source.read_ahead.finished() == nxt, "the read ahead")
                assert source.read_ahead.planned() == nxt
            else:  # read-ahead off
                assert source.read_ahead.planned() == []
        assert source.read_ahead.used == (3 if bound else 0)
    finally:
        source.stop()


@pytest.mark.parametrize("value", [-1, 1.5, True, "1MB"])
def test_read_ahead_bytes_must_be_a_non_negative_int(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="read_ahead_bytes must be"):
        FileSourceSpec(str(tmp_path), schema=SCHEMA, read_ahead_bytes=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_file_deleted_after_its_read_ahead_is_missing_in_its_batch(
    tmp_path: Path, source_ctx: SourceContext, policy: str
) -> None:
    data = tmp_path / "in"
    put(data, "a.parquet", rows(1), mtime=1000)
    b = put(data, "b.parquet", rows(2), mtime=1001)
    source = build(source_ctx, data, on_missing_file=policy)
    try:
        batch(source, -1)  # reads a, reads b ahead
        wait_for(lambda: source.read_ahead.finished() == ["b.parquet"], "b's read ahead")
        end = source.latest_offset(source.parse_offset({"log_index": 0}), rate_limited=True)
        b.unlink()  # after its log entry and its read-ahead, before its batch reads
        start = source.parse_offset({"log_index": 0})
        if policy == "fail":
            with pytest.raises(SourceError) as raised:
                source.read(start, end)
            message = str(raised.value)
            assert f"file {b} (source log entry " in message
            assert "1.json) no longer exists, so this logged range cannot be replayed" in message
        else:
            assert_frame_equal(source.read(start, end), rows().clear())
            assert source.metrics() == {"files_skipped_missing": 1}
            record = source_ctx.storage.read_model("skipped/1.json", SkippedFiles)
            assert [(f.name, f.missing) for f in record.files] == [("b.parquet", True)]
        assert (source.read_ahead.used, source.read_ahead.discarded) == (0, 1)
    finally:
        source.stop()


def test_a_file_rewritten_after_its_batch_was_logged_is_read_again(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    put(data, "a.parquet", rows(1), mtime=1000)
    put(data, "b.parquet", rows(2), mtime=1001)
    source = build(source_ctx, data)
    try:
        batch(source, -1)  # reads a, reads b ahead
        wait_for(lambda: source.read_ahead.finished() == ["b.parquet"], "b's read ahead")
        start = source.parse_offset({"log_index": 0})
        end = source.latest_offset(start, rate_limited=True)  # logs b as it was read ahead
        put(data, "b.parquet", rows(7, 8, 9), mtime=1002)  # then rewritten in place
        # What the batch reads now, as without read-ahead: not the rows read ahead.
        assert_frame_equal(source.read(start, end), rows(7, 8, 9))
        assert (source.read_ahead.used, source.read_ahead.discarded) == (0, 1)
    finally:
        source.stop()


def test_a_file_whose_version_cannot_be_read_is_read_by_its_batch() -> None:
    calls: list[str] = []

    def read(logged: LoggedFile, k: int) -> FileRead | FileFailed:
        return FileRead(logged, logged.name, rows(k), [], ())

    def version(logged: LoggedFile) -> tuple[int, int]:
        calls.append(logged.name)
        if len(calls) > 2:  # before and after the read answer; the check at take cannot
            raise PermissionError(f"cannot stat {logged.name}")
        return (1, 1)

    f = LoggedFile(name="a.parquet", size=10, mtime=1.0)
    with ThreadPoolExecutor(1) as pool:
        ahead = ReadAhead(read, pool.submit, version=version)
        ahead.start([(f, 0)])
        wait_for(lambda: ahead.finished() == ["a.parquet"], "the read")
        assert ahead.take(f) is None  # not an error here: the batch reads the file itself
    assert calls == ["a.parquet"] * 3
    assert (ahead.used, ahead.discarded) == (0, 1)


@pytest.mark.parametrize("recheck", [True, False])
def test_the_check_at_take_is_left_out_for_object_stores(recheck: bool) -> None:
    """On an object store the version check at take would be one request per file on the
    batch's path: there only the checks around the read (on the read thread) count."""
    versions = iter([(1, "etag-a"), (1, "etag-a"), (2, "etag-b")])  # changed after the read
    calls: list[str] = []

    def read(logged: LoggedFile, k: int) -> FileRead | FileFailed:
        return FileRead(logged, logged.name, rows(k), [], ())

    def version(logged: LoggedFile) -> tuple[int, str]:
        calls.append(logged.name)
        return next(versions)

    f = LoggedFile(name="a.parquet", size=10, mtime=1.0)
    with ThreadPoolExecutor(1) as pool:
        ahead = ReadAhead(read, pool.submit, version=version, recheck_on_take=recheck)
        ahead.start([(f, 4)])
        wait_for(lambda: ahead.finished() == ["a.parquet"], "the read")
        taken = ahead.take(f)
    if recheck:
        assert taken is None and (ahead.used, ahead.discarded) == (0, 1)
        assert calls == ["a.parquet"] * 3
    else:
        assert taken is not None and taken.frame["id"].to_list() == [4]
        assert (ahead.used, ahead.discarded) == (1, 0) and calls == ["a.parquet"] * 2


def test_an_object_store_source_does_not_recheck_at_take(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    (tmp_path / "in").mkdir()
    local = FileSourceSpec(str(tmp_path / "in"), format="parquet", schema=SCHEMA).build(source_ctx)
    remote = FileSourceSpec(
        "memory://read-ahead-recheck/in", format="parquet", schema=SCHEMA, wait_for_path=True
    )
    try:
        assert local.read_ahead._recheck_on_take is True
        built = remote.build(source_ctx)
        assert built.read_ahead._recheck_on_take is False
        built.stop()
    finally:
        local.stop()
