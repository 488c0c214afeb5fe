"""An exactly-once PostgreSQL sink: rows and the batch id commit in one transaction.

Each batch is one transaction:

1. the query's progress row ``(query id, table) -> batch id`` in the progress
   table (``microstream_progress`` in the target's schema, created if missing)
   is read and locked (``SELECT ... FOR UPDATE``); if it holds this batch id or a
   later one, the batch was committed by an earlier attempt and is skipped;
2. the rows are written: ``COPY`` (mode ``"append"``), ``COPY`` into a
   temporary table then ``INSERT ... ON CONFLICT (key) DO UPDATE`` (mode
   ``"upsert"``, and output mode ``"update"``), or ``DELETE`` then ``COPY``
   (output mode ``"complete"``);
3. the progress row is set to the batch id, and the transaction commits.

A crash anywhere before the commit leaves nothing (PostgreSQL rolls the
transaction back); after it, the progress row says the batch is in, so the
re-run skips it. The progress row also tells the engine, on restart, which
batch the table holds (:class:`~microstream.protocols.CommittedBatchSink`), so a
checkpoint whose log lost committed batches is refused.

The target table is created by the first batch when missing, its columns typed
from the batch's polars schema (:func:`connectors.postgres.types.pg_type_for`);
in upsert mode it gets a ``UNIQUE NULLS NOT DISTINCT`` constraint on the key.
An existing table must have every batch column, with a type that holds the
batch's values (:func:`connectors.postgres.types.accepts`); a mismatch is a
:class:`~microstream.exceptions.SchemaMismatchError` naming the column and
both types.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors.postgres.client import connect, qualified_name, require_psycopg, table_columns
from connectors.postgres.types import accepts, pg_type_for
from microstream.exceptions import MicrostreamError, PlanError, SchemaMismatchError, SinkError
from microstream.protocols import SinkContext

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

    from microstream._typing import PostgresSinkMode

__all__ = ["PostgresSink", "PostgresSinkSpec"]


@dataclass(frozen=True)
class PostgresSinkSpec:
    """Write each batch to a PostgreSQL table, exactly once.

    Parameters
    ----------
    dsn
        A libpq connection string or URL of the database. Never shown (it may
        hold a password).
    table
        ``"table"`` or ``"schema.table"``; created by the first batch if missing.
    mode
        ``"append"``: every row is inserted (``COPY``). ``"upsert"``: a row whose
        ``key`` is in the table replaces it, others are inserted (``INSERT ... ON
        CONFLICT (key) DO UPDATE``); of rows with the same key in one batch the
        last wins. ``output_mode="update"`` needs ``"upsert"``.
    key
        The columns that identify a row, for ``mode="upsert"``. Default in
        ``output_mode="update"``: the query's aggregation keys (its group keys,
        after the window start). The table needs a unique index on them (a
        table the sink creates has one, nulls equal to nulls).
    progress_table
        The table that records each query's last committed batch, in the
        target's schema unless qualified; created if missing.

    Notes
    -----
    Output modes: ``"append"`` (with either mode), ``"update"`` (upsert by the
    aggregation's keys; a global aggregation with no keys replaces the table's
    one row), ``"complete"`` (the table's rows are replaced by each batch, in
    the batch's transaction: readers see the old or the new result, never a
    mix).

    Examples
    --------
    >>> spec = PostgresSinkSpec("host=db", "counts", mode="upsert", key=["user"])
    >>> spec.describe(), sorted(spec.output_modes)
    ('PostgresSink[public.counts]', ['append', 'complete', 'update'])
    >>> PostgresSinkSpec("host=db", "t", key=["id"])
    Traceback (most recent call last):
    ...
    ValueError: key= is for mode='upsert'; got mode='append' (appended rows are never matched)
    """

    kind: ClassVar[str] = "postgres"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "update", "complete"})
    durable: ClassVar[bool] = True

    dsn: str = field(repr=False, compare=False)
    table: str
    _: KW_ONLY
    mode: PostgresSinkMode = "append"
    key: Sequence[str] | None = None
    progress_table: str = "microstream_progress"

    def __post_init__(self) -> None:
        if not isinstance(self.dsn, str) or not self.dsn.strip():
            msg = f"dsn must be a libpq connection string or URL; got {self.dsn!r}"
            raise ValueError(msg)
        schema, name = qualified_name(self.table)
        object.__setattr__(self, "table", f"{schema}.{name}")
        if self.mode not in ("append", "upsert"):
            msg = f"mode must be 'append' or 'upsert'; got {self.mode!r}"
            raise ValueError(msg)
        if self.key is not None:
            keys = (self.key,) if isinstance(self.key, str) else tuple(self.key)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                msg = f"key must be a non-empty list of column names; got {self.key!r}"
                raise ValueError(msg)
            if self.mode != "upsert":
                msg = (
                    f"key= is for mode='upsert'; got mode={self.mode!r} (appended rows are "
                    "never matched)"
                )
                raise ValueError(msg)
            object.__setattr__(self, "key", keys)
        progress_schema, progress = qualified_name(self.progress_table)
        if "." not in self.progress_table:
            progress_schema = schema
        object.__setattr__(self, "progress_table", f"{progress_schema}.{progress}")

    def describe(self) -> str:
        """One line: ``PostgresSink[public.counts]``."""
        return f"PostgresSink[{self.table}]"

    def build(self, context: SinkContext) -> PostgresSink:
        """The runtime sink (checks that psycopg is installed and the modes fit)."""
        return PostgresSink(self, context)


def _ident(qualified: str) -> sql.Composable:
    from psycopg import sql

    schema, name = qualified.split(".", 1)
    return sql.Identifier(schema, name)


class PostgresSink:
    """The runtime side of :class:`PostgresSinkSpec` (see the module docstring)."""

    def __init__(self, spec: PostgresSinkSpec, context: SinkContext) -> None:
        require_psycopg()
        self.spec = spec
        self.description = spec.describe()
        self.query_id = context.query_id
        self._output_mode = context.output_mode
        self._logger = context.logger
        self._faults = context.faults
        self._conn: psycopg.Connection[Any] | None = None
        self._table_ready = False
        self.key: tuple[str, ...] | None = self._key(context)

    def _key(self, context: SinkContext) -> tuple[str, ...] | None:
        spec, mode = self.spec, context.output_mode
        if mode == "complete":
            if spec.mode != "append":
                msg = (
                    f"{self.description}: output_mode='complete' replaces the table's rows with "
                    "each batch's whole result: use mode='append' (the default)"
                )
                raise PlanError(msg)
            return None
        if spec.mode == "append":
            if mode == "update":
                msg = (
                    f"{self.description}: output_mode='update' emits changed rows again, which "
                    "must replace the old ones: use mode='upsert' (key= defaults to the "
                    "aggregation's keys)"
                )
                raise PlanError(msg)
            return None
        key = tuple(spec.key) if spec.key is not None else None
        if key is None and mode == "update":
            key = context.key_columns
        if key is None:
            msg = (
                f"{self.description}: mode='upsert' needs key= (the columns that identify a "
                "row)"
                + ("; this query has no aggregation keys to default to" if mode == "update" else "")
            )
            raise PlanError(msg)
        if context.schema is not None:
            lost = [k for k in key if k not in context.schema]
            if lost:
                msg = (
                    f"{self.description}: the key columns {lost} are not in the query's output "
                    f"(columns: {list(context.schema.names())})"
                )
                raise PlanError(msg)
        return key

    # -- connection ---------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.spec.dsn)
        return self._conn

    def _fail(self, what: str, exc: Exception) -> SinkError:
        self._close()
        hint = ""
        if "no unique or exclusion constraint" in str(exc):
            hint = (
                f" (mode='upsert' needs a unique index on {list(self.key or ())} in "
                f"{self.spec.table}: CREATE UNIQUE INDEX ... ON {self.spec.table} "
                f"({', '.join(self.key or ())}))"
            )
        return SinkError(f"{self.description}: {what}: {exc}{hint}")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing a broken connection: nothing to keep
                self._logger.debug("%s: closing the connection: %s", self.description, exc)

    # -- CommittedBatchSink -------------------------------------------------------------------

    def committed_batch(self) -> int | None:
        """The last batch id of this query the table holds (its progress row); None: none."""
        import psycopg

        schema, name = self.spec.progress_table.split(".", 1)
        try:
            conn = self._connection()
            if table_columns(conn, schema, name) is None:
                return None
            row = conn.execute(
                _sql("SELECT batch_id FROM {} WHERE query_id = %s AND table_name = %s").format(
                    _ident(self.spec.progress_table)
                ),
                (self.query_id, self.spec.table),
            ).fetchone()
        except psycopg.Error as exc:
            raise self._fail("cannot read the progress table", exc) from exc
        return None if row is None else int(row[0])

    # -- Sink ---------------------------------------------------------------------------------

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Write ``data`` and the batch id in one transaction; skip a committed batch.

        Raises
        ------
        SchemaMismatchError
            The existing table lacks a batch column or has a type that cannot
            hold it (the message names the column and both types).
        SinkError
            The write or the commit failed (the message names the table and batch).
        """
        import psycopg

        try:
            conn = self._connection()
            with conn.transaction():
                self._ensure_progress_table(conn)
                done = self._locked_progress(conn)
                if done is not None and done >= batch_id:
                    self._logger.info(
                        "%s: batch %d already committed (progress row: batch %d); skipped",
                        self.description,
                        batch_id,
                        done,
                    )
                    return
                if not self._table_ready:
                    self._ensure_table(conn, data.schema)
                self._write(conn, data)
                conn.execute(
                    _sql(
                        "INSERT INTO {} (query_id, table_name, batch_id) VALUES (%s, %s, %s) "
                        "ON CONFLICT (query_id, table_name) DO UPDATE "
                        "SET batch_id = EXCLUDED.batch_id, committed_at = now()"
                    ).format(_ident(self.spec.progress_table)),
                    (self.query_id, self.spec.table, batch_id),
                )
                # Rows and progress written, not committed: a crash here rolls both back.
                self._faults.reach("sink.after_data")
        except MicrostreamError:
            self._table_ready = False
            raise
        except psycopg.Error as exc:
            self._table_ready = False
            raise self._fail(f"cannot commit batch {batch_id}", exc) from exc

    def _ensure_progress_table(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            _sql(
                "CREATE TABLE IF NOT EXISTS {} (query_id text NOT NULL, table_name text NOT NULL, "
                "batch_id bigint NOT NULL, committed_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (query_id, table_name))"
            ).format(_ident(self.spec.progress_table))
        )

    def _locked_progress(self, conn: psycopg.Connection[Any]) -> int | None:
        row = conn.execute(
            _sql(
                "SELECT batch_id FROM {} WHERE query_id = %s AND table_name = %s FOR UPDATE"
            ).format(_ident(self.spec.progress_table)),
            (self.query_id, self.spec.table),
        ).fetchone()
        return None if row is None else int(row[0])

    def _ensure_table(self, conn: psycopg.Connection[Any], schema: pl.Schema) -> None:
        """Create the table from the batch's schema, or check the existing one against it."""
        from psycopg import sql

        table_schema, name = self.spec.table.split(".", 1)
        columns = table_columns(conn, table_schema, name)
        if columns is None:
            definitions = [
                sql.SQL("{} {}").format(sql.Identifier(column), sql.SQL(pg_type_for(column, dtype)))
                for column, dtype in schema.items()
            ]
            if self.key:
                unique = (
                    "UNIQUE NULLS NOT DISTINCT" if conn.info.server_version >= 150000 else "UNIQUE"
                )
                definitions.append(
                    sql.SQL(unique + " ({})").format(
                        sql.SQL(", ").join(map(sql.Identifier, self.key))
                    )
                )
            conn.execute(
                sql.SQL("CREATE TABLE {} ({})").format(
                    _ident(self.spec.table), sql.SQL(", ").join(definitions)
                )
            )
            self._logger.info("%s: created table %s", self.description, self.spec.table)
        else:
            by_name = {c.name: c for c in columns}
            for column, dtype in schema.items():
                existing = by_name.get(column)
                if existing is None:
                    msg = (
                        f"{self.description}: table {self.spec.table} has no column {column!r}, "
                        f"which the batches have ({dtype}); add it (ALTER TABLE {self.spec.table} "
                        f"ADD COLUMN {column} {pg_type_for(column, dtype)}) or drop it from the "
                        "query's output"
                    )
                    raise SchemaMismatchError(msg)
                if not accepts(existing, dtype):
                    msg = (
                        f"{self.description}: column {column!r} of table {self.spec.table} is "
                        f"{existing.formatted}, and the batches' column is {dtype}, which needs "
                        f"{pg_type_for(column, dtype)}: change the column's type, or cast the "
                        "column in the query"
                    )
                    raise SchemaMismatchError(msg)
            required = [
                c.name for c in columns if c.not_null and not c.has_default and c.name not in schema
            ]
            if required:
                msg = (
                    f"{self.description}: table {self.spec.table} has NOT NULL column(s) "
                    f"{required} without a default, which the batches lack"
                )
                raise SchemaMismatchError(msg)
        self._table_ready = True

    def _write(self, conn: psycopg.Connection[Any], data: pl.DataFrame) -> None:
        from psycopg import sql

        target = _ident(self.spec.table)
        if self._output_mode == "complete" or (self.key is not None and not self.key):
            # The whole result (complete mode; update mode of a global aggregation's one row).
            conn.execute(sql.SQL("DELETE FROM {}").format(target))
            self._copy(conn, target, data)
            return
        if self.key is None:
            self._copy(conn, target, data)
            return
        if data.height == 0:
            return
        rows = data.unique(subset=list(self.key), keep="last", maintain_order=True)
        staging = sql.Identifier("microstream_batch")
        conn.execute(
            sql.SQL(
                "CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT * FROM {} WITH NO DATA"
            ).format(staging, target)
        )
        self._copy(conn, staging, rows)
        columns = sql.SQL(", ").join(map(sql.Identifier, rows.columns))
        keys = sql.SQL(", ").join(map(sql.Identifier, self.key))
        others = [c for c in rows.columns if c not in self.key]
        action = (
            sql.SQL("DO UPDATE SET ")
            + sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                for c in others
            )
            if others
            else sql.SQL("DO NOTHING")
        )
        conn.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) ").format(
                target, columns, columns, staging, keys
            )
            + action
        )

    def _copy(
        self, conn: psycopg.Connection[Any], target: sql.Composable, data: pl.DataFrame
    ) -> None:
        """``COPY`` the rows in as CSV, written by polars in one go."""
        from psycopg import sql

        if data.height == 0:
            return
        as_text = data.with_columns(
            [
                (pl.lit("\\x") + pl.col(name).bin.encode("hex")).alias(name)
                for name, dtype in data.schema.items()
                if dtype == pl.Binary
            ]
            + [
                pl.col(name).cast(pl.String)
                for name, dtype in data.schema.items()
                if dtype == pl.Categorical
            ]
        )
        payload = as_text.write_csv(include_header=False).encode()
        columns = sql.SQL(", ").join(map(sql.Identifier, data.columns))
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(target, columns)
        with conn.cursor() as cursor, cursor.copy(statement) as copy:
            buffer = io.BytesIO(payload)
            while block := buffer.read(1 << 20):
                copy.write(block)

    def stop(self) -> None:
        """Close the connection."""
        self._close()


def _sql(text: str) -> sql.SQL:
    from psycopg import sql

    return sql.SQL(text)
