"""Streaming SQL in Flink's dialect, lowered to StreamFrame verbs.

``ms.SQLContext`` and ``ms.sql`` (:mod:`microstream.sql.context`) parse with sqlglot
(:mod:`~microstream.sql.dialect`), declare tables (:mod:`~microstream.sql.ddl`),
lower expressions (:mod:`~microstream.sql.expressions`), queries
(:mod:`~microstream.sql.query`) and windows (:mod:`~microstream.sql.windows`), and
refuse what has no exact operator (:mod:`~microstream.sql.refusals`). Needs the
``sql`` extra (sqlglot), imported on first use so that ``import microstream`` does
not need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

    from microstream.api.frame import StreamFrame
    from microstream.sql.context import SQLContext

__all__ = ["SQLContext", "sql"]


def sql(query: str, *, tables: Mapping[str, Any] | None = None) -> StreamFrame | pl.LazyFrame:
    """Run a SQL query over the StreamFrames, LazyFrames and DataFrames in the caller's scope.

    As :func:`polars.sql`: the tables a query names are looked up among the
    variables of the calling function, then of its callers, then the globals;
    ``tables`` names more. A query over a stream returns a StreamFrame, over static
    frames only a LazyFrame.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> prices = pl.DataFrame({"item": ["a", "b"], "price": [3, 7]})
    >>> ms.sql("SELECT item FROM prices WHERE price > 5").collect().rows()
    [('b',)]
    """
    from microstream.sql.context import sql as run

    return run(query, tables=tables)


def __getattr__(name: str) -> Any:
    if name == "SQLContext":
        from microstream.sql.context import SQLContext

        return SQLContext
    msg = f"module 'microstream.sql' has no attribute {name!r}"
    raise AttributeError(msg)
