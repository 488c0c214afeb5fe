"""Change data capture from PostgreSQL through a logical replication slot (``scan_postgres_cdc``).

The life of a batch:

1. **Offsets are slot positions.** An offset is an LSN ``P`` with the meaning
   PostgreSQL gives a slot's ``confirmed_flush_lsn``: everything whose commit
   record starts before ``P`` is consumed. Batch ``(S, E]`` holds the
   transactions whose commit *ends* in ``(S, E]`` (the same set, since every
   ``E`` the source picks is the end of a commit record). The first ``S`` is the
   slot's position when the query first starts (the slot is created then,
   unless it exists).
2. **Planning** (``latest_offset``) peeks at the slot
   (``pg_logical_slot_peek_changes``, which consumes nothing) up to the WAL
   flushed now, or ``max_changes_per_trigger`` changes (whole transactions), and
   picks ``E`` = the end of the last commit decoded. ``E`` is logged in
   ``offsets/N`` before the batch is read; the decoded rows are kept for the read.
3. **Reading** ``(S, E]`` peeks up to ``E`` and keeps the transactions whose
   commit ends in ``(S, E]``: a batch re-run after a crash decodes the same WAL
   and gets the same rows, in the same order (commit order, then change order).
4. **Committing.** Only after ``commits/N`` does ``commit(E)`` advance the slot
   (``pg_replication_slot_advance``), so the server may recycle the WAL of
   batch ``N``; until then a re-run can read it again.

Decoding is in bulk: the ``wal2json`` output plugin (format 2) prints each
change as JSON; the server turns each change's column list into one JSON
object of the values' text forms (``jsonb_object_agg``) and sends everything
in one ``COPY ... TO STDOUT (FORMAT csv)``; polars parses the CSV, matches each
change to its commit (a join on the transaction id), keeps the range, decodes the
objects (``str.json_decode``) and casts each column to its table's type
(:func:`connectors.postgres.types.text_to_dtype`). No Python code runs per row
or per value.

A slot that was dropped, advanced past the query's position by another
consumer, or invalidated because the server removed WAL it still needed
(``max_slot_wal_keep_size``) is a :class:`~microstream.exceptions.DataLossError`
naming the slot and the range.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl
from pydantic import field_validator

from connectors.postgres.client import connect, qualified_name, require_psycopg, table_columns
from connectors.postgres.types import dtype_for, text_to_dtype
from microstream.exceptions import DataLossError, OffsetError, PlanError, SourceError
from microstream.protocols import Offset, SourceContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CDC_COLUMNS",
    "PostgresCdcSource",
    "PostgresCdcSourceSpec",
    "PostgresLsn",
    "format_lsn",
    "parse_lsn",
]

CDC_COLUMNS: dict[str, pl.DataType] = {
    "_table": pl.String(),
    "_op": pl.String(),
    "_commit_lsn": pl.UInt64(),
    "_commit_time": pl.Datetime("us", "UTC"),
}
"""The columns every change carries after the table's own: ``schema.table``, the
operation (``insert``, ``update``, ``delete``), the LSN of the transaction's commit
record and its commit time."""

_LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")
_OPS = {"I": "insert", "U": "update", "D": "delete"}


def parse_lsn(text: str) -> int:
    """The integer of an LSN written as PostgreSQL prints it.

    Examples
    --------
    >>> parse_lsn("0/16B3748"), parse_lsn("1/0")
    (23803720, 4294967296)
    """
    if not isinstance(text, str) or not _LSN.match(text):
        msg = f"an LSN is written 'X/Y' in hexadecimal (e.g. '0/16B3748'); got {text!r}"
        raise OffsetError(msg)
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    """An LSN as PostgreSQL prints it.

    Examples
    --------
    >>> format_lsn(23803720)
    '0/16B3748'
    """
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


class PostgresLsn(Offset):
    """A position in the WAL, with the meaning of a slot's ``confirmed_flush_lsn``.

    Examples
    --------
    >>> a, b = PostgresLsn(lsn="0/16B3748"), PostgresLsn(lsn="0/16B3800")
    >>> b.follows_or_equals(a), a.follows_or_equals(b), b.value - a.value
    (True, False, 184)
    """

    lsn: str

    @field_validator("lsn")
    @classmethod
    def _valid(cls, value: str) -> str:
        return format_lsn(parse_lsn(value))

    @property
    def value(self) -> int:
        """The LSN as an integer (bytes of WAL since its start)."""
        return parse_lsn(self.lsn)

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this position is at or after ``other``."""
        if not isinstance(other, PostgresLsn):
            msg = f"cannot compare a PostgresLsn with a {type(other).__name__} ({other!r})"
            raise OffsetError(msg)
        return self.value >= other.value


