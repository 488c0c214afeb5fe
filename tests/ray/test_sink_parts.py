"""The file and Delta sinks on RayRuntime: the owners of the last operator write the data
files, the driver commits them once per batch (one Delta version carrying the batch's
transaction; one manifest entry), and a piece of an attempt never committed is never
visible. Sinks that cannot take pieces (foreach_batch) get the batch gathered on the
driver, as do the modes whose table the pieces would not give (Delta's update MERGE).
"""

from __future__ import annotations

import json
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fault_pipelines import FaultyRayRuntime, run, write_inputs
from files_pipeline import SCHEMA

import microstream as ms
from connectors._delta_parts import DeltaPartWriter
from connectors.delta import DeltaSinkSpec
from connectors.file_sink import FileSinkPartWriter, FileSinkSpec
from microstream.api.session import Session
from microstream.checkpoint.storage import Storage
from microstream.exceptions import SinkError
from microstream.protocols import SinkContext

FILES = 5
PIECE = re.compile(r"part-(\d{5})-[0-9a-f]+\.(\d+)-w(\d+)-[0-9a-f]{12}\.parquet$")
"""A data file a worker wrote: batch, attempt, worker (the driver's write_deltalake
names its files ``part-00000-<uuid>-c000...``, the file sink ``part-00000-<uuid>``)."""


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[Any, ...]]]:
    """Each pipeline's output on LocalRuntime."""
    root = tmp_path_factory.mktemp("clean-sink-parts")
    write_inputs(root, FILES)
    result = {name: run(root, name, ms.LocalRuntime()) for name in ("window_delta", "join_files")}
    assert all(len(rows) > 20 for rows in result.values())
    return result


def _delta_log(table: Path) -> list[list[dict[str, Any]]]:
    """The actions of every version of the table, by version."""
    files = sorted((table / "_delta_log").glob("*.json"), key=lambda p: int(p.stem))
    return [[json.loads(line) for line in f.read_text().splitlines()] for f in files]


def _single_run(runtime: FaultyRayRuntime | ms.RayRuntime) -> Any:
    (execution,) = runtime.executions  # type: ignore[union-attr]
    return execution


def test_delta_on_ray_the_workers_write_the_files_and_each_batch_is_one_version(
    ray_cluster: Any, clean: dict[str, list[tuple[Any, ...]]], tmp_path: Path
) -> None:
    write_inputs(tmp_path, FILES)
    runtime = FaultyRayRuntime(num_workers=2)  # no faults: it keeps the driver
    assert run(tmp_path, "window_delta", runtime) == clean["window_delta"]
    execution = _single_run(runtime)
    assert execution.executor.sink_tail is not None
    log = _delta_log(tmp_path / "delta")
    # One version per batch with rows (and the first batch's, which creates the table),
    # none else: a batch without rows makes no commit.
    with_rows = [0] + [
        p.batch_id for p in execution.recent_progress if p.num_output_rows and p.batch_id
    ]
    assert len(with_rows) > FILES // 2
    assert len(log) == len(with_rows)
    adds: list[str] = []
    workers: set[int] = set()
    for version, actions in enumerate(log):
        txns = [a["txn"] for a in actions if "txn" in a]
        batch = with_rows[version]
        assert txns == [{"appId": execution.query_id, "version": batch, **_last(txns)}]
        for add in (a["add"] for a in actions if "add" in a):
            match = PIECE.search(add["path"])
            assert match, f"{add['path']} was not written by a worker"
            assert int(match[1]) == batch
            workers.add(int(match[3]))
            assert json.loads(add["stats"])["numRecords"] > 0
            adds.append(add["path"])
    assert adds and workers == {0, 1}  # both owners wrote pieces, the driver none


