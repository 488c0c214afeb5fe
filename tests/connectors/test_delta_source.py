"""The Delta source: offsets over the table's log, replay, non-append versions, change feed."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from polars.testing import assert_frame_equal

import microstream as ms
from connectors.delta_source import DeltaOffset, DeltaSource, DeltaSourceSpec
from microstream.exceptions import OffsetError, PlanError, SourceError
from microstream.protocols import Source, SourceContext


def rows(*ids: int, part: str = "a") -> pl.DataFrame:
    return pl.DataFrame({"id": list(ids), "part": [part] * len(ids)})


def write(table: Path, df: pl.DataFrame, mode: str = "append", **options: Any) -> None:
    write_deltalake(str(table), df.to_arrow(), mode=mode, **options)  # type: ignore[call-overload]


def source(table: Path, ctx: SourceContext, **options: Any) -> DeltaSource:
    return DeltaSourceSpec(str(table), **options).build(ctx)


def at(version: int, index: int) -> DeltaOffset:
    return DeltaOffset(version=version, index=index)


def drain(src: DeltaSource, start: DeltaOffset) -> list[tuple[DeltaOffset, pl.DataFrame]]:
    """Every batch a rate-limited source gives from ``start`` on."""
    batches = []
    while (end := src.latest_offset(start, rate_limited=True)) != start:
        batches.append((end, src.read(start, end)))
        start = end
    return batches


def commit_timestamp(table: Path, version: int) -> datetime:
    for line in (table / "_delta_log" / f"{version:020d}.json").read_text().splitlines():
        action = json.loads(line)
        if "commitInfo" in action:
            ms_ = action["commitInfo"]["timestamp"]
            return datetime.fromtimestamp(ms_ / 1000, tz=timezone.utc)
    raise AssertionError(version)


# -- append-only tables ----------------------------------------------------------------------------


def test_snapshot_then_new_versions_file_by_file(tmp_path: Path, source_ctx: SourceContext) -> None:
    table = tmp_path / "t"
    # Version 0: three files (one per partition); version 1: two more.
    write(table, pl.concat([rows(1, part="a"), rows(2, part="b"), rows(3, part="c")]),
          partition_by=["part"])  # fmt: skip
    src = source(table, source_ctx, max_files_per_trigger=2)
    assert isinstance(src, Source)
    write(table, pl.concat([rows(4, part="a"), rows(5, part="d")]), partition_by=["part"])

    start = src.initial_offset()
    assert start == at(0, -1)  # the snapshot as of the first start is version 0
    batches = drain(src, start)
    assert [end for end, _ in batches] == [at(0, 1), at(1, 0), at(1, 1)]
    got = [sorted(df.rows()) for _, df in batches]
    # The snapshot's files come oldest first (by modification time), then version 1's
    # in the order of its commit.
    snapshot = DeltaTable(str(table), version=0).get_add_actions(flatten=True)
    first = pl.DataFrame(snapshot).sort("modification_time", "path")["partition.part"].to_list()
    by_part = {"a": (1, "a"), "b": (2, "b"), "c": (3, "c")}
    assert got[0] == sorted(by_part[p] for p in first[:2])
    # version 1's files in the order its commit lists them (delta-rs writes partitions
    # in no fixed order)
    log = (table / "_delta_log" / f"{1:020d}.json").read_text().splitlines()
    added = [json.loads(line)["add"]["path"] for line in log if '"add"' in line]
    second = [(4, "a") if "part=a" in path else (5, "d") for path in added]
    assert got[1] == sorted([by_part[first[2]], second[0]])
    assert got[2] == [second[1]]
    assert batches[0][1].schema == pl.Schema({"id": pl.Int64, "part": pl.String})
    assert src.lag(at(0, 1)) == 3

    # Without a rate limit, everything in one batch.
    assert src.latest_offset(start, rate_limited=False) == at(1, 1)
    assert src.latest_offset(at(1, 1), rate_limited=True) == at(1, 1)  # nothing new
    assert src.lag(at(1, 1)) == 0


def test_starting_version_and_timestamp(tmp_path: Path, tmp_path_factory: Any) -> None:
    table = tmp_path / "t"
    for i in range(4):
        write(table, rows(i))

    def ctx() -> SourceContext:
        from microstream.checkpoint.storage import Storage

        return SourceContext(index=0, storage=Storage(str(tmp_path_factory.mktemp("cp"))),
                             query_id="q")  # fmt: skip

    def everything(**options: Any) -> list[int]:
        src = source(table, ctx(), **options)
        start = src.initial_offset()
        end = src.latest_offset(start, rate_limited=False)
        return sorted(src.read(start, end)["id"].to_list())

    assert everything() == [0, 1, 2, 3]  # the snapshot
    assert everything(starting_version=2) == [2, 3]
    assert everything(starting_version=0) == [0, 1, 2, 3]
    assert everything(starting_version="latest") == []
    v2 = commit_timestamp(table, 2)
    assert everything(starting_timestamp=v2) == [2, 3]
    assert everything(starting_timestamp=v2 + timedelta(microseconds=1)) == [3]
    assert everything(starting_timestamp=v2.isoformat()) == [2, 3]
    assert everything(starting_timestamp=v2.replace(tzinfo=None)) == [2, 3]  # naive = UTC
    assert everything(starting_timestamp=datetime(2000, 1, 1)) == [0, 1, 2, 3]
    assert everything(starting_timestamp=datetime.now() + timedelta(days=1)) == []

    with pytest.raises(ValueError, match="not both"):
        DeltaSourceSpec(str(table), starting_version=1, starting_timestamp=v2)
    with pytest.raises(ValueError, match="starting_version must be"):
        DeltaSourceSpec(str(table), starting_version=-1)
    assert everything(starting_version=4) == []  # the next commit
    with pytest.raises(PlanError, match=r"beyond the next version \(4\)"):
        DeltaSourceSpec(str(table), starting_version=5)
    with pytest.raises(PlanError, match="no Delta table"):
        DeltaSourceSpec(str(tmp_path / "missing"))


def test_start_is_fixed_at_the_first_start(tmp_path: Path, source_ctx: SourceContext) -> None:
    table = tmp_path / "t"
    write(table, rows(1))
    first = source(table, source_ctx)
    end = first.latest_offset(first.initial_offset(), rate_limited=True)
    assert end == at(0, 0)
    write(table, rows(2))
    write(table, rows(3))
    # A restart reads start.json: the snapshot stays version 0, and a logged range
    # (0,-1]..(0,0] re-reads exactly its rows although the table moved on.
    again = source(table, source_ctx, starting_version=2)  # ignored: the checkpoint decides
    assert again.initial_offset() == at(0, -1)
    assert_frame_equal(again.read(at(0, -1), end), rows(1))
    assert again.read(end, again.latest_offset(end, rate_limited=False))["id"].to_list() == [2, 3]


def test_typed_partition_values(tmp_path: Path, source_ctx: SourceContext) -> None:
    table = tmp_path / "t"
    df = pl.DataFrame(
        {
            "id": [1, 2, 3],
            "day": [date(2024, 1, 1), date(2024, 1, 2), None],
            "n": pl.Series([7, None, 9], dtype=pl.Int32),
            "ts": [datetime(2024, 1, 1, 12, 30, 1, 123456), datetime(2024, 1, 2), None],
            "flag": [True, False, None],
            "s": ["a b", "x/y%", None],
        }
    ).with_columns(tz=pl.col("ts").dt.replace_time_zone("UTC"))
    parts = ["day", "n", "ts", "flag", "s", "tz"]
    write(table, df.filter(pl.col("id") == 1), partition_by=parts)
    src = source(table, source_ctx)
    write(table, df.filter(pl.col("id") > 1), partition_by=parts)  # read from the commit log
    start = src.initial_offset()
    got = src.read(start, src.latest_offset(start, rate_limited=False)).sort("id")
    assert_frame_equal(got, pl.read_delta(str(table)).sort("id"))
    assert_frame_equal(got, df.select(got.columns))


def test_replay_of_an_uncommitted_batch_reads_the_same_rows(tmp_path: Path) -> None:
    table, cp = tmp_path / "t", tmp_path / "cp"
    write(table, pl.concat([rows(1, part="a"), rows(2, part="b")]), partition_by=["part"])
    seen: list[tuple[int, list[int]]] = []

    def start() -> ms.StreamingQuery:
        return ms.scan_delta(table, max_files_per_trigger=1).foreach_batch(
            lambda df, batch_id: seen.append((batch_id, sorted(df["id"].to_list()))),
            checkpoint=cp,
        )

    query = start()
    query.process_all_available()
    query.stop()
    first_run = list(seen)  # one file per batch, oldest first
    assert [batch_id for batch_id, _ in first_run] == [0, 1]
    assert sorted(i for _, ids in first_run for i in ids) == [1, 2]
    (cp / "commits" / "1.json").unlink()  # batch 1 ran, but its commit never landed
    write(table, rows(3, part="c"))  # more data meanwhile: not part of batch 1
    query = start()
    query.process_all_available()
    query.stop()
    assert seen[2:] == [first_run[1], (2, [3])]
    logged = json.loads((cp / "offsets" / "1.json").read_text())["sources"][0]
    assert (logged["start"], logged["end"]) == (
        {"version": 0, "index": 0},
        {"version": 0, "index": 1},
    )


# -- versions that are not appends -----------------------------------------------------------------


def test_delete_without_change_feed_is_a_named_error(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    table = tmp_path / "t"
    write(table, rows(1, 2))
    src = source(table, source_ctx)
    write(table, rows(3))
    DeltaTable(str(table)).delete("id = 1")  # version 2
    write(table, rows(4))
    start = src.initial_offset()
    # What precedes the delete is processed first...
    end = src.latest_offset(start, rate_limited=False)
    assert end == at(1, 0)
    assert sorted(src.read(start, end)["id"].to_list()) == [1, 2, 3]
    # ...then the stream stops at it, naming the table, version, operation and options.
    with pytest.raises(SourceError) as info:
        src.latest_offset(end, rate_limited=False)
    message = str(info.value)
    assert f"version 2 of Delta table {table} (operation DELETE)" in message
    assert "read_change_feed=True" in message
    assert "starting_version=3" in message


def test_overwrite_without_change_feed_is_a_named_error(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    table = tmp_path / "t"
    write(table, rows(1))
    src = source(table, source_ctx)
    write(table, rows(2), mode="overwrite")
    end = src.latest_offset(src.initial_offset(), rate_limited=False)
    with pytest.raises(SourceError, match=r"version 1 of .* \(operation WRITE, mode Overwrite\)"):
        src.latest_offset(end, rate_limited=False)
    # Restarting after it, as the message says, continues.
    again = DeltaSourceSpec(str(table), starting_version=2)
    assert again.schema == pl.Schema({"id": pl.Int64, "part": pl.String})


def test_optimize_in_between_gives_no_duplicates(tmp_path: Path, source_ctx: SourceContext) -> None:
    table = tmp_path / "t"
    write(table, rows(1))
    src = source(table, source_ctx)
    write(table, rows(2))
    start = src.initial_offset()
    first = src.latest_offset(start, rate_limited=False)
    assert sorted(src.read(start, first)["id"].to_list()) == [1, 2]
    assert ms.optimize_delta(table)["numFilesRemoved"] == 2  # version 2, dataChange=false
    write(table, rows(3))
    second = src.latest_offset(first, rate_limited=False)
    assert second == at(3, 0)
    assert src.read(first, second)["id"].to_list() == [3]
    # A stream over the whole history also skips the compaction.
    replay = DeltaSourceSpec(str(table), starting_version=0).build(
        SourceContext(index=1, storage=source_ctx.storage.sub("../1"), query_id="q")
    )
    begin = replay.initial_offset()
    assert sorted(replay.read(begin, replay.latest_offset(begin, rate_limited=False))["id"]) == [
        1,
        2,
        3,
    ]


def test_schema_change_after_planning_is_an_error(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    table = tmp_path / "t"
    write(table, rows(1))
    src = source(table, source_ctx)
    write(table, rows(2).with_columns(extra=pl.lit(1)), schema_mode="merge")
    with pytest.raises(
        SourceError, match=r"version 1 .* changed the table's schema \(added \['extra'\]\)"
    ):
        src.latest_offset(at(0, 0), rate_limited=False)
    # Planned again (a restart), the new schema is read; older rows get nulls.
    src = source(table, source_ctx)
    assert src.spec.schema == pl.Schema({"id": pl.Int64, "part": pl.String, "extra": pl.Int32})
    got = src.read(at(0, -1), src.latest_offset(at(0, -1), rate_limited=False))
    assert got.sort("id").rows() == [(1, "a", None), (2, "a", 1)]


# -- change data feed ------------------------------------------------------------------------------


def test_change_feed_streams_inserts_updates_deletes(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    table = tmp_path / "t"
    write(table, rows(1, 2), configuration={"delta.enableChangeDataFeed": "true"})
    src = source(table, source_ctx, read_change_feed=True, max_files_per_trigger=1)
    assert src.spec.schema == pl.Schema(
        [
            ("id", pl.Int64()),
            ("part", pl.String()),
            ("_change_type", pl.String()),
            ("_commit_version", pl.Int64()),
            ("_commit_timestamp", pl.Datetime("us", "UTC")),
        ]
    )
    dt = DeltaTable(str(table))
    dt.update(updates={"part": "'z'"}, predicate="id = 2")  # version 1
    DeltaTable(str(table)).delete("id = 1")  # version 2
    write(table, rows(3))  # version 3
    assert ms.optimize_delta(table)["numFilesRemoved"] == 2  # version 4: no changes
    write(table, rows(4))  # version 5

    batches = drain(src, src.initial_offset())
    ends = [end for end, _ in batches]
    assert ends == [at(0, 0), at(1, 0), at(2, 0), at(3, 0), at(5, 0)]
    order = {"delete": 0, "update_preimage": 1, "update_postimage": 2, "insert": 3}
    got = [
        df.drop("_commit_timestamp").sort(pl.col("_change_type").replace_strict(order), "id").rows()
        for _, df in batches
    ]
    assert got == [
        [(1, "a", "insert", 0), (2, "a", "insert", 0)],  # the snapshot, as inserts
        [(2, "a", "update_preimage", 1), (2, "z", "update_postimage", 1)],
        [(1, "a", "delete", 2)],
        [(3, "a", "insert", 3)],
        [(4, "a", "insert", 5)],
    ]
    stamps = [df["_commit_timestamp"].unique().to_list() for _, df in batches]
    assert stamps == [[commit_timestamp(table, v)] for v in (0, 1, 2, 3, 5)]
    # Without a rate limit, consecutive versions come in one read, in version order.
    whole = src.read(at(0, 0), at(5, 0))
    assert whole["_commit_version"].to_list() == [1, 1, 2, 3, 5]


def test_change_feed_needs_it_enabled(tmp_path: Path, source_ctx: SourceContext) -> None:
    table = tmp_path / "t"
    write(table, rows(1))
    with pytest.raises(PlanError, match=r"delta.enableChangeDataFeed is not 'true'"):
        DeltaSourceSpec(str(table), read_change_feed=True)
    DeltaTable(str(table)).delete("id = 1")  # version 1, not recorded
    DeltaTable(str(table)).alter.set_table_properties({"delta.enableChangeDataFeed": "true"})
    src = source(table, source_ctx, read_change_feed=True, starting_version=0)
    end = src.latest_offset(src.initial_offset(), rate_limited=False)
    assert end == at(0, 0)
    with pytest.raises(
        SourceError, match=r"version 1 .* while the table's change data feed was off"
    ):
        src.latest_offset(end, rate_limited=False)


# -- offsets ---------------------------------------------------------------------------------------


def test_offsets(tmp_path: Path, source_ctx: SourceContext) -> None:
    table = tmp_path / "t"
    write(table, rows(1))
    src = source(table, source_ctx)
    assert src.parse_offset({"version": 2, "index": 3}) == at(2, 3)
    with pytest.raises(OffsetError, match="is not a Delta source offset"):
        src.parse_offset({"version": -1, "index": 0})
    with pytest.raises(OffsetError, match="end is before the start"):
        src.read(at(1, 0), at(0, 0))
    assert at(1, -1).follows_or_equals(at(0, 5))
    assert not at(0, 5).follows_or_equals(at(1, -1))
    assert at(1, 4).distance(at(1, 1)) == 3
    assert at(2, 0).distance(at(1, 1)) is None
    assert src.spec.identity() == {"path": str(table), "read_change_feed": False}
    assert src.description == f"DeltaSource[{table}]"