# -- the spec --------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class PostgresCdcSourceSpec:
    """The changes (inserts, updates, deletes) of PostgreSQL tables as an unbounded stream.

    Parameters
    ----------
    dsn
        A libpq connection string or URL of the database
        (``"host=... dbname=... user=..."``, ``"postgresql://..."``). The server
        needs ``wal_level=logical`` and the ``wal2json`` output plugin
        (Debian: ``postgresql-15-wal2json``); the user needs the ``REPLICATION``
        attribute (or to be a superuser) and ``SELECT`` on the catalog.
    tables, publication
        Exactly one: the tables to capture (``"table"`` or ``"schema.table"``, the
        names as stored: case-sensitive, as if quoted), or
        the name of a publication whose tables (and published operations) are
        captured, looked up when the query is defined. Every table needs a
        primary key or a replica identity (``ALTER TABLE ... REPLICA IDENTITY
        FULL``), or PostgreSQL logs no key for its updates and deletes.
    slot
        The logical replication slot to read (``[a-z0-9_]``, at most 63
        characters). One slot per query: a slot is a position, and a second
        reader would move it under the first.
    create_slot
        Create the slot (plugin ``wal2json``) when the query first starts and it
        does not exist; the stream then holds the changes committed after that
        moment. With False, a missing slot is an error. A slot that existed
        must use ``wal2json``. Once the query has run, a missing slot is always
        a :class:`~microstream.exceptions.DataLossError` (it is never re-created:
        its changes are gone).
    max_changes_per_trigger
        At most about this many changes per batch: whole transactions are read
        until the count is reached (a larger transaction is one batch). Not
        applied to ``Trigger.once()``.
    retry_timeout
        How long a lost connection (the server restarting) is retried, with a
        backoff from 50 ms to 1 s, before the query fails. ``"30s"`` by default.

    Notes
    -----
    The stream's schema is each table's columns, typed from the catalog when
    the query is defined (see :mod:`connectors.postgres.types`), then
    ``_table`` (``schema.table``), ``_op`` (``insert``, ``update``,
    ``delete``), ``_commit_lsn`` (UInt64: the LSN of the transaction's commit
    record) and ``_commit_time`` (Datetime, UTC). An insert or an update
    carries the new row; a delete carries the old row's key columns (every
    column with ``REPLICA IDENTITY FULL``), the others null. With several
    tables the columns are the union of theirs, by name, in order of first
    appearance (a column shared by two tables must have the same type in
    both); a row's columns of other tables are null: ``filter(pl.col("_table")
    == ...)`` selects one table. Columns added to a table after the query was
    defined are not read (restart the query to pick them up).

    Examples
    --------
    >>> PostgresCdcSourceSpec("host=db", tables=["t"], slot="Bad-Name")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: slot must be ... got 'Bad-Name'
    """

    kind: ClassVar[str] = "postgres_cdc"

    dsn: str = field(repr=False, compare=False)
    tables: tuple[str, ...]
    publication: str | None
    slot: str
    create_slot: bool
    max_changes_per_trigger: int | None
    retry_timeout_s: float
    actions: tuple[str, ...]
    schema: pl.Schema = field(compare=False)
    table_schemas: dict[str, dict[str, pl.DataType]] = field(compare=False, repr=False)

    def __init__(
        self,
        dsn: str,
        *,
        slot: str,
        tables: Sequence[str] | None = None,
        publication: str | None = None,
        create_slot: bool = True,
        max_changes_per_trigger: int | None = None,
        retry_timeout: str | timedelta | float = "30s",
    ) -> None:
        if not isinstance(dsn, str) or not dsn.strip():
            msg = f"dsn must be a libpq connection string or URL; got {dsn!r}"
            raise ValueError(msg)
        if not isinstance(slot, str) or not _SLOT.match(slot):
            msg = (
                "slot must be a replication slot name: lower-case letters, digits and _, "
                f"at most 63 characters; got {slot!r}"
            )
            raise ValueError(msg)
        if (tables is None) == (publication is None):
            msg = (
                "pass exactly one of tables= (a list of tables) or publication= (a publication "
                f"name); got tables={tables!r}, publication={publication!r}"
            )
            raise ValueError(msg)
        if tables is not None and (
            isinstance(tables, str) or not tables or not all(isinstance(t, str) for t in tables)
        ):
            msg = f"tables must be a non-empty list of 'table' or 'schema.table'; got {tables!r}"
            raise ValueError(msg)
        if not isinstance(create_slot, bool):
            msg = f"create_slot must be a bool; got {create_slot!r}"
            raise ValueError(msg)
        limit = max_changes_per_trigger
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            msg = f"max_changes_per_trigger must be a positive int or None; got {limit!r}"
            raise ValueError(msg)
        retry = parse_duration(retry_timeout, name="retry_timeout").total_seconds()
        names, actions, schemas = _describe_tables(dsn, tables, publication)
        put = object.__setattr__
        put(self, "dsn", dsn)
        put(self, "tables", names)
        put(self, "publication", publication)
        put(self, "slot", slot)
        put(self, "create_slot", create_slot)
        put(self, "max_changes_per_trigger", limit)
        put(self, "retry_timeout_s", retry)
        put(self, "actions", actions)
        put(self, "table_schemas", schemas)
        put(self, "schema", _stream_schema(schemas))

    def identity(self) -> dict[str, Any]:
        """The slot and what is captured (fingerprinted: a change refuses the checkpoint)."""
        if self.publication is not None:
            return {"slot": self.slot, "publication": self.publication}
        return {"slot": self.slot, "tables": list(self.tables)}

    def describe(self) -> str:
        """One line: ``PostgresCDC[public.orders@slot]``."""
        return f"PostgresCDC[{','.join(self.tables)}@{self.slot}]"

    def build(self, context: SourceContext) -> PostgresCdcSource:
        """The runtime source."""
        return PostgresCdcSource(self, context)


