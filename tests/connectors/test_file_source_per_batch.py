"""The file source's own work per batch (issue 14, engine per-batch slice): a backlog taken
one file per trigger is stat-ed once per file, not once per file and trigger."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from connectors import _file_listing

SCHEMA = pl.Schema({"id": pl.Int64()})
_SCANDIR = os.scandir


class _CountingEntry:
    """An ``os.DirEntry`` whose ``stat`` calls are counted."""

    def __init__(self, entry: os.DirEntry[str], counts: dict[str, int]) -> None:
        self._entry = entry
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._entry, name)

    def stat(self, **kw: Any) -> os.stat_result:
        self._counts[self._entry.name] = self._counts.get(self._entry.name, 0) + 1
        return self._entry.stat(**kw)


class _CountingScandir:
    def __init__(self, path: str, counts: dict[str, int]) -> None:
        self._inner = _SCANDIR(path)
        self._counts = counts

    def __enter__(self) -> Iterator[_CountingEntry]:
        return (_CountingEntry(e, self._counts) for e in self._inner.__enter__())

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


@pytest.mark.parametrize("trigger", ["available_now", "once_per_file"])
def test_a_backlog_is_stat_ed_once_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trigger: str
) -> None:
    data = tmp_path / "in"
    data.mkdir()
    for i in range(6):
        path = data / f"f{i}.parquet"
        pl.DataFrame({"id": [i * 10, i * 10 + 1]}, schema=SCHEMA).write_parquet(path)
        os.utime(path, (1_000 + i, 1_000 + i))
    counts: dict[str, int] = {}
    monkeypatch.setattr(_file_listing.os, "scandir", lambda path: _CountingScandir(path, counts))
    frame = ms.scan_files(data, format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    name = f"backlog_{trigger}"
    if trigger == "available_now":
        query = frame.sink_memory(
            name, checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now()
        )
        query.await_termination()
    else:  # as fast as possible: one listing per trigger, the backlog left for later
        query = frame.sink_memory(name, checkpoint=tmp_path / "cp", trigger=ms.Trigger.every(0))
        query.process_all_available(timeout=60)
        query.stop()
    progress = query.recent_progress
    assert [p.num_input_rows for p in progress] == [2] * 6
    assert [s.end_offset for p in progress for s in p.sources] == [
        {"log_index": k} for k in range(6)
    ]
    assert sorted(ms.table(name)["id"].to_list()) == sorted(
        v for i in range(6) for v in (i * 10, i * 10 + 1)
    )
    # Each file once, when first listed (before: 1 + 6 + 5 + ... in an available-now run).
    assert counts == {f"f{i}.parquet": 1 for i in range(6)}
