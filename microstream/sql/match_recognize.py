"""``MATCH_RECOGNIZE`` in SQL, lowered onto :meth:`StreamFrame.match_recognize`.

Flink's clause (``PARTITION BY``, ``ORDER BY``, ``MEASURES``, ``ONE ROW PER MATCH``,
``AFTER MATCH SKIP ...``, ``PATTERN (...)``, ``WITHIN INTERVAL ...``, ``DEFINE``) is
parsed by the dialect (:class:`~microstream.sql.dialect.MatchRecognize`); here each
part becomes an argument of the verb:

- ``PARTITION BY k`` -> ``partition_by``; ``ORDER BY ts`` -> ``order_by``, which must
  be the input's watermarked event-time column (ascending, alone); over static
  frames any column, and the clause runs over all the rows at once
  (:func:`~microstream.api.match_recognize.match_recognize_static`): the batch result
  of the same text;
- ``PATTERN (...)`` -> ``pattern``, its text unchanged (the verb's grammar is SQL's);
- ``WITHIN INTERVAL '1' MINUTE`` -> ``within``;
- ``AFTER MATCH SKIP PAST LAST ROW | TO NEXT ROW | TO FIRST v | TO [LAST] v`` ->
  ``after_match``; without the clause, ``SKIP TO NEXT ROW``, as Flink (Calcite) does;
- ``DEFINE`` and ``MEASURES`` expressions are lowered by
  :class:`~microstream.sql.expressions.ExpressionLowering`, with pattern references
  substituted by :mod:`microstream.api.pattern`'s columns: ``A.price`` is
  ``LAST(A.price)`` (in ``A``'s own DEFINE, the current row); ``FIRST``/``LAST``,
  ``PREV(col, n)`` and ``COUNT``/``SUM``/``AVG``/``MIN``/``MAX`` over ``A.col`` or
  ``col`` are ``pattern.first("A.col")`` and its siblings. A plain ``col`` is the
  current row in DEFINE and the match's last row in MEASURES.

``ALL ROWS PER MATCH`` -> ``rows_per_match="all"``; ``CLASSIFIER()`` and
``MATCH_NUMBER()`` in MEASURES -> ``pattern.classifier()``/``pattern.match_number()``;
``NEXT(col, n)`` (or ``NEXT(A.col, n)`` in ``A``'s own DEFINE) -> ``pattern.next``.

What the verb does not do is refused by name and position: ``MATCH_ROWTIME()``/
``MATCH_PROCTIME()``, ``CLASSIFIER()``/``MATCH_NUMBER()`` in DEFINE, ``NEXT`` in
MEASURES or of another variable, logical offsets (``FIRST(A.price, 2)``), aggregates
of expressions, and an ``ORDER BY`` that is not the watermarked column.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import polars as pl
from sqlglot import exp

from microstream.api import pattern as mp
from microstream.api.frame import StreamFrame
from microstream.api.match_recognize import match_recognize_static
from microstream.exceptions import PlanError
from microstream.operators.pattern import parse_pattern, variables
from microstream.operators.pattern_refs import reference_name
from microstream.sql.dialect import MatchRecognize
from microstream.sql.expressions import ExpressionLowering, interval_of, sql_text
from microstream.sql.refusals import position, refuse
from microstream.sql.relation import Frame, Relation, fields_of

__all__ = ["lower_match_recognize"]

_UNSUPPORTED_FUNCTIONS = {
    "MATCH_ROWTIME": "MATCH_ROWTIME()",
    "MATCH_PROCTIME": "MATCH_PROCTIME()",
}
_MEASURES_ONLY = {"CLASSIFIER": mp.classifier, "MATCH_NUMBER": mp.match_number}
_AGGREGATES: dict[type[exp.Expr], str] = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Avg: "avg",
    exp.Min: "min",
    exp.Max: "max",
}


def _at(node: exp.Expr) -> str:
    where = position(node)
    return f" (line {where[0]}, column {where[1]})" if where else ""


def lower_match_recognize(rel: Relation, match: MatchRecognize) -> Relation:
    """The relation ``rel MATCH_RECOGNIZE (...) [AS alias]``: one row per match, the
    partition columns then the measures, visible as ``alias.column``.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> ticks = ms.MemoryStream({"ts": pl.Datetime("us"), "sym": pl.String, "price": pl.Int64})
    >>> ctx = ms.SQLContext(ticks=ticks.lazy().with_watermark("ts", "5s"))
    >>> dips = ctx.execute(
    ...     "SELECT * FROM ticks MATCH_RECOGNIZE (PARTITION BY sym ORDER BY ts "
    ...     "MEASURES FIRST(A.price) AS top, LAST(B.price) AS bottom "
    ...     "PATTERN (A B+ C) DEFINE B AS B.price < PREV(B.price), C AS C.price > PREV(C.price)) AS m"
    ... )
    >>> dips.columns
    ['sym', 'top', 'bottom']
    """
    frame = rel.frame
    rows = match.args.get("rows")
    # SHOW/OMIT EMPTY MATCHES agree: a pattern that can match no rows is refused.
    every = rows is not None and rows.name.upper().startswith("ALL ROWS PER MATCH")
    pattern_node = match.args.get("pattern")
    if pattern_node is None:
        raise refuse(match, "MATCH_RECOGNIZE without PATTERN", alternative="add PATTERN (...)")
    pattern = pattern_node.name
    try:
        names = set(variables(parse_pattern(pattern)))
    except PlanError as exc:
        msg = f"MATCH_RECOGNIZE PATTERN{_at(pattern_node)}: {exc}"
        raise PlanError(msg) from None
    for item in match.args.get("define") or []:
        if isinstance(item, exp.Alias) and item.alias not in names:
            msg = (
                f"SQL: DEFINE {item.alias}{_at(item)} names no variable of PATTERN ({pattern}); "
                f"its variables are {sorted(names)}"
            )
            raise PlanError(msg)
    lowering = _Lowering(rel, names)
    partition_by = [lowering.partition_column(p) for p in match.args.get("partition_by") or []]
    order_by = lowering.order_column(match)
    define: dict[str, pl.Expr] = {}
    for item in match.args.get("define") or []:
        if not isinstance(item, exp.Alias):
            raise refuse(
                item, f"DEFINE {sql_text(item)}", alternative="write DEFINE A AS condition"
            )
        define[item.alias] = lowering.lower(item.this, defining=item.alias)
    measures: dict[str, pl.Expr] = {}
    for item in match.args.get("measures") or []:
        named = item.this
        if not isinstance(named, exp.Alias):
            raise refuse(
                item, f"MEASURES {sql_text(item)} without a name", alternative="add AS name"
            )
        if every and (item.args.get("window_frame") or "").upper() == "FINAL":
            # ALL ROWS PER MATCH measures are running: FINAL would need the match's end
            raise refuse(item, "FINAL in ALL ROWS PER MATCH")
        measures[named.alias] = lowering.lower(named.this, defining=None)
    if not measures:
        raise refuse(
            match, "MATCH_RECOGNIZE without MEASURES", alternative="add MEASURES expr AS name"
        )
    within_node = match.args.get("within")
    within: timedelta | None = interval_of(within_node) if within_node is not None else None
    arguments: dict[str, Any] = {
        "partition_by": partition_by,
        "order_by": order_by,
        "pattern": pattern,
        "define": define,
        "measures": measures,
        "after_match": _after_match(match),
        "within": within,
        "rows_per_match": "all" if every else "one",
    }
    try:
        out: Frame = (
            frame.match_recognize(**arguments)
            if isinstance(frame, StreamFrame)
            # over static frames: every match of all the rows at once, the batch result
            else match_recognize_static(frame, **arguments)
        )
    except PlanError as exc:
        msg = f"MATCH_RECOGNIZE{_at(match)}: {exc}"
        raise PlanError(msg) from None
    alias = match.args.get("alias")
    return Relation(out, fields_of(out, alias.name if alias is not None else None))


def _after_match(match: MatchRecognize) -> str:
    after = match.args.get("after")
    if after is None:
        return "skip_to_next_row"  # Flink's default (Calcite's), unlike the verb's
    words = after.name.split()[3:]  # after AFTER MATCH SKIP
    if words == ["PAST", "LAST", "ROW"]:
        return "skip_past_last_row"
    if words == ["TO", "NEXT", "ROW"]:
        return "skip_to_next_row"
    return f"skip_to_{words[1].lower()}:{words[2]}"


class _Lowering:
    """DEFINE and MEASURES expressions over ``rel``'s columns and pattern ``variables``."""

    def __init__(self, rel: Relation, variables: set[str]):
        self.rel = rel
        self.variables = variables
        self.schema = rel.frame.collect_schema()

    def column(self, node: exp.Column) -> str:
        """The input column ``node`` names, without its pattern variable."""
        if node.table not in self.variables:
            return self.rel.scope.column_of(node)
        bare = node.copy()
        bare.set("table", None)
        try:
            return self.rel.scope.column_of(bare)
        except PlanError:
            msg = (
                f"SQL: {sql_text(node)}{_at(node)} reads column {node.name!r} of the rows of "
                f"pattern variable {node.table}; the input's columns are {list(self.schema)}"
            )
            raise PlanError(msg) from None

    def partition_column(self, node: exp.Expr) -> str:
        if not isinstance(node, exp.Column):
            raise refuse(
                node,
                "MATCH_RECOGNIZE PARTITION BY an expression",
                alternative="compute it as a column in a subquery and partition by that",
            )
        return self.column(node)

    def order_column(self, match: MatchRecognize) -> str:
        order = match.args.get("order")
        items = order.expressions if order is not None else []
        if not items:
            raise refuse(
                match,
                "MATCH_RECOGNIZE without ORDER BY",
                alternative="ORDER BY the watermarked event-time column",
            )
        first = items[0]
        if len(items) > 1:
            raise refuse(
                items[1],
                "MATCH_RECOGNIZE ORDER BY more than one column",
                reason="rows with equal event times are taken in arrival order",
                alternative="ORDER BY the event-time column alone",
            )
        if first.args.get("desc"):
            raise refuse(
                first,
                "MATCH_RECOGNIZE ORDER BY ... DESC",
                reason="rows are matched in ascending event time",
            )
        frame = self.rel.frame
        column = self.column(first.this) if isinstance(first.this, exp.Column) else None
        if not isinstance(frame, StreamFrame):
            if column is None:
                raise refuse(first, "MATCH_RECOGNIZE ORDER BY an expression")
            return column  # static rows are all there: any column orders them
        watermarked = [n.column for n in frame.plan.watermark_nodes()]
        if column is None or column not in watermarked:
            raise refuse(first, "MATCH_RECOGNIZE ORDER BY a column without a watermark")
        return column

    def lower(self, node: exp.Expr, *, defining: str | None) -> pl.Expr:
        def substitute(part: exp.Expr) -> pl.Expr | None:
            return self.reference(part, defining)

        return ExpressionLowering(self.rel.scope, self.schema, substitute).lower(node)

    def target(self, node: exp.Expr, call: exp.Expr) -> tuple[str | None, str]:
        """The pattern variable (None: every row) and input column of ``A.col``/``col``."""
        if not isinstance(node, exp.Column) or isinstance(node.this, exp.Star):
            raise refuse(
                call,
                f"{sql_text(call)} over an expression",
                reason="navigation and aggregates in MATCH_RECOGNIZE read a column",
                alternative="write it over columns, as FIRST(A.price) * 2 or SUM(A.price)",
            )
        variable = node.table if node.table in self.variables else None
        return variable, self.column(node)

    def reference(self, node: exp.Expr, defining: str | None) -> pl.Expr | None:
        if isinstance(node, exp.Anonymous) and node.name.upper() in _UNSUPPORTED_FUNCTIONS:
            raise refuse(node, _UNSUPPORTED_FUNCTIONS[node.name.upper()])
        if isinstance(node, exp.Anonymous) and node.name.upper() in _MEASURES_ONLY:
            if defining is not None:
                raise refuse(node, f"{node.name.upper()}() in DEFINE")
            if node.expressions:
                raise refuse(node, f"{sql_text(node)}", alternative=f"{node.name.upper()}()")
            return _MEASURES_ONLY[node.name.upper()]()
        if isinstance(node, exp.Anonymous) and node.name.upper() == "NEXT":
            return self.next(node, defining)
        if isinstance(node, exp.Column) and node.table in self.variables:
            if isinstance(node.this, exp.Star):
                raise refuse(node, f"{sql_text(node)} outside COUNT")
            column = self.column(node)
            # In A's own DEFINE, A.col is the row being tried as A: the current row.
            if node.table == defining:
                return pl.col(column)
            return mp.last(f"{node.table}.{column}")
        if isinstance(node, (exp.First, exp.Last)):
            offset = node.args.get("expression")
            if offset is not None and not (isinstance(offset, exp.Literal) and offset.name == "0"):
                raise refuse(node, "logical offset")
            variable, column = self.target(node.this, node)
            if isinstance(node, exp.Last) and variable in (None, defining):
                return pl.col(column)  # the current row (DEFINE), the last row (MEASURES)
            argument = f"{variable}.{column}" if variable else column
            return mp.first(argument) if isinstance(node, exp.First) else mp.last(argument)
        if isinstance(node, exp.Anonymous) and node.name.upper() == "PREV":
            return self.prev(node, defining)
        if isinstance(node, tuple(_AGGREGATES)):
            return self.aggregate(node)
        return None

    def prev(self, node: exp.Anonymous, defining: str | None) -> pl.Expr:
        args = node.expressions
        n = 1
        if len(args) == 2:
            literal = args[1]
            if not (isinstance(literal, exp.Literal) and not literal.is_string):
                raise refuse(node, f"{sql_text(node)} with an offset that is not a number")
            n = int(literal.name)
        elif len(args) != 1:
            raise refuse(
                node, f"{sql_text(node)}", alternative="write PREV(A.col) or PREV(A.col, n)"
            )
        variable, column = self.target(args[0], node)
        if variable == defining:
            variable = None  # in A's DEFINE, A's last row is the current row
        if n == 0:
            return pl.col(column) if variable is None else mp.last(f"{variable}.{column}")
        return mp.prev(f"{variable}.{column}" if variable else column, n)

    def next(self, node: exp.Anonymous, defining: str | None) -> pl.Expr:
        if defining is None:
            raise refuse(node, "NEXT in MEASURES")
        args = node.expressions
        n = 1
        if len(args) == 2:
            literal = args[1]
            if not (isinstance(literal, exp.Literal) and literal.is_int):
                raise refuse(node, f"{sql_text(node)} with an offset that is not a number")
            n = int(literal.name)
        elif len(args) != 1:
            raise refuse(
                node, f"{sql_text(node)}", alternative="write NEXT(A.col) or NEXT(A.col, n)"
            )
        variable, column = self.target(args[0], node)
        if variable not in (None, defining):
            raise refuse(node, "NEXT of another pattern variable")
        if n == 0:
            return pl.col(column)
        return mp.next(column, n)

    def aggregate(self, node: exp.Expr) -> pl.Expr:
        function = _AGGREGATES[type(node)]
        arg = node.this
        if isinstance(arg, exp.Distinct):
            raise refuse(node, f"{sql_text(node)}", alternative="aggregate without DISTINCT")
        if isinstance(node, exp.Count):
            if arg is None or isinstance(arg, exp.Star):
                return mp.count()
            if isinstance(arg, exp.Column) and isinstance(arg.this, exp.Star):
                if arg.table not in self.variables:
                    msg = (
                        f"SQL: {sql_text(node)}{_at(node)} names no pattern variable; the "
                        f"pattern's variables are {sorted(self.variables)}"
                    )
                    raise PlanError(msg)
                return mp.count(arg.table)
        variable, column = self.target(arg, node)
        argument = f"{variable}.{column}" if variable else column
        return pl.col(reference_name(function, argument))