def _describe_tables(
    dsn: str, tables: Sequence[str] | None, publication: str | None
) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, dict[str, pl.DataType]]]:
    """The tables (``schema.table``), the operations captured and each table's columns."""
    require_psycopg()
    import psycopg

    try:
        with connect(dsn) as conn:
            actions: tuple[str, ...] = ("insert", "update", "delete")
            if publication is not None:
                row = conn.execute(
                    "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = %s",
                    (publication,),
                ).fetchone()
                if row is None:
                    msg = (
                        f"there is no publication {publication!r} in the database at {_where(dsn)}"
                    )
                    raise PlanError(msg)
                actions = tuple(a for a, on in zip(actions, row) if on)
                pairs = conn.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables "
                    "WHERE pubname = %s ORDER BY 1, 2",
                    (publication,),
                ).fetchall()
                if not pairs:
                    msg = f"publication {publication!r} has no tables to capture"
                    raise PlanError(msg)
                qualified = [(str(s), str(t)) for s, t in pairs]
            else:
                assert tables is not None
                qualified = [qualified_name(t) for t in dict.fromkeys(tables)]
            schemas: dict[str, dict[str, pl.DataType]] = {}
            for schema, table in qualified:
                name = f"{schema}.{table}"
                columns = table_columns(conn, schema, table)
                if columns is None:
                    msg = f"there is no table {name} to capture changes of (database {_where(dsn)})"
                    raise PlanError(msg)
                _check_replica_identity(conn, schema, table)
                schemas[name] = {c.name: dtype_for(c) for c in columns}
    except psycopg.Error as exc:
        msg = f"cannot read the tables to capture from the database at {_where(dsn)}: {exc}"
        raise PlanError(msg) from exc
    return tuple(schemas), actions, schemas


