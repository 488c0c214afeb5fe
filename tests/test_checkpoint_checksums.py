"""Checksums on the JSON files of a checkpoint (issue 12 item 5).

A flipped byte, or a file rewritten with other valid JSON, in any JSON file a
restart reads (metadata, WAL, commits, source log, state metadata, state
version manifests) stops the query with ``CheckpointCorruptError`` naming the
file; the output is untouched, and once the file is restored the query goes on
to exactly the output of a clean run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.checkpoint.checksums import seal, unseal
from microstream.checkpoint.log import Checkpoint, OffsetEntry
from microstream.checkpoint.storage import Storage

SCHEMA = {"id": pl.Int64, "user": pl.String, "ts": pl.Datetime("us"), "amount": pl.Int64}
T0 = datetime(2026, 1, 1)


def part(i: int) -> pl.DataFrame:
    """File i: ids repeat within the file (the dedup drops them), event time only moves on."""
    rows = [
        (10 * i + j % 3, "ab"[j % 2], T0 + timedelta(seconds=7 * i + j), 100 * i + j)
        for j in range(4)
    ]
    rows.append(rows[0])
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def write_inputs(directory: Path, parts: range) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in parts:
        path = directory / f"part-{i}.parquet"
        part(i).write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))


def windowed_query(root: Path) -> ms.StreamingQuery:
    """Two stateful operators (dedup, then a windowed aggregation), one file per batch."""
    frame = ms.scan_files(root / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    return (
        frame.with_watermark("ts", delay="5s")
        .unique(subset=["id", "ts"], keep="first")
        .group_by_dynamic("ts", every="10s", group_by="user")
        .agg(pl.col("amount").sum().alias("total"), pl.len().alias("n"))
        .sink_parquet(root / "out", checkpoint=root / "cp", trigger=ms.Trigger.available_now())
    )


def output(root: Path) -> pl.DataFrame:
    return ms.read_file_sink(root / "out").sort(["ts", "user"])


@pytest.fixture(scope="module")
def clean_output(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    root = tmp_path_factory.mktemp("clean")
    write_inputs(root / "in", range(5))
    assert windowed_query(root).await_termination(timeout=60)
    return output(root)


def edit(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    """A mutation that rewrites a JSON file with one value changed (its checksum kept)."""

    def mutate(raw: bytes) -> bytes:
        document = json.loads(raw)
        change(document)
        return json.dumps(document, indent=1).encode()

    return mutate


def flip_digit(member: bytes) -> Callable[[bytes], bytes]:
    """A mutation that changes one byte: the first character of a member's value."""

    def mutate(raw: bytes) -> bytes:
        at = raw.index(b'"' + member + b'": ') + len(member) + 4
        at += raw[at : at + 1] == b'"'  # a string: its first character
        new = b"1" if raw[at : at + 1] != b"1" else b"2"
        return raw[:at] + new + raw[at + 1 :]

    return mutate


def shift(path: list[Any], by: int) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target: Any = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] += by

    return change


