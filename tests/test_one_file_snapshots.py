"""A full snapshot of a small state is one file covering every key group; a large state,
or a store naming ``snapshot_files``, keeps the split; every such version (and any
key-group range of it) loads exactly, and checkpoints with four-file snapshots written
by earlier code load and continue."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal

from microstream.checkpoint.storage import Storage
from microstream.state.format import StateVersion, version_file
from microstream.state.key_groups import key_groups
from microstream.state.rotation import ONE_FILE_SNAPSHOT_ROWS
from microstream.state.store import StateStore

SCHEMA = pl.Schema({"k": pl.Int64, "v": pl.Int64})
OPERATOR = "op0/counts"
FIXTURE = Path(__file__).parent / "data" / "state_full_snapshots" / "store"


def new_store(storage: Storage, groups: int = 128, **options: int) -> StateStore:
    return StateStore(
        storage,
        operator=OPERATOR,
        key_columns=["k"],
        schema=SCHEMA,
        num_key_groups=groups,
        snapshot_every=4,
        **options,
    )


def upserts(keys: range, version: int) -> pl.DataFrame:
    return pl.DataFrame({"k": list(keys), "v": [version * 1000 + k for k in keys]}, schema=SCHEMA)


def snapshot_files(storage: Storage, version: int) -> list[tuple[str, tuple[int, int]]]:
    entry = storage.read_model(version_file(version), StateVersion)
    return [(f.name, f.key_groups) for f in entry.files if f.kind == "snapshot"]


def loaded(storage: Storage, version: int, groups: int = 128, part: range | None = None):  # type: ignore[no-untyped-def]
    store = new_store(storage, groups)
    store.load(version, key_groups=part)
    return store.frame.sort("k")


def test_a_small_state_snapshots_into_one_file_and_every_range_loads(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "s")
    store = new_store(storage)
    store.load(None)
    for version in range(6):  # keys 0-9, each version rewrites two of them, deletes one
        store.apply(
            upserts=upserts(range(2 * version % 10, 2 * version % 10 + 2), version)
            if version
            else upserts(range(10), 0),
            deletes=pl.DataFrame({"k": [9]}) if version == 5 else None,
        )
        store.commit(version)
    assert snapshot_files(storage, 0) == [("snapshots/0/0-128.arrow", (0, 128))]
    assert snapshot_files(storage, 4) == [("snapshots/4/0-128.arrow", (0, 128))]
    assert sorted(p.name for p in (tmp_path / "s" / "snapshots" / "4").iterdir()) == ["0-128.arrow"]
    expected = {
        0: {k: k for k in range(10)},
        4: {0: 0, 1: 1, 2: 1002, 3: 1003, 4: 2004, 5: 2005, 6: 3006, 7: 3007, 8: 4008, 9: 4009},
        5: {0: 5000, 1: 5001, 2: 1002, 3: 1003, 4: 2004, 5: 2005, 6: 3006, 7: 3007, 8: 4008},
    }
    for version, rows in expected.items():
        want = pl.DataFrame({"k": list(rows), "v": list(rows.values())}, schema=SCHEMA)
        assert_frame_equal(loaded(storage, version), want)
        # an owner of a range reads the one file and keeps its groups' rows
        groups = key_groups(want, ["k"], 128)
        for lo, hi in ((0, 40), (40, 100), (100, 128)):
            part = want.filter(pl.Series((groups >= lo) & (groups < hi)))
            assert_frame_equal(loaded(storage, version, part=range(lo, hi)), part)


def test_a_large_state_and_an_explicit_number_keep_the_split(tmp_path: Path) -> None:
    large = Storage(tmp_path / "large")
    store = new_store(large)
    store.load(None)
    store.apply(upserts=upserts(range(ONE_FILE_SNAPSHOT_ROWS), 0))
    store.commit(0)
    assert [r for _, r in snapshot_files(large, 0)] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert loaded(large, 0).height == ONE_FILE_SNAPSHOT_ROWS

    small = Storage(tmp_path / "small")
    named = new_store(small, snapshot_files=4)
    named.load(None)
    named.apply(upserts=upserts(range(3), 0))
    named.commit(0)
    assert [r for _, r in snapshot_files(small, 0)] == [(0, 32), (32, 64), (64, 96), (96, 128)]


def test_a_checkpoint_with_four_file_snapshots_continues_with_one_file(tmp_path: Path) -> None:
    """The fixture (8 key groups, a snapshot every 4 versions) was written with four
    files per snapshot; the next snapshot of its 30-odd rows is one file, and every
    version, old and new, loads to the same rows as a store that kept the split."""
    shutil.copytree(FIXTURE, tmp_path / "one")
    shutil.copytree(FIXTURE, tmp_path / "four")
    one, four = Storage(tmp_path / "one"), Storage(tmp_path / "four")
    assert len(snapshot_files(one, 4)) == 4
    stores = [new_store(one, 8), new_store(four, 8, snapshot_files=4)]
    for store in stores:
        store.load(6)
        for version in range(7, 10):
            store.apply(upserts=upserts(range(version, version + 5), version))
            store.commit(version)
    assert snapshot_files(one, 8) == [("snapshots/8/0-8.arrow", (0, 8))]
    assert len(snapshot_files(four, 8)) == 4
    for version in range(4, 10):
        assert_frame_equal(loaded(one, version, 8), loaded(four, version, 8))
    assert loaded(one, 9, 8).filter(pl.col("k") == 13)["v"].to_list() == [9013]
