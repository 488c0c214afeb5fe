from __future__ import annotations

import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from polars.testing import assert_frame_equal

from connectors.delta import DeltaSink, DeltaSinkSpec, DeltaStaticTable, read_delta
from microstream.exceptions import MissingDependencyError, PlanError, SinkError
from microstream.plan import StaticSide
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


def test_empty_batch_records_its_transaction(tmp_path: Path, sink_ctx: SinkContext) -> None:
    table = tmp_path / "t"
    sink = sink_for(table, sink_ctx)
    sink.add_batch(0, batch())  # creates the table with the schema
    assert DeltaTable(str(table)).transaction_version("q") == 0
    assert_frame_equal(read_delta(table), batch())
    sink.add_batch(1, batch(1))
    sink.add_batch(2, batch())
    dt = DeltaTable(str(table))
    assert (dt.version(), dt.transaction_version("q")) == (2, 2)
    assert_frame_equal(read_delta(table), batch(1))


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
    assert spec.output_modes == frozenset({"append", "complete"})
    assert spec.durable and spec.kind == "delta"
    with pytest.raises(
        SinkError, match="supports output_mode 'append' or 'complete'; got 'update'"
    ):
        spec.build(replace(sink_ctx, output_mode="update"))


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
    assert DeltaSinkSpec("t", partition_by=["a"]) == DeltaSinkSpec("t", partition_by=("a",))


def test_missing_deltalake_names_the_extra(
    tmp_path: Path, sink_ctx: SinkContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "deltalake", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'microstream\[delta\]'"):
        DeltaSinkSpec(str(tmp_path)).build(sink_ctx)
    with pytest.raises(ImportError):  # also an ImportError, for code that expects one
        read_delta(tmp_path)


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
