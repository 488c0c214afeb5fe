"""Scalar user-defined functions: Python functions a SQL query calls by name.

Flink registers a ``ScalarFunction`` under a name (``CREATE FUNCTION count_char AS
'...'``) and calls its ``eval`` once per row; here
:meth:`~microstream.SQLContext.register_function` registers a Python function with
the dtype it returns, and a call ``count_char(extra, 'c')`` in any expression of a
query lowers to a Polars expression:

- by default ``function(*values)`` once per row with Python values (``None`` for a
  SQL NULL, as Flink passes null to ``eval``), through ``map_elements`` over a struct
  of the arguments;
- with ``vectorized=True``, ``function(*series)`` once per micro-batch with one
  ``pl.Series`` per argument (constants broadcast to the batch's length), through
  ``pl.map_batches``; it must return a Series of the same length, each row's value
  depending on that row only (the stream splits rows into batches arbitrarily).

The names are resolved before the statement is lowered: :func:`bind_functions`
replaces each call of a registered name by a :class:`FunctionCall` node that holds
the function, so every expression position (SELECT, WHERE, GROUP BY, ON, DEFINE)
can call one. A registered name shadows no built-in: registering ``UPPER`` is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl
from sqlglot import exp

from microstream.exceptions import PlanError
from microstream.sql.dialect import parse

__all__ = ["FunctionCall", "ScalarFunction", "bind_functions", "call_expr", "check_function"]


@dataclass(frozen=True)
class ScalarFunction:
    """A registered scalar function: its SQL name, the Python callable, its result dtype."""

    name: str
    function: Callable[..., Any]
    return_dtype: pl.DataType
    vectorized: bool = False


class FunctionCall(exp.Anonymous):
    """A call of a registered :class:`ScalarFunction` (printed back as ``name(args)``)."""

    arg_types = {**exp.Anonymous.arg_types, "function": False}


BUILTIN_CALLS = frozenset(
    {"HOUR", "MINUTE", "SECOND", "DATE_FORMAT", "SPLIT_INDEX", "CHAR_LENGTH", "PROCTIME",
     "TUMBLE", "HOP", "SESSION", "CUMULATE", "TABLE", "NOW", "CURRENT_TIMESTAMP",
     "LOCALTIMESTAMP", "RAND", "MATCH_NUMBER", "CLASSIFIER", "MATCH_ROWTIME", "MATCH_PROCTIME",
     "FIRST", "LAST", "PREV", "NEXT"}
    | {f"{kind}_{part}" for kind in ("TUMBLE", "HOP", "SESSION")
       for part in ("START", "END", "ROWTIME")}
)  # fmt: skip
"""Names the lowering reads as calls of its own (not sqlglot functions): not registrable."""


def check_function(
    name: str, function: Any, return_dtype: Any, *, vectorized: bool
) -> ScalarFunction:
    """A :class:`ScalarFunction`, or a PlanError naming what is wrong with the arguments."""
    if not name.isidentifier():
        msg = f"register_function: the name must be a SQL identifier; got {name!r} instead"
        raise PlanError(msg)
    try:
        call = parse(f"SELECT {name}(x)")[0].expressions[0]
    except PlanError:
        call = None
    if not isinstance(call, exp.Anonymous) or name.upper() in BUILTIN_CALLS:
        msg = (
            f"register_function({name!r}, ...): {name.upper()} is a SQL keyword or built-in "
            "function; register the Python function under another name"
        )
        raise PlanError(msg)
    if not callable(function):
        msg = f"register_function({name!r}, ...): the function must be callable; got {function!r}"
        raise PlanError(msg)
    dtype = return_dtype
    if isinstance(dtype, type) and issubclass(dtype, pl.DataType):
        dtype = dtype()
    if not isinstance(dtype, pl.DataType):
        msg = (
            f"register_function({name!r}, ...): return_dtype must be a Polars dtype "
            f"(pl.Int64, pl.String, ...); got {return_dtype!r} instead"
        )
        raise PlanError(msg)
    return ScalarFunction(name, function, dtype, vectorized)


def bind_functions(statement: exp.Expr, functions: Mapping[str, ScalarFunction]) -> exp.Expr:
    """``statement`` with every call of a registered function a :class:`FunctionCall`."""
    if not functions:
        return statement
    by_name = {name.upper(): f for name, f in functions.items()}

    def bind(node: exp.Expr) -> exp.Expr:
        if isinstance(node, exp.Anonymous) and not isinstance(node, FunctionCall):
            found = by_name.get(node.name.upper())
            if found is not None:
                call = FunctionCall(this=node.this, expressions=node.expressions, function=found)
                if node.meta:
                    call.meta.update(node.meta)
                return call
        return node

    return statement.transform(bind)


def call_expr(function: ScalarFunction, args: list[pl.Expr]) -> pl.Expr:
    """The Polars expression of ``function(*args)``.

    Examples
    --------
    >>> import polars as pl
    >>> count = ScalarFunction("count_char", lambda s, c: (s or "").count(c), pl.Int64())
    >>> df = pl.DataFrame({"s": ["acc", None]})
    >>> df.select(call_expr(count, [pl.col("s"), pl.lit("c")]).alias("n")).rows()
    [(2,), (0,)]
    """
    fields = [a.alias(f"__{i}") for i, a in enumerate(args)]
    fn = function.function
    if function.vectorized:
        return pl.map_batches(
            fields, lambda series: fn(*series), return_dtype=function.return_dtype
        )
    return pl.struct(fields).map_elements(
        lambda row: fn(*row.values()), return_dtype=function.return_dtype
    )
