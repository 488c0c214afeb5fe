"""A keyed store and a join's segment buffer refuse the same two commits: a first commit
over committed versions without a load (it would fork the state's history), and a
commit of the whole state by an owner of some key groups."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import polars as pl
import pytest

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointError
from microstream.state.segment_buffer import SegmentBuffer
from microstream.state.store import StateStore

SCHEMA = {"k": pl.Int64(), "t": pl.Datetime("us"), "id": pl.Int64()}
ROWS = pl.DataFrame({"k": [1, 2], "t": [datetime(2024, 1, 1)] * 2, "id": [1, 2]}, schema=SCHEMA)


def keyed(storage: Storage) -> StateStore | SegmentBuffer:
    return StateStore(
        storage, operator="s", key_columns=["k", "id"], hash_columns=["k"], schema=SCHEMA
    )


def segments(storage: Storage) -> StateStore | SegmentBuffer:
    return SegmentBuffer(
        storage,
        operator="s",
        key_columns=["k", "id"],
        hash_columns=["k"],
        schema=SCHEMA,
        time_column="t",
        row_id_column="id",
        num_key_groups=128,
    )


def committed(make: Callable[[Storage], StateStore | SegmentBuffer]) -> Storage:
    """A store's directory holding version 0 of ``ROWS``."""
    storage = Storage(f"memory://commit-checks-{uuid.uuid4().hex}")
    first = make(storage)
    first.load(None)
    first.insert(ROWS)
    first.commit(0)
    return storage


@pytest.mark.parametrize("make", [keyed, segments], ids=["keyed", "segments"])
def test_a_first_commit_over_committed_versions_needs_a_load(
    make: Callable[[Storage], StateStore | SegmentBuffer],
) -> None:
    storage = committed(make)
    again = make(storage)  # (a new process: not loaded)
    again.insert(ROWS)
    with pytest.raises(CheckpointError, match=r"has committed versions: call load\(\)"):
        again.commit(1)
    again = make(storage)
    again.load(0)
    again.commit(1)  # (loaded: commits)
    assert again.version == 1


@pytest.mark.parametrize("make", [keyed, segments], ids=["keyed", "segments"])
def test_an_owner_of_some_key_groups_cannot_commit_the_whole_state(
    make: Callable[[Storage], StateStore | SegmentBuffer],
) -> None:
    storage = committed(make)
    owner = make(storage)
    owner.load(0, key_groups=range(0, 64))
    owner.insert(ROWS.filter(pl.col("k") == 99))
    with pytest.raises(CheckpointError, match="loaded for key groups 0-63 only"):
        owner.commit(1)
