from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from polars.testing import assert_frame_equal

import microstream as ms
from connectors.delta import DeltaSink, DeltaSinkSpec, DeltaStaticTable, read_delta
from microstream.checkpoint.log import Checkpoint, CommitEntry
from microstream.exceptions import MissingDependencyError, PlanError, SinkError
from microstream.plan.nodes import StaticSide
from microstream.protocols import Sink, SinkContext


def batch(*ids: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": list(ids), "ts": [datetime(2024, 1, 1, 0, 0, i) for i in ids]},
        schema={"id": pl.Int64, "ts": pl.Datetime("us")},
    )


def sink_for(path: Path, ctx: SinkContext, **options: object) -> DeltaSink:
    return DeltaSinkSpec(str(path), **options).build(ctx)  # type: ignore[arg-type]


def test_append_commits_each_batch_with_its_transaction(
    tmp_path: Path, sink_ctx: SinkContext
) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    assert isinstance(sink, Sink)
    assert sink.committed_batch() is None
    sink.add_batch(0, batch(1, 2))
    sink.add_batch(1, batch(3))
    assert_frame_equal(read_delta(table).sort("id"), batch(1, 2, 3))
    dt = DeltaTable(str(table))
    assert dt.version() == 1
    assert dt.transaction_version("q") == 1
    assert sink.committed_batch() == 1


