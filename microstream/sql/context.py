"""``ms.SQLContext`` and ``ms.sql``: SQL entry points that mirror Polars'.

A context holds named tables: StreamFrames, LazyFrames and DataFrames registered
from Python (a stream keeps the watermark it was given), tables declared with
``CREATE TABLE`` (:mod:`microstream.sql.ddl`) and views. ``execute`` runs one
statement:

- a query returns a :class:`~microstream.StreamFrame` when it reads at least one
  stream (then any sink verb starts it), a ``pl.LazyFrame`` over static frames
  only (the same text over static frames is the batch oracle);
- ``CREATE TABLE`` / ``CREATE TEMPORARY VIEW`` return None;
- ``INSERT INTO sink SELECT ...`` starts the query and returns its
  :class:`~microstream.StreamingQuery`;
- ``EXPLAIN <query>`` returns a LazyFrame with one ``plan`` line a row.

``ms.sql(query)`` picks the frames a query names from the caller's scope, as
``pl.sql`` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import polars as pl
from sqlglot import exp

from microstream.api.frame import StreamFrame
from microstream.api.query import StreamingQuery
from microstream.exceptions import PlanError
from microstream.plan.physical import explain_lines
from microstream.sql.ddl import TableDeclaration, declare, source_frame, start_sink
from microstream.sql.dialect import Explain, parse
from microstream.sql.functions import ScalarFunction, bind_functions, check_function
from microstream.sql.query import Frame, QueryLowering
from microstream.sql.refusals import refuse

__all__ = ["SQLContext", "sql"]

Result = StreamFrame | pl.LazyFrame | StreamingQuery | None
_FRAMES = (StreamFrame, pl.LazyFrame, pl.DataFrame)


class SQLContext:
    """Run Flink SQL over streams and static frames, as :class:`polars.SQLContext`.

    Parameters
    ----------
    register_globals
        Register the StreamFrames, LazyFrames and DataFrames of the caller's
        global scope (an int: only the last ``n`` of them).
    **frames
        Tables by name.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> bids = ms.MemoryStream({"auction": pl.Int64, "price": pl.Int64}, name="bids")
    >>> ctx = ms.SQLContext(bid=bids.lazy())
    >>> big = ctx.execute("SELECT auction, price * 2 AS doubled FROM bid WHERE price > 10")
    >>> query = big.sink_memory("doc_sql")
    >>> _ = bids.add_data({"auction": [1, 2], "price": [5, 20]})
    >>> query.process_all_available()
    >>> ms.table("doc_sql").rows()
    [(2, 40)]
    >>> query.stop()

    Over static frames only, the result is a LazyFrame:

    >>> ms.SQLContext(t=pl.DataFrame({"x": [1, 2]})).execute("SELECT x + 1 AS y FROM t").collect().rows()
    [(2,), (3,)]
    """

    def __init__(self, register_globals: bool | int = False, **frames: Frame | pl.DataFrame):
        self._frames: dict[str, Frame] = {}
        self._declared: dict[str, TableDeclaration] = {}
        self._sources: dict[str, StreamFrame] = {}
        self._functions: dict[str, ScalarFunction] = {}
        if register_globals:
            caller = inspect.currentframe()
            scope = (
                caller.f_back.f_globals if caller is not None and caller.f_back is not None else {}
            )
            found = [
                (k, v) for k, v in scope.items() if isinstance(v, _FRAMES) and not k.startswith("_")
            ]
            if not isinstance(register_globals, bool):
                found = found[-int(register_globals) :]
            for name, frame in found:
                self.register(name, frame)
        for name, frame in frames.items():
            self.register(name, frame)

    # -- tables ---------------------------------------------------------------------

    def register(self, name: str, frame: Frame | pl.DataFrame) -> SQLContext:
        """Register ``frame`` as table ``name`` (a stream keeps its watermark)."""
        if isinstance(frame, pl.DataFrame):
            frame = frame.lazy()
        if not isinstance(frame, (StreamFrame, pl.LazyFrame)):
            msg = (
                f"SQLContext.register({name!r}, ...): a table is a StreamFrame, LazyFrame or "
                f"DataFrame; got {type(frame).__name__} instead (a MemoryStream's frame is "
                "stream.lazy())"
            )
            raise PlanError(msg)
        self._declared.pop(name, None)
        self._frames[name] = frame
        return self

    def register_function(
        self,
        name: str,
        function: Callable[..., Any],
        return_dtype: pl.DataType | type[pl.DataType],
        *,
        vectorized: bool = False,
    ) -> SQLContext:
        """Register a Python function that queries call as ``name(args)`` (a scalar UDF).

        Flink's ``ScalarFunction``: by default ``function`` is called once per row
        with the arguments' Python values (``None`` for NULL) and returns one value of
        ``return_dtype`` (``map_elements``); with ``vectorized=True`` it is called once
        per micro-batch with one ``pl.Series`` per argument and returns a Series of
        the same length (``pl.map_batches``), each row's value from that row only.
        A name that is a built-in function or a keyword is refused, as is a call
        without arguments.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> ctx = ms.SQLContext(t=pl.DataFrame({"s": ["acc", None]}))
        >>> _ = ctx.register_function("count_char", lambda s, c: (s or "").count(c), pl.Int64)
        >>> ctx.execute("SELECT count_char(s, 'c') AS n FROM t").collect().rows()
        [(2,), (0,)]
        """
        self._functions[name.upper()] = check_function(
            name, function, return_dtype, vectorized=vectorized
        )
        return self

    def unregister(self, names: str | list[str]) -> SQLContext:
        """Forget tables (registered, declared or views) by name."""
        for name in [names] if isinstance(names, str) else names:
            self._frames.pop(name, None)
            self._declared.pop(name, None)
            self._sources.pop(name, None)
        return self

    def tables(self) -> list[str]:
        """The names of the registered and declared tables and views, sorted."""
        return sorted({*self._frames, *self._declared})

    def _resolved(self, statement: exp.Expr) -> dict[str, Frame]:
        tables: dict[str, Frame] = dict(self._frames)
        wanted = {t.name.lower() for t in statement.find_all(exp.Table)}
        from microstream.sql.dialect import TableArgument

        wanted |= {a.this.name.lower() for a in statement.find_all(TableArgument)}
        for name, decl in self._declared.items():
            if name.lower() in wanted:
                if name not in self._sources:
                    self._sources[name] = source_frame(decl)
                tables[name] = self._sources[name]
        return tables

    # -- statements -----------------------------------------------------------------

    def execute(self, query: str) -> Result:
        """Run one statement; see the module docstring for what each kind returns."""
        statements = parse(query)
        if len(statements) != 1:
            msg = (
                f"SQLContext.execute runs one statement; got {len(statements)}. Use "
                "execute_script for several"
            )
            raise PlanError(msg)
        return self._statement(statements[0])

    def execute_script(self, script: str) -> list[Result]:
        """Run the ``;``-separated statements of ``script`` in order; their results."""
        return [self._statement(s) for s in parse(script)]

    def _statement(self, statement: exp.Expr) -> Result:
        statement = bind_functions(statement, self._functions)
        if isinstance(statement, Explain):
            frame = self._query(statement.this)
            lines = (
                explain_lines(frame.plan)
                if isinstance(frame, StreamFrame)
                else frame.explain().splitlines()
            )
            return pl.LazyFrame({"plan": lines})
        if isinstance(statement, exp.Create):
            kind = (statement.args.get("kind") or "").upper()
            if kind == "VIEW":
                name = statement.this.name
                self._frames[name] = self._query(statement.expression)
                return None
            if kind == "TABLE":
                if statement.expression is not None:
                    raise refuse(
                        statement,
                        "CREATE TABLE ... AS SELECT",
                        alternative="CREATE TABLE, then INSERT INTO",
                    )
                decl = declare(statement)
                self._frames.pop(decl.name, None)
                self._sources.pop(decl.name, None)
                self._declared[decl.name] = decl
                return None
            raise refuse(statement, f"CREATE {kind}")
        if isinstance(statement, exp.Insert):
            target = statement.this
            if isinstance(target, exp.Schema):
                raise refuse(
                    target,
                    "INSERT INTO t (columns)",
                    alternative="select the columns in the table's order",
                )
            name = target.name
            sink_decl = next(
                (d for n, d in self._declared.items() if n.lower() == name.lower()), None
            )
            if sink_decl is None:
                msg = (
                    f"INSERT INTO {name}: no sink table {name!r}; sink_declare it with CREATE TABLE "
                    f"{name} (...) WITH ('connector' = 'print' | 'blackhole' | 'memory' | "
                    "'filesystem' | 'delta' | 'kafka', ...)"
                )
                raise PlanError(msg)
            frame = self._query(statement.expression)
            if not isinstance(frame, StreamFrame):
                raise refuse(
                    statement,
                    "INSERT INTO from static tables only",
                    alternative="write a static result with Polars' write_* functions",
                )
            return start_sink(sink_decl, frame, statement)
        if isinstance(statement, (exp.Select, exp.Union, exp.Subquery, exp.Intersect, exp.Except)):
            return self._query(statement)
        raise refuse(statement, f"statement {type(statement).__name__.upper()}")

    def _query(self, node: exp.Expr) -> Frame:
        return QueryLowering(self._resolved(node)).query(node).frame


def sql(query: str, *, tables: Mapping[str, Any] | None = None) -> StreamFrame | pl.LazyFrame:
    """Run a SQL query over the StreamFrames, LazyFrames and DataFrames in the caller's scope.

    As :func:`polars.sql`: the tables a query names are looked up among the
    variables of the calling function, then of its callers, then the globals.

    ``microstream.sql.sql`` (``ms.sql``) is the public entry, which calls this.
    """
    statements = parse(query)
    if len(statements) != 1:
        msg = f"ms.sql runs one query; got {len(statements)} statements. Use ms.SQLContext for DDL"
        raise PlanError(msg)
    statement = statements[0]
    wanted = {t.name for t in statement.find_all(exp.Table)}
    from microstream.sql.dialect import TableArgument

    wanted |= {a.this.name for a in statement.find_all(TableArgument)}
    found: dict[str, Any] = dict(tables or {})
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    while caller is not None and len(found) < len(wanted):
        for scope in (caller.f_locals, caller.f_globals):
            for name in wanted - set(found):
                value = scope.get(name)
                if isinstance(value, _FRAMES):
                    found[name] = value
        caller = caller.f_back
    context = SQLContext(**found)
    result = context._statement(statement)
    if not isinstance(result, (StreamFrame, pl.LazyFrame)):
        msg = "ms.sql runs queries; use ms.SQLContext().execute for CREATE TABLE, views and INSERT INTO"
        raise PlanError(msg)
    return result
