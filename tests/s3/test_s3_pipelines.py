"""Queries whose files, Delta tables and checkpoints all live on S3 (moto)."""

from __future__ import annotations

import io
import time
from datetime import datetime, timedelta

import fsspec
import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from polars.testing import assert_frame_equal

import microstream as ms
from connectors.delta import DeltaStaticTable
from microstream.testing.moto_s3 import S3Bucket

pytestmark = pytest.mark.integration

SCHEMA = pl.Schema({"id": pl.Int64, "user": pl.String, "amount": pl.Float64})
T0 = datetime(2024, 1, 1)


def filesystem(s3: S3Bucket) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", **s3.fsspec_options)


def put_parquet(s3: S3Bucket, path: str, df: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    df.write_parquet(buffer)
    filesystem(s3).pipe_file(s3.url(path), buffer.getvalue())


def events(first: int, last: int) -> pl.DataFrame:
    """Rows ``first..last-1``: every third amount negative, users a/b/c in turn."""
    ids = list(range(first, last))
    return pl.DataFrame(
        {
            "id": ids,
            "user": ["abc"[i % 3] for i in ids],
            "amount": [float(-i if i % 3 == 0 else i) for i in ids],
        },
        schema=SCHEMA,
    )


def expected_rows(*frames: pl.DataFrame) -> pl.DataFrame:
    """The batch query's result on all input (the stream must equal it)."""
    return (
        pl.concat(frames)
        .filter(pl.col("amount") > 0)
        .with_columns(cents=(pl.col("amount") * 100).cast(pl.Int64))
        .sort("id")
    )


def test_files_to_file_sink_with_s3_checkpoint_exact_rows_and_restart(s3: S3Bucket) -> None:
    options = s3.fsspec_options
    failing = {"on": -1}

    def fail_on_marked_batch(df: pl.DataFrame) -> pl.DataFrame:
        if failing["on"] in df["id"].to_list():
            msg = "injected failure after the WAL entry"
            raise RuntimeError(msg)
        return df

    def run() -> ms.StreamingQuery:
        return (
            ms.scan_files(
                s3.url("in"),
                format="parquet",
                schema=SCHEMA,
                max_files_per_trigger=1,
                storage_options=options,
            )
            .filter(pl.col("amount") > 0)
            .map_batches(fail_on_marked_batch)
            .with_columns(cents=(pl.col("amount") * 100).cast(pl.Int64))
            .sink_parquet(
                s3.url("out"),
                storage_options=options,
                checkpoint=s3.url("cp"),
                checkpoint_options=options,
                trigger=ms.Trigger.available_now(),
            )
        )

    def output() -> pl.DataFrame:
        return ms.read_file_sink(s3.url("out"), storage_options=options).sort("id")

    put_parquet(s3, "in/001.parquet", events(0, 6))
    put_parquet(s3, "in/002.parquet", events(6, 12))
    first = run()
    first.await_termination(timeout=60)
    assert_frame_equal(output(), expected_rows(events(0, 6), events(6, 12)))
    fs = filesystem(s3)
    names = {p.split("/cp/", 1)[1] for p in fs.find(s3.url("cp"))}
    assert {"metadata.json", "offsets/0.json", "offsets/1.json", "commits/1.json"} <= names
    assert {"sources/0/0.json", "sources/0/1.json"} <= names
    assert any(n.startswith("progress/") for n in names)
    assert "lock.json" not in names  # released on stop

    # Batch 2 fails after its WAL entry: offsets/2 without commits/2, nothing in the sink.
    put_parquet(s3, "in/003.parquet", events(12, 18))
    failing["on"] = 13
    crashed = run()
    with pytest.raises(RuntimeError, match="injected failure"):
        crashed.await_termination(timeout=60)
    assert fs.exists(s3.url("cp/offsets/2.json"))
    assert not fs.exists(s3.url("cp/commits/2.json"))
    assert_frame_equal(output(), expected_rows(events(0, 6), events(6, 12)))

    # The restart re-runs batch 2 with exactly its logged file, then takes the new one.
    put_parquet(s3, "in/004.parquet", events(18, 24))
    failing["on"] = -1
    restarted = run()
    restarted.await_termination(timeout=60)
    assert restarted.id == first.id
    assert [(p.batch_id, p.recovered) for p in restarted.recent_progress] == [
        (2, True),
        (3, False),
    ]
    assert_frame_equal(
        output(), expected_rows(events(0, 6), events(6, 12), events(12, 18), events(18, 24))
    )


def test_file_source_lists_s3_in_mtime_order_and_reads_csv(s3: S3Bucket) -> None:
    fs = filesystem(s3)
    fs.pipe_file(s3.url("in/b.csv"), b"id,user\n1,x\n2,y\n")
    time.sleep(1.1)  # S3 LastModified has one-second resolution
    fs.pipe_file(s3.url("in/a.csv"), b"id,user\n3,z\n")
    fs.pipe_file(s3.url("in/_partial.csv"), b"id,user\n99,hidden\n")
    fs.pipe_file(s3.url("in/sub/c.csv"), b"id,user\n98,nested\n")
    seen: list[tuple[int, list[int]]] = []
    query = ms.scan_files(
        s3.url("in"), format="csv", max_files_per_trigger=1, storage_options=s3.fsspec_options
    ).foreach_batch(
        lambda df, batch_id: seen.append((batch_id, df["id"].to_list())),
        checkpoint=s3.url("cp"),
        checkpoint_options=s3.fsspec_options,
        trigger=ms.Trigger.available_now(),
    )
    query.await_termination(timeout=60)
    # The older file first although its name sorts later; hidden and nested files ignored.
    assert seen == [(0, [1, 2]), (1, [3])]
    log = fs.cat_file(s3.url("cp/sources/0/0.json")).decode()
    assert '"name": "b.csv"' in log


def test_delta_sink_and_static_table_on_s3(s3: S3Bucket) -> None:
    delta = s3.delta_options
    users_url = s3.url("tables/users")
    write_deltalake(
        users_url,
        pl.DataFrame({"user": ["a", "b"], "tier": ["gold", "silver"]}).to_arrow(),
        storage_options=delta,
    )
    users = DeltaStaticTable(users_url, storage_options=delta)
    out = s3.url("tables/out")

    def run() -> ms.StreamingQuery:
        return (
            ms.scan_files(
                s3.url("in"),
                format="parquet",
                schema=SCHEMA,
                max_files_per_trigger=1,
                storage_options=s3.fsspec_options,
            )
            .filter(pl.col("amount") > 0)
            .join(users, on="user", how="left")
            .sink_delta(
                out,
                storage_options=delta,
                checkpoint=s3.url("cp"),
                checkpoint_options=s3.fsspec_options,
                trigger=ms.Trigger.available_now(),
            )
        )

    def table() -> pl.DataFrame:
        return pl.read_delta(out, storage_options=delta).sort("id")

    tiers = {"a": "gold", "b": "silver"}
    put_parquet(s3, "in/001.parquet", events(0, 6))
    put_parquet(s3, "in/002.parquet", events(6, 12))
    first = run()
    first.await_termination(timeout=60)
    expected = (
        pl.concat([events(0, 6), events(6, 12)])
        .filter(pl.col("amount") > 0)
        .with_columns(tier=pl.col("user").replace_strict(tiers, default=None))
        .sort("id")
    )
    assert_frame_equal(table(), expected)
    assert DeltaTable(out, storage_options=delta).version() == 1
    assert DeltaTable(out, storage_options=delta).transaction_version(first.id) == 1

    # Died after the Delta commit of batch 1, before commits/1: the re-run is skipped.
    filesystem(s3).rm_file(s3.url("cp/commits/1.json"))
    rerun = run()
    rerun.await_termination(timeout=60)
    assert [(p.batch_id, p.recovered) for p in rerun.recent_progress] == [(1, True)]
    assert DeltaTable(out, storage_options=delta).version() == 1
    assert_frame_equal(table(), expected)

    # The static side is re-read when its table (on S3) gets a new version.
    write_deltalake(
        users_url,
        pl.DataFrame({"user": ["c"], "tier": ["bronze"]}).to_arrow(),
        mode="append",
        storage_options=delta,
    )
    put_parquet(s3, "in/003.parquet", events(12, 18))
    last = run()
    last.await_termination(timeout=60)
    tiers["c"] = "bronze"
    new_rows = (
        events(12, 18)
        .filter(pl.col("amount") > 0)
        .with_columns(tier=pl.col("user").replace_strict(tiers, default=None))
    )
    assert_frame_equal(table(), pl.concat([expected, new_rows]).sort("id"))
    assert DeltaTable(out, storage_options=delta).transaction_version(first.id) == 2


def test_concurrent_delta_commits_on_s3_lose_nothing(s3: S3Bucket) -> None:
    delta = s3.delta_options
    url = s3.url("tables/t")
    write_deltalake(url, pl.DataFrame({"x": [0]}).to_arrow(), storage_options=delta)
    one = DeltaTable(url, storage_options=delta)
    two = DeltaTable(url, storage_options=delta)  # both at version 0
    write_deltalake(one, pl.DataFrame({"x": [1]}).to_arrow(), mode="append")
    # two's commit file 1 exists now: its conditional put is refused, it commits as 2.
    write_deltalake(two, pl.DataFrame({"x": [2]}).to_arrow(), mode="append")
    assert DeltaTable(url, storage_options=delta).version() == 2
    assert sorted(pl.read_delta(url, storage_options=delta)["x"].to_list()) == [0, 1, 2]


def readings(start_s: int, stop_s: int) -> pl.DataFrame:
    """One reading per 2 s for users u/v, event times in ``[start_s, stop_s)``."""
    seconds = list(range(start_s, stop_s, 2))
    return pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=s) for s in seconds],
            "user": ["uv"[(s // 2) % 2] for s in seconds],
            "amount": [s for s in seconds],
        },
        schema={"ts": pl.Datetime("us"), "user": pl.String, "amount": pl.Int64},
    )


def test_windowed_query_keeps_its_state_on_s3_across_restarts(s3: S3Bucket) -> None:
    options = s3.fsspec_options
    files = [readings(20 * i, 20 * i + 20) for i in range(4)]

    def run(prefix: str, trigger: ms.Trigger) -> ms.StreamingQuery:
        query = (
            ms.scan_files(
                s3.url(f"{prefix}/in"),
                format="parquet",
                schema=files[0].schema,
                max_files_per_trigger=1,
                storage_options=options,
            )
            .with_watermark("ts", delay="5s")
            .group_by_dynamic("ts", every="10s", group_by="user")
            .agg(pl.col("amount").sum(), pl.len().alias("n"))
            .sink_parquet(
                s3.url(f"{prefix}/out"),
                storage_options=options,
                checkpoint=s3.url(f"{prefix}/cp"),
                checkpoint_options=options,
                trigger=trigger,
            )
        )
        query.await_termination(timeout=60)
        return query

    def output(prefix: str) -> pl.DataFrame:
        return ms.read_file_sink(s3.url(f"{prefix}/out"), storage_options=options).sort(
            "user", "ts"
        )

    # With restarts: two files, a crash that loses the last commit, two more files.
    for i in (0, 1):
        put_parquet(s3, f"restarted/in/{i}.parquet", files[i])
    first = run("restarted", ms.Trigger.available_now())
    fs = filesystem(s3)
    state_files = [p.split("/cp/", 1)[1] for p in fs.find(s3.url("restarted/cp/state"))]
    assert any(p.endswith(".arrow") for p in state_files)
    assert any("/versions/" in p for p in state_files)
    last = first.recent_progress[-1].batch_id
    fs.rm_file(s3.url(f"restarted/cp/commits/{last}.json"))  # state of `last` stays on S3
    for i in (2, 3):
        put_parquet(s3, f"restarted/in/{i}.parquet", files[i])
    second = run("restarted", ms.Trigger.available_now(flush=True))
    assert second.recent_progress[0].batch_id == last
    assert second.recent_progress[0].recovered

    # In one go, on a fresh checkpoint.
    for i, df in enumerate(files):
        put_parquet(s3, f"once/in/{i}.parquet", df)
    run("once", ms.Trigger.available_now(flush=True))

    batch = (
        pl.concat(files)
        .group_by("user", pl.col("ts").dt.truncate("10s"))
        .agg(pl.col("amount").sum(), pl.len().alias("n").cast(pl.UInt32))
        .sort("user", "ts")
    )
    assert_frame_equal(output("once"), batch, check_dtypes=False)
    assert_frame_equal(output("restarted"), output("once"))
