"""The trigger loop and the write-ahead log: exactly-once, recovery, lock, plan changes."""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pytest

import microstream as ms
from microstream.protocols import Offset, SourceContext

SCHEMA = {"x": pl.Int64}


def write_files(directory: Path, start: int, count: int, rows: int = 3) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        pl.DataFrame({"x": list(range(i * rows, (i + 1) * rows))}).write_parquet(
            directory / f"f{i:03d}.parquet"
        )
        os.utime(directory / f"f{i:03d}.parquet", (1_000 + i, 1_000 + i))


def test_wal_entry_before_batch_commit_after(tmp_path: Path) -> None:
    seen: list[tuple[int, bool, bool]] = []
    cp = tmp_path / "cp"

    def check(df: pl.DataFrame, batch_id: int) -> None:
        seen.append(
            (
                batch_id,
                (cp / "offsets" / f"{batch_id}.json").exists(),
                (cp / "commits" / f"{batch_id}.json").exists(),
            )
        )

    source = ms.MemoryStream(SCHEMA)
    query = source.lazy().foreach_batch(check, checkpoint=cp)
    source.add_data({"x": [1]})
    query.process_all_available(timeout=30)
    source.add_data({"x": [2]})
    query.process_all_available(timeout=30)
    query.stop()
    assert seen == [(0, True, False), (1, True, False)]
    assert sorted(p.name for p in (cp / "commits").iterdir()) == ["0.json", "1.json"]
    entry = json.loads((cp / "offsets" / "1.json").read_text())
    assert entry["sources"][0]["start"] == {"batches": 1}
    assert entry["sources"][0]["end"] == {"batches": 2}


