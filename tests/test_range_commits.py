"""Range-owned commits of a state store: owners of key-group ranges write their parts of a
version, one manifest commits them; any split of the key groups loads it back."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointError
from microstream.state.format import StateVersion, version_file
from microstream.state.key_groups import key_group_ranges
from microstream.state.parts import commit_parts
from microstream.state.store import StateStore

SCHEMA = pl.Schema({"k": pl.String(), "n": pl.Int64()})
GROUPS = 16


def _store(storage: Storage) -> StateStore:
    return StateStore(
        storage, operator="op0/counts", key_columns=["k"], schema=SCHEMA, num_key_groups=GROUPS
    )


def _owners(storage: Storage, version: int | None, parts: int) -> list[StateStore]:
    owners = []
    for lo, hi in key_group_ranges(GROUPS, parts):
        store = _store(storage)
        store.load(version, key_groups=range(lo, hi))
        owners.append(store)
    return owners


def _batch(v: int) -> pl.DataFrame:
    return pl.DataFrame({"k": [f"k{(v * 7 + j) % 40}" for j in range(12)], "n": [v] * 12}).unique(
        "k", keep="last"
    )


def _apply(stores: list[StateStore], batch: pl.DataFrame) -> None:
    from microstream.state.key_groups import key_groups

    groups = key_groups(batch, ["k"], GROUPS)
    for store in stores:
        lo, hi = store._key_range
        mine = batch.filter(pl.Series((groups >= lo) & (groups < hi)))
        store.apply(upserts=mine, deletes=mine.filter(pl.col("n") % 5 == 4).select("k"))


def test_owners_commit_versions_that_any_split_and_a_whole_store_load(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "counts")
    whole = _store(Storage(tmp_path / "reference"))
    whole.load(None)
    version: int | None = None
    for v, parts in enumerate([2, 2, 3, 3, 3, 1, 4, 4, 2, 2, 2, 3, 3]):  # crosses snapshot 10
        owners = _owners(storage, version, parts)
        _apply(owners, _batch(v))
        _apply([whole], _batch(v))
        written = [o.write_part(v, leader=o._key_range[0] == 0) for o in owners]
        entry = commit_parts(storage, written, GROUPS)
        assert entry.snapshot == (v % 10 == 0)
        whole.commit(v)
        version = v
        # A store owning every group reads what the owners wrote, row for row.
        check = _store(storage)
        check.load(v)
        assert check.frame.sort("k").equals(whole.frame.sort("k"))
    manifest = storage.read_model(version_file(11), StateVersion)
    assert [f.name for f in manifest.files] == [
        "deltas/11/0-5.arrow",
        "deltas/11/5-10.arrow",
        "deltas/11/10-16.arrow",
    ]
    # ... and a whole store commits on top of a range-owned version.
    check = _store(storage)
    check.load(12)
    _apply([check], _batch(13))
    check.commit(13)
    assert storage.exists("deltas/13.arrow")


def test_an_owner_holding_rows_outside_its_range_is_refused(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "counts")
    owner = _owners(storage, None, 2)[0]
    owner.apply(upserts=pl.DataFrame({"k": [f"k{i}" for i in range(20)], "n": [1] * 20}))
    with pytest.raises(CheckpointError, match=r"owns key groups 0-7 but holds rows of key group"):
        owner.write_part(0, leader=True)


def test_parts_that_leave_out_or_disagree_are_not_committed(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "counts")
    owners = _owners(storage, None, 2)
    parts = [o.write_part(0, leader=o._key_range[0] == 0) for o in owners]
    with pytest.raises(CheckpointError, match=r"do not cover 0-15 exactly once"):
        commit_parts(storage, parts[:1], GROUPS)
    with pytest.raises(CheckpointError, match=r"do not cover 0-15 exactly once"):
        commit_parts(storage, [parts[0], parts[0], parts[1]], GROUPS)
    other = parts[1].model_copy(update={"snapshot": not parts[1].snapshot})
    with pytest.raises(CheckpointError, match=r"disagree on \(version, parent, snapshot\)"):
        commit_parts(storage, [parts[0], other], GROUPS)
    assert not storage.exists(version_file(0))


def test_a_stale_owner_writing_late_writes_a_file_no_manifest_names(tmp_path: Path) -> None:
    """Fencing: the owner of attempt 0 hangs in version 1, its replacement (attempt 1)
    writes version 1 and the manifest is committed; then the stale owner's write lands.
    It lands under its own fence, so the manifest and the state it names are unchanged."""
    storage = Storage(tmp_path / "counts")
    (first,) = _owners(storage, None, 1)
    _apply([first], _batch(0))
    commit_parts(storage, [first.write_part(0, leader=True, fence="run1.0")], GROUPS)
    stale, replacement = _owners(storage, 0, 1), _owners(storage, 0, 1)
    _apply(stale, _batch(1))
    _apply(replacement, _batch(2))  # other rows, so the two writes differ
    part = replacement[0].write_part(1, leader=True, fence="run1.1")
    commit_parts(storage, [part], GROUPS)
    manifest = storage.read_bytes(version_file(1))
    expected = _owners(storage, 1, 1)[0].frame.sort("k")

    late = stale[0].write_part(1, leader=True, fence="run1.0")

    assert [f.name for f in late.files] == ["deltas/1/0-16.run1.0.arrow"]
    assert [f.name for f in part.files] == ["deltas/1/0-16.run1.1.arrow"]
    assert storage.read_bytes(version_file(1)) == manifest
    assert_frame_equal(_owners(storage, 1, 1)[0].frame.sort("k"), expected)
    assert sorted(storage.list_names("deltas/1")) == [
        "0-16.run1.0.arrow",
        "0-16.run1.1.arrow",
    ]
