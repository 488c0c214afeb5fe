"""``StreamingQuery.state()``: the committed state of an operator, while the query runs and after."""

from __future__ import annotations

import threading
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream.checkpoint.log import Checkpoint, CommitEntry
from microstream.checkpoint.storage import Storage
from microstream.state.read import read_store as read_newest_on_disk

EVENTS = pl.Schema({"k": pl.String(), "v": pl.Int64()})


def count(key: tuple[Any, ...], rows: pl.DataFrame, state: ms.GroupState[dict[str, Any]]) -> None:
    before = state.get() or {"n": 0, "total": 0}
    state.update({"n": before["n"] + rows.height, "total": before["total"] + rows["v"].sum()})


def counting(source: ms.MemoryStream, checkpoint: str) -> ms.StreamingQuery:
    return (
        source.lazy()
        .group_by("k")
        .map_groups_with_state(
            count,
            state_schema={"n": pl.Int64, "total": pl.Int64},
            output_schema={"k": pl.String},
        )
        .foreach_batch(lambda df, batch_id: None, checkpoint=checkpoint)
    )


def counts(frame: pl.DataFrame) -> list[tuple[Any, ...]]:
    return frame.select("k", "n", "total").sort("k").rows()


def on_disk(checkpoint: str) -> pl.DataFrame:
    """The newest state version on disk, committed by the query's ``commits/`` or not."""
    return read_newest_on_disk(Storage(checkpoint).sub("state/op0/state"))


BATCHES: list[dict[str, list[Any]]] = [
    {"k": ["a", "b", "a"], "v": [1, 2, 3]},
    {"k": ["a"], "v": [10]},
    {"k": ["b", "c"], "v": [100, 1000]},
]


def test_state_follows_the_commits(name: str) -> None:
    checkpoint = f"memory://{name}/cp"
    source = ms.MemoryStream(EVENTS)
    query = counting(source, checkpoint)
    for batch in BATCHES:
        source.add_data(batch)
        query.process_all_available(timeout=30)
        state = query.state()
        assert state.columns == ["k", "n", "total", "has_state", "timer_us", "updated_at_ms"]
        assert state.sort("k").equals(ms.read_state(checkpoint).sort("k"))
    assert counts(query.state()) == [("a", 3, 14), ("b", 2, 102), ("c", 1, 1000)]
    query.stop()
    assert counts(query.state("op0")) == counts(query.state("op0/state"))  # after the stop too


def test_state_while_a_batch_is_being_committed_is_the_previous_commit(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = f"memory://{name}/cp"
    reached, release = threading.Event(), threading.Event()
    write_commit = Checkpoint.write_commit

    def gated(self: Checkpoint, entry: CommitEntry) -> None:
        # batch 2's state is on disk; commits/2 is not yet
        if self.url == checkpoint and entry.batch_id == 2:
            reached.set()
            assert release.wait(30)
        write_commit(self, entry)

    monkeypatch.setattr(Checkpoint, "write_commit", gated)
    source = ms.MemoryStream(EVENTS)
    query = counting(source, checkpoint)
    try:
        for batch in BATCHES[:2]:
            source.add_data(batch)
            query.process_all_available(timeout=30)
        source.add_data(BATCHES[2])
        assert reached.wait(30)
        assert counts(on_disk(checkpoint)) == [("a", 3, 14), ("b", 2, 102), ("c", 1, 1000)]
        assert counts(query.state()) == [("a", 3, 14), ("b", 1, 2)]
        assert query.state().equals(ms.read_state(checkpoint, version=1))
    finally:
        release.set()
    query.process_all_available(timeout=30)
    assert counts(query.state()) == [("a", 3, 14), ("b", 2, 102), ("c", 1, 1000)]
    query.stop()


def test_state_after_a_crash_in_the_commit_is_the_previous_version(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = f"memory://{name}/cp"
    write_commit = Checkpoint.write_commit

    def crash(self: Checkpoint, entry: CommitEntry) -> None:
        if self.url == checkpoint and entry.batch_id == 2:
            raise RuntimeError("simulated crash after the state commit of batch 2")
        write_commit(self, entry)

    monkeypatch.setattr(Checkpoint, "write_commit", crash)
    source = ms.MemoryStream(EVENTS)
    query = counting(source, checkpoint)
    for batch in BATCHES[:2]:
        source.add_data(batch)
        query.process_all_available(timeout=30)
    source.add_data(BATCHES[2])
    with pytest.raises(RuntimeError, match="simulated crash"):
        query.process_all_available(timeout=30)
    assert not query.is_active
    # version 2 of the state is on disk, but batch 2 never committed: it does not count
    assert counts(on_disk(checkpoint))[-1] == ("c", 1, 1000)
    assert counts(query.state()) == [("a", 3, 14), ("b", 1, 2)]
    assert counts(ms.read_state(checkpoint)) == [("a", 3, 14), ("b", 1, 2)]
    monkeypatch.setattr(Checkpoint, "write_commit", write_commit)
    restarted = counting(source, checkpoint)  # re-runs batch 2
    restarted.process_all_available(timeout=30)
    assert counts(restarted.state()) == [("a", 3, 14), ("b", 2, 102), ("c", 1, 1000)]
    restarted.stop()


def test_state_before_the_first_commit_is_empty_with_the_state_columns(name: str) -> None:
    query = counting(ms.MemoryStream(EVENTS), f"memory://{name}/cp")
    state = query.state()
    query.stop()
    assert state.height == 0
    assert state.schema == pl.Schema(
        {
            "k": pl.String(),
            "n": pl.Int64(),
            "total": pl.Int64(),
            "has_state": pl.Boolean(),
            "timer_us": pl.Int64(),
            "updated_at_ms": pl.Int64(),
        }
    )


def test_operators_and_stores_are_named_as_read_state_names_them(name: str) -> None:
    checkpoint = f"memory://{name}/cp"
    source = ms.MemoryStream(EVENTS)
    query = (
        source.lazy()
        .group_by("k")
        .agg(pl.col("v").sum(), med=pl.col("v").median())  # partials + rows
        .sink_memory(name, output_mode="complete", checkpoint=checkpoint)
    )
    source.add_data(BATCHES[0])
    query.process_all_available(timeout=30)
    assert query.state().equals(query.state("op0/partials"))
    rows = query.state("op0/rows")
    assert rows.sort("k", "v").select("k", "v").rows() == [("a", 1), ("a", 3), ("b", 2)]
    assert rows.equals(ms.read_state(checkpoint, store="rows"))
    with pytest.raises(ms.CheckpointError, match=r"no store 'op0/nope' .*: op0/partials, op0/rows"):
        query.state("op0/nope")
    with pytest.raises(ms.CheckpointError, match="no stateful operator 'op1'"):
        query.state("op1")
    query.stop()


def test_a_query_without_state_says_so(name: str) -> None:
    query = ms.MemoryStream(EVENTS).lazy().sink_memory(name)
    with pytest.raises(
        ms.CheckpointError, match="this query has 0 stateful operators; name one: none"
    ):
        query.state()
    query.stop()