def test_uncommitted_batch_reruns_with_logged_offsets_and_timestamp(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    source = ms.MemoryStream(SCHEMA, name="s")

    def fail_on_second(df: pl.DataFrame, batch_id: int) -> None:
        if batch_id == 1:
            raise RuntimeError("disk full")

    query = source.lazy().foreach_batch(fail_on_second, checkpoint=cp)
    source.add_data({"x": [1, 2]})
    query.process_all_available(timeout=30)
    source.add_data({"x": [3]})
    with pytest.raises(ms.SinkError, match="batch 1: disk full"):
        query.await_termination(timeout=30)
    assert isinstance(query.exception(), ms.SinkError)
    assert not query.is_active
    assert (cp / "offsets" / "1.json").exists()
    assert not (cp / "commits" / "1.json").exists()
    logged = json.loads((cp / "offsets" / "1.json").read_text())

    source.add_data({"x": [4, 5]})  # arrives after the crash: not part of batch 1
    calls: list[tuple[int, list[int]]] = []
    query = source.lazy().foreach_batch(
        lambda df, b: calls.append((b, df["x"].to_list())), checkpoint=cp
    )
    query.process_all_available(timeout=30)
    query.stop()
    assert calls == [(1, [3]), (2, [4, 5])]
    first = query.recent_progress[0]
    assert first.recovered and first.batch_id == 1
    assert first.batch_timestamp_ms == logged["batch_timestamp_ms"]
    assert not query.recent_progress[1].recovered


def test_second_process_on_checkpoint_is_refused(tmp_path: Path, name: str) -> None:
    source = ms.MemoryStream(SCHEMA, name="s")
    first = source.lazy().sink_memory(name, checkpoint=tmp_path / "cp")
    try:
        with pytest.raises(ms.CheckpointLockedError, match=f"pid {os.getpid()}"):
            source.lazy().sink_memory(name + "b", checkpoint=tmp_path / "cp")
    finally:
        first.stop()
    # Once stopped, the lock is released and the checkpoint is usable again.
    again = source.lazy().sink_memory(name + "c", checkpoint=tmp_path / "cp")
    again.stop()


def _write_lock(cp: Path, *, host: str, pid: int, heartbeat_age: float) -> None:
    cp.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {
        "host": host,
        "pid": pid,
        "run_id": "old-run",
        "acquired_at": now - 100,
        "heartbeat_at": now - heartbeat_age,
        "timeout_s": 30.0,
    }
    (cp / "lock.json").write_text(json.dumps(record))


def test_lock_of_dead_process_is_taken_over(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    _write_lock(tmp_path / "cp", host=socket.gethostname(), pid=int(child.stdout), heartbeat_age=1)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        query = ms.MemoryStream(SCHEMA).lazy().sink_memory(name, checkpoint=tmp_path / "cp")
    query.stop()
    assert "taking over the lock" in caplog.text
    assert "its process is gone" in caplog.text


def test_lock_with_expired_heartbeat_is_taken_over(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    _write_lock(tmp_path / "cp", host="other-host", pid=1, heartbeat_age=120)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        query = ms.MemoryStream(SCHEMA).lazy().sink_memory(name, checkpoint=tmp_path / "cp")
    query.stop()
    assert "no heartbeat for 120s" in caplog.text


def test_live_lock_on_other_host_is_refused(tmp_path: Path, name: str) -> None:
    _write_lock(tmp_path / "cp", host="other-host", pid=1, heartbeat_age=2)
    with pytest.raises(ms.CheckpointLockedError, match="other-host"):
        ms.MemoryStream(SCHEMA).lazy().sink_memory(name, checkpoint=tmp_path / "cp")


def test_incompatible_plan_change_is_refused(tmp_path: Path, name: str) -> None:
    cp = tmp_path / "cp"
    ms.MemoryStream(SCHEMA, name="a").lazy().sink_memory(name, checkpoint=cp).stop()
    with pytest.raises(ms.PlanChangedError, match="source 0 changed from") as info:
        ms.MemoryStream(SCHEMA, name="b").lazy().sink_memory(name, checkpoint=cp)
    assert "'name': 'a'" in str(info.value) and "'name': 'b'" in str(info.value)
    # A change of stateless steps is compatible.
    changed = ms.MemoryStream(SCHEMA, name="a").lazy().filter(pl.col("x") > 0)
    changed.sink_memory(name, checkpoint=cp).stop()


@pytest.mark.parametrize(
    ("relative", "content"),
    [
        ("offsets/0.json", b'{"format_version": 1, "batch_id": 0, "batch_ti'),
        ("commits/0.json", b""),
        ("metadata.json", b"not json"),
        (
            "offsets/0.json",
            b'{"format_version": 1, "batch_id": 7, "batch_timestamp_ms": 1, "sources": []}',
        ),
    ],
)
def test_corrupt_checkpoint_file_is_named(
    tmp_path: Path, name: str, relative: str, content: bytes
) -> None:
    cp = tmp_path / "cp"
    source = ms.MemoryStream(SCHEMA, name="s")
    query = source.lazy().sink_memory(name, checkpoint=cp)
    source.add_data({"x": [1]})
    query.process_all_available(timeout=30)
    query.stop()
    (cp / relative).write_bytes(content)
    with pytest.raises(ms.CheckpointCorruptError, match=str(cp / relative)):
        source.lazy().sink_memory(name, checkpoint=cp)
    assert not (cp / "lock.json").exists()  # a failed start releases the lock


def test_checkpoint_on_memory_filesystem(name: str) -> None:
    import fsspec

    url = f"memory://{name}/cp"
    source = ms.MemoryStream(SCHEMA, name="s")
    query = source.lazy().sink_memory(name, checkpoint=url)
    source.add_data({"x": [1, 2]})
    query.process_all_available(timeout=30)
    query.stop()
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"/{name}/cp/offsets/0.json")
    assert fs.exists(f"/{name}/cp/commits/0.json")
    assert json.loads(fs.cat_file(f"/{name}/cp/metadata.json"))["id"] == query.id
    # Restart from the memory checkpoint: nothing is re-processed.
    source.add_data({"x": [3]})
    query = source.lazy().sink_memory(name, checkpoint=url)
    query.process_all_available(timeout=30)
    query.stop()
    assert ms.table(name)["x"].to_list() == [1, 2, 3]


def test_trigger_once_takes_everything_in_one_batch(tmp_path: Path, name: str) -> None:
    write_files(tmp_path / "in", 0, 5)
    frame = ms.scan_files(tmp_path / "in", max_files_per_trigger=2)
    query = frame.sink_memory(name, trigger=ms.Trigger.once())
    assert query.await_termination(timeout=30)
    assert [p.num_input_rows for p in query.recent_progress] == [15]


def test_available_now_respects_rate_limit_and_stops(tmp_path: Path, name: str) -> None:
    write_files(tmp_path / "in", 0, 5)
    frame = ms.scan_files(tmp_path / "in", max_files_per_trigger=2)
    query = frame.sink_memory(name, trigger=ms.Trigger.available_now())
    write_files(tmp_path / "in", 5, 2)  # after the start: not part of this run
    assert query.await_termination(timeout=30)
    assert [p.num_input_rows for p in query.recent_progress] == [6, 6, 3]
    assert ms.table(name)["x"].to_list() == list(range(15))


def test_processing_time_trigger_spaces_batches(name: str) -> None:
    source = ms.MemoryStream(SCHEMA)
    query = source.lazy().sink_memory(name, trigger=ms.Trigger.every("300ms"))
    for i in range(3):
        source.add_data({"x": [i]})
        query.process_all_available(timeout=30)
    query.stop()
    stamps = [p.timestamp for p in query.recent_progress]
    assert len(stamps) == 3
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]
    assert all(gap >= 0.25 for gap in gaps), gaps


def test_listeners_see_the_life_cycle(name: str) -> None:
    events: list[str] = []

    class Listener:
        def on_query_started(self, event: Any) -> None:
            events.append("started")

        def on_query_progress(self, event: Any) -> None:
            events.append(f"progress {event.progress.batch_id}")

        def on_query_terminated(self, event: Any) -> None:
            events.append(f"terminated {event.exception}")

    listener = Listener()
    ms.add_listener(listener)
    try:
        source = ms.MemoryStream(SCHEMA)
        query = source.lazy().sink_memory(name)
        source.add_data({"x": [1]})
        query.process_all_available(timeout=30)
        query.stop()
    finally:
        ms.remove_listener(listener)
    assert events == ["started", "progress 0", "terminated None"]


def test_progress_is_recorded(tmp_path: Path, name: str) -> None:
    source = ms.MemoryStream(SCHEMA, name="s")
    query = source.lazy().filter(pl.col("x") > 1).sink_memory(name, checkpoint=tmp_path / "cp")
    source.add_data({"x": [1, 2, 3]})
    query.process_all_available(timeout=30)
    assert query.status.is_data_available is False
    query.stop()
    progress = query.last_progress
    assert progress is not None
    assert (progress.batch_id, progress.num_input_rows, progress.num_output_rows) == (0, 3, 2)
    assert progress.sources[0].end_offset == {"batches": 1}
    assert progress.sources[0].lag == 0
    assert progress.durations_ms.total >= progress.durations_ms.compute > 0
    assert progress.id == query.id and progress.run_id == query.run_id
    df = query.progress_df()
    assert df["num_output_rows"].to_list() == [2]
    lines = (tmp_path / "cp" / "progress" / f"{query.run_id}.jsonl").read_text().splitlines()
    assert ms.QueryProgress.model_validate_json(lines[0]) == progress
    assert query.status.state == "stopped"


def test_query_id_stable_run_id_new(tmp_path: Path, name: str) -> None:
    source = ms.MemoryStream(SCHEMA, name="s")
    first = source.lazy().sink_memory(name, checkpoint=tmp_path / "cp")
    first.stop()
    second = source.lazy().sink_memory(name, checkpoint=tmp_path / "cp")
    second.stop()
    assert first.id == second.id
    assert first.run_id != second.run_id


class BackwardsOffset(Offset):
    n: int

    def follows_or_equals(self, other: Offset) -> bool:
        return isinstance(other, BackwardsOffset) and self.n >= other.n


class BackwardsSource:
    """A broken third-party source whose latest offset goes back."""

    kind: ClassVar[str] = "backwards"
    schema = pl.Schema(SCHEMA)
    description = "backwards"

    def identity(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return "backwards"

    def build(self, context: SourceContext) -> BackwardsSource:
        self.calls = 0
        return self

    def initial_offset(self) -> BackwardsOffset:
        return BackwardsOffset(n=0)

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> BackwardsOffset:
        self.calls += 1
        return BackwardsOffset(n=5 if self.calls == 1 else 2)

    def prepare_for_available_now(self) -> None: ...

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        return pl.DataFrame({"x": [1]})

    def parse_offset(self, data: dict[str, Any]) -> BackwardsOffset:
        return BackwardsOffset.model_validate(data)

    def commit(self, end: Offset) -> None: ...

    def stop(self) -> None: ...


def test_offsets_going_backwards_are_refused(name: str) -> None:
    query = ms.StreamFrame.from_source(BackwardsSource()).sink_memory(name)
    with pytest.raises(
        ms.OffsetError, match=r"source 0 \(backwards\) returned latest offset \{'n': 2\}"
    ):
        query.await_termination(timeout=30)
    assert ms.table(name).height == 1
