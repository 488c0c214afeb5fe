"""The driver's own work per batch (issue 14, engine per-batch slice): no poll interval
after a batch, checkpoint writes with fewer system calls, built-in connectors found at once."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream import registry
from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointConflictError, MicrostreamError
from microstream.runtime import driver

SCHEMA = {"ts": pl.Datetime("us"), "k": pl.Utf8, "v": pl.Int64}
T0 = dt.datetime(2026, 1, 1)


def _rows(*items: tuple[int, str, int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [T0 + dt.timedelta(seconds=s) for s, _, _ in items],
            "k": [k for _, k, _ in items],
            "v": [v for _, _, v in items],
        },
        schema=SCHEMA,
    )


def test_no_poll_interval_after_a_batch_without_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data batch moves the watermark, so a no-data batch follows at once; the check
    after that one must not wait a poll interval (a long one here) before it finds the
    input drained and ``process_all_available`` returns."""
    monkeypatch.setattr(driver, "IDLE_POLL_S", 6.0)
    source = ms.MemoryStream(SCHEMA)
    out: dict[int, list[tuple[str, dt.datetime, int]]] = {}

    def collect(df: pl.DataFrame, batch_id: int) -> None:
        out[batch_id] = sorted(df.select("k", "ts", "v").iter_rows())

    query = (
        source.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("v").sum())
        .foreach_batch(collect, checkpoint=tmp_path / "cp", trigger=ms.Trigger.every(0))
    )
    try:
        source.add_data(_rows((1, "a", 1), (2, "b", 2)))
        query.process_all_available(timeout=30)  # the first poll may still be running
        source.add_data(_rows((61, "a", 4), (62, "b", 8)))
        t0 = time.perf_counter()
        query.process_all_available(timeout=30)
        elapsed = time.perf_counter() - t0
        batches = [p.batch_id for p in query.recent_progress]
        rows_in = [p.num_input_rows for p in query.recent_progress]
    finally:
        query.stop()
    # Batches: the first rows; the no-data batch their watermark asks for; the second
    # rows (which close the first minute); and the no-data batch after them.
    assert batches == [0, 1, 2, 3]
    assert rows_in == [2, 0, 2, 0]
    emitted = [row for b in sorted(out) for row in out[b]]
    assert emitted == [("a", T0, 1), ("b", T0, 2)]
    assert elapsed < 3.0, f"waited {elapsed:.2f} s: a poll interval after the no-data batch"


class _Calls:
    """Counts the calls of the ``os`` functions a test wraps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            module, attr = (os.path, name[5:]) if name.startswith("path.") else (os, name)
            original = getattr(module, attr)

            def counted(*args: Any, _name: str = name, _f: Any = original, **kw: Any) -> Any:
                self.counts[_name] += 1
                return _f(*args, **kw)

            monkeypatch.setattr(module, attr, counted)


def test_a_checkpoint_write_into_an_existing_directory_makes_no_extra_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path / "cp")
    storage.write_bytes("offsets/0.json", b"zero", overwrite=False)  # creates offsets/
    storage.append_line("progress/run.jsonl", "a")  # creates progress/
    calls = _Calls(monkeypatch, "makedirs", "mkdir", "stat", "path.exists", "open")
    storage.write_bytes("offsets/1.json", b"one", overwrite=False)
    storage.write_bytes("lock.json", b"lock")
    storage.append_line("progress/run.jsonl", "b")
    # One open per file (the temporary, or the appended file), nothing to look up first.
    assert calls.counts == {"makedirs": 0, "mkdir": 0, "stat": 0, "path.exists": 0, "open": 3}
    assert (tmp_path / "cp" / "offsets" / "1.json").read_bytes() == b"one"
    assert (tmp_path / "cp" / "lock.json").read_bytes() == b"lock"
    assert (tmp_path / "cp" / "progress" / "run.jsonl").read_text() == "a\nb\n"
    assert sorted(p.name for p in (tmp_path / "cp" / "offsets").iterdir()) == ["0.json", "1.json"]


def test_a_write_once_file_still_conflicts_and_a_removed_directory_is_made_again(
    tmp_path: Path,
) -> None:
    storage = Storage(tmp_path / "cp")
    storage.write_bytes("offsets/0.json", b"first", overwrite=False)
    with pytest.raises(CheckpointConflictError, match=r"offsets/0\.json"):
        storage.write_bytes("offsets/0.json", b"second", overwrite=False)
    assert (tmp_path / "cp" / "offsets" / "0.json").read_bytes() == b"first"
    assert sorted(p.name for p in (tmp_path / "cp" / "offsets").iterdir()) == ["0.json"]
    shutil.rmtree(tmp_path / "cp" / "offsets")  # e.g. by `microstream reset`
    storage.write_bytes("offsets/0.json", b"again", overwrite=False)
    assert (tmp_path / "cp" / "offsets" / "0.json").read_bytes() == b"again"
    assert sorted(p.name for p in (tmp_path / "cp" / "offsets").iterdir()) == ["0.json"]
    storage.append_line("progress/deep/run.jsonl", "x")
    assert (tmp_path / "cp" / "progress" / "deep" / "run.jsonl").read_text() == "x\n"


def test_a_built_in_connector_is_found_without_reading_every_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``scan_*`` and ``sink_*`` call looks its connector up; a built-in one is found
    in microstream's own metadata (the full scan costs 10-20 ms per call), and a name
    only another package declares is still found by the full scan."""
    full_scans: list[str] = []
    targets = registry._targets

    def counted(group: str) -> dict[str, str]:
        full_scans.append(group)
        extra = {"toy_rate": "connectors.rate:RateSourceSpec"}
        return {**targets(group), **(extra if group == registry.CONNECTORS_GROUP else {})}

    monkeypatch.setattr(registry, "_targets", counted)
    data = tmp_path / "in"
    data.mkdir()
    pl.DataFrame({"x": [1, 2]}).write_parquet(data / "a.parquet")
    query = ms.scan_files(data, format="parquet", schema={"x": pl.Int64}).sink_memory(
        "built_in_lookup", checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now()
    )
    query.await_termination()
    assert ms.table("built_in_lookup")["x"].to_list() == [1, 2]
    assert full_scans == []
    assert registry.load_connector("toy_rate").kind == "rate"
    assert full_scans == [registry.CONNECTORS_GROUP]
    with pytest.raises(MicrostreamError, match=r"no connector named 'nope'; installed connectors"):
        registry.load_connector("nope")