def _check_replica_identity(conn: psycopg.Connection[Any], schema: str, table: str) -> None:
    row = conn.execute(
        """
        SELECT c.relreplident,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s
        """,
        (schema, table),
    ).fetchone()
    assert row is not None
    identity, has_key = row
    if identity == "n" or (identity == "d" and not has_key):
        msg = (
            f"table {schema}.{table} has no primary key or replica identity, so PostgreSQL "
            "logs no key for its updates and deletes and they cannot be captured: add a "
            f"primary key, or ALTER TABLE {schema}.{table} REPLICA IDENTITY FULL"
        )
        raise PlanError(msg)


def _stream_schema(schemas: dict[str, dict[str, pl.DataType]]) -> pl.Schema:
    columns: dict[str, pl.DataType] = {}
    owner: dict[str, str] = {}
    for table, table_schema in schemas.items():
        for name, dtype in table_schema.items():
            if name in CDC_COLUMNS:
                msg = (
                    f"table {table} has a column {name!r}, which the change stream uses for "
                    f"itself ({', '.join(CDC_COLUMNS)}); capture a view of the table without it "
                    "is not possible, so rename the column"
                )
                raise PlanError(msg)
            if name in columns and columns[name] != dtype:
                msg = (
                    f"column {name!r} is {columns[name]} in table {owner[name]} and {dtype} in "
                    f"table {table}; a change stream of several tables has one type per column "
                    "name: capture these tables in separate queries"
                )
                raise PlanError(msg)
            columns.setdefault(name, dtype)
            owner.setdefault(name, table)
    return pl.Schema({**columns, **CDC_COLUMNS})


def _where(dsn: str) -> str:
    """The server and database of a connection string, without credentials."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(dsn)
    except Exception:
        return "<the dsn given>"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


# -- the runtime source ----------------------------------------------------------------------------


_DECODE_SQL = """
COPY (
  SELECT c.ord, c.xid::text AS xid, j.d->>'action' AS op,
         (j.d->>'schema') || '.' || (j.d->>'table') AS "table",
         (c.lsn - '0/0'::pg_lsn)::text AS end_lsn,
         ((j.d->>'lsn')::pg_lsn - '0/0'::pg_lsn)::text AS commit_lsn,
         j.d->>'timestamp' AS commit_time,
         CASE WHEN j.d->>'action' <> 'C' THEN
           (SELECT jsonb_object_agg(e->>'name', e->>'value')
            FROM jsonb_array_elements(COALESCE(j.d->'columns', j.d->'identity')) e)::text
         END AS "row"
  FROM pg_logical_slot_peek_changes(
    {slot}, {upto}, {limit},
    'format-version', '2', 'include-lsn', 'true', 'include-timestamp', 'true',
    'include-transaction', 'true', 'include-type-oids', 'false',
    'add-tables', {tables}, 'actions', {actions}
  ) WITH ORDINALITY AS c(lsn, xid, data, ord),
  LATERAL (SELECT c.data::jsonb AS d) j
  WHERE j.d->>'action' IN ('I', 'U', 'D', 'C')
) TO STDOUT (FORMAT csv, HEADER)
"""
"""One peek, as CSV: every change (``op`` I, U, D; its values as one JSON object of their
text forms) and every commit (``op`` C: in ``end_lsn`` the end of the commit record, which
is the slot position after the transaction, and in ``commit_lsn`` its start), in WAL order
(``ord``). Changes are matched to their commit by transaction id, and the range is cut, by
polars (:meth:`PostgresCdcSource._decode`): the server's planner cannot estimate the
function's rows, and a join there degenerated into a nested loop (seconds per 100k rows)."""

_CSV_SCHEMA = {
    "ord": pl.Int64,
    "xid": pl.String,
    "op": pl.String,
    "table": pl.String,
    "end_lsn": pl.UInt64,
    "commit_lsn": pl.UInt64,
    "commit_time": pl.String,
    "row": pl.String,
}


@dataclass(frozen=True)
class _Decoded:
    """The changes of ``(start, end]`` decoded by a peek, and the end of their last commit."""

    start: int
    end: int
    changes: pl.DataFrame


