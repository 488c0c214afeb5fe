"""The PostgreSQL CDC source against a real server (``postgres_server``: initdb into a temporary
directory, ``wal_level=logical``, the wal2json plugin), one database per test."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

import microstream as ms
from connectors.postgres import PostgresCdcSourceSpec, PostgresLsn
from connectors.postgres.cdc import format_lsn, parse_lsn
from microstream.checkpoint.storage import Storage
from microstream.protocols import SourceContext
from microstream.testing.postgres import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("wal2json")]

CDC = ["_table", "_op", "_commit_lsn", "_commit_time"]


def execute(dsn: str, *statements: str) -> None:
    """Run ``statements`` in one transaction."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        for statement in statements:
            conn.execute(statement)


def scalar(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(statement, params).fetchone()
    return None if row is None else row[0]


def create_orders(dsn: str) -> None:
    execute(
        dsn,
        "CREATE TABLE orders (id int PRIMARY KEY, name text, amount numeric(10,2), "
        "ts timestamptz, paid bool, payload bytea)",
    )


def collect(
    frame: ms.StreamFrame, checkpoint: Path
) -> tuple[ms.StreamingQuery, list[tuple[int, pl.DataFrame]]]:
    batches: list[tuple[int, pl.DataFrame]] = []
    query = frame.foreach_batch(lambda df, i: batches.append((i, df)), checkpoint=checkpoint)
    return query, batches


def source_of(spec: PostgresCdcSourceSpec, tmp_path: Path) -> Any:
    return spec.build(SourceContext(index=0, storage=Storage(str(tmp_path / "src")), query_id="q"))


# -- exact rows ------------------------------------------------------------------------------------


def test_changes_arrive_exactly_in_commit_order_in_whole_transactions(
    postgres_dsn: str, tmp_path: Path
) -> None:
    create_orders(postgres_dsn)
    frame = ms.scan_postgres_cdc(
        postgres_dsn, tables=["orders"], slot="exact", max_changes_per_trigger=4
    )
    assert frame.schema == pl.Schema(
        {
            "id": pl.Int32,
            "name": pl.String,
            "amount": pl.Decimal(10, 2),
            "ts": pl.Datetime("us", "UTC"),
            "paid": pl.Boolean,
            "payload": pl.Binary,
            "_table": pl.String,
            "_op": pl.String,
            "_commit_lsn": pl.UInt64,
            "_commit_time": pl.Datetime("us", "UTC"),
        }
    )
    query, batches = collect(frame, tmp_path / "cp")  # creates the slot: changes from here on
    before = datetime.now(timezone.utc)
    execute(
        postgres_dsn,
        "INSERT INTO orders VALUES (1, 'a''b \"c\"', 1.50, '2024-01-01 10:00:00.25+02', true, "
        "'\\x00ff'), (2, 'b', 2.00, NULL, false, NULL), (3, 'c', NULL, NULL, NULL, NULL)",
    )
    execute(
        postgres_dsn,
        "UPDATE orders SET name = 'a2' WHERE id = 1",
        "DELETE FROM orders WHERE id = 2",
    )
    execute(postgres_dsn, "INSERT INTO orders (id, name) VALUES (4, '')")
    execute(postgres_dsn, "UPDATE orders SET name = NULL, amount = 9.99 WHERE id = 3")
    query.process_all_available(timeout=30)
    query.stop()
    after = datetime.now(timezone.utc)

    out = pl.concat([df for _, df in batches])
    ts = datetime(2024, 1, 1, 8, 0, 0, 250000, tzinfo=timezone.utc)
    assert out.drop(CDC[2:]).rows() == [
        (1, 'a\'b "c"', Decimal("1.50"), ts, True, b"\x00\xff", "public.orders", "insert"),
        (2, "b", Decimal("2.00"), None, False, None, "public.orders", "insert"),
        (3, "c", None, None, None, None, "public.orders", "insert"),
        (1, "a2", Decimal("1.50"), ts, True, b"\x00\xff", "public.orders", "update"),
        (2, None, None, None, None, None, "public.orders", "delete"),  # the key only
        (4, "", None, None, None, None, "public.orders", "insert"),
        (3, None, Decimal("9.99"), None, None, None, "public.orders", "update"),
    ]
    # One commit LSN and time per transaction, increasing, in the run's time span.
    per_txn = out.select("_commit_lsn", "_commit_time").unique(maintain_order=True)
    assert per_txn.height == 4
    assert per_txn["_commit_lsn"].is_sorted() and per_txn["_commit_time"].is_sorted()
    assert out["_commit_lsn"].to_list() == [
        per_txn["_commit_lsn"][i] for i in (0, 0, 0, 1, 1, 2, 3)
    ]
    assert all(before <= t <= after for t in per_txn["_commit_time"])
    # The rate limit splits between transactions, never inside one.
    assert len(batches) >= 3
    txn_batches = pl.concat(
        [df.select("_commit_lsn").with_columns(batch=pl.lit(i)) for i, df in batches if df.height]
    ).unique()
    assert txn_batches["_commit_lsn"].n_unique() == txn_batches.height


def test_several_tables_share_columns_by_name(postgres_dsn: str, tmp_path: Path) -> None:
    execute(
        postgres_dsn,
        "CREATE TABLE a (id int PRIMARY KEY, x text)",
        "CREATE TABLE b (id int PRIMARY KEY, y float8)",
        "CREATE TABLE c (id int PRIMARY KEY)",
        'CREATE TABLE "Odd, Name" (id int PRIMARY KEY)',  # quoted for wal2json's filter
    )
    frame = ms.scan_postgres_cdc(
        postgres_dsn, tables=["a", "public.b", "Odd, Name"], slot="several"
    )
    assert frame.columns == ["id", "x", "y", *CDC]
    query, batches = collect(frame, tmp_path / "cp")
    execute(
        postgres_dsn,
        "INSERT INTO b VALUES (1, 0.5)",
        "INSERT INTO c VALUES (7)",  # not captured
        "INSERT INTO a VALUES (1, 'one')",
        'INSERT INTO "Odd, Name" VALUES (3)',
    )
    execute(postgres_dsn, "DELETE FROM b WHERE id = 1")
    query.process_all_available(timeout=30)
    query.stop()
    out = pl.concat([df for _, df in batches])
    assert out.select("id", "x", "y", "_table", "_op").rows() == [
        (1, None, 0.5, "public.b", "insert"),
        (1, "one", None, "public.a", "insert"),
        (3, None, None, "public.Odd, Name", "insert"),
        (1, None, None, "public.b", "delete"),
    ]


def test_publication_names_the_tables_and_operations(postgres_dsn: str, tmp_path: Path) -> None:
    execute(
        postgres_dsn,
        "CREATE TABLE p (id int PRIMARY KEY, v int)",
        "CREATE TABLE q (id int PRIMARY KEY)",
        "CREATE PUBLICATION inserts_only FOR TABLE p WITH (publish = 'insert')",
    )
    frame = ms.scan_postgres_cdc(postgres_dsn, publication="inserts_only", slot="pub")
    assert frame.columns == ["id", "v", *CDC]
    query, batches = collect(frame, tmp_path / "cp")
    execute(postgres_dsn, "INSERT INTO p VALUES (1, 1), (2, 2)", "INSERT INTO q VALUES (3)")
    execute(postgres_dsn, "UPDATE p SET v = 5", "DELETE FROM p WHERE id = 1")
    query.process_all_available(timeout=30)
    query.stop()
    out = pl.concat([df for _, df in batches])
    assert out.select("id", "v", "_op").rows() == [(1, 1, "insert"), (2, 2, "insert")]


# -- offsets, replays, restarts --------------------------------------------------------------------


def test_a_logged_range_is_read_again_exactly_and_the_slot_moves_only_on_commit(
    postgres_dsn: str, tmp_path: Path
) -> None:
    create_orders(postgres_dsn)
    spec = PostgresCdcSourceSpec(postgres_dsn, tables=["orders"], slot="replay")
    source = source_of(spec, tmp_path)
    start = source.initial_offset()
    execute(postgres_dsn, "INSERT INTO orders (id) VALUES (1), (2)")
    execute(postgres_dsn, "UPDATE orders SET name = 'x' WHERE id = 2")
    end = source.latest_offset(start, rate_limited=True)
    first = source.read(start, end)
    assert first.select("id", "name", "_op").rows() == [
        (1, None, "insert"),
        (2, None, "insert"),
        (2, "x", "update"),
    ]
    execute(postgres_dsn, "DELETE FROM orders WHERE id = 1")  # after the range: not in it
    # A crash before commits/N: a new source (nothing cached) re-reads the logged range.
    source.stop()
    again = source_of(spec, tmp_path)
    assert again.read(start, end).equals(first)
    slot_at = "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s"
    assert scalar(postgres_dsn, slot_at, ("replay",)) == start.lsn
    # The next range, while the slot still stands at the batch's start (a crash between
    # commits/N and the slot's advance): the committed batch is not read again.
    later = again.latest_offset(end, rate_limited=False)
    assert again.read(end, later).select("id", "_op").rows() == [(1, "delete")]
    again.commit(end)
    assert scalar(postgres_dsn, slot_at, ("replay",)) == end.lsn
    again.commit(end)  # idempotent (the engine commits again on restart)
    assert scalar(postgres_dsn, slot_at, ("replay",)) == end.lsn
    assert again.read(end, later).select("id", "_op").rows() == [(1, "delete")]
    assert again.latest_offset(later, rate_limited=False) == later  # nothing new
    assert parse_lsn(format_lsn(parse_lsn(later.lsn))) == PostgresLsn(lsn=later.lsn).value
    again.stop()


def test_restart_continues_and_equals_one_clean_run(
    postgres_server: PostgresServer, postgres_dsn: str, tmp_path: Path
) -> None:
    create_orders(postgres_dsn)
    # Two slots at the same position: one read in two runs with a stop between, one in one run.
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        for slot in ("two_runs", "one_run"):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
    options: dict[str, Any] = {"tables": ["orders"], "max_changes_per_trigger": 3}
    execute(postgres_dsn, "INSERT INTO orders (id, name) VALUES (1, 'a'), (2, 'b')")
    execute(postgres_dsn, "UPDATE orders SET name = 'c' WHERE id = 1")
    first, batches_1 = collect(
        ms.scan_postgres_cdc(postgres_dsn, slot="two_runs", **options), tmp_path / "cp"
    )
    first.process_all_available(timeout=30)
    first.stop()
    execute(postgres_dsn, "DELETE FROM orders WHERE id = 2")
    execute(postgres_dsn, "INSERT INTO orders (id, name) VALUES (5, 'e')")
    second, batches_2 = collect(
        ms.scan_postgres_cdc(postgres_dsn, slot="two_runs", **options), tmp_path / "cp"
    )
    second.process_all_available(timeout=30)
    second.stop()
    clean, batches_c = collect(
        ms.scan_postgres_cdc(postgres_dsn, slot="one_run", **options), tmp_path / "cp_clean"
    )
    clean.process_all_available(timeout=30)
    clean.stop()

    def rows(batches: list[tuple[int, pl.DataFrame]]) -> pl.DataFrame:
        return pl.concat([df for _, df in batches])

    assert rows(batches_1).select("id", "_op").rows() == [
        (1, "insert"),
        (2, "insert"),
        (1, "update"),
    ]
    assert rows(batches_2).select("id", "_op").rows() == [(2, "delete"), (5, "insert")]
    assert min(i for i, _ in batches_2) == max(i for i, _ in batches_1) + 1
    # Byte for byte the same changes, commit LSNs and times included.
    assert pl.concat([rows(batches_1), rows(batches_2)]).equals(rows(batches_c))


# -- failure paths ---------------------------------------------------------------------------------


def test_a_dropped_slot_is_a_named_data_loss(postgres_dsn: str, tmp_path: Path) -> None:
    create_orders(postgres_dsn)
    frame = ms.scan_postgres_cdc(postgres_dsn, tables=["orders"], slot="dropped")
    query, _ = collect(frame, tmp_path / "cp")
    execute(postgres_dsn, "INSERT INTO orders (id) VALUES (1)")
    query.process_all_available(timeout=30)
    query.stop()
    execute(postgres_dsn, "INSERT INTO orders (id) VALUES (2)")
    scalar(postgres_dsn, "SELECT pg_drop_replication_slot('dropped')")
    query, batches = collect(frame, tmp_path / "cp")
    with pytest.raises(ms.DataLossError) as info:
        query.process_all_available(timeout=30)
    assert "replication slot 'dropped' does not exist any more" in str(info.value)
    assert "Start over with a new checkpoint" in str(info.value)
    assert batches == []
    # Never re-created behind the query's back.
    assert scalar(postgres_dsn, "SELECT count(*) FROM pg_replication_slots") == 0


def test_a_slot_moved_past_the_query_is_a_named_data_loss(
    postgres_dsn: str, tmp_path: Path
) -> None:
    create_orders(postgres_dsn)
    frame = ms.scan_postgres_cdc(postgres_dsn, tables=["orders"], slot="moved")
    query, _ = collect(frame, tmp_path / "cp")
    execute(postgres_dsn, "INSERT INTO orders (id) VALUES (0)")
    query.process_all_available(timeout=30)
    query.stop()
    execute(postgres_dsn, "INSERT INTO orders (id) VALUES (1)")
    scalar(postgres_dsn, "SELECT pg_replication_slot_advance('moved', pg_current_wal_flush_lsn())")
    query, batches = collect(frame, tmp_path / "cp")
    with pytest.raises(ms.DataLossError) as info:
        query.process_all_available(timeout=30)
    assert "replication slot 'moved' is at" in str(info.value)
    assert "another reader consumed or advanced it" in str(info.value)
    assert batches == []


def test_a_slot_invalidated_for_lack_of_wal_is_a_named_data_loss(tmp_path: Path) -> None:
    # Its own server: the retention limit applies to every slot of a server.
    with PostgresServer(
        settings={"max_slot_wal_keep_size": "1MB", "max_wal_size": "32MB"}
    ) as server:
        if not server.has_plugin("wal2json"):
            pytest.skip("the wal2json output plugin is not installed")
        dsn = server.dsn
        create_orders(dsn)
        spec = PostgresCdcSourceSpec(dsn, tables=["orders"], slot="short")
        source = source_of(spec, tmp_path)
        start = source.initial_offset()
        execute(dsn, "INSERT INTO orders (id) VALUES (1)")
        end = source.latest_offset(start, rate_limited=False)
        for i in range(3):  # three WAL segments later, a checkpoint drops the slot's WAL
            execute(dsn, f"INSERT INTO orders (id) VALUES ({10 + i})")
            scalar(dsn, "SELECT pg_switch_wal()")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        assert scalar(dsn, "SELECT wal_status FROM pg_replication_slots") == "lost"
        again = source_of(spec, tmp_path)
        with pytest.raises(ms.DataLossError) as info:
            again.read(start, end)
        assert "replication slot 'short' was invalidated" in str(info.value)
        source.stop()
        again.stop()


def test_a_server_restart_is_retried_and_the_stream_continues(tmp_path: Path) -> None:
    with PostgresServer() as server:
        if not server.has_plugin("wal2json"):
            pytest.skip("the wal2json output plugin is not installed")
        create_orders(server.dsn)
        frame = ms.scan_postgres_cdc(
            server.dsn, tables=["orders"], slot="restarts", retry_timeout="30s"
        )
        query, batches = collect(frame, tmp_path / "cp")
        execute(server.dsn, "INSERT INTO orders (id) VALUES (1)")
        query.process_all_available(timeout=30)
        server.restart(down_for=1.0)  # the source's connection is ended, then refused
        execute(server.dsn, "INSERT INTO orders (id) VALUES (2)")
        query.process_all_available(timeout=60)
        assert query.exception() is None
        query.stop()
        assert pl.concat([df for _, df in batches])["id"].to_list() == [1, 2]
        # Retried, not lost and not doubled: the batches hold each change once.
        assert sum(df.height for _, df in batches) == 2


def test_plan_errors_name_the_table_and_the_fix(postgres_dsn: str) -> None:
    execute(postgres_dsn, "CREATE TABLE nokey (x int)", "CREATE TABLE k1 (id int PRIMARY KEY)")
    execute(postgres_dsn, "CREATE TABLE k2 (id bigint PRIMARY KEY)")
    with pytest.raises(
        ms.PlanError, match=r"public.nokey has no primary key .* REPLICA IDENTITY FULL"
    ):
        ms.scan_postgres_cdc(postgres_dsn, tables=["nokey"], slot="s")
    with pytest.raises(ms.PlanError, match=r"there is no table public.missing"):
        ms.scan_postgres_cdc(postgres_dsn, tables=["missing"], slot="s")
    with pytest.raises(ms.PlanError, match=r"column 'id' is Int32 in table public.k1 and Int64"):
        ms.scan_postgres_cdc(postgres_dsn, tables=["k1", "k2"], slot="s")
    with pytest.raises(ms.PlanError, match="there is no publication 'nope'"):
        ms.scan_postgres_cdc(postgres_dsn, publication="nope", slot="s")
    with pytest.raises(ValueError, match=r"exactly one of tables= .* or publication="):
        ms.scan_postgres_cdc(postgres_dsn, slot="s")
    # A full-identity table is fine; it also sends whole old rows with deletes.
    execute(postgres_dsn, "ALTER TABLE nokey REPLICA IDENTITY FULL")
    assert ms.scan_postgres_cdc(postgres_dsn, tables=["nokey"], slot="s").columns[0] == "x"


def test_a_slot_of_another_plugin_or_a_missing_one_is_refused(
    postgres_dsn: str, tmp_path: Path
) -> None:
    create_orders(postgres_dsn)
    scalar(postgres_dsn, "SELECT pg_create_logical_replication_slot('other', 'test_decoding')")
    frame = ms.scan_postgres_cdc(postgres_dsn, tables=["orders"], slot="other")
    with pytest.raises(
        ms.SourceError, match="plugin 'test_decoding'; this source needs a wal2json"
    ):
        collect(frame, tmp_path / "cp")
    frame = ms.scan_postgres_cdc(postgres_dsn, tables=["orders"], slot="absent", create_slot=False)
    with pytest.raises(ms.SourceError, match="there is no logical replication slot 'absent'"):
        collect(frame, tmp_path / "cp2")
    scalar(postgres_dsn, "SELECT pg_drop_replication_slot('other')")
