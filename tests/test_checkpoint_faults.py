"""Checkpoint faults: a full disk, a corrupt WAL range, a WAL that is gone.

Each fault stops the query with a :class:`~microstream.CheckpointError` that
names the file, the storage and what to do, and leaves the checkpoint so that a
restart (once the fault is fixed) gives exactly the output of a clean run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.checkpoint import storage as storage_module
from microstream.checkpoint.checksums import CHECKSUM_MEMBER, seal

SCHEMA = {"id": pl.Int64, "user": pl.Int64, "amount": pl.Float64}
FILES = [
    {"id": [1, 2, 3], "user": [1, 2, 1], "amount": [10.0, 20.0, 30.0]},
    {"id": [4, 5], "user": [2, 3], "amount": [1.0, 2.0]},
    {"id": [6, 7, 8], "user": [1, 3, 4], "amount": [5.0, 6.0, 7.0]},
]
TOTALS = pl.DataFrame(  # FILES grouped by user; Delta has no UInt32, so pl.len() reads as Int32
    {"user": [1, 2, 3, 4], "total": [45.0, 21.0, 8.0, 7.0], "n": [3, 2, 2, 1]},
    schema={"user": pl.Int64, "total": pl.Float64, "n": pl.Int32},
)

needs_proc = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds the file being written in /proc/self/fd"
)


def write_inputs(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, columns in enumerate(FILES):
        path = directory / f"part-{i}.parquet"
        pl.DataFrame(columns, schema=SCHEMA).write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))


def totals_query(tmp_path: Path) -> ms.StreamingQuery:
    """Three batches (one file each) into a stateful aggregation, written to Delta."""
    frame = ms.scan_files(tmp_path / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    return (
        frame.group_by("user")
        .agg(total=pl.col("amount").sum(), n=pl.len())
        .sink_delta(
            tmp_path / "table",
            output_mode="complete",
            checkpoint=tmp_path / "cp",
            trigger=ms.Trigger.available_now(),
        )
    )


def rows_query(tmp_path: Path) -> ms.StreamingQuery:
    """Three batches of rows, appended to a file sink."""
    frame = ms.scan_files(tmp_path / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    return frame.sink_parquet(
        tmp_path / "out", checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now()
    )


def read_totals(tmp_path: Path) -> pl.DataFrame:
    return pl.read_delta(str(tmp_path / "table")).sort("user")


@dataclass
class FullDisk:
    """A disk that fills up at the first write into ``target`` and stays full.

    Installed in place of the storage's one local write primitive, it writes
    half of the bytes and then fails as the kernel does (``ENOSPC``), so a
    temporary file or an appended line is left half-written unless the storage
    removes it.
    """

    target: str
    armed: bool = True
    full: bool = False
    failed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._write_all = storage_module._write_all

    def write_all(self, fd: int, data: bytes) -> None:
        path = _final_name(os.readlink(f"/proc/self/fd/{fd}"))
        if self.armed and self.target in path:
            self.full = True
        if not self.full:
            self._write_all(fd, data)
            return
        self.failed.append(path)
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _final_name(path: str) -> str:
    """``.../offsets/1.json`` for its temporary file ``.../offsets/.1.json.<hex>.tmp``."""
    head, _, name = path.rpartition("/")
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:].rsplit(".", 2)[0]
    return f"{head}/{name}"


def arm_after_first_commit(disk: FullDisk, cp: Path) -> None:
    """Let the disk fill only once batch 0 is committed (a fault in the middle of a run)."""
    disk.armed = False
    real = disk._write_all

    def watching(fd: int, data: bytes) -> None:
        real(fd, data)
        if _final_name(os.readlink(f"/proc/self/fd/{fd}")) == str(cp / "commits" / "0.json"):
            disk.armed = True

    disk._write_all = watching


FULL_DISK = "no space left on device (ENOSPC) on the local disk. Free space on it"


def assert_checkpoint_clean(cp: Path) -> None:
    assert sorted(p.name for p in cp.rglob("*.tmp")) == []
    for log in cp.glob("progress/*.jsonl"):
        for line in log.read_text().splitlines():
            json.loads(line)  # no half line


@needs_proc
@pytest.mark.parametrize(
    ("target", "mid_run"),
    [
        ("lock.json", False),
        ("metadata.json", False),
        ("sources/0/", True),
        ("offsets/", True),
        ("state/op0/", True),
        ("commits/", True),
        ("progress/", True),
    ],
)
def test_full_disk_names_the_file_and_a_restart_is_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, mid_run: bool
) -> None:
    write_inputs(tmp_path / "in")
    cp = tmp_path / "cp"
    disk = FullDisk(str(cp / target))
    if mid_run:
        arm_after_first_commit(disk, cp)
    monkeypatch.setattr(storage_module, "_write_all", disk.write_all)

    with pytest.raises(ms.CheckpointStorageError) as info:
        totals_query(tmp_path).await_termination(timeout=60)

    assert disk.failed, "the disk never filled"
    assert target in disk.failed[0]
    message = str(info.value)
    named = re.match(r"cannot (?:write|append to) checkpoint file (\S+): ", message)
    assert named is not None, message
    assert named.group(1) in disk.failed
    assert FULL_DISK in message
    assert "a restarted query then continues from its last committed batch" in message
    assert_checkpoint_clean(cp)
    if mid_run:
        assert (cp / "commits" / "0.json").exists()
        assert not (cp / "commits" / "2.json").exists()

    monkeypatch.undo()  # space freed
    assert totals_query(tmp_path).await_termination(timeout=60)
    assert_checkpoint_clean(cp)
    assert sorted(p.name for p in (cp / "commits").glob("*.json")) == [
        "0.json",
        "1.json",
        "2.json",
    ]
    assert_frame_equal(read_totals(tmp_path), TOTALS)


@needs_proc
def test_full_disk_under_the_file_sink_manifest_then_restart_is_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    disk = FullDisk(str(out / "_microstream_log" / "1.json"))
    monkeypatch.setattr(storage_module, "_write_all", disk.write_all)

    with pytest.raises(ms.SinkError) as info:
        rows_query(tmp_path).await_termination(timeout=60)

    message = str(info.value)
    assert f"cannot write checkpoint file {out}/_microstream_log/1.json: {FULL_DISK}" in message
    assert sorted(p.name for p in out.rglob("*.tmp")) == []
    assert_checkpoint_clean(tmp_path / "cp")
    assert sorted(ms.read_file_sink(out)["id"].to_list()) == [1, 2, 3]

    monkeypatch.undo()
    assert rows_query(tmp_path).await_termination(timeout=60)
    assert sorted(ms.read_file_sink(out)["id"].to_list()) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_failed_append_leaves_no_half_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = storage_module.Storage(tmp_path / "cp")
    store.append_line("progress/run.jsonl", '{"batch": 0}')

    def full(fd: int, data: bytes) -> None:
        os.write(fd, data[:5])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage_module, "_write_all", full)
    expected = f"cannot append to checkpoint file {tmp_path}/cp/progress/run.jsonl: {FULL_DISK}"
    with pytest.raises(ms.CheckpointStorageError, match=re.escape(expected)):
        store.append_line("progress/run.jsonl", '{"batch": 1}')
    monkeypatch.undo()
    store.append_line("progress/run.jsonl", '{"batch": 2}')
    assert (tmp_path / "cp" / "progress" / "run.jsonl").read_text().splitlines() == [
        '{"batch": 0}',
        '{"batch": 2}',
    ]


# -- a WAL range that goes backwards ---------------------------------------------------------


def write_resealed(path: Path, entry: dict[str, Any]) -> None:
    """Write an edited JSON file of a checkpoint with a checksum that matches the edit."""
    entry.pop(CHECKSUM_MEMBER)
    path.write_bytes(seal(json.dumps(entry, indent=1).encode()))


def test_wal_range_ending_before_its_start_is_refused_by_file_and_source(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in")
    assert rows_query(tmp_path).await_termination(timeout=60)
    wal = tmp_path / "cp" / "offsets" / "2.json"
    entry = json.loads(wal.read_text())
    assert (entry["sources"][0]["start"], entry["sources"][0]["end"]) == (
        {"log_index": 1},
        {"log_index": 2},
    )
    entry["sources"][0]["end"] = {"log_index": 0}  # a hand edit, or a corrupt copy
    write_resealed(wal, entry)  # one with a matching checksum: the range itself is checked
    (tmp_path / "cp" / "commits" / "2.json").unlink()  # so that batch 2 would be re-run

    expected = (
        f"checkpoint file {wal} is corrupt: source 0 (FileSource[parquet: {tmp_path / 'in'}]) "
        "ends at {'log_index': 0} before its start {'log_index': 1}"
    )
    with pytest.raises(ms.CheckpointCorruptError, match=re.escape(expected)):
        rows_query(tmp_path)
    assert sorted(ms.read_file_sink(tmp_path / "out")["id"].to_list()) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_wal_range_that_does_not_parse_names_the_file(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in")
    assert rows_query(tmp_path).await_termination(timeout=60)
    wal = tmp_path / "cp" / "offsets" / "2.json"
    entry = json.loads(wal.read_text())
    entry["sources"][0]["end"] = {"log_index": "two"}
    write_resealed(wal, entry)
    with pytest.raises(
        ms.CheckpointCorruptError,
        match=rf"checkpoint file {re.escape(str(wal))} is corrupt: .* is not a file source offset",
    ):
        rows_query(tmp_path)


# -- a WAL that is gone while the sink or the state remember its batches -------------------


def memory_to(sink: str, stream: ms.MemoryStream, tmp_path: Path) -> ms.StreamingQuery:
    frame = stream.lazy()
    if sink == "delta":
        return frame.sink_delta(tmp_path / "out", checkpoint=tmp_path / "cp")
    return frame.sink_parquet(tmp_path / "out", checkpoint=tmp_path / "cp")


def read_output(sink: str, tmp_path: Path) -> list[int]:
    if sink == "delta":
        return sorted(pl.read_delta(str(tmp_path / "out"))["x"].to_list())
    return sorted(ms.read_file_sink(tmp_path / "out")["x"].to_list())


def run_two_batches(sink: str, stream: ms.MemoryStream, tmp_path: Path) -> str:
    """Batches 0 (3 rows) and 1 (6 rows) into ``sink``; returns the query id."""
    query = memory_to(sink, stream, tmp_path)
    stream.add_data({"x": [1, 2, 3]})
    query.process_all_available(timeout=60)
    stream.add_data({"x": [4, 5, 6, 7, 8, 9]})
    query.process_all_available(timeout=60)
    query.stop()
    assert query.exception() is None
    assert read_output(sink, tmp_path) == list(range(1, 10))
    return query.id


@pytest.mark.parametrize("sink", ["delta", "files"])
def test_wal_gone_while_the_sink_holds_batches_is_refused(sink: str, tmp_path: Path) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    query_id = run_two_batches(sink, stream, tmp_path)
    cp = tmp_path / "cp"
    for log in ("offsets", "commits"):
        for entry in (cp / log).iterdir():
            entry.unlink()
    stream.add_data({"x": [10, 11, 12, 13, 14, 15]})

    # Before: batch 0 re-ran with all 15 rows and the sink skipped it as a replay (9 rows).
    description = "DeltaSink" if sink == "delta" else "FileSink[parquet: "
    expected = (
        rf"checkpoint {re.escape(str(cp))} cannot continue: its write-ahead log is gone: "
        rf"metadata.json \(query id {query_id}\) is there, but offsets/ and commits/ are empty, "
        rf"while {re.escape(description)}.*{re.escape(str(tmp_path / 'out'))}\]? already holds "
        r"batch 1 of this query.*Numbering batches from 0 again would make the sink skip them "
        r"as already written and lose their rows\. Restore offsets/ and commits/ from a backup "
        r"of the checkpoint; or, to process the input again from the start, use a new "
        r"checkpoint location and a new output \(or delete both\)"
    )
    with pytest.raises(ms.CheckpointCorruptError, match=expected):
        memory_to(sink, stream, tmp_path)
    assert read_output(sink, tmp_path) == list(range(1, 10))
    assert list((cp / "offsets").iterdir()) == []
    assert not (cp / "lock.json").exists()


def test_wal_tail_gone_while_the_sink_holds_later_batches_is_refused(tmp_path: Path) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    run_two_batches("delta", stream, tmp_path)
    cp = tmp_path / "cp"
    (cp / "offsets" / "1.json").unlink()  # an older copy of the checkpoint, say
    (cp / "commits" / "1.json").unlink()
    stream.add_data({"x": [10]})
    with pytest.raises(
        ms.CheckpointCorruptError,
        match=r"its write-ahead log ends at offsets/0\.json, so offsets/ and commits/ from batch "
        r"1 on are missing \(deleted, or an older copy of the checkpoint was restored\), while "
        r"DeltaSink\[.*\] already holds batch 1 of this query\. Numbering batches from 1 again",
    ):
        memory_to("delta", stream, tmp_path)
    assert read_output("delta", tmp_path) == list(range(1, 10))


def test_wal_gone_while_state_and_progress_remain_is_refused(tmp_path: Path) -> None:
    stream = ms.MemoryStream({"k": pl.Int64, "x": pl.Int64})

    def start() -> ms.StreamingQuery:
        return (
            stream.lazy()
            .group_by("k")
            .agg(total=pl.col("x").sum())
            .sink_memory("wal_gone_totals", output_mode="complete", checkpoint=tmp_path / "cp")
        )

    query = start()
    stream.add_data({"k": [1, 1, 2], "x": [1, 2, 3]})
    query.process_all_available(timeout=60)
    query.stop()
    cp = tmp_path / "cp"
    for log in ("offsets", "commits"):
        for entry in (cp / log).iterdir():
            entry.unlink()

    expected = (
        "its write-ahead log is gone: metadata.json (query id "
        f"{query.id}) is there, but offsets/ and commits/ are empty, while earlier batches "
        f"left {cp}/state/op0/partials/versions/0.json, {cp}/progress/{query.run_id}.jsonl. "
    )
    with pytest.raises(ms.CheckpointCorruptError, match=re.escape(expected)):
        start()


def test_a_checkpoint_that_never_ran_a_batch_restarts(tmp_path: Path) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    memory_to("delta", stream, tmp_path).stop()  # metadata.json and an empty log
    query = memory_to("delta", stream, tmp_path)
    stream.add_data({"x": [1, 2]})
    query.process_all_available(timeout=60)
    query.stop()
    assert read_output("delta", tmp_path) == [1, 2]


def test_temporary_files_a_killed_writer_left_are_removed_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed between writing ``.<name>.<hex>.tmp`` and renaming it leaves the
    temporary file; the next run (holding the lock) removes it, and nothing else."""
    stream = ms.MemoryStream({"x": pl.Int64})
    checkpoint = tmp_path / "cp"

    def start() -> ms.StreamingQuery:
        return stream.lazy().sink_memory(f"tmp_{os.getpid()}", checkpoint=str(checkpoint))

    query = start()
    stream.add_data({"x": [1]})
    query.process_all_available(timeout=30)
    query.stop()
    before = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    stray = [checkpoint / "offsets" / ".1.json.0123abcd.tmp", checkpoint / ".metadata.json.99.tmp"]
    for path in stray:
        path.write_bytes(b'{"half": ')
    keep = checkpoint / "offsets" / "notes.tmp"  # not a name microstream writes: left alone
    keep.write_text("mine")
    query = start()
    query.stop()
    assert not any(p.exists() for p in stray)
    assert keep.exists()
    assert "removed 2 temporary file(s)" in caplog.text
    after = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    assert set(before) <= set(after)
