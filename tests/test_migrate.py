"""``microstream migrate``: a real format-1 checkpoint (``tests/data/format1``, written by
microstream 82ba171) is refused with the command to run, converted in place, and its
query continues to exactly the output of a clean run; an interrupted migration finishes
on a re-run; what is no format-1 checkpoint is refused."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.checkpoint import migrate as migrate_module
from microstream.checkpoint.storage import Storage
from tests.test_cli import cli

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).parent / "data" / "format1"
SCHEMA = {"id": pl.Int64, "user": pl.String, "ts": pl.Datetime("us"), "amount": pl.Int64}


def windowed_query(root: Path) -> ms.StreamingQuery:
    """The query of ``tests/data/format1/make_format1.py``."""
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


def place_input(root: Path, parts: range) -> None:
    """Input files i of the fixture into ``root/in``, with the mtimes the old run saw."""
    (root / "in").mkdir(parents=True, exist_ok=True)
    for i in parts:
        source = FIXTURE / ("in" if i < 3 else "rest") / f"part-{i}.parquet"
        target = root / "in" / source.name
        shutil.copyfile(source, target)
        os.utime(target, (1000 + i, 1000 + i))


def old_checkpoint(root: Path) -> Path:
    """The format-1 checkpoint and its output, moved to ``root`` with their input.

    A checkpoint records its source's absolute path; the format-1 ``metadata.json``
    has no checksum, so the move is recorded there as a user moving a checkpoint
    would: the path is rewritten.
    """
    shutil.copytree(FIXTURE / "cp", root / "cp")
    shutil.copytree(FIXTURE / "out", root / "out")
    place_input(root, range(3))
    meta_path = root / "cp" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == 1
    meta["plan"]["sources"][0]["path"] = str(root / "in")
    meta_path.write_text(json.dumps(meta, indent=1))
    return root / "cp"


@pytest.fixture(scope="module")
def clean_output(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    """All five input files through the query, by this microstream, from the start."""
    root = tmp_path_factory.mktemp("clean")
    place_input(root, range(5))
    assert windowed_query(root).await_termination(timeout=60)
    return output(root)


def test_a_format1_checkpoint_is_refused_migrated_and_continues_exactly(
    tmp_path: Path, clean_output: pl.DataFrame
) -> None:
    cp = old_checkpoint(tmp_path)
    before = output(tmp_path)
    assert before.height == 2  # the old run emitted the first window of both users
    with pytest.raises(ms.CheckpointFormatError) as refused:
        windowed_query(tmp_path)
    assert f"Convert it in place with `microstream migrate {cp}`" in str(refused.value)

    done = cli("migrate", "cp", "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "format 1 -> 2 in place: state stores (op0/keys, op1/partials) rewritten as format-2 "
        "snapshots of version 3 in 128 key groups; 11 JSON files given checksums" in done.stdout
    )
    assert "checkpoint cp is in format 2 now" in done.stdout
    state_files = sorted(str(p.relative_to(cp)) for p in (cp / "state").rglob("*") if p.is_file())
    assert state_files == [
        f"state/{store}/{name}"
        for store in ("op0/keys", "op1/partials")
        for name in (
            "_metadata.json",
            "snapshots/3/0-32.arrow",
            "snapshots/3/32-64.arrow",
            "snapshots/3/64-96.arrow",
            "snapshots/3/96-128.arrow",
            "versions/3.json",
        )
    ]
    assert json.loads((cp / "metadata.json").read_text())["key_groups"] == 128

    place_input(tmp_path, range(3, 5))
    assert windowed_query(tmp_path).await_termination(timeout=60)
    assert_frame_equal(output(tmp_path), clean_output)


def test_migrate_with_other_key_groups_records_them(
    tmp_path: Path, clean_output: pl.DataFrame
) -> None:
    cp = old_checkpoint(tmp_path)
    done = cli("migrate", "cp", "--yes", "--key-groups", "16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((cp / "metadata.json").read_text())["key_groups"] == 16
    assert sorted(
        p.name for p in (cp / "state" / "op0" / "keys" / "snapshots" / "3").iterdir()
    ) == [
        "0-4.arrow",
        "12-16.arrow",
        "4-8.arrow",
        "8-12.arrow",
    ]
    place_input(tmp_path, range(3, 5))
    assert windowed_query(tmp_path).await_termination(timeout=60)
    assert_frame_equal(output(tmp_path), clean_output)


def checkpoint_files(cp: Path) -> dict[str, bytes]:
    """Every file but the progress log (and no lock: none is left)."""
    return {
        str(p.relative_to(cp)): p.read_bytes()
        for p in sorted(cp.rglob("*"))
        if p.is_file() and p.parts[len(cp.parts)] != "progress"
    }


class SimulatedCrashError(Exception):
    """The simulated crash of a migration."""


def crash_after(write: Callable[..., None], writes: int) -> Callable[..., None]:
    """``Storage.write_bytes`` that crashes at write number ``writes`` (0: the first)."""
    done = 0

    def failing(self: Storage, relative: str, data: bytes, **kwargs: bool) -> None:
        nonlocal done
        if done == writes:
            raise SimulatedCrashError(relative)
        done += 1
        write(self, relative, data, **kwargs)

    return failing


def test_an_interrupted_migration_finishes_on_a_rerun_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_output: pl.DataFrame
) -> None:
    root = tmp_path / "run"  # one place for every run: the checkpoint records its input's path
    reference = old_checkpoint(root)
    original = Storage.write_bytes
    writes: list[str] = []

    def counting(self: Storage, relative: str, data: bytes, **kwargs: bool) -> None:
        writes.append(relative)
        original(self, relative, data, **kwargs)

    monkeypatch.setattr(Storage, "write_bytes", counting)
    assert migrate_module.migrate_checkpoint(str(reference), confirm=lambda plan: True)
    expected = checkpoint_files(reference)
    total = len(writes)
    assert total > 20  # journal, two stores staged and installed, 11 WAL/log files, metadata

    for crash_at in range(total):
        shutil.rmtree(root)
        cp = old_checkpoint(root)
        monkeypatch.setattr(Storage, "write_bytes", crash_after(original, crash_at))
        with pytest.raises(SimulatedCrashError):
            migrate_module.migrate_checkpoint(str(cp), confirm=lambda plan: True)
        monkeypatch.setattr(Storage, "write_bytes", original)
        # Half-way, this microstream does not run the query: the metadata still says format 1.
        with pytest.raises(ms.CheckpointFormatError):
            windowed_query(root)
        assert migrate_module.migrate_checkpoint(str(cp), confirm=lambda plan: True)
        assert checkpoint_files(cp) == expected, f"crashed at write {crash_at} ({writes[crash_at]})"

    place_input(root, range(3, 5))
    assert windowed_query(root).await_termination(timeout=60)
    assert_frame_equal(output(root), clean_output)


def test_migrate_refuses_what_is_no_format1_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    nothing = cli("migrate", "empty", "--yes", cwd=tmp_path)
    assert nothing.returncode == 1
    assert (
        f"{tmp_path / 'empty'} is not a microstream checkpoint (no metadata.json): nothing "
        "to migrate" in nothing.stderr
    )

    old_checkpoint(tmp_path)
    assert cli("migrate", "cp", "--yes", cwd=tmp_path).returncode == 0
    again = cli("migrate", "cp", "--yes", cwd=tmp_path)
    assert again.returncode == 1
    assert (
        f"checkpoint {tmp_path / 'cp'} is already in format 2: nothing to migrate; run its query"
        in again.stderr
    )


def test_migrate_asks_and_without_a_terminal_needs_yes(tmp_path: Path) -> None:
    cp = old_checkpoint(tmp_path)
    before = checkpoint_files(cp)
    no_tty = cli("migrate", "cp", cwd=tmp_path)
    assert no_tty.returncode == 1
    assert "pass --yes to convert" in no_tty.stderr
    assert checkpoint_files(cp) == before
    assert not (cp / "lock.json").exists()


def test_a_resumed_migration_keeps_its_choices_and_refuses_a_checkpoint_that_moved_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = old_checkpoint(tmp_path)
    original = Storage.write_bytes
    monkeypatch.setattr(Storage, "write_bytes", crash_after(original, 2))  # lock, journal
    with pytest.raises(SimulatedCrashError):
        migrate_module.migrate_checkpoint(str(cp), confirm=lambda plan: True, key_groups=32)
    monkeypatch.setattr(Storage, "write_bytes", original)
    other = cli("migrate", "cp", "--yes", "--key-groups", "16", cwd=tmp_path)
    assert other.returncode == 1
    assert (
        f"checkpoint {cp} is half-way through a migration to 32 key groups; run it again "
        "with --key-groups 32 (or without --key-groups) to finish it"
    ) in other.stderr

    newest = (cp / "commits" / "3.json").read_bytes()
    (cp / "commits" / "3.json").unlink()
    moved = cli("migrate", "cp", "--yes", cwd=tmp_path)
    assert moved.returncode == 1
    assert (
        f"checkpoint {cp} is half-way through a migration of the state as of batch 3, but its "
        "newest commit is now 2: a query ran on it meanwhile"
    ) in moved.stderr

    (cp / "commits" / "3.json").write_bytes(newest)
    assert cli("migrate", "cp", "--yes", cwd=tmp_path).returncode == 0
    assert json.loads((cp / "metadata.json").read_text())["key_groups"] == 32
    assert not (cp / "migrating.json").exists()
