"""The PostgreSQL sink against a real server (``postgres_server``), one database per test."""

from __future__ import annotations

import logging
import shutil
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

import microstream as ms
from connectors.postgres import PostgresSinkSpec
from microstream.api.session import default_session
from microstream.checkpoint.storage import Storage
from microstream.protocols import CommittedBatchSink, SinkContext

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning"),
]


def fetch(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description is not None else []


def column_types(dsn: str, table: str) -> dict[str, str]:
    return dict(
        fetch(
            dsn,
            "SELECT column_name, data_type FROM information_schema.columns "
            f"WHERE table_name = '{table}' ORDER BY ordinal_position",
        )
    )


def sink_of(dsn: str, tmp_path: Path, query_id: str = "q1", **options: Any) -> Any:
    output_mode = options.pop("output_mode", "append")
    key_columns = options.pop("key_columns", None)
    spec = PostgresSinkSpec(dsn, options.pop("table", "out"), **options)
    return spec.build(
        SinkContext(
            query_id=query_id,
            query_name=None,
            output_mode=output_mode,
            storage=Storage(str(tmp_path / "sink")),
            session=default_session,
            key_columns=key_columns,
            logger=logging.getLogger("test"),
        )
    )


def test_append_creates_a_typed_table_and_writes_exact_rows(
    postgres_dsn: str, tmp_path: Path
) -> None:
    schema = {
        "id": pl.Int64,
        "name": pl.String,
        "score": pl.Float64,
        "ts": pl.Datetime("us", "UTC"),
        "local": pl.Datetime("us"),
        "day": pl.Date,
        "ok": pl.Boolean,
        "price": pl.Decimal(10, 2),
        "blob": pl.Binary,
        "small": pl.Int16,
    }
    stream = ms.MemoryStream(schema)
    query = stream.lazy().sink_postgres(postgres_dsn, "out", checkpoint=tmp_path / "cp")
    ts = datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
    stream.add_data(
        pl.DataFrame(
            {
                "id": [1, 2],
                "name": ['a,"b"\nc', ""],
                "score": [0.1, float("inf")],
                "ts": [ts, None],
                "local": [datetime(2024, 5, 6, 7, 8, 9), None],
                "day": [date(2024, 1, 31), None],
                "ok": [True, None],
                "price": [Decimal("12.34"), None],
                "blob": [b"\x00\x01", None],
                "small": [7, None],
            },
            schema=schema,
        )
    )
    query.process_all_available()
    stream.add_data(
        pl.DataFrame({"id": [3]}).with_columns(
            pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c != "id"
        )
    )
    query.process_all_available()
    query.stop()
    assert column_types(postgres_dsn, "out") == {
        "id": "bigint",
        "name": "text",
        "score": "double precision",
        "ts": "timestamp with time zone",
        "local": "timestamp without time zone",
        "day": "date",
        "ok": "boolean",
        "price": "numeric",
        "blob": "bytea",
        "small": "smallint",
    }
    rows = fetch(postgres_dsn, "SELECT * FROM out ORDER BY id")
    assert rows == [
        (1, 'a,"b"\nc', 0.1, ts, datetime(2024, 5, 6, 7, 8, 9), date(2024, 1, 31), True,
         Decimal("12.34"), b"\x00\x01", 7),
        (2, "", float("inf"), None, None, None, None, None, None, None),
        (3, None, None, None, None, None, None, None, None, None),
    ]  # fmt: skip
    progress = fetch(postgres_dsn, "SELECT table_name, batch_id FROM microstream_progress")
    assert progress == [("public.out", 1)]


def test_a_replayed_batch_is_skipped_and_the_sink_reports_what_it_holds(
    postgres_dsn: str, tmp_path: Path
) -> None:
    sink = sink_of(postgres_dsn, tmp_path)
    assert isinstance(sink, CommittedBatchSink)
    assert sink.committed_batch() is None
    sink.add_batch(0, pl.DataFrame({"id": [1, 2]}))
    sink.add_batch(0, pl.DataFrame({"id": [1, 2]}))  # a re-run after a crash
    sink.add_batch(1, pl.DataFrame({"id": [3]}))
    sink.add_batch(0, pl.DataFrame({"id": [1, 2]}))  # an older one too
    assert fetch(postgres_dsn, "SELECT id FROM out ORDER BY id") == [(1,), (2,), (3,)]
    assert sink.committed_batch() == 1
    other = sink_of(postgres_dsn, tmp_path, query_id="q2")  # another query: its own progress
    assert other.committed_batch() is None
    other.add_batch(0, pl.DataFrame({"id": [9]}))
    assert fetch(postgres_dsn, "SELECT count(*) FROM out") == [(4,)]
    sink.stop()
    other.stop()


def test_a_failed_batch_leaves_nothing_behind(postgres_dsn: str, tmp_path: Path) -> None:
    fetch(postgres_dsn, "CREATE TABLE out (id bigint CHECK (id < 10))")
    sink = sink_of(postgres_dsn, tmp_path)
    sink.add_batch(0, pl.DataFrame({"id": [1]}))
    with pytest.raises(ms.SinkError, match=r"cannot commit batch 1: .*violates check constraint"):
        sink.add_batch(1, pl.DataFrame({"id": [2, 99]}))
    assert fetch(postgres_dsn, "SELECT id FROM out") == [(1,)]
    assert sink.committed_batch() == 0
    sink.stop()


def test_update_mode_upserts_on_the_aggregation_keys(postgres_dsn: str, tmp_path: Path) -> None:
    clicks = ms.MemoryStream({"user": pl.String, "n": pl.Int64})
    query = (
        clicks.lazy()
        .group_by("user")
        .agg(pl.col("n").sum())
        .sink_postgres(
            postgres_dsn, "counts", mode="upsert", output_mode="update", checkpoint=tmp_path / "cp"
        )
    )
    clicks.add_data({"user": ["a", "b", "a", None], "n": [1, 1, 1, 5]})
    query.process_all_available()
    clicks.add_data({"user": ["b", None], "n": [10, 1]})
    query.process_all_available()
    query.stop()
    assert fetch(postgres_dsn, "SELECT * FROM counts ORDER BY user") == [
        ("a", 2),
        ("b", 11),
        (None, 6),  # a null key is one key (UNIQUE NULLS NOT DISTINCT)
    ]


def test_upsert_with_a_key_in_append_mode_keeps_the_last_row_per_key(
    postgres_dsn: str, tmp_path: Path
) -> None:
    sink = sink_of(postgres_dsn, tmp_path, table="latest", mode="upsert", key=["id"])
    sink.add_batch(0, pl.DataFrame({"id": [1, 2, 1], "v": ["a", "b", "c"]}))
    sink.add_batch(1, pl.DataFrame({"id": [2, 3], "v": ["B", "C"]}))
    sink.add_batch(1, pl.DataFrame({"id": [2], "v": ["replayed"]}))
    assert fetch(postgres_dsn, "SELECT * FROM latest ORDER BY id") == [(1, "c"), (2, "B"), (3, "C")]
    sink.stop()


def test_complete_mode_replaces_the_table(postgres_dsn: str, tmp_path: Path) -> None:
    words = ms.MemoryStream({"w": pl.String})
    query = (
        words.lazy()
        .group_by("w")
        .agg(pl.len().alias("n"))
        .sink_postgres(postgres_dsn, "totals", output_mode="complete", checkpoint=tmp_path / "cp")
    )
    words.add_data({"w": ["x", "y", "x"]})
    query.process_all_available()
    words.add_data({"w": ["y"]})
    query.process_all_available()
    query.stop()
    assert fetch(postgres_dsn, "SELECT w, n FROM totals ORDER BY w") == [("x", 2), ("y", 2)]


def test_a_mismatched_table_names_the_column_and_both_types(
    postgres_dsn: str, tmp_path: Path
) -> None:
    fetch(postgres_dsn, "CREATE TABLE typed (id integer, name text)")
    stream = ms.MemoryStream({"id": pl.Int64, "name": pl.String})
    query = stream.lazy().sink_postgres(postgres_dsn, "typed", checkpoint=tmp_path / "cp")
    stream.add_data({"id": [1], "name": ["a"]})
    with pytest.raises(ms.SchemaMismatchError) as info:
        query.process_all_available()
    assert (
        "column 'id' of table public.typed is integer, and the batches' column is Int64, which "
        "needs bigint" in str(info.value)
    )
    assert fetch(postgres_dsn, "SELECT count(*) FROM typed") == [(0,)]
    sink = sink_of(postgres_dsn, tmp_path, table="typed")
    with pytest.raises(
        ms.SchemaMismatchError, match="has no column 'extra', which the batches have"
    ):
        sink.add_batch(
            0,
            pl.DataFrame(
                {"id": [1], "name": ["a"], "extra": [1.5]}, schema_overrides={"id": pl.Int32}
            ),
        )
    fetch(postgres_dsn, "CREATE TABLE strict (id integer, must text NOT NULL)")
    sink = sink_of(postgres_dsn, tmp_path, table="strict")
    with pytest.raises(
        ms.SchemaMismatchError, match=r"NOT NULL column\(s\) \['must'\] without a default"
    ):
        sink.add_batch(0, pl.DataFrame({"id": [1]}, schema={"id": pl.Int32}))
    sink.stop()


def test_modes_that_do_not_fit_are_refused_when_the_query_starts(
    postgres_dsn: str, tmp_path: Path
) -> None:
    clicks = ms.MemoryStream({"user": pl.String})
    counts = clicks.lazy().group_by("user").agg(pl.len().alias("n"))
    with pytest.raises(ms.PlanError, match=r"output_mode='update' .* use mode='upsert'"):
        counts.sink_postgres(postgres_dsn, "c", output_mode="update", checkpoint=tmp_path / "a")
    with pytest.raises(ms.PlanError, match="mode='upsert' needs key="):
        clicks.lazy().sink_postgres(postgres_dsn, "c", mode="upsert", checkpoint=tmp_path / "b")
    with pytest.raises(ValueError, match="key= is for mode='upsert'"):
        clicks.lazy().sink_postgres(postgres_dsn, "c", key=["user"], checkpoint=tmp_path / "c")


def test_upsert_into_a_table_without_a_unique_key_says_what_to_create(
    postgres_dsn: str, tmp_path: Path
) -> None:
    fetch(postgres_dsn, "CREATE TABLE plain (id bigint, v text)")
    sink = sink_of(postgres_dsn, tmp_path, table="plain", mode="upsert", key=["id"])
    with pytest.raises(ms.SinkError, match=r"needs a unique index on \['id'\] in public.plain"):
        sink.add_batch(0, pl.DataFrame({"id": [1], "v": ["a"]}))
    sink.stop()


def test_a_checkpoint_that_lost_its_log_is_refused(postgres_dsn: str, tmp_path: Path) -> None:
    stream = ms.MemoryStream({"id": pl.Int64})
    query = stream.lazy().sink_postgres(postgres_dsn, "out", checkpoint=tmp_path / "cp")
    stream.add_data({"id": [1]})
    query.process_all_available()
    stream.add_data({"id": [2]})
    query.process_all_available()
    query.stop()
    for log in ("offsets", "commits"):
        shutil.rmtree(tmp_path / "cp" / log)
    with pytest.raises(
        ms.CheckpointCorruptError, match=r"PostgresSink\[public.out\] already holds batch 1"
    ):
        stream.lazy().sink_postgres(postgres_dsn, "out", checkpoint=tmp_path / "cp")