def _last(txns: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields of a txn action besides app id and version (delta-rs adds lastUpdated)."""
    return {k: v for k, v in txns[0].items() if k not in ("appId", "version")} if txns else {}


def test_file_sink_on_ray_one_manifest_entry_per_batch_lists_the_workers_files(
    ray_cluster: Any, clean: dict[str, list[tuple[Any, ...]]], tmp_path: Path
) -> None:
    write_inputs(tmp_path, FILES)
    runtime = FaultyRayRuntime(num_workers=2)
    assert run(tmp_path, "join_files", runtime) == clean["join_files"]
    assert _single_run(runtime).executor.sink_tail is not None
    entries = sorted((tmp_path / "files" / "_microstream_log").glob("*.json"))
    commits = list((tmp_path / "cp-files" / "commits").glob("*"))
    assert [int(p.stem) for p in entries] == list(range(len(commits)))
    assert len(commits) > FILES
    listed = [f["name"] for p in entries for f in json.loads(p.read_text())["files"]]
    assert listed and all(PIECE.search(name) for name in listed)
    assert {int(PIECE.search(n)[3]) for n in listed} == {0, 1}  # type: ignore[index]
    on_disk = sorted(p.name for p in (tmp_path / "files").glob("*.parquet"))
    assert on_disk == sorted(listed)  # no run was lost: nothing unlisted


def _data_files(table: Path) -> set[str]:
    return {str(p.relative_to(table)) for p in table.rglob("*.parquet")}


@pytest.mark.parametrize(
    ("pipeline", "point", "batch", "orphaned", "committed"),
    [
        # Worker 1 dies before batch 3's join runs: worker 0 still writes its piece of
        # attempt 0; the re-run (attempt 1) writes new pieces, and only those commit.
        ("join_files", "batch.after_read", 3, 0, 1),
        # (A worker that dies after its piece was written no longer makes its batch run
        # again: the owners' one call of a batch, their state included, is done before the
        # sink, so the batch commits; the re-run of a batch whose sink committed happens
        # only after a restart of the query: test_a_re_run_of_a_committed_batch_...)
    ],
)
def test_a_piece_of_an_attempt_that_is_not_committed_is_never_visible(
    ray_cluster: Any,
    clean: dict[str, list[tuple[Any, ...]]],
    tmp_path: Path,
    pipeline: str,
    point: str,
    batch: int,
    orphaned: int,
    committed: int,
) -> None:
    write_inputs(tmp_path, FILES)
    runtime = FaultyRayRuntime((point, batch + 1, 1), num_workers=2)
    rows = run(tmp_path, pipeline, runtime)
    assert rows == clean[pipeline]
    execution = _single_run(runtime)
    assert (execution.executor.restarts, execution.executor.replaced) == (1, [1])
    if pipeline == "window_delta":
        table = tmp_path / "delta"
        listed = {a["add"]["path"] for v in _delta_log(table) for a in v if "add" in a}
        frame = pl.read_delta(str(table))
    else:
        table = tmp_path / "files"
        listed = {
            f["name"]
            for p in (table / "_microstream_log").glob("*.json")
            for f in json.loads(p.read_text())["files"]
        }
        frame = ms.read_file_sink(table)
    orphans = _data_files(table) - listed
    assert orphans, "the attempt not committed wrote no piece"

    def batch_attempt(name: str) -> tuple[int, int]:
        match = PIECE.search(name)
        assert match, name
        return int(match[1]), int(match[2])

    assert {batch_attempt(o) for o in orphans} == {(batch, orphaned)}
    assert {a for b, a in map(batch_attempt, listed) if b == batch} == {committed}
    # Reading every data file, orphans included, would double rows; the table does not.
    assert sorted(frame.iter_rows(), key=repr) == clean[pipeline]
    assert len(frame) < sum(len(pl.read_parquet(table / f)) for f in _data_files(table))


class _DriverDies:
    """Stands for the driver's FaultInjector: raises at the ``nth`` visit of ``point``, as
    a driver that dies there (the query fails; its checkpoint stays as it was)."""

    armed = True

    def __init__(self, point: str, nth: int) -> None:
        self.point, self.nth, self.visits = point, nth, 0

    def reach(self, point: str) -> None:
        if point == self.point:
            self.visits += 1
            if self.visits == self.nth:
                msg = f"the driver dies at {point}"
                raise RuntimeError(msg)


class _DyingDriverRuntime(ms.RayRuntime):
    def __init__(self, point: str, nth: int, **options: Any) -> None:
        super().__init__(**options)
        self.point, self.nth = point, nth

    def prepare(self, config: Any) -> Any:
        execution = super().prepare(config)
        execution.faults = _DriverDies(self.point, self.nth)
        return execution


RUN_PIECE = re.compile(r"part-(\d{5})-([0-9a-f]+)\.(\d+)-w\d+-[0-9a-f]{12}\.parquet$")
"""A worker's data file: batch, run, attempt."""


def test_a_re_run_of_a_committed_batch_writes_pieces_never_visible(
    ray_cluster: Any, clean: dict[str, list[tuple[Any, ...]]], tmp_path: Path
) -> None:
    # The driver dies after the sink committed the flush batch (6) with the owners'
    # pieces, before commits/6; the next run re-runs batch 6 from its log entry: its
    # owners write new pieces (the new run's), which the sink skips as a committed
    # batch's. The table holds the clean output, no row twice.
    write_inputs(tmp_path, FILES)
    with pytest.raises(Exception, match=r"the driver dies at batch\.after_sink"):
        run(tmp_path, "window_delta", _DyingDriverRuntime("batch.after_sink", 7, num_workers=2))
    assert not (tmp_path / "cp-delta" / "commits" / "6.json").exists()
    assert run(tmp_path, "window_delta", ms.RayRuntime(num_workers=2)) == clean["window_delta"]
    table = tmp_path / "delta"
    listed = {a["add"]["path"] for v in _delta_log(table) for a in v if "add" in a}
    orphans = _data_files(table) - listed

    def batch_run(name: str) -> tuple[int, str, int]:
        match = RUN_PIECE.search(name)
        assert match, name
        return int(match[1]), match[2], int(match[3])

    assert orphans, "the re-run of batch 6 wrote no piece"
    (orphan_run,) = {batch_run(o)[1] for o in orphans}
    assert {(b, a) for b, _, a in map(batch_run, orphans)} == {(6, 0)}
    first_runs = {r for b, r, _ in map(batch_run, listed) if b == 6}
    assert first_runs and orphan_run not in first_runs
    frame = pl.read_delta(str(table))
    assert sorted(frame.iter_rows(), key=repr) == clean["window_delta"]
    assert len(frame) < sum(len(pl.read_parquet(table / f)) for f in _data_files(table))


def _totals(root: Path, mode: str, runtime: ms.Runtime, table: str) -> ms.StreamingQuery:
    return (
        ms.scan_files(root / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
        .group_by("user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
        .with_columns(twice=pl.col("total") * 2)  # a stateless stage after the operator
        .sink_delta(
            root / table,
            checkpoint=root / f"cp-{table}",
            output_mode=mode,  # type: ignore[arg-type]
            trigger=ms.Trigger.available_now(),
            runtime=runtime,
        )
    )


@pytest.mark.parametrize(("mode", "parallel"), [("complete", True), ("update", False)])
def test_delta_complete_mode_is_written_by_the_workers_and_update_gathered(
    ray_cluster: Any, tmp_path: Path, mode: str, parallel: bool
) -> None:
    write_inputs(tmp_path, FILES)
    local = _totals(tmp_path, mode, ms.LocalRuntime(), "local")
    assert local.await_termination(timeout=60) and local.exception() is None
    runtime = FaultyRayRuntime(num_workers=2)
    query = _totals(tmp_path, mode, runtime, "ray")
    assert query.await_termination(timeout=120) and query.exception() is None, query.exception()
    tail = _single_run(runtime).executor.sink_tail
    assert (tail is not None) == parallel
    if parallel:
        assert [s.steps[-1].verb for s in tail.stages] == ["with_columns"]

    def table(name: str) -> list[tuple[Any, ...]]:
        return sorted(pl.read_delta(str(tmp_path / name)).iter_rows(), key=repr)

    assert table("ray") == table("local") and len(table("local")) == 12
    assert len(_delta_log(tmp_path / "ray")) == FILES


def test_foreach_batch_on_ray_gets_the_gathered_batch(ray_cluster: Any, tmp_path: Path) -> None:
    write_inputs(tmp_path, FILES)

    def collect(runtime: ms.Runtime, name: str) -> tuple[dict[int, list[Any]], Any]:
        got: dict[int, list[Any]] = {}
        query = (
            ms.scan_files(tmp_path / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
            .with_watermark("ts", delay="5s")
            .group_by_dynamic("ts", every="10s", group_by="user")
            .agg(pl.col("v").sum().alias("total"))
            .foreach_batch(
                lambda df, b: got.__setitem__(b, sorted(df.iter_rows(), key=repr)),
                checkpoint=tmp_path / f"cp-{name}",
                trigger=ms.Trigger.available_now(flush=True),
                runtime=runtime,
            )
        )
        assert query.await_termination(timeout=120) and query.exception() is None
        return got, query

    local, _ = collect(ms.LocalRuntime(), "local")
    runtime = FaultyRayRuntime(num_workers=2)
    on_ray, _ = collect(runtime, "ray")
    assert on_ray == local and sum(map(len, local.values())) > 10
    assert _single_run(runtime).executor.sink_tail is None


def test_a_table_whose_schema_differs_is_refused_by_name_on_the_parallel_path(
    ray_cluster: Any, tmp_path: Path
) -> None:
    from deltalake import write_deltalake

    write_inputs(tmp_path, FILES)
    frame = pl.DataFrame(
        {"user": ["x"], "ts": [None], "total": ["not a number"], "n": [1]},
        schema={"user": pl.String, "ts": pl.Datetime("us"), "total": pl.String, "n": pl.Int32},
    )
    write_deltalake(str(tmp_path / "delta"), frame.to_arrow())
    runtime = FaultyRayRuntime(num_workers=2)
    query = (
        ms.scan_files(tmp_path / "in", format="parquet", schema=SCHEMA)
        .with_watermark("ts", delay="5s")
        .group_by_dynamic("ts", every="10s", group_by="user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
        .sink_delta(
            tmp_path / "delta",
            checkpoint=tmp_path / "cp",
            trigger=ms.Trigger.available_now(flush=True),
            runtime=runtime,
        )
    )
    with pytest.raises(SinkError) as error:
        query.await_termination(timeout=120)
    assert (
        "cannot commit batch 1 to Delta table "  # batch 0 has no rows: no commit
        f"{tmp_path / 'delta'}: the batch's schema differs from the table's in column(s) "
        "['total'] (table: {'total': 'string'}; batch: {'total': 'long'}); pass "
        "merge_schema=True to let batches add columns"
    ) in str(error.value)
    assert _single_run(runtime).executor.sink_tail is not None
    assert len(_delta_log(tmp_path / "delta")) == 1  # nothing committed


# -- the connectors' side, without Ray ----------------------------------------------------


def _context(root: Path, mode: str, schema: pl.Schema | None = None) -> SinkContext:
    return SinkContext(
        query_id="q",
        query_name=None,
        output_mode=mode,  # type: ignore[arg-type]
        storage=Storage(str(root / "cp")),
        session=Session(),
        schema=schema,
    )


def test_file_sink_commit_parts_lists_the_pieces_once_and_never_an_uncommitted_one(
    tmp_path: Path,
) -> None:
    spec = FileSinkSpec(str(tmp_path / "out"), partition_by=["k"])
    sink = spec.build(_context(tmp_path, "append"))
    writer = sink.part_writer()
    assert isinstance(writer, FileSinkPartWriter)
    a = writer.write_part(0, "r.0-w0", pl.DataFrame({"k": [1, 2], "v": ["a", "b"]}))
    b = writer.write_part(0, "r.0-w1", pl.DataFrame({"k": [1], "v": ["c"]}))
    orphan = writer.write_part(0, "r.0-w2", pl.DataFrame({"k": [9], "v": ["never"]}))
    sink.commit_parts(0, [a, b])
    again = writer.write_part(0, "r.1-w0", pl.DataFrame({"k": [7], "v": ["replay"]}))
    sink.commit_parts(0, [again])  # batch 0 is committed: skipped
    assert sorted(ms.read_file_sink(tmp_path / "out").iter_rows()) == [
        (1, "a"),
        (1, "c"),
        (2, "b"),
    ]
    assert sink.committed_batch() == 0
    assert len(list((tmp_path / "out").rglob("*.parquet"))) == 5  # 2 orphans on disk
    assert orphan.files[0].name.startswith("k=9/part-00000-r.0-w2-")
    with pytest.raises(SinkError, match=r"batch 1 has no partition column\(s\) \['k'\]"):
        writer.write_part(1, "r.0-w0", pl.DataFrame({"v": ["x"]}))


def test_delta_commit_parts_is_one_version_with_the_transaction_and_idempotent(
    tmp_path: Path,
) -> None:
    from deltalake import DeltaTable

    path = tmp_path / "t"
    schema = pl.Schema({"day": pl.Date, "n": pl.UInt32})
    sink = DeltaSinkSpec(str(path), partition_by=["day"]).build(
        _context(tmp_path, "append", schema)
    )
    writer = sink.part_writer()
    assert isinstance(writer, DeltaPartWriter)

    def piece(batch: int, name: str, days: list[int]) -> Any:
        frame = pl.DataFrame({"day": days, "n": list(range(len(days)))}).with_columns(
            pl.col("day").cast(pl.Date), pl.col("n").cast(pl.UInt32)
        )
        return writer.write_part(batch, name, frame)

    sink.commit_parts(0, [piece(0, "r.0-w0", [1, 2]), piece(0, "r.0-w1", [])])
    orphan = piece(1, "r.0-w0", [5])  # an attempt never committed
    sink.commit_parts(1, [piece(1, "r.1-w0", [3]), piece(1, "r.1-w1", [1])])
    sink.commit_parts(1, [piece(1, "r.2-w0", [4])])  # committed already: skipped
    table = DeltaTable(str(path))
    assert (table.version(), table.transaction_version("q")) == (1, 1)
    assert table.metadata().partition_columns == ["day"]
    rows = pl.read_delta(str(path)).sort("day", "n")
    assert rows.schema == pl.Schema({"day": pl.Date, "n": pl.Int32})  # as write_deltalake
    day = [date(1970, 1, 1) + timedelta(days=d) for d in range(4)]
    assert rows.rows() == [(day[1], 0), (day[1], 0), (day[2], 1), (day[3], 0)]
    listed = {a["add"]["path"] for v in _delta_log(path) for a in v if "add" in a}
    assert len(listed) == 4 and all(p.endswith(".parquet") for p in listed)
    assert orphan.files[0].path not in listed and (path / orphan.files[0].path).exists()


def test_delta_pieces_partitioned_by_strings_that_need_escaping_read_back(tmp_path: Path) -> None:
    path = tmp_path / "t"
    schema = pl.Schema({"k": pl.String, "v": pl.Int64})
    sink = DeltaSinkSpec(str(path), partition_by=["k"]).build(_context(tmp_path, "append", schema))
    writer = sink.part_writer()
    assert writer is not None
    rows = pl.DataFrame({"k": ["a b", "c/d", "e%f", None], "v": [1, 2, 3, 4]})
    sink.commit_parts(0, [writer.write_part(0, "r.0-w0", rows)])
    back = pl.read_delta(str(path)).select("k", "v").sort("v")
    assert back.rows() == rows.rows()
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("k=")) == [
        "k=__HIVE_DEFAULT_PARTITION__",
        "k=a%20b",
        "k=c%2Fd",
        "k=e%25f",
    ]  # the directories write_deltalake makes
