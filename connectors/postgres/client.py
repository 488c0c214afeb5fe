"""The PostgreSQL connector's connections and catalog look-ups.

Every connection gets :data:`SESSION_SETTINGS`, so values are printed and
parsed in one known form whatever the server's defaults; ``psycopg`` (3) is
imported only when a connection is made (``pip install 'microstream[postgres]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microstream.exceptions import MissingDependencyError

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "SESSION_SETTINGS",
    "PgColumn",
    "connect",
    "qualified_name",
    "require_psycopg",
    "table_columns",
]


SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}
"""Settings of every connection: values are printed (by wal2json, which calls the types'
output functions in this session) and parsed in one known form."""


def require_psycopg() -> None:
    """Fail with the ``pip install`` to run when psycopg is missing."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        msg = (
            "the PostgreSQL connector needs psycopg 3, which is not installed: "
            "pip install 'microstream[postgres]'"
        )
        raise MissingDependencyError(msg) from exc


def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A connection to ``dsn`` with :data:`SESSION_SETTINGS` (libpq's ``options``)."""
    require_psycopg()
    import psycopg

    options = " ".join(
        f"-c {key}={value.replace(' ', '')}" for key, value in SESSION_SETTINGS.items()
    )
    return psycopg.connect(dsn, autocommit=autocommit, options=options)


def qualified_name(table: str) -> tuple[str, str]:
    """``(schema, table)`` of ``"schema.table"`` or ``"table"`` (schema ``public``).

    Examples
    --------
    >>> qualified_name("orders"), qualified_name("shop.orders")
    (('public', 'orders'), ('shop', 'orders'))
    """
    if not isinstance(table, str) or not table or table.startswith(".") or table.endswith("."):
        msg = f"a table name must be 'table' or 'schema.table'; got {table!r}"
        raise ValueError(msg)
    schema, dot, name = table.partition(".")
    return (schema, name) if dot else ("public", table)


@dataclass(frozen=True)
class PgColumn:
    """One column of a table, as the catalog describes it."""

    name: str
    type_name: str
    """``pg_type.typname``: ``int4``, ``timestamptz``, ``_int4`` (an array), ..."""
    formatted: str
    """``format_type()``: ``integer``, ``numeric(10,2)``, ``timestamp with time zone``."""
    typmod: int
    not_null: bool
    has_default: bool


def table_columns(conn: psycopg.Connection[Any], schema: str, table: str) -> list[PgColumn] | None:
    """The columns of ``schema.table`` in table order, or None if there is no such table."""
    rows = conn.execute(
        """
        SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod), a.atttypmod,
               a.attnotnull, a.atthasdef
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (schema, table),
    ).fetchall()
    if not rows:
        return None
    return [PgColumn(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
