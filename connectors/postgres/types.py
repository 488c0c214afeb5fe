"""PostgreSQL types and polars dtypes, both ways.

Reading (the CDC source): a table's columns are read from the catalog once, at
plan time, and each PostgreSQL type maps to a polars dtype; a change's values
arrive as their text form and are cast column by column in bulk
(:func:`text_to_dtype`). Writing (the sink): each polars dtype maps to the
PostgreSQL type a new table gets (:func:`pg_type_for`) and to the types an
existing table's column may have (:func:`accepts`).

Types without a polars counterpart (arrays, ranges, intervals, geometric types,
enums, ...) are read as their PostgreSQL text form (``String``).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from connectors.postgres.client import PgColumn
from microstream.exceptions import SchemaMismatchError

__all__ = ["accepts", "dtype_for", "pg_type_for", "text_to_dtype"]


_READ_DTYPES: dict[str, pl.DataType] = {
    "int2": pl.Int16(),
    "int4": pl.Int32(),
    "int8": pl.Int64(),
    "oid": pl.UInt32(),
    "float4": pl.Float32(),
    "float8": pl.Float64(),
    "bool": pl.Boolean(),
    "date": pl.Date(),
    "time": pl.Time(),
    "timestamp": pl.Datetime("us"),
    "timestamptz": pl.Datetime("us", "UTC"),
    "bytea": pl.Binary(),
}


def dtype_for(column: PgColumn) -> pl.DataType:
    """The polars dtype a PostgreSQL column is read as.

    ``numeric(p, s)`` with ``p <= 38`` is ``Decimal(p, s)``; a ``numeric``
    without precision (or wider) is ``String``, its exact text, since no polars
    dtype holds every such value. Text-like and unknown types are ``String``.

    Examples
    --------
    >>> dtype_for(PgColumn("n", "numeric", "numeric(10,2)", 655366, False, False))
    Decimal(precision=10, scale=2)
    >>> dtype_for(PgColumn("t", "timestamptz", "timestamp with time zone", -1, False, False))
    Datetime(time_unit='us', time_zone='UTC')
    """
    if column.type_name == "numeric" and column.typmod >= 4:
        precision = ((column.typmod - 4) >> 16) & 0xFFFF
        scale = (column.typmod - 4) & 0xFFFF
        if 0 < precision <= 38:
            return pl.Decimal(precision, scale)
        return pl.String()
    return _READ_DTYPES.get(column.type_name, pl.String())


def text_to_dtype(name: str, dtype: pl.DataType) -> pl.Expr:
    """Cast column ``name``, holding PostgreSQL's text form of values, to ``dtype``, in bulk.

    The text is what the server prints under :data:`connectors.postgres.client.SESSION_SETTINGS`
    (timestamps ``2024-01-01 08:00:00.5+00``, booleans ``true``, bytea as hex).

    Examples
    --------
    >>> df = pl.DataFrame({"t": ["2024-01-01 08:00:00.5+00", None], "b": ["true", "false"]})
    >>> df.select(
    ...     text_to_dtype("t", pl.Datetime("us", "UTC")), text_to_dtype("b", pl.Boolean())
    ... ).rows()  # doctest: +NORMALIZE_WHITESPACE
    [(datetime.datetime(2024, 1, 1, 8, 0, 0, 500000, tzinfo=zoneinfo.ZoneInfo(key='UTC')), True),
     (None, False)]
    """
    col = pl.col(name)
    if dtype == pl.String:
        return col
    if dtype == pl.Boolean:
        return (col == "true").alias(name)
    if dtype == pl.Date:
        return col.str.to_date("%Y-%m-%d")
    if dtype == pl.Time:
        return col.str.to_time("%H:%M:%S%.f")
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            parsed = col.str.to_datetime("%Y-%m-%d %H:%M:%S%.f%#z", time_unit="us")
            return parsed.dt.convert_time_zone("UTC").alias(name)
        return col.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us")
    if dtype == pl.Binary:
        return col.str.strip_prefix("\\x").str.decode("hex")
    return col.cast(dtype)


# -- writing: polars dtypes as PostgreSQL types ------------------------------------------------


def pg_type_for(name: str, dtype: pl.DataType) -> str:
    """The PostgreSQL type a new table's column gets for a polars dtype.

    Raises
    ------
    SchemaMismatchError
        A nested or otherwise unsupported dtype (lists, structs, durations, objects).

    Examples
    --------
    >>> pg_type_for("x", pl.Int64()), pg_type_for("t", pl.Datetime("us", "UTC"))
    ('bigint', 'timestamp with time zone')
    >>> pg_type_for("p", pl.Decimal(10, 2))
    'numeric(10,2)'
    """
    if isinstance(dtype, pl.Decimal):
        return f"numeric({dtype.precision},{dtype.scale})" if dtype.precision else "numeric"
    if isinstance(dtype, pl.Datetime):
        return "timestamp with time zone" if dtype.time_zone else "timestamp without time zone"
    for polars_type, (created, _) in _WRITE_TYPES.items():
        if dtype == polars_type:
            return created
    msg = (
        f"column {name!r} has dtype {dtype}, which sink_postgres cannot write: it writes "
        "numbers, booleans, strings, dates, times, datetimes, decimals and binary; "
        "convert it first (e.g. .struct.json_encode() for a struct, cast a list to a string)"
    )
    raise SchemaMismatchError(msg)


_WRITE_TYPES: dict[Any, tuple[str, frozenset[str]]] = {
    # dtype: (type of a new column, types an existing column may have)
    pl.Int8: ("smallint", frozenset({"smallint", "integer", "bigint", "numeric"})),
    pl.Int16: ("smallint", frozenset({"smallint", "integer", "bigint", "numeric"})),
    pl.UInt8: ("smallint", frozenset({"smallint", "integer", "bigint", "numeric"})),
    pl.Int32: ("integer", frozenset({"integer", "bigint", "numeric"})),
    pl.UInt16: ("integer", frozenset({"integer", "bigint", "numeric"})),
    pl.Int64: ("bigint", frozenset({"bigint", "numeric"})),
    pl.UInt32: ("bigint", frozenset({"bigint", "numeric"})),
    pl.UInt64: ("numeric(20,0)", frozenset({"numeric"})),
    pl.Float32: ("real", frozenset({"real", "double precision"})),
    pl.Float64: ("double precision", frozenset({"double precision"})),
    pl.Boolean: ("boolean", frozenset({"boolean"})),
    pl.String: (
        "text",
        frozenset({"text", "character varying", "character", "json", "jsonb", "uuid", "citext"}),
    ),
    pl.Categorical: ("text", frozenset({"text", "character varying", "character"})),
    pl.Date: ("date", frozenset({"date", "timestamp without time zone"})),
    pl.Time: ("time without time zone", frozenset({"time without time zone"})),
    pl.Binary: ("bytea", frozenset({"bytea"})),
    pl.Null: ("text", frozenset()),  # a column of nulls fits any type
}


def accepts(column: PgColumn, dtype: pl.DataType) -> bool:
    """Whether an existing column can take a batch column of ``dtype`` without loss.

    Examples
    --------
    >>> col = PgColumn("n", "int4", "integer", -1, False, False)
    >>> accepts(col, pl.Int32()), accepts(col, pl.Int64()), accepts(col, pl.String())
    (True, False, False)
    """
    base = column.formatted.split("(", 1)[0].strip()
    if dtype == pl.Null:
        return True
    if isinstance(dtype, pl.Decimal):
        return base == "numeric"
    if isinstance(dtype, pl.Datetime):
        wanted = "timestamp with time zone" if dtype.time_zone else "timestamp without time zone"
        return base == wanted
    for polars_type, (_, allowed) in _WRITE_TYPES.items():
        if dtype == polars_type:
            return base in allowed
    return False