def set_value(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target: Any = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


CASES: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "metadata-flipped-id": ("metadata.json", flip_digit(b"id")),
    "metadata-edited-sink": (
        "metadata.json",
        edit(set_value(["plan", "sink"], "delta")),
    ),
    "offsets-edited-end": (
        "offsets/3.json",
        edit(shift(["sources", 0, "end", "log_index"], -1)),
    ),
    "commits-edited-rows": ("commits/3.json", edit(shift(["num_output_rows"], 1))),
    "commits-flipped-watermark": ("commits/3.json", flip_digit(b"watermark_us")),
    "source-log-edited-name": (
        "sources/0/1.json",
        edit(set_value(["files", 0, "name"], "part-3.parquet")),
    ),
    "state-metadata-edited": (
        "state/op0/keys/_metadata.json",
        edit(set_value(["snapshot_every"], 5)),
    ),
    "state-manifest-edited-range": (
        "state/op1/partials/versions/3.json",
        edit(set_value(["files", 0, "key_groups"], [0, 128])),
    ),
    "state-manifest-flipped-count": (
        "state/op0/keys/versions/3.json",
        edit(shift(["files", 0, "rows"], 1)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_changed_json_file_is_refused_by_name_and_nothing_is_lost_or_repeated(
    tmp_path: Path, case: str, clean_output: pl.DataFrame
) -> None:
    relative, mutate = CASES[case]
    write_inputs(tmp_path / "in", range(3))
    assert windowed_query(tmp_path).await_termination(timeout=60)
    before = output(tmp_path)
    target = tmp_path / "cp" / relative
    good = target.read_bytes()
    bad = mutate(good)
    assert bad != good
    json.loads(bad)  # still valid JSON: only the checksum tells
    target.write_bytes(bad)

    write_inputs(tmp_path / "in", range(3, 5))
    with pytest.raises(ms.CheckpointCorruptError) as raised:
        query = windowed_query(tmp_path)
        query.await_termination(timeout=60)
    message = str(raised.value)
    assert message.startswith(f"checkpoint file {target} is corrupt: the CRC-32 of its bytes is ")
    assert "(a changed byte, or the file was edited)" in message
    assert_frame_equal(output(tmp_path), before)

    target.write_bytes(good)
    assert windowed_query(tmp_path).await_termination(timeout=60)
    assert_frame_equal(output(tmp_path), clean_output)


def test_every_json_file_of_a_checkpoint_carries_a_checksum_but_the_lock_and_progress(
    tmp_path: Path,
) -> None:
    write_inputs(tmp_path / "in", range(2))
    assert windowed_query(tmp_path).await_termination(timeout=60)
    cp = tmp_path / "cp"
    sealed = sorted(str(p.relative_to(cp)) for p in cp.rglob("*.json"))
    assert sealed == [
        "commits/0.json",
        "commits/1.json",
        "commits/2.json",
        "metadata.json",
        "offsets/0.json",
        "offsets/1.json",
        "offsets/2.json",
        "sources/0/0.json",
        "sources/0/1.json",
        "state/op0/keys/_metadata.json",
        "state/op0/keys/versions/0.json",
        "state/op0/keys/versions/1.json",
        "state/op0/keys/versions/2.json",
        "state/op1/partials/_metadata.json",
        "state/op1/partials/versions/0.json",
        "state/op1/partials/versions/1.json",
        "state/op1/partials/versions/2.json",
    ]
    for name in sealed:
        raw = (cp / name).read_bytes()
        assert json.loads(raw)["crc32"] == json.loads(seal(unseal(raw, name)))["crc32"]
    # The lock is rewritten by every heartbeat and holds no data: no checksum.
    cp_obj = Checkpoint(str(cp))
    cp_obj.acquire_lock("run-x")
    try:
        assert "crc32" not in json.loads((cp / "lock.json").read_bytes())
    finally:
        cp_obj.release_lock()
    progress = next((cp / "progress").iterdir()).read_text().splitlines()
    assert all("crc32" not in json.loads(line) for line in progress)


def test_a_file_without_its_checksum_is_refused_and_any_reader_checks_one(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in", range(2))
    assert windowed_query(tmp_path).await_termination(timeout=60)
    wal = tmp_path / "cp" / "offsets" / "2.json"
    good = wal.read_bytes()
    document = json.loads(good)
    document.pop("crc32")
    wal.write_text(json.dumps(document, indent=1))
    with pytest.raises(ms.CheckpointCorruptError) as raised:
        Checkpoint(str(tmp_path / "cp")).read_offsets(2)
    assert str(raised.value).startswith(
        f"checkpoint file {wal} is corrupt or truncated ({len(wal.read_bytes())} bytes): it does "
        'not end with its "crc32" member, which every JSON file of the checkpoint carries'
    )
    # A plain Storage (not the checkpoint's) still checks a checksum the file has.
    wal.write_bytes(good.replace(b'"batch_id": 2', b'"batch_id": 7'))
    with pytest.raises(ms.CheckpointCorruptError, match="the CRC-32 of its bytes is"):
        Storage(str(tmp_path / "cp")).read_model("offsets/2.json", OffsetEntry)
    wal.write_bytes(good)
    assert Storage(str(tmp_path / "cp")).read_model("offsets/2.json", OffsetEntry).batch_id == 2
