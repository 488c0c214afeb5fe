"""Failure paths: each a clear error, the checkpoint left consistent, a restart continues."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

import microstream as ms

SCHEMA = {"id": pl.Int64, "amount": pl.Float64}


def write(directory: Path, name: str, ids: list[int], mtime: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    pl.DataFrame({"id": ids, "amount": [float(i) for i in ids]}, schema=SCHEMA).write_parquet(path)
    os.utime(path, (mtime, mtime))
    return path


def run_available_now(tmp_path: Path) -> ms.StreamingQuery:
    frame = ms.scan_files(tmp_path / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    return frame.sink_parquet(
        tmp_path / "out", checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now()
    )


def committed_batches(cp: Path) -> tuple[list[str], list[str]]:
    def names(sub: str) -> list[str]:
        return sorted(p.name for p in (cp / sub).glob("*.json"))

    return names("offsets"), names("commits")


def test_unreadable_file_fails_then_restart_continues(tmp_path: Path) -> None:
    write(tmp_path / "in", "a.parquet", [1, 2], 1000)
    bad = tmp_path / "in" / "b.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    os.utime(bad, (1001, 1001))
    write(tmp_path / "in", "c.parquet", [5], 1002)

    query = run_available_now(tmp_path)
    with pytest.raises(ms.SourceError, match=r"b\.parquet"):
        query.await_termination(timeout=60)
    offsets, commits = committed_batches(tmp_path / "cp")
    assert offsets == ["0.json", "1.json"] and commits == ["0.json"]  # batch 1 is pending
    assert ms.read_file_sink(tmp_path / "out")["id"].to_list() == [1, 2]

    write(tmp_path / "in", "b.parquet", [3, 4], 1001)  # the producer re-delivers the file
    query = run_available_now(tmp_path)
    assert query.await_termination(timeout=60)
    assert query.recent_progress[0].recovered
    assert sorted(ms.read_file_sink(tmp_path / "out")["id"].to_list()) == [1, 2, 3, 4, 5]


def test_schema_mismatch_names_file_and_column(tmp_path: Path) -> None:
    write(tmp_path / "in", "a.parquet", [1], 1000)
    odd = tmp_path / "in" / "b.parquet"
    pl.DataFrame({"id": ["x"], "amount": [1.0]}).write_parquet(odd)
    os.utime(odd, (1001, 1001))

    query = run_available_now(tmp_path)
    with pytest.raises(ms.SchemaMismatchError) as info:
        query.await_termination(timeout=60)
    message = str(info.value)
    assert str(odd) in message
    assert "column 'id' as String" in message and "Int64" in message
    _, commits = committed_batches(tmp_path / "cp")
    assert commits == ["0.json"]

    write(tmp_path / "in", "b.parquet", [2], 1001)
    query = run_available_now(tmp_path)
    assert query.await_termination(timeout=60)
    assert sorted(ms.read_file_sink(tmp_path / "out")["id"].to_list()) == [1, 2]


def test_sink_error_then_restart_is_exactly_once(tmp_path: Path) -> None:
    write(tmp_path / "in", "a.parquet", [1, 2], 1000)
    write(tmp_path / "in", "b.parquet", [3], 1001)
    writes: list[tuple[int, list[int]]] = []

    def flaky(df: pl.DataFrame, batch_id: int) -> None:
        if batch_id == 1 and not (tmp_path / "healed").exists():
            raise ConnectionError("warehouse unreachable")
        writes.append((batch_id, df["id"].to_list()))

    def start() -> ms.StreamingQuery:
        frame = ms.scan_files(tmp_path / "in", schema=SCHEMA, max_files_per_trigger=1)
        return frame.foreach_batch(
            flaky, checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now()
        )

    with pytest.raises(ms.SinkError, match="failed to write batch 1: warehouse unreachable"):
        start().await_termination(timeout=60)
    (tmp_path / "healed").touch()
    assert start().await_termination(timeout=60)
    assert writes == [(0, [1, 2]), (1, [3])]


def test_delta_sink_error_names_table_and_restart_continues(tmp_path: Path) -> None:
    write(tmp_path / "in", "a.parquet", [1, 2], 1000)
    target = tmp_path / "table"
    target.write_text("a file where the table should be")

    def start() -> ms.StreamingQuery:
        frame = ms.scan_files(tmp_path / "in", schema=SCHEMA)
        return frame.sink_delta(
            target, checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now()
        )

    with pytest.raises(ms.SinkError, match=str(target)):
        start().await_termination(timeout=60)
    target.unlink()
    assert start().await_termination(timeout=60)
    assert sorted(pl.read_delta(str(target))["id"].to_list()) == [1, 2]


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="root ignores permission bits and setpriv is missing to drop that capability",
)
def test_checkpoint_without_permission_is_a_clear_error(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    cp.mkdir()
    os.chmod(cp, 0o555)  # read-only for everyone but root
    script = textwrap.dedent(
        f"""
        import polars as pl, microstream as ms
        try:
            ms.MemoryStream({{"x": pl.Int64}}).lazy().sink_memory("t", checkpoint={str(cp)!r})
        except ms.CheckpointError as exc:
            print("ERROR:", exc)
        """
    )
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:  # root ignores permission bits unless it drops the capabilities
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert "ERROR:" in result.stdout, result.stderr
    assert "permission denied" in result.stdout
    assert str(cp) in result.stdout
    assert list(cp.iterdir()) == []  # nothing half-written


def test_truncated_wal_entry_never_restarts_from_zero(tmp_path: Path) -> None:
    write(tmp_path / "in", "a.parquet", [1], 1000)
    assert run_available_now(tmp_path).await_termination(timeout=60)
    wal = tmp_path / "cp" / "offsets" / "0.json"
    wal.write_text(wal.read_text()[:20])
    write(tmp_path / "in", "b.parquet", [2], 1001)
    with pytest.raises(ms.CheckpointCorruptError, match=str(wal)):
        run_available_now(tmp_path)
    assert ms.read_file_sink(tmp_path / "out")["id"].to_list() == [1]
    assert json.loads((tmp_path / "cp" / "commits" / "0.json").read_text())["batch_id"] == 0