def test_replayed_batch_is_skipped(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    sink.add_batch(0, batch(1))
    sink.add_batch(1, batch(2))
    sink.add_batch(1, batch(2))
    restarted = sink_for(table, sink_ctx)  # a new process replays the last batches
    restarted.add_batch(0, batch(1))
    restarted.add_batch(1, batch(2))
    assert DeltaTable(str(table)).version() == 1
    assert_frame_equal(read_delta(table).sort("id"), batch(1, 2))
    restarted.add_batch(2, batch(3))
    assert DeltaTable(str(table)).transaction_version("q") == 2


def test_append_reads_the_log_once_per_run_yet_stays_exactly_once(
    tmp_path: Path, sink_ctx: SinkContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    reads: list[int | None] = []
    read = sink.committed_batch
    monkeypatch.setattr(sink, "committed_batch", lambda: reads.append(read()) or reads[-1])
    for i in range(4):
        sink.add_batch(i, batch(i))
    # batch 0 finds no table and creates it by path, batch 1 opens the handle; after that
    # the handle is at the version of the sink's own last commit: no read per batch
    assert reads == [None, 0]
    # another writer between batches (an OPTIMIZE): the next append still lands once
    DeltaTable(str(table)).optimize.compact()
    sink.add_batch(4, batch(4))
    sink.add_batch(4, batch(9))  # the same batch again: recognised by the log, skipped
    assert_frame_equal(read_delta(table).sort("id"), batch(0, 1, 2, 3, 4))
    assert DeltaTable(str(table)).transaction_version("q") == 4
    assert reads[2:] == [4]


def test_transactions_are_per_query(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink_for(table, sink_ctx).add_batch(0, batch(1))
    sink_for(table, replace(sink_ctx, query_id="other")).add_batch(0, batch(2))
    assert_frame_equal(read_delta(table).sort("id"), batch(1, 2))
    dt = DeltaTable(str(table))
    assert (dt.transaction_version("q"), dt.transaction_version("other")) == (0, 0)


def test_complete_mode_replaces_the_table(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, replace(sink_ctx, output_mode="complete"))
    sink.add_batch(0, batch(1, 2))
    sink.add_batch(1, batch(1, 2, 3))
    sink.add_batch(1, batch(9))  # replay: skipped, table unchanged
    assert_frame_equal(read_delta(table).sort("id"), batch(1, 2, 3))
    assert DeltaTable(str(table)).transaction_version("q") == 1
    assert_frame_equal(read_delta(table, version=0).sort("id"), batch(1, 2))


def test_empty_batch_creating_the_table_records_its_transaction(
    tmp_path: Path, sink_ctx: SinkContext
) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    sink.add_batch(0, batch())  # creates the table with the schema
    assert DeltaTable(str(table)).transaction_version("q") == 0
    assert_frame_equal(read_delta(table), batch())
    sink.add_batch(1, batch(1))
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (1, 1)
    assert_frame_equal(read_delta(table), batch(1))


@pytest.mark.parametrize("mode", ["append", "update"])
def test_empty_batch_makes_no_commit_and_replays_stay_exactly_once(
    tmp_path: Path, sink_ctx: SinkContext, mode: str
) -> None:
    table = tmp_path / "t"
    ctx = replace(sink_ctx, output_mode=mode, key_columns=("id",))
    sink = sink_for(table, ctx)
    sink.add_batch(0, batch(1))
    sink.add_batch(1, batch())  # (a handle-less sink: batch 0 created the table by path)
    sink.add_batch(2, batch())
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (0, 0)
    assert sink.committed_batch() == 0
    sink.add_batch(3, batch(2))
    assert DeltaTable(str(table)).transaction_version("q") == 3
    # A new process re-runs batches 1-3 (crash before their commits/N): the empty ones
    # again write nothing, batch 3 is recognised by the log; then batch 4 is new.
    restarted = sink_for(table, ctx)
    assert restarted.committed_batch() == 3
    for batch_id, rows in ((1, batch()), (2, batch()), (3, batch(2)), (4, batch())):
        restarted.add_batch(batch_id, rows)
    restarted.add_batch(5, batch(3))
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (2, 5)
    assert_frame_equal(read_delta(table).sort("id"), batch(1, 2, 3))
    # a re-run of a batch left out writes what it computes, once (the first run wrote none)
    restarted.add_batch(6, batch())
    again = sink_for(table, ctx)
    again.add_batch(6, batch(4))
    again.add_batch(6, batch(4))
    assert_frame_equal(read_delta(table).sort("id"), batch(1, 2, 3, 4))
    assert DeltaTable(str(table)).transaction_version("q") == 6


def test_empty_batch_in_complete_mode_empties_the_table(
    tmp_path: Path, sink_ctx: SinkContext
) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, replace(sink_ctx, output_mode="complete"))
    sink.add_batch(0, batch(1, 2))
    sink.add_batch(1, batch())
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (1, 1)
    assert_frame_equal(read_delta(table), batch())


def test_empty_batch_with_other_columns_still_commits(
    tmp_path: Path, sink_ctx: SinkContext
) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    sink.add_batch(0, batch(1))
    wider = batch().with_columns(extra=pl.lit(None, pl.String))
    with pytest.raises(
        SinkError, match=rf"cannot commit batch 1 to Delta table {table}: .*merge_schema=True"
    ):
        sink.add_batch(1, wider)
    merging = sink_for(table, sink_ctx, merge_schema=True)
    merging.add_batch(1, wider)  # no rows, yet the table gains the column
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (1, 1)
    assert [f.name for f in dt.schema().fields] == ["id", "ts", "extra"]


def test_schema_mismatch_names_table_and_batch(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    sink.add_batch(0, batch(1))
    wider = batch(2).with_columns(extra=pl.lit("x"))
    with pytest.raises(
        SinkError, match=rf"cannot commit batch 1 to Delta table {table}: .*merge_schema=True"
    ):
        sink.add_batch(1, wider)
    assert DeltaTable(str(table)).transaction_version("q") == 0

    merging = sink_for(table, sink_ctx, merge_schema=True)
    merging.add_batch(1, wider)
    got = read_delta(table).sort("id")
    assert got["extra"].to_list() == [None, "x"]


def test_partition_by(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx, partition_by=["part"])
    sink.add_batch(0, pl.DataFrame({"part": ["a", "b"], "v": [1, 2]}))
    assert DeltaTable(str(table)).metadata().partition_columns == ["part"]
    assert (table / "part=a").is_dir()


def test_unsupported_output_mode(tmp_path: Path, sink_ctx: SinkContext) -> None:
    spec = DeltaSinkSpec(str(tmp_path))
    assert spec.output_modes == frozenset({"append", "complete", "update"})
    assert spec.durable and spec.kind == "delta"
    with pytest.raises(
        SinkError, match="supports output_mode 'append', 'complete' or 'update'; got 'bogus'"
    ):
        spec.build(replace(sink_ctx, output_mode="bogus"))  # type: ignore[arg-type]


def test_unreadable_table_is_a_sink_error(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    sink.add_batch(0, batch(1))
    (table / "_delta_log" / "00000000000000000000.json").write_text("{not json")
    restarted = sink_for(table, sink_ctx)
    with pytest.raises(
        SinkError, match=rf"cannot read the transaction log of {table} before batch 1"
    ):
        restarted.add_batch(1, batch(2))


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="partition_by must be a non-empty list"):
        DeltaSinkSpec("t", partition_by=[])
    with pytest.raises(ValueError, match="merge_schema must be a bool"):
        DeltaSinkSpec("t", merge_schema="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_file_size must be a positive number of bytes"):
        DeltaSinkSpec("t", target_file_size=0)
    assert DeltaSinkSpec("t", partition_by=["a"]) == DeltaSinkSpec("t", partition_by=("a",))


def test_missing_deltalake_names_the_extra(
    tmp_path: Path, sink_ctx: SinkContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "deltalake", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'microstream\[delta\]'"):
        DeltaSinkSpec(str(tmp_path)).build(sink_ctx)
    with pytest.raises(ImportError):  # also an ImportError, for code that expects one
        read_delta(tmp_path)


# -- update mode: MERGE on the key columns --------------------------------------------------------

KEYED = pl.Schema({"k": pl.String, "w": pl.Int64, "n": pl.Int64})


def keyed(*items: tuple[str | None, int, int]) -> pl.DataFrame:
    return pl.DataFrame(items, schema=KEYED, orient="row")


def update_ctx(ctx: SinkContext, keys: tuple[str, ...] | None = ("w", "k")) -> SinkContext:
    return replace(ctx, output_mode="update", key_columns=keys, schema=pl.Schema(KEYED))


def test_update_mode_merges_on_the_keys_null_safely(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, update_ctx(sink_ctx))
    sink.add_batch(0, keyed(("a", 0, 1), ("b", 0, 2), (None, 0, 3)))  # creates the table
    sink.add_batch(1, keyed(("a", 0, 10), (None, 0, 30), ("a", 1, 4)))  # 2 updates, 1 insert
    expected = keyed(("a", 0, 10), ("a", 1, 4), ("b", 0, 2), (None, 0, 30))
    assert_frame_equal(read_delta(table).sort("k", "w", nulls_last=True), expected)
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (1, 1)
    history = dt.history(1)[0]
    assert history["operation"] == "MERGE"  # data and transaction in one commit

    # A replayed batch is skipped, even with other rows (a re-run never changes a commit).
    sink_for(table, update_ctx(sink_ctx)).add_batch(1, keyed(("a", 0, 99)))
    assert DeltaTable(str(table)).version() == 1
    assert_frame_equal(read_delta(table).sort("k", "w", nulls_last=True), expected)

    sink.add_batch(2, keyed())  # an empty batch changes nothing: no commit
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (1, 1)
    assert_frame_equal(read_delta(table).sort("k", "w", nulls_last=True), expected)


def test_update_mode_needs_the_keys_in_the_output(sink_ctx: SinkContext, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"output_mode='update' MERGEs .* this query has none"):
        sink_for(tmp_path / "t", update_ctx(sink_ctx, keys=None))
    with pytest.raises(PlanError, match=r"output lacks \['user'\]"):
        sink_for(tmp_path / "t", update_ctx(sink_ctx, keys=("w", "user")))


def test_update_mode_global_aggregation_has_one_row(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    ctx = replace(update_ctx(sink_ctx, keys=()), schema=pl.Schema({"n": pl.Int64}))
    sink = sink_for(table, ctx)
    sink.add_batch(0, pl.DataFrame({"n": [1]}))
    sink.add_batch(1, pl.DataFrame({"n": [5]}))
    assert read_delta(table).rows() == [(5,)]


def test_update_mode_schema_evolution(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink_for(table, update_ctx(sink_ctx)).add_batch(0, keyed(("a", 0, 1)))
    wider = keyed(("a", 0, 2), ("b", 0, 3)).with_columns(extra=pl.lit("x"))
    with pytest.raises(SinkError, match=r"not in the table: \['extra'\].*merge_schema=True"):
        sink_for(table, update_ctx(sink_ctx)).add_batch(1, wider)
    assert DeltaTable(str(table)).transaction_version("q") == 0
    sink_for(table, update_ctx(sink_ctx), merge_schema=True).add_batch(1, wider)
    assert_frame_equal(read_delta(table).sort("k"), wider)


def test_update_mode_partitions_and_file_size(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, update_ctx(sink_ctx), partition_by=["k"], target_file_size=1 << 20)
    sink.add_batch(0, keyed(("a", 0, 1), ("b", 0, 2)))
    sink.add_batch(1, keyed(("a", 0, 5)))
    dt = DeltaTable(str(table))
    assert dt.metadata().partition_columns == ["k"]
    assert dt.metadata().configuration["delta.targetFileSize"] == str(1 << 20)
    assert (table / "k=a").is_dir() and (table / "k=b").is_dir()
    assert_frame_equal(read_delta(table).sort("k"), keyed(("a", 0, 5), ("b", 0, 2)))


def test_update_mode_retries_a_commit_that_lost_to_optimize(
    tmp_path: Path,
    sink_ctx: SinkContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = tmp_path / "t"
    for item in (("a", 0, 1), ("b", 0, 2), ("c", 0, 3)):
        write_deltalake(str(table), keyed(item).to_arrow(), mode="append")
    sink = sink_for(table, update_ctx(sink_ctx))
    read_log = DeltaSink.committed_batch
    raced: list[dict[str, Any]] = []

    def race(self: DeltaSink) -> int | None:
        done = read_log(self)
        if not raced:  # OPTIMIZE commits between the sink's read and its MERGE
            raced.append(ms.optimize_delta(table))
        return done

    monkeypatch.setattr(DeltaSink, "committed_batch", race)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        sink.add_batch(0, keyed(("a", 0, 10), ("d", 0, 4)))
    assert "batch 0 conflicted with a concurrent commit, retrying (1/3)" in caplog.text
    assert raced[0]["numFilesRemoved"] == 3
    dt = DeltaTable(str(table))
    assert [h["operation"] for h in dt.history(2)] == ["MERGE", "OPTIMIZE"]
    assert dt.transaction_version("q") == 0
    expected = keyed(("a", 0, 10), ("b", 0, 2), ("c", 0, 3), ("d", 0, 4))
    assert_frame_equal(read_delta(table).sort("k"), expected)


T0 = datetime(2024, 1, 1)
EVENTS = pl.Schema([("ts", pl.Datetime("us")), ("k", pl.String()), ("v", pl.Int64())])


def events(*items: tuple[int, str | None, int]) -> pl.DataFrame:
    return pl.DataFrame(
        [(T0 + timedelta(seconds=s), k, v) for s, k, v in items], schema=EVENTS, orient="row"
    )


def test_windowed_update_mode_end_to_end_and_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, cp = tmp_path / "t", tmp_path / "cp"
    stream = ms.MemoryStream(EVENTS, name="events")

    def start() -> ms.StreamingQuery:
        return (
            stream.lazy()
            .with_watermark("ts", "30s")
            .group_by_dynamic("ts", every="1m", group_by="k")
            .agg(pl.len().cast(pl.Int64).alias("n"), pl.col("v").sum())
            .sink_delta(table, output_mode="update", checkpoint=cp)
        )

    # The last batch with rows (4; batch 5 is the no-data batch the watermark asks for,
    # which in update mode writes nothing) reaches Delta, but its commits/4.json does not
    # land: the query dies there.
    write_commit = Checkpoint.write_commit

    def dies_before_commit_4(checkpoint: Checkpoint, entry: CommitEntry) -> None:
        if entry.batch_id == 4:
            raise OSError("disk gone before commits/4.json")
        write_commit(checkpoint, entry)

    monkeypatch.setattr(Checkpoint, "write_commit", dies_before_commit_4)
    query = start()
    for batch in (
        events((5, "a", 1), (30, "a", 2), (70, "b", 5)),  # watermark after: 40s
        # The row of "a" at 50s updates its window [0s, 60s), which is still open
        # (60s > 40s), in the table; the watermark then passes it (65s).
        events((50, "a", 4), (95, None, 1)),
    ):
        stream.add_data(batch)
        query.process_all_available(timeout=30)
    stream.add_data(events((90, "b", 1), (59, "a", 100), (100, None, 2)))  # (59s, "a"): late
    with pytest.raises(OSError, match=r"disk gone before commits/4\.json"):
        query.process_all_available(timeout=30)
    query.stop()
    monkeypatch.setattr(Checkpoint, "write_commit", write_commit)
    expected = pl.DataFrame(
        [("a", T0, 3, 7), ("b", T0 + timedelta(minutes=1), 2, 6),
         (None, T0 + timedelta(minutes=1), 2, 3)],
        schema={"k": pl.String, "ts": pl.Datetime("us"), "n": pl.Int64, "v": pl.Int64},
        orient="row",
    )  # fmt: skip
    assert_frame_equal(read_delta(table).sort("k", nulls_last=True), expected)

    # The last batch reached Delta but its commits/N.json did not land: the re-run is
    # recognised by the table's transaction version and skipped (no second commit).
    dt = DeltaTable(str(table))
    version, last = dt.version(), 4
    assert max(int(f.stem) for f in (cp / "commits").glob("*.json")) == last - 1
    assert dt.transaction_version(json.loads((cp / "metadata.json").read_text())["id"]) == last
    query = start()
    query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None
    assert [(p.batch_id, p.recovered) for p in query.recent_progress][:1] == [(last, True)]
    assert (cp / "commits" / f"{last}.json").exists()
    assert DeltaTable(str(table)).version() == version
    assert_frame_equal(read_delta(table).sort("k", nulls_last=True), expected)


def test_global_group_by_update_mode(tmp_path: Path) -> None:
    table = tmp_path / "t"
    stream = ms.MemoryStream({"k": pl.String, "v": pl.Int64})
    query = (
        stream.lazy()
        .group_by("k")
        .agg(pl.col("v").sum(), pl.col("v").max().alias("top"))
        .sink_delta(table, output_mode="update", checkpoint=tmp_path / "cp")
    )
    batches: list[dict[str, list[Any]]] = [
        {"k": ["a", "b", None], "v": [1, 2, 3]},
        {"k": ["a", None], "v": [10, 4]},
        {"k": ["c"], "v": [7]},
    ]
    for batch in batches:
        stream.add_data(batch)
        query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None
    assert read_delta(table).sort("k", nulls_last=True).rows() == [
        ("a", 11, 10),
        ("b", 2, 2),
        ("c", 7, 7),
        (None, 7, 4),
    ]
    assert DeltaTable(str(table)).version() == 2  # one commit per batch


def test_update_mode_refuses_a_query_without_keys(tmp_path: Path) -> None:
    stream = ms.MemoryStream({"k": pl.String, "v": pl.Int64})
    with pytest.raises(PlanError, match="use output_mode='append'"):
        stream.lazy().sink_delta(tmp_path / "t", output_mode="update", checkpoint=tmp_path / "c")
    renamed = stream.lazy().group_by("k").agg(pl.col("v").sum()).rename({"k": "key"})
    with pytest.raises(PlanError, match=r"lacks \['k'\]"):
        renamed.sink_delta(tmp_path / "t", output_mode="update", checkpoint=tmp_path / "c2")


# -- maintenance -----------------------------------------------------------------------------------


def test_optimize_and_vacuum(tmp_path: Path) -> None:
    table = tmp_path / "t"
    for i in range(4):
        write_deltalake(str(table), batch(i).to_arrow(), mode="append")
    metrics = ms.optimize_delta(table, target_size=1 << 20)
    assert (metrics["numFilesRemoved"], metrics["numFilesAdded"]) == (4, 1)
    dt = DeltaTable(str(table))
    assert dt.history(1)[0]["operation"] == "OPTIMIZE"
    assert len(dt.file_uris()) == 1
    assert_frame_equal(read_delta(table).sort("id"), batch(0, 1, 2, 3))

    listed = ms.vacuum_delta(table, retention_hours=0, enforce_retention_duration=False)
    assert len(listed) == 4
    assert len(list(table.glob("*.parquet"))) == 5  # dry run: nothing deleted
    deleted = ms.vacuum_delta(
        table, retention_hours=0, enforce_retention_duration=False, dry_run=False
    )
    assert sorted(deleted) == sorted(listed)
    assert len(list(table.glob("*.parquet"))) == 1
    assert_frame_equal(read_delta(table).sort("id"), batch(0, 1, 2, 3))

    ordered = ms.optimize_delta(table, z_order=["id"])
    assert ordered["numFilesAdded"] == ordered["numFilesRemoved"] == 1
    with pytest.raises(SinkError, match=r"no Delta table .* to optimize"):
        ms.optimize_delta(tmp_path / "missing")


# -- static table ----------------------------------------------------------------------------------


def test_static_table_reloads_only_when_the_version_changes(tmp_path: Path) -> None:
    table = str(tmp_path / "users")
    write_deltalake(table, batch(1).to_arrow())
    side = DeltaStaticTable(table)
    assert isinstance(side, StaticSide)
    assert side.schema == batch().schema

    version, first, reloaded = side.load_if_changed()
    assert (version, reloaded) == (0, False)  # loaded when the spec was made
    assert_frame_equal(first, batch(1))
    again = side.load_if_changed()
    assert again[2] is False and again[1] is first

    write_deltalake(table, batch(2).to_arrow(), mode="append")
    version, second, reloaded = side.load_if_changed()
    assert (version, reloaded) == (1, True)
    assert_frame_equal(second.sort("id"), batch(1, 2))
    assert_frame_equal(side.current().collect().sort("id"), batch(1, 2))
    assert side.load_if_changed()[2] is False


def test_static_table_pinned_version(tmp_path: Path) -> None:
    table = str(tmp_path / "users")
    write_deltalake(table, batch(1).to_arrow())
    write_deltalake(table, batch(2).to_arrow(), mode="append")
    side = DeltaStaticTable(table, version=0)
    write_deltalake(table, batch(3).to_arrow(), mode="append")
    version, frame, reloaded = side.load_if_changed()
    assert (version, reloaded) == (0, False)
    assert_frame_equal(frame, batch(1))
    assert side.describe() == f"DeltaTable[{table}@v0]"
    assert side.identity() == {"path": table, "version": 0}


def test_static_table_from_a_deltatable(tmp_path: Path) -> None:
    table = str(tmp_path / "users")
    write_deltalake(table, batch(1).to_arrow())
    side = DeltaStaticTable.from_table(DeltaTable(table))
    write_deltalake(table, batch(2).to_arrow(), mode="append")
    assert_frame_equal(side.current().collect().sort("id"), batch(1, 2))
    assert side.describe().endswith("@latest]")


def test_static_table_must_exist(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"there is no Delta table at .*missing"):
        DeltaStaticTable(str(tmp_path / "missing"))


def test_static_tables_compare_by_location(tmp_path: Path) -> None:
    table = str(tmp_path / "users")
    write_deltalake(table, batch(1).to_arrow())
    assert DeltaStaticTable(table) == DeltaStaticTable(table)
    assert DeltaStaticTable(table) != DeltaStaticTable(table, version=0)


def _log_versions(table: Path) -> list[int]:
    return sorted(int(p.name[:20]) for p in (table / "_delta_log").glob("*.json"))


def test_log_retention_keeps_the_log_short_and_exactly_once(
    tmp_path: Path, sink_ctx: SinkContext
) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx, log_retention="0s")
    for i in range(101):  # versions 0..100; delta-rs checkpoints version 99
        sink.add_batch(i, batch(i % 60))
    config = DeltaTable(str(table)).metadata().configuration
    assert config["delta.logRetentionDuration"] == "interval 0 seconds"
    # The checkpoint's commit deleted the log files before it; the table still reads
    # whole, and still knows its transaction (from the checkpoint and the log after it).
    assert _log_versions(table) == [99, 100]
    assert read_delta(table).height == 101
    restarted = sink_for(table, sink_ctx, log_retention="0s")
    assert restarted.committed_batch() == 100
    restarted.add_batch(100, batch(59))  # a replay: skipped
    restarted.add_batch(101, batch(1))
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q"), read_delta(table).height) == (101, 101, 102)


def test_expired_log_cleanup_waits_for_a_checkpoint(tmp_path: Path, sink_ctx: SinkContext) -> None:
    """delta-rs would list all of ``_delta_log`` for the cleanup after every commit; the
    sink asks for it only with a checkpoint, as Delta's own writers do."""
    table = tmp_path / "t"
    sink_for(table, sink_ctx, log_retention="1s").add_batch(0, batch(0))
    DeltaTable(str(table)).alter.set_table_properties({"delta.checkpointInterval": "5"})
    sink = sink_for(table, sink_ctx)
    for i in range(1, 5):  # versions 2..5: a checkpoint at 5, nothing expired yet
        sink.add_batch(i, batch(i))
    assert _log_versions(table) == [0, 1, 2, 3, 4, 5]
    time.sleep(1.2)
    sink.add_batch(5, batch(5))  # version 6: versions 0-4 expired, but no checkpoint
    assert _log_versions(table) == [0, 1, 2, 3, 4, 5, 6]
    for i in range(6, 10):  # versions 7..10: the checkpoint at 10 cleans up
        sink.add_batch(i, batch(i))
    # (delta-rs keeps what the versions still in retention need to be read)
    assert _log_versions(table)[:2] == [4, 5], _log_versions(table)
    assert DeltaTable(str(table)).transaction_version("q") == 9
    assert read_delta(table).height == 10


def test_log_retention_must_be_a_duration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log_retention"):
        DeltaSinkSpec(str(tmp_path / "t"), log_retention="soon")
