"""Snapshots spread over key-group slices: each version of a large state snapshots the
slices under pressure (their deltas since their last snapshot reach their rows, or they
went ``AGE_FACTOR * snapshot_every`` versions without one), those bounds hold on disk
after every version, and any version (and any range of key groups) loads exactly, also
after a crash in the middle of a version and from a checkpoint written with full
snapshots by earlier code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointCorruptError
from microstream.state.chain import read_chain
from microstream.state.format import StateVersion, version_file
from microstream.state.key_groups import key_group_ranges, key_groups
from microstream.state.keyed_rows import KeyedRows
from microstream.state.parts import commit_parts
from microstream.state.rotation import AGE_FACTOR, resolve_bases, spread_slices
from microstream.state.store import StateStore

SCHEMA = pl.Schema({"k": pl.Int64, "v": pl.Int64})
GROUPS = 8
EVERY = 4
OPERATOR = "op0/counts"
FIXTURE = Path(__file__).parent / "data" / "state_full_snapshots" / "store"


def batch(version: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """20 keys upserted, one other deleted (as in the fixture's ``make_fixture.py``)."""
    ks = sorted({(version * 7 + j) % 50 for j in range(20)})
    upserts = pl.DataFrame({"k": ks, "v": [version * 100 + k for k in ks]}, schema=SCHEMA)
    deletes = pl.DataFrame({"k": [(version * 3 + 1) % 50]}, schema={"k": pl.Int64})
    return upserts, deletes.filter(~pl.col("k").is_in(ks))


def model(versions: list[int]) -> pl.DataFrame:
    """The expected state after the batches of ``versions``, computed without the store."""
    state: dict[int, int] = {}
    for version in versions:
        upserts, deletes = batch(version)
        for k in deletes["k"]:
            state.pop(k, None)
        state.update(zip(upserts["k"], upserts["v"], strict=True))
    return pl.DataFrame({"k": list(state), "v": list(state.values())}, schema=SCHEMA).sort("k")


def new_store(storage: Storage, **options: int) -> StateStore:
    return StateStore(
        storage,
        operator=OPERATOR,
        key_columns=["k"],
        schema=SCHEMA,
        num_key_groups=GROUPS,
        snapshot_every=EVERY,
        **options,
    )


def run(store: StateStore, version: int) -> None:
    upserts, deletes = batch(version)
    store.apply(upserts=upserts, deletes=deletes)
    store.commit(version)


def manifest(storage: Storage, version: int) -> StateVersion:
    return storage.read_model(version_file(version), StateVersion)


def snapshot_ranges(storage: Storage, version: int) -> list[tuple[int, int]]:
    return [f.key_groups for f in manifest(storage, version).files if f.kind == "snapshot"]


def loaded(storage: Storage, version: int, groups: range | None = None) -> pl.DataFrame:
    store = new_store(storage)
    store.load(version, key_groups=groups)
    return store.frame.sort("k")


def in_groups(frame: pl.DataFrame, lo: int, hi: int) -> pl.DataFrame:
    groups = key_groups(frame, ["k"], GROUPS)
    return frame.filter(pl.Series((groups >= lo) & (groups < hi)))


def pressures(storage: Storage, version: int) -> tuple[list[float], int]:
    """From the files on disk, after ``version``: per spread slice, the delta rows written
    since its groups' bases over its rows; and the oldest group's age (versions after
    its base, ``version`` included). What :func:`slices_by_pressure` bounds."""
    chain = read_chain(storage, OPERATOR, GROUPS, version)  # newest first
    bases, _ = resolve_bases(chain, 0, GROUPS, GROUPS)
    since = np.zeros(GROUPS, dtype=np.int64)
    for entry in chain:
        for f in entry.files:
            if f.kind == "delta":
                groups = pl.read_ipc(storage.read_bytes(f.name))["__key_group"].to_numpy()
                since += np.bincount(groups[entry.version > bases[groups]], minlength=GROUPS)
    rows = np.asarray(chain[0].rows_per_key_group)
    by_rows = [since[a:b].sum() / max(rows[a:b].sum(), 1) for a, b in spread_slices(GROUPS, EVERY)]
    ages = [sum(1 for m in chain if m.version > base) for base in bases]
    return by_rows, max(ages)


def assert_bounded(storage: Storage, version: int) -> None:
    by_rows, age = pressures(storage, version)
    assert max(by_rows) < 1, (version, by_rows)  # a load replays less than the state's rows
    assert age < AGE_FACTOR * EVERY, (version, age)
    assert len(read_chain(storage, OPERATOR, GROUPS, version)) <= AGE_FACTOR * EVERY


def test_a_large_state_snapshots_the_slices_under_pressure(tmp_path: Path) -> None:
    """20 of 50 keys change per version: a slice's deltas reach its rows within a few
    versions, so most versions snapshot some slices; never the whole state at once after
    the first, and every load is exact."""
    storage = Storage(tmp_path / "counts")
    store = new_store(storage, spread_snapshots_above=1)
    store.load(None)
    slices = spread_slices(GROUPS, EVERY)
    assert slices == [(g, g + 1) for g in range(GROUPS)]
    for version in range(13):
        run(store, version)
        entry = manifest(storage, version)
        assert not entry.snapshot and entry.files[0].kind == "delta"
        written = snapshot_ranges(storage, version)
        assert set(written) <= set(slices)
        if version == 0:  # every row came in this version's delta: each slice with rows at 1
            assert written == [(a, b) for a, b in slices if sum(entry.rows_per_key_group[a:b])]
        else:
            assert 0 < len(written) < len(slices)
        assert_bounded(storage, version)
    for version in range(13):
        assert_frame_equal(loaded(storage, version), model(list(range(version + 1))))


def test_a_large_state_with_few_changes_writes_one_slice_per_version(tmp_path: Path) -> None:
    """2,000 keys, 20 changed per version: the rows since a base stay far below a slice's
    rows, so the age decides: a slice becomes due at half of ``AGE_FACTOR * EVERY``
    versions, one per version, and each version writes at most one slice (an eighth of
    the state, where the old rule wrote a quarter every version)."""
    storage = Storage(tmp_path / "counts")
    store = new_store(storage, spread_snapshots_above=1)
    store.load(None)
    keys = pl.DataFrame({"k": range(2000), "v": range(2000)}, schema=SCHEMA)
    store.apply(upserts=keys, deletes=keys.clear().select("k"))
    store.commit(0)
    # every slice under pressure: a full snapshot in the spread slices, no delta of the
    # same rows besides it
    assert snapshot_ranges(storage, 0) == spread_slices(GROUPS, EVERY)
    assert manifest(storage, 0).snapshot
    assert {f.kind for f in manifest(storage, 0).files} == {"snapshot"}
    assert_frame_equal(loaded(storage, 0), keys.sort("k"))
    written: list[tuple[int, int]] = []
    for version in range(1, 61):
        changed = keys.slice((version * 20) % 2000, 20).with_columns(v=pl.col("v") + version)
        store.apply(upserts=changed, deletes=keys.clear().select("k"))
        store.commit(version)
        ranges = snapshot_ranges(storage, version)
        assert len(ranges) <= 1, (version, ranges)
        written += ranges
        assert_bounded(storage, version)
        keys = keys.update(changed, on="k")
    # slices due by age from version 20 (half of 40), one per version: each of the 8
    # twice or three times in 60 versions, never more than 40 versions apart
    assert 16 <= len(written) <= 24
    assert {r for r in written} == set(spread_slices(GROUPS, EVERY))
    snapshot_rows = sum(f.rows for v in range(1, 61) for f in manifest(storage, v).files
                        if f.kind == "snapshot")  # fmt: skip
    assert snapshot_rows <= 24 * 2000 // GROUPS * 1.5 < 60 * 2000 // EVERY
    assert_frame_equal(loaded(storage, 60), keys.sort("k"))
    assert_frame_equal(loaded(storage, 37), store_at(storage, 37))


def store_at(storage: Storage, version: int) -> pl.DataFrame:
    """The state of :func:`test_a_large_state_with_few_changes_writes_one_slice_per_version`
    at ``version``, rebuilt without the store."""
    keys = pl.DataFrame({"k": range(2000), "v": range(2000)}, schema=SCHEMA)
    for v in range(1, version + 1):
        changed = keys.slice((v * 20) % 2000, 20).with_columns(v=pl.col("v") + v)
        keys = keys.update(changed, on="k")
    return keys.sort("k")


def test_spread_snapshots_stay_bounded_when_versions_skip(tmp_path: Path) -> None:
    """Odd versions only: the bounds hold over the versions that exist."""
    storage = Storage(tmp_path / "counts")
    store = new_store(storage, spread_snapshots_above=1)
    store.load(None)
    versions = list(range(1, 30, 2))
    for i, version in enumerate(versions):
        run(store, version)
        assert_bounded(storage, version)
        assert_frame_equal(loaded(storage, version), model(versions[: i + 1]))
    assert {r for v in versions for r in snapshot_ranges(storage, v)} == set(
        spread_slices(GROUPS, EVERY)
    )


def test_a_small_state_still_writes_full_snapshots(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "counts")
    store = new_store(storage)  # 50 keys, below the default spread_snapshots_above
    store.load(None)
    for version in range(6):
        run(store, version)
    kinds = [manifest(storage, v).snapshot for v in range(6)]
    assert kinds == [True, False, False, False, True, False]
    assert snapshot_ranges(storage, 5) == []


def test_ranges_of_spread_versions_load_exactly_and_owners_continue(tmp_path: Path) -> None:
    """What RayRuntime does: owners load key-group ranges of versions a whole store wrote
    with spread snapshots, write their parts of the next versions, and any split or a
    whole store reads them back."""
    storage = Storage(tmp_path / "counts")
    store = new_store(storage, spread_snapshots_above=1)
    store.load(None)
    for version in range(7):
        run(store, version)
    for version in range(7):
        whole = loaded(storage, version)
        for lo, hi in ((0, 8), (0, 3), (3, 8), (5, 6), (1, 7)):
            assert_frame_equal(loaded(storage, version, range(lo, hi)), in_groups(whole, lo, hi))
    previous = 6
    for version, workers in ((7, 2), (8, 3), (9, 2), (11, 3), (12, 2), (13, 3), (15, 2)):
        owners = []
        for lo, hi in key_group_ranges(GROUPS, workers):
            owner = new_store(storage)
            owner.load(previous, key_groups=range(lo, hi))
            upserts, deletes = batch(version)
            owner.apply(upserts=in_groups(upserts, lo, hi), deletes=in_groups(deletes, lo, hi))
            owners.append(owner)
        parts = [o.write_part(version, leader=o._key_range[0] == 0) for o in owners]
        entry = commit_parts(storage, parts, GROUPS)
        assert entry.snapshot == (version % EVERY == 0)
        assert len(read_chain(storage, OPERATOR, GROUPS, version)) <= EVERY
        previous = version
    done = [*range(7), 7, 8, 9, 11, 12, 13, 15]
    assert_frame_equal(loaded(storage, 15), model(done))
    assert_frame_equal(loaded(storage, 15, range(2, 7)), in_groups(model(done), 2, 7))
    # ... and a whole store spreads its snapshots on top of the owners' versions
    again = new_store(storage, spread_snapshots_above=1)
    again.load(15)
    for version in (16, 17):
        run(again, version)
    assert_frame_equal(loaded(storage, 17), model([*done, 16, 17]))


def test_a_checkpoint_with_full_snapshots_from_earlier_code_loads_and_continues(
    tmp_path: Path,
) -> None:
    """``tests/data/state_full_snapshots`` was written by main before this change."""
    shutil.copytree(FIXTURE, tmp_path / "counts")
    storage = Storage(tmp_path / "counts")
    assert [manifest(storage, v).snapshot for v in range(7)] == [
        True, False, False, False, True, False, False,
    ]  # fmt: skip
    for version in range(7):
        assert_frame_equal(loaded(storage, version), model(list(range(version + 1))))
    store = new_store(storage, spread_snapshots_above=1)
    store.load(6)
    for version in range(7, 16):
        run(store, version)
        # the deltas of 5 and 6 (after the full snapshot at 4) count towards version 7's
        # pressure: the load rebuilt them, so the bounds hold from the first version on
        assert snapshot_ranges(storage, version)
        assert_bounded(storage, version)
        assert_frame_equal(loaded(storage, version), model(list(range(version + 1))))
    # the retention (100 versions) kept everything: the old full snapshots still load
    assert_frame_equal(loaded(storage, 4), model(list(range(5))))


def test_retention_keeps_what_spread_versions_need(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "counts")
    store = new_store(storage, spread_snapshots_above=1, min_versions_to_retain=3)
    store.load(None)
    for version in range(20):
        run(store, version)
    # retained: 17..19; 17 reads back to 15 (slices 2-3 and 6-7 were last snapshotted
    # at 15), so versions, snapshots and deltas from 15 on stay, older ones are removed
    assert [m.version for m in read_chain(storage, OPERATOR, GROUPS, 17)] == [17, 16, 15]
    assert {(2, 3), (6, 7)} <= set(snapshot_ranges(storage, 15))
    assert storage.list_numbered("versions") == list(range(15, 20))
    assert sorted(int(n) for n in storage.list_names("snapshots")) == list(range(15, 20))
    assert sorted(int(n.split(".")[0]) for n in storage.list_names("deltas")) == list(range(15, 20))
    for version in range(17, 20):
        assert_frame_equal(loaded(storage, version), model(list(range(version + 1))))
    # 16 needs a snapshot older than 15 (and the manifest 14): gone
    with pytest.raises(
        CheckpointCorruptError,
        match=r"version 16 is no longer retained: it needs version 14, older than the oldest "
        r"on disk \(15\)",
    ):
        loaded(storage, 16)


CRASHING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from test_state_rotation import new_store, run
    from microstream.checkpoint.storage import Storage

    storage = Storage(sys.argv[2])
    crash_at = sys.argv[3]
    store = new_store(storage, spread_snapshots_above=1)
    store.load(None)
    for version in range(6):
        run(store, version)
    write = storage.write_bytes

    def dying_write(name, data, **options):
        if name.startswith(crash_at):  # the process dies before this file is written
            os.kill(os.getpid(), signal.SIGKILL)
        write(name, data, **options)

    storage.write_bytes = dying_write
    run(store, 6)
    """
)


@pytest.mark.parametrize(
    "crash_at",
    [
        "snapshots/6/",  # after the delta of version 6, before its slice's snapshot
        "versions/6.json",  # after both data files, before the manifest
    ],
)
def test_a_crash_in_the_middle_of_a_rotation_loses_nothing(tmp_path: Path, crash_at: str) -> None:
    crashed = Storage(tmp_path / "crashed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    died = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, str(Path(__file__).parent), crashed.root, crash_at],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert died.returncode == -9, died.stderr
    assert crashed.list_numbered("versions") == list(range(6))
    assert crashed.exists("deltas/6.arrow")  # the dead run's files of version 6 are there
    assert_frame_equal(loaded(crashed, 5), model(list(range(6))))
    # the restart re-runs batch 6 from version 5 and goes on; an uncrashed run agrees
    again = new_store(crashed, spread_snapshots_above=1)
    again.load(5)
    reference = Storage(tmp_path / "reference")
    uncrashed = new_store(reference, spread_snapshots_above=1)
    uncrashed.load(None)
    for version in range(6):
        run(uncrashed, version)
    for version in range(6, 10):
        run(again, version)
        run(uncrashed, version)
        # the same files with the same rows (a file's row order may differ: the restarted
        # store rebuilt its rows from the files, the other kept them as they came)
        ours, theirs = manifest(crashed, version), manifest(reference, version)
        assert ours.model_dump(exclude={"files"}) == theirs.model_dump(exclude={"files"})
        assert [f.model_dump(exclude={"crc32"}) for f in ours.files] == [
            f.model_dump(exclude={"crc32"}) for f in theirs.files
        ]
        for f in ours.files:
            assert_frame_equal(
                pl.read_ipc(crashed.read_bytes(f.name)).sort("k"),
                pl.read_ipc(reference.read_bytes(f.name)).sort("k"),
            )
        assert_frame_equal(loaded(crashed, version), model(list(range(version + 1))))


def test_the_rows_of_a_slice_and_the_merge_of_the_tail() -> None:
    """The store's in-memory rows, sorted by key group first: a range of groups is one
    slice of the base (plus its tail rows), before and after the tail is merged in."""
    rng = np.random.default_rng(5)

    def keyed(ks: np.ndarray) -> pl.DataFrame:
        groups = (ks % 16).astype(np.uint16)
        return pl.DataFrame(
            {"k": ks, "v": rng.integers(0, 1000, ks.size), "g": groups}
        ).with_columns(
            (pl.col("g").cast(pl.UInt64) * (1 << 48) + pl.col("k").hash() // (1 << 16)).alias("h")
        )

    rows = KeyedRows(
        keyed(np.arange(2000)),
        key_columns=["k"],
        hash_column="h",
        num_partitions=16,
        tail_rows=10_000,
        group_column="g",
        sorted_by_group=True,
    )
    expected = dict(rows.frame().select("k", "v").iter_rows())
    for _ in range(5):
        changed = keyed(np.unique(rng.integers(0, 3000, 300)))
        rows.replace(changed.select("k", "h", "g"), changed.select("k", "v", "g", "h"))
        expected.update(changed.select("k", "v").iter_rows())
        rows.remove_where(pl.col("v") < 50)
        expected = {k: v for k, v in expected.items() if v >= 50}
        for merged in (False, True):
            if merged:
                rows.compact()
                assert rows.frame()["h"].is_sorted()
            every = rows.frame()
            assert dict(every.select("k", "v").iter_rows()) == expected
            for lo, hi in ((0, 16), (0, 3), (5, 6), (7, 16)):
                part = rows.rows_in_partitions(lo, hi)
                want = every.filter(pl.col("g").is_between(lo, hi - 1))
                assert sorted(part.select("k", "v").iter_rows()) == sorted(
                    want.select("k", "v").iter_rows()
                )