class PostgresCdcSource:
    """The runtime side of :class:`PostgresCdcSourceSpec` (see the module docstring)."""

    def __init__(self, spec: PostgresCdcSourceSpec, context: SourceContext) -> None:
        require_psycopg()
        self.spec = spec
        self.description = spec.describe()
        self._logger = context.logger
        self._conn: psycopg.Connection[Any] | None = None
        self._until: int | None = None
        self._planned: _Decoded | None = None
        self._json_dtype = pl.Struct(
            {name: pl.String for name in spec.schema if name not in CDC_COLUMNS}
        )

    # -- connection ---------------------------------------------------------------------------

    def _run(self, what: str, work: Any) -> Any:
        """``work(conn)``, retrying a lost connection for ``retry_timeout``."""
        import psycopg

        deadline = time.monotonic() + self.spec.retry_timeout_s
        delay = 0.05
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self.spec.dsn)
                return work(self._conn)
            except psycopg.OperationalError as exc:
                if self._conn is not None and not self._conn.closed and not self._conn.broken:
                    raise self._error(what, exc) from exc  # the server answered: not transient
                self._close()
                if time.monotonic() >= deadline:
                    msg = (
                        f"{self.description}: cannot {what}: the server at {_where(self.spec.dsn)} "
                        f"did not answer for {self.spec.retry_timeout_s:g} s (retry_timeout): {exc}"
                    )
                    raise SourceError(msg) from exc
                self._logger.warning("%s: cannot %s, retrying: %s", self.description, what, exc)
                time.sleep(delay)
                delay = min(1.0, delay * 2)
            except psycopg.Error as exc:
                raise self._error(what, exc) from exc

    def _error(self, what: str, exc: Exception) -> SourceError:
        from psycopg import errors

        slot = self.spec.slot
        if isinstance(exc, errors.UndefinedObject) and "replication slot" in str(exc):
            return self._dropped()
        if isinstance(exc, errors.UndefinedFile | errors.ObjectNotInPrerequisiteState) and (
            "WAL" in str(exc) or "invalidated" in str(exc)
        ):
            msg = (
                f"{self.description}: the server no longer has the WAL that replication slot "
                f"{slot!r} needs ({exc}); the changes the query has not read are lost. Start "
                "over with a new checkpoint and a new slot, and raise max_slot_wal_keep_size"
            )
            return DataLossError(msg)
        if isinstance(exc, errors.ObjectInUse):
            msg = (
                f"{self.description}: replication slot {slot!r} is in use by another process "
                f"({exc}); a slot serves one reader: give each query its own slot"
            )
            return SourceError(msg)
        if "could not access file" in str(exc) and "wal2json" in str(exc):
            msg = (
                f"{self.description}: the server has no wal2json output plugin ({exc}): install "
                "it on the server (Debian: apt-get install postgresql-15-wal2json)"
            )
            return SourceError(msg)
        return SourceError(f"{self.description}: cannot {what}: {exc}")

    def _dropped(self) -> DataLossError:
        msg = (
            f"{self.description}: replication slot {self.spec.slot!r} does not exist any more "
            "(it was dropped), and with it the position of the changes the query has not read: "
            "they are lost. Start over with a new checkpoint (a new slot captures changes from "
            "its creation on)"
        )
        return DataLossError(msg)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # closing a broken connection: nothing to keep
                self._logger.debug("%s: closing the connection: %s", self.description, exc)

    def _slot(
        self, conn: psycopg.Connection[Any]
    ) -> tuple[str, str, int | None, str | None] | None:
        row = conn.execute(
            "SELECT plugin, database, confirmed_flush_lsn::text, wal_status "
            "FROM pg_replication_slots WHERE slot_name = %s AND slot_type = 'logical'",
            (self.spec.slot,),
        ).fetchone()
        if row is None:
            return None
        plugin, database, confirmed, status = row
        return plugin, database, None if confirmed is None else parse_lsn(confirmed), status

    def _check_slot(self, conn: psycopg.Connection[Any], start: int) -> int:
        """The slot's position, checked to be usable from ``start``."""
        slot = self._slot(conn)
        if slot is None:
            raise self._dropped()
        _, _, confirmed, status = slot
        if status == "lost" or confirmed is None:
            msg = (
                f"{self.description}: replication slot {self.spec.slot!r} was invalidated: the "
                "server removed WAL it still needed (max_slot_wal_keep_size); the changes after "
                f"{format_lsn(start)} that the query has not read are lost. Start over with a "
                "new checkpoint and a new slot"
            )
            raise DataLossError(msg)
        if confirmed > start:
            msg = (
                f"{self.description}: replication slot {self.spec.slot!r} is at "
                f"{format_lsn(confirmed)}, past the query's position {format_lsn(start)}: another "
                "reader consumed or advanced it, and the changes committed in "
                f"({format_lsn(start)}, {format_lsn(confirmed)}] are lost to this query. Give "
                "each query its own slot, and start over with a new checkpoint"
            )
            raise DataLossError(msg)
        return confirmed

    # -- the Source contract ------------------------------------------------------------------

    def parse_offset(self, data: dict[str, Any]) -> PostgresLsn:
        """The offset from its JSON form in the WAL: ``{"lsn": "0/16B3748"}``."""
        return PostgresLsn.model_validate(data)

    def initial_offset(self) -> PostgresLsn:
        """The slot's position when the query first starts, creating the slot if asked to.

        Raises
        ------
        SourceError
            No such slot and ``create_slot=False``, or a slot of another plugin
            or database.
        """

        def work(conn: psycopg.Connection[Any]) -> int:
            slot = self._slot(conn)
            if slot is None:
                if not self.spec.create_slot:
                    msg = (
                        f"{self.description}: there is no logical replication slot "
                        f"{self.spec.slot!r}; create it (SELECT pg_create_logical_replication_slot("
                        f"'{self.spec.slot}', 'wal2json')) or pass create_slot=True"
                    )
                    raise SourceError(msg)
                row = conn.execute(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'wal2json')",
                    (self.spec.slot,),
                ).fetchone()
                assert row is not None
                self._logger.info("%s: created slot at %s", self.description, row[0])
                return parse_lsn(row[0])
            plugin, database, confirmed, _ = slot
            current = conn.execute("SELECT current_database()").fetchone()
            if plugin != "wal2json" or (current is not None and database != current[0]):
                msg = (
                    f"{self.description}: replication slot {self.spec.slot!r} decodes database "
                    f"{database!r} with plugin {plugin!r}; this source needs a wal2json slot of "
                    f"database {current[0] if current else '?'!r}: choose another slot name"
                )
                raise SourceError(msg)
            if confirmed is None:
                raise self._lost_before_start()
            return confirmed

        return PostgresLsn(lsn=format_lsn(self._run("open the replication slot", work)))

    def _lost_before_start(self) -> DataLossError:
        msg = (
            f"{self.description}: replication slot {self.spec.slot!r} was invalidated (WAL removed)"
        )
        return DataLossError(msg)

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> PostgresLsn:
        """The end of the last commit flushed now (or within the batch's rate limit).

        Raises
        ------
        DataLossError
            The slot was dropped, invalidated, or moved past ``start``.
        """
        begin = _lsn(start).value
        if self._until is not None and begin >= self._until:
            return PostgresLsn(lsn=format_lsn(begin))
        limit = self.spec.max_changes_per_trigger if rate_limited else None
        decoded = self._decode(begin, None, upto=self._until, limit=limit)
        self._planned = decoded
        return PostgresLsn(lsn=format_lsn(decoded.end))

    def prepare_for_available_now(self) -> None:
        """Fix the end of the stream at the WAL flushed now."""

        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
            assert row is not None
            return parse_lsn(row[0])

        self._until = self._run("read the WAL position", work)

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The changes of the transactions whose commit ends in ``(start, end]``.

        Raises
        ------
        DataLossError
            The slot was dropped, invalidated, or moved past ``start``.
        """
        begin, finish = _lsn(start).value, _lsn(end).value
        planned, self._planned = self._planned, None
        if finish <= begin:
            return self._typed(pl.DataFrame(schema=_CSV_SCHEMA))
        if planned is not None and planned.start == begin and planned.end == finish:
            changes = planned.changes
        else:
            decoded = self._decode(begin, finish, upto=finish, limit=None)
            if decoded.end != finish:
                msg = (
                    f"{self.description}: the batch ({format_lsn(begin)}, {format_lsn(finish)}] "
                    f"ends at a commit the slot no longer decodes (the last commit found ends at "
                    f"{format_lsn(decoded.end)}): its WAL is lost"
                )
                raise DataLossError(msg)
            changes = decoded.changes
        return self._typed(changes)

    def _decode(
        self, start: int, end: int | None, *, upto: int | None, limit: int | None
    ) -> _Decoded:
        from psycopg import sql

        def work(conn: psycopg.Connection[Any]) -> bytes:
            self._check_slot(conn, start)
            statement = sql.SQL(_DECODE_SQL).format(
                slot=sql.Literal(self.spec.slot),
                upto=sql.SQL("NULL") if upto is None else sql.Literal(format_lsn(upto)),
                limit=sql.SQL("NULL") if limit is None else sql.Literal(limit),
                tables=sql.Literal(",".join(_wal2json_table(t) for t in self.spec.tables)),
                actions=sql.Literal(",".join(self.spec.actions)),
            )
            buffer = io.BytesIO()
            with conn.cursor() as cursor, cursor.copy(statement) as copy:
                for block in copy:
                    buffer.write(block)
            return buffer.getvalue()

        data = self._run("decode the slot's changes", work)
        frame = pl.read_csv(io.BytesIO(data), schema=_CSV_SCHEMA)
        in_range = pl.col("end_lsn") > start
        if end is not None:
            in_range &= pl.col("end_lsn") <= end
        commits = frame.filter((pl.col("op") == "C") & in_range).select(
            "xid", "end_lsn", "commit_lsn"
        )
        changes = (
            frame.filter(pl.col("op") != "C")
            .drop("end_lsn", "commit_lsn")
            .join(commits, on="xid", how="inner")
            .sort("ord")
        )
        last = start if commits.is_empty() else int(commits["end_lsn"].max())  # type: ignore[arg-type]
        return _Decoded(start, last, changes)

    def _typed(self, changes: pl.DataFrame) -> pl.DataFrame:
        """The stream's rows from the decoded changes: columns cast to the tables' types."""
        schema = self.spec.schema
        values = (
            changes.select(pl.col("row").str.json_decode(self._json_dtype).alias("row"))
            .unnest("row")
            .select(
                text_to_dtype(name, dtype)
                for name, dtype in schema.items()
                if name not in CDC_COLUMNS
            )
        )
        cdc = changes.select(
            pl.col("table").alias("_table"),
            pl.col("op").replace_strict(_OPS, return_dtype=pl.String).alias("_op"),
            pl.col("commit_lsn").alias("_commit_lsn"),
            text_to_dtype("commit_time", CDC_COLUMNS["_commit_time"]).alias("_commit_time"),
        )
        return pl.concat([values, cdc], how="horizontal").select(list(schema))

    def commit(self, end: Offset) -> None:
        """Advance the slot to ``end`` (called after ``commits/N``): its WAL may be recycled."""
        target = _lsn(end).value

        def work(conn: psycopg.Connection[Any]) -> None:
            slot = self._slot(conn)
            if slot is None or slot[2] is None or slot[2] >= target:
                return  # a missing slot is reported by the next read, with its range
            conn.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                (self.spec.slot, format_lsn(target)),
            )

        self._run("advance the replication slot", work)

    def stop(self) -> None:
        """Close the connection (the slot stays, at the last committed batch)."""
        self._planned = None
        self._close()


def _lsn(offset: Offset) -> PostgresLsn:
    if not isinstance(offset, PostgresLsn):
        msg = f"expected a PostgresLsn offset; got a {type(offset).__name__} ({offset!r})"
        raise OffsetError(msg)
    return offset


def _wal2json_table(name: str) -> str:
    """``schema.table`` for wal2json's ``add-tables``, which escapes space, ``'``, ``,``, ``.``,
    ``*`` and ``\\`` with a backslash."""
    schema, table = name.split(".", 1) if "." in name else ("public", name)

    def escape(part: str) -> str:
        return re.sub(r"([,.\\ '*])", r"\\\1", part)

    return f"{escape(schema)}.{escape(table)}"
