"""Lowering SQL expressions to Polars expressions, over a scope of named columns.

A :class:`Scope` says which columns a query's ``FROM`` makes visible (``b.price``,
``price``) and which frame column holds each. :class:`ExpressionLowering` turns a
row-wise SQL expression into a ``pl.Expr`` with Flink's semantics: integer
division truncates, ``SUBSTRING`` counts from 1, ``LIKE`` matches the whole
string, ``DATE_FORMAT`` takes Java's pattern letters. A function or construct
with no exact Polars counterpart is refused by name (:mod:`microstream.sql.refusals`);
aggregates are lowered by the query lowering, which hands them in through
``substitute``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import polars as pl
from sqlglot import exp

from microstream.exceptions import PlanError
from microstream.sql.dialect import Descriptor, TableArgument
from microstream.sql.functions import FunctionCall, call_expr
from microstream.sql.refusals import position, refuse

__all__ = [
    "AGGREGATES",
    "ExpressionLowering",
    "Field",
    "Scope",
    "interval_of",
    "polars_type",
    "sql_text",
]

AGGREGATES = (exp.Count, exp.Sum, exp.Min, exp.Max, exp.Avg)

_UNITS = {
    "MILLISECOND": timedelta(milliseconds=1),
    "SECOND": timedelta(seconds=1),
    "MINUTE": timedelta(minutes=1),
    "HOUR": timedelta(hours=1),
    "DAY": timedelta(days=1),
}

_JAVA_DATE_LETTERS = {
    "yyyy": "%Y",
    "yy": "%y",
    "MM": "%m",
    "dd": "%d",
    "HH": "%H",
    "mm": "%M",
    "ss": "%S",
    "SSS": "%3f",
}


def sql_text(node: exp.Expr) -> str:
    """``node`` written back as Flink SQL (for messages)."""
    from microstream.sql.dialect import Flink

    return node.sql(dialect=Flink())


@dataclass(frozen=True)
class Field:
    """A column a query can name: ``qualifier.name``, held in frame column ``column``.

    ``column`` is None for a window column that exists only once the window
    aggregation has run (``window_start`` of a ``HOP`` or ``SESSION``).
    """

    qualifier: str | None
    name: str
    column: str | None


@dataclass(frozen=True)
class Scope:
    """The columns visible in a query, in order."""

    fields: tuple[Field, ...]

    def requalified(self, qualifier: str | None) -> Scope:
        return Scope(tuple(Field(qualifier, f.name, f.column) for f in self.fields))

    def resolve(self, column: exp.Column) -> Field:
        name, table = column.name, column.table or None
        matches = [
            f
            for f in self.fields
            if f.name.lower() == name.lower()
            and (table is None or (f.qualifier or "").lower() == table.lower())
        ]
        if len(matches) == 1:
            return matches[0]
        where = position(column)
        at = f" (line {where[0]}, column {where[1]})" if where else ""
        shown = sql_text(column)
        if not matches:
            visible = [f"{f.qualifier}.{f.name}" if f.qualifier else f.name for f in self.fields]
            msg = f"SQL: no column {shown}{at}; the columns here are {visible}"
        else:
            msg = f"SQL: column {shown} is ambiguous{at}; qualify it with its table's name or alias"
        raise PlanError(msg)

    def column_of(self, column: exp.Column) -> str:
        found = self.resolve(column)
        if found.column is None:
            raise refuse(
                column,
                f"{found.name} outside GROUP BY window_start, window_end",
                reason="the window columns of HOP and SESSION exist after the window "
                "aggregation; group by them (only TUMBLE's are row-wise)",
            )
        return found.column


def interval_of(node: exp.Expr) -> timedelta:
    """The duration of ``INTERVAL '10' SECOND`` (Flink's single-unit interval literals)."""
    if not isinstance(node, exp.Interval):
        raise refuse(node, f"{sql_text(node)} as a duration", alternative="write INTERVAL 'n' UNIT")
    unit = (node.text("unit") or "").upper().rstrip("S") if node.args.get("unit") else ""
    value = node.this.name if isinstance(node.this, exp.Literal) else None
    if not unit and value and " " in value:  # INTERVAL '10 SECOND'
        value, unit = value.split(None, 1)
        unit = unit.upper().rstrip("S")
    if unit not in _UNITS or value is None or not re.fullmatch(r"-?\d+", value.strip()):
        raise refuse(
            node,
            f"interval {sql_text(node)}",
            alternative="write a whole number of one unit: INTERVAL '10' SECOND, MILLISECOND, "
            "MINUTE, HOUR or DAY",
        )
    return int(value.strip()) * _UNITS[unit]


def polars_type(datatype: exp.DataType, node: exp.Expr | None = None) -> pl.DataType:
    """The Polars type of a Flink SQL type (``BIGINT``, ``TIMESTAMP(3)``, ``DECIMAL(10, 2)``)."""
    kind = datatype.this
    params = [p.this.name for p in datatype.expressions if isinstance(p, exp.DataTypeParam)]
    t = exp.DataType.Type
    simple: dict[Any, pl.DataType] = {
        t.BIGINT: pl.Int64(),
        t.INT: pl.Int32(),
        t.SMALLINT: pl.Int16(),
        t.TINYINT: pl.Int8(),
        t.DOUBLE: pl.Float64(),
        t.FLOAT: pl.Float32(),
        t.BOOLEAN: pl.Boolean(),
        t.VARCHAR: pl.String(),
        t.CHAR: pl.String(),
        t.TEXT: pl.String(),
        t.DATE: pl.Date(),
        t.VARBINARY: pl.Binary(),
        t.BINARY: pl.Binary(),
    }
    if kind in simple:
        return simple[kind]
    if kind == t.TIMESTAMP:
        precision = int(params[0]) if params else 6  # Flink's default TIMESTAMP is (6)
        if precision <= 3:
            return pl.Datetime("ms")
        return pl.Datetime("us" if precision <= 6 else "ns")
    if kind == t.DECIMAL:
        precision = int(params[0]) if params else 10
        scale = int(params[1]) if len(params) > 1 else 0
        return pl.Decimal(precision, scale)
    raise refuse(
        node if node is not None else datatype,
        f"type {sql_text(datatype)}",
        alternative="use BIGINT, INT, SMALLINT, TINYINT, DOUBLE, FLOAT, BOOLEAN, STRING/VARCHAR, "
        "DATE, TIMESTAMP(p), DECIMAL(p, s) or BYTES",
    )


def _like_regex(pattern: str) -> str:
    out = []
    for ch in pattern:
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
    return "(?s)^" + "".join(out) + "$"


def _java_to_strftime(pattern: str, node: exp.Expr) -> str:
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "'":
            end = pattern.find("'", i + 1)
            literal = pattern[i + 1 : end if end >= 0 else len(pattern)]
            out.append(literal.replace("%", "%%"))
            i = (end if end >= 0 else len(pattern)) + 1
            continue
        if ch.isalpha():
            run = len(pattern[i:]) - len(pattern[i:].lstrip(ch))
            letters = pattern[i : i + run]
            if letters not in _JAVA_DATE_LETTERS:
                raise refuse(
                    node,
                    f"DATE_FORMAT pattern letters {letters!r}",
                    alternative=f"use {' '.join(_JAVA_DATE_LETTERS)} and literal text",
                )
            out.append(_JAVA_DATE_LETTERS[letters])
            i += run
            continue
        out.append("%%" if ch == "%" else ch)
        i += 1
    return "".join(out)


Substitute = Callable[[exp.Expr], "pl.Expr | None"]


class ExpressionLowering:
    """Lowers row-wise SQL expressions over ``scope`` (frame schema ``schema``) to ``pl.Expr``.

    ``substitute(node)`` is asked first for every node: the query lowering answers
    for group keys and aggregates once a query aggregates.

    Examples
    --------
    >>> import polars as pl
    >>> from microstream.sql.dialect import parse
    >>> scope = Scope((Field("t", "a", "a"), Field("t", "s", "s")))
    >>> lowering = ExpressionLowering(scope, pl.Schema({"a": pl.Int64, "s": pl.String}))
    >>> select = parse("SELECT CASE WHEN a > 1 THEN UPPER(s) ELSE s || '!' END, -7 / a FROM t")[0]
    >>> df = pl.DataFrame({"a": [1, 2], "s": ["x", "y"]})
    >>> df.select(lowering.lower(e).alias(str(i)) for i, e in enumerate(select.expressions)).rows()
    [('x!', -7), ('Y', -3)]
    """

    def __init__(self, scope: Scope, schema: pl.Schema, substitute: Substitute | None = None):
        self.scope = scope
        self.schema = schema
        self.substitute = substitute

    def dtype(self, expr: pl.Expr) -> pl.DataType:
        return pl.LazyFrame(schema=self.schema).select(expr.alias("_")).collect_schema()["_"]

    def lower(self, node: exp.Expr) -> pl.Expr:
        if self.substitute is not None:
            found = self.substitute(node)
            if found is not None:
                return found
        method = getattr(self, f"_{type(node).__name__.lower()}", None)
        if method is not None:
            result: pl.Expr = method(node)
            return result
        if isinstance(node, AGGREGATES):
            raise refuse(
                node,
                f"aggregate {sql_text(node)} here",
                reason="aggregates belong in the SELECT list or HAVING of a query that groups",
            )
        if isinstance(node, exp.Window):
            raise refuse(node, "OVER")
        if isinstance(node, (exp.Subquery, exp.Exists)) or (
            isinstance(node, exp.In) and node.args.get("query") is not None
        ):
            raise refuse(node, "subquery in an expression")
        if isinstance(node, exp.Func):
            name = node.sql_name() if not isinstance(node, exp.Anonymous) else node.name
            raise refuse(
                node,
                f"function {name.upper()}",
                alternative="the functions microstream SQL knows are listed in the README's "
                "SQL section; compute this one in Python with map_batches",
            )
        raise refuse(node, f"expression {sql_text(node)}")

    # -- leaves ---------------------------------------------------------------------

    def _column(self, node: exp.Column) -> pl.Expr:
        return pl.col(self.scope.column_of(node))

    def _paren(self, node: exp.Paren) -> pl.Expr:
        return self.lower(node.this)

    def _literal(self, node: exp.Literal) -> pl.Expr:
        if node.is_string:
            return pl.lit(node.this, pl.String)
        text = node.this
        if re.fullmatch(r"-?\d+", text):
            return pl.lit(int(text), pl.Int64 if abs(int(text)) >= 2**31 else pl.Int32)
        return pl.lit(float(text), pl.Float64)

    def _boolean(self, node: exp.Boolean) -> pl.Expr:
        return pl.lit(bool(node.this), pl.Boolean)

    def _null(self, node: exp.Null) -> pl.Expr:
        return pl.lit(None)

    def _interval(self, node: exp.Interval) -> pl.Expr:
        return pl.lit(interval_of(node))

    # -- operators ------------------------------------------------------------------

    def _binary(self, node: exp.Binary) -> tuple[pl.Expr, pl.Expr]:
        return self.lower(node.this), self.lower(node.expression)

    def _add(self, node: exp.Add) -> pl.Expr:
        a, b = self._binary(node)
        return a + b

    def _sub(self, node: exp.Sub) -> pl.Expr:
        a, b = self._binary(node)
        return a - b

    def _mul(self, node: exp.Mul) -> pl.Expr:
        a, b = self._binary(node)
        return a * b

    def _div(self, node: exp.Div) -> pl.Expr:
        a, b = self._binary(node)
        if self.dtype(a).is_integer() and self.dtype(b).is_integer():
            # SQL's integer division truncates toward zero; Polars' // floors.
            floor = a // b
            return pl.when((floor < 0) & (a % b != 0)).then(floor + 1).otherwise(floor)
        return a / b

    def _mod(self, node: exp.Mod) -> pl.Expr:
        a, b = self._binary(node)
        # SQL's MOD takes the dividend's sign; Polars' % the divisor's.
        rem = a % b
        return pl.when((rem != 0) & ((rem < 0) != (a < 0))).then(rem - b).otherwise(rem)

    def _neg(self, node: exp.Neg) -> pl.Expr:
        return -self.lower(node.this)

    def _dpipe(self, node: exp.DPipe) -> pl.Expr:
        a, b = self._binary(node)
        return pl.concat_str([a.cast(pl.String), b.cast(pl.String)])

    def _eq(self, node: exp.EQ) -> pl.Expr:
        a, b = self._binary(node)
        return a == b

    def _neq(self, node: exp.NEQ) -> pl.Expr:
        a, b = self._binary(node)
        return a != b

    def _gt(self, node: exp.GT) -> pl.Expr:
        a, b = self._binary(node)
        return a > b

    def _gte(self, node: exp.GTE) -> pl.Expr:
        a, b = self._binary(node)
        return a >= b

    def _lt(self, node: exp.LT) -> pl.Expr:
        a, b = self._binary(node)
        return a < b

    def _lte(self, node: exp.LTE) -> pl.Expr:
        a, b = self._binary(node)
        return a <= b

    def _and(self, node: exp.And) -> pl.Expr:
        a, b = self._binary(node)
        return a & b

    def _or(self, node: exp.Or) -> pl.Expr:
        a, b = self._binary(node)
        return a | b

    def _not(self, node: exp.Not) -> pl.Expr:
        return ~self.lower(node.this)

    def _is(self, node: exp.Is) -> pl.Expr:
        if isinstance(node.expression, exp.Null):
            return self.lower(node.this).is_null()
        if isinstance(node.expression, exp.Boolean):
            value = self.lower(node.this)
            return (value == node.expression.this).fill_null(False)
        raise refuse(node, f"IS {sql_text(node.expression)}")

    def _between(self, node: exp.Between) -> pl.Expr:
        value = self.lower(node.this)
        return (value >= self.lower(node.args["low"])) & (value <= self.lower(node.args["high"]))

    def _in(self, node: exp.In) -> pl.Expr:
        if node.args.get("query") is not None or node.args.get("unnest") is not None:
            raise refuse(node, "subquery in an expression")
        values = []
        for item in node.expressions:
            if not isinstance(item, (exp.Literal, exp.Boolean)):
                raise refuse(item, f"IN with {sql_text(item)}", alternative="list constants")
            values.append(pl.select(self.lower(item)).item())
        return self.lower(node.this).is_in(values)

    def _like(self, node: exp.Like) -> pl.Expr:
        pattern = node.expression
        if not (isinstance(pattern, exp.Literal) and pattern.is_string):
            raise refuse(node, "LIKE with a pattern that is not a string constant")
        return self.lower(node.this).str.contains(_like_regex(pattern.this))

    def _escape(self, node: exp.Escape) -> pl.Expr:
        raise refuse(node, "LIKE ... ESCAPE")

    def _case(self, node: exp.Case) -> pl.Expr:
        subject = self.lower(node.this) if node.this is not None else None
        chain: Any = None
        for branch in node.args.get("ifs") or []:
            condition = self.lower(branch.this)
            if subject is not None:
                condition = subject == condition
            value = self.lower(branch.args["true"])
            chain = (
                pl.when(condition).then(value)
                if chain is None
                else chain.when(condition).then(value)
            )
        default = node.args.get("default")
        otherwise = self.lower(default) if default is not None else pl.lit(None)
        return chain.otherwise(otherwise) if chain is not None else otherwise

    def _if(self, node: exp.If) -> pl.Expr:
        false = node.args.get("false")
        return (
            pl.when(self.lower(node.this))
            .then(self.lower(node.args["true"]))
            .otherwise(self.lower(false) if false is not None else pl.lit(None))
        )

    def _cast(self, node: exp.Cast) -> pl.Expr:
        return self.lower(node.this).cast(polars_type(node.to, node), strict=True)

    def _trycast(self, node: exp.TryCast) -> pl.Expr:
        return self.lower(node.this).cast(polars_type(node.to, node), strict=False)

    # -- functions ------------------------------------------------------------------

    def _coalesce(self, node: exp.Coalesce) -> pl.Expr:
        return pl.coalesce([self.lower(node.this), *(self.lower(e) for e in node.expressions)])

    def _nullif(self, node: exp.Nullif) -> pl.Expr:
        a, b = self.lower(node.this), self.lower(node.expression)
        return pl.when(a == b).then(pl.lit(None)).otherwise(a)

    def _upper(self, node: exp.Upper) -> pl.Expr:
        return self.lower(node.this).str.to_uppercase()

    def _lower(self, node: exp.Lower) -> pl.Expr:
        return self.lower(node.this).str.to_lowercase()

    def _length(self, node: exp.Length) -> pl.Expr:
        return self.lower(node.this).str.len_chars().cast(pl.Int32)

    def _concat(self, node: exp.Concat) -> pl.Expr:
        return pl.concat_str([self.lower(e).cast(pl.String) for e in node.expressions])

    def _substring(self, node: exp.Substring) -> pl.Expr:
        start = node.args.get("start")
        length = node.args.get("length")
        offset = self.lower(start) - 1 if start is not None else 0
        return self.lower(node.this).str.slice(
            offset, self.lower(length) if length is not None else None
        )

    def _trim(self, node: exp.Trim) -> pl.Expr:
        value = self.lower(node.this)
        chars = node.expression
        characters = chars.name if isinstance(chars, exp.Literal) else None
        where = (node.args.get("position") or "BOTH").upper()
        if where == "LEADING":
            return value.str.strip_chars_start(characters)
        if where == "TRAILING":
            return value.str.strip_chars_end(characters)
        return value.str.strip_chars(characters)

    def _replace(self, node: exp.Replace) -> pl.Expr:
        return self.lower(node.this).str.replace_all(
            self.lower(node.expression), self.lower(node.args["replacement"]), literal=True
        )

    def _strposition(self, node: exp.StrPosition) -> pl.Expr:
        found = self.lower(node.this).str.find(self.lower(node.args["substr"]), literal=True)
        return (found.fill_null(-1) + 1).cast(pl.Int32)

    def _abs(self, node: exp.Abs) -> pl.Expr:
        return self.lower(node.this).abs()

    def _floor(self, node: exp.Floor) -> pl.Expr:
        return self.lower(node.this).floor()

    def _ceil(self, node: exp.Ceil) -> pl.Expr:
        return self.lower(node.this).ceil()

    def _round(self, node: exp.Round) -> pl.Expr:
        digits = node.args.get("decimals")
        places = int(digits.name) if isinstance(digits, exp.Literal) else 0
        return self.lower(node.this).round(places, mode="half_away_from_zero")

    def _pow(self, node: exp.Pow) -> pl.Expr:
        a, b = self._binary(node)
        return a.cast(pl.Float64).pow(b)

    def _sqrt(self, node: exp.Sqrt) -> pl.Expr:
        return self.lower(node.this).sqrt()

    def _extract(self, node: exp.Extract) -> pl.Expr:
        unit = node.this.name.upper()
        value = self.lower(node.expression)
        parts = {
            "YEAR": value.dt.year(),
            "MONTH": value.dt.month(),
            "DAY": value.dt.day(),
            "HOUR": value.dt.hour(),
            "MINUTE": value.dt.minute(),
            "SECOND": value.dt.second(),
            "DOW": value.dt.weekday() % 7 + 1,
            "DOY": value.dt.ordinal_day(),
        }
        if unit not in parts:
            raise refuse(node, f"EXTRACT({unit} FROM ...)", alternative=f"use {', '.join(parts)}")
        return parts[unit].cast(pl.Int64)

    def _year(self, node: exp.Year) -> pl.Expr:
        return self.lower(node.this).dt.year().cast(pl.Int64)

    def _month(self, node: exp.Month) -> pl.Expr:
        return self.lower(node.this).dt.month().cast(pl.Int64)

    def _day(self, node: exp.Day) -> pl.Expr:
        return self.lower(node.this).dt.day().cast(pl.Int64)

    def _hour(self, node: exp.Expr) -> pl.Expr:
        return self.lower(node.this).dt.hour().cast(pl.Int64)

    def _minute(self, node: exp.Expr) -> pl.Expr:
        return self.lower(node.this).dt.minute().cast(pl.Int64)

    def _second(self, node: exp.Expr) -> pl.Expr:
        return self.lower(node.this).dt.second().cast(pl.Int64)

    def _dayofmonth(self, node: exp.DayOfMonth) -> pl.Expr:
        return self.lower(node.this).dt.day().cast(pl.Int64)

    def _regexpextract(self, node: exp.RegexpExtract) -> pl.Expr:
        # Flink's REGEXP_EXTRACT(s, regex[, group]); sqlglot files a third argument as
        # "position" (other dialects' meaning), Flink has no position argument.
        pattern = node.expression
        if not (isinstance(pattern, exp.Literal) and pattern.is_string):
            raise refuse(node, "REGEXP_EXTRACT with a pattern that is not a string constant")
        group = node.args.get("group") or node.args.get("position")
        if group is not None and not (isinstance(group, exp.Literal) and group.is_int):
            raise refuse(node, "REGEXP_EXTRACT with a group that is not an integer constant")
        index = int(group.this) if group is not None else 0
        return self.lower(node.this).str.extract(pattern.this, group_index=index)

    def _functioncall(self, node: FunctionCall) -> pl.Expr:
        function = node.args["function"]
        if not node.expressions:
            raise refuse(
                node,
                f"{node.name}() without arguments",
                reason="a registered function is called with a row's values",
                alternative="pass it the columns it depends on",
            )
        return call_expr(function, [self.lower(a) for a in node.expressions])

    def _anonymous(self, node: exp.Anonymous) -> pl.Expr:
        name = node.name.upper()
        args = node.expressions
        if name in ("HOUR", "MINUTE", "SECOND") and len(args) == 1:
            value = self.lower(args[0])
            part = {
                "HOUR": value.dt.hour(),
                "MINUTE": value.dt.minute(),
                "SECOND": value.dt.second(),
            }
            return part[name].cast(pl.Int64)
        if name == "DATE_FORMAT" and len(args) == 2:
            pattern = args[1]
            if not (isinstance(pattern, exp.Literal) and pattern.is_string):
                raise refuse(node, "DATE_FORMAT with a pattern that is not a string constant")
            return self.lower(args[0]).dt.strftime(_java_to_strftime(pattern.this, node))
        if name == "SPLIT_INDEX" and len(args) == 3:
            sep, index = args[1], args[2]
            if not (isinstance(sep, exp.Literal) and sep.is_string and sep.this):
                raise refuse(node, "SPLIT_INDEX with a separator that is not a string constant")
            if not (isinstance(index, exp.Literal) and index.is_int):
                raise refuse(node, "SPLIT_INDEX with an index that is not an integer constant")
            # Flink: the 0-based index-th field, null when there are fewer fields.
            parts = self.lower(args[0]).str.split(sep.this)
            return parts.list.get(int(index.this), null_on_oob=True)
        if name == "CHAR_LENGTH" and len(args) == 1:
            return self.lower(args[0]).str.len_chars().cast(pl.Int32)
        if isinstance(node.parent, exp.Table) or any(
            isinstance(a, (TableArgument, Descriptor)) for a in args
        ):
            raise refuse(node, f"table function {name} here")
        if name in ("PROCTIME", "NOW", "CURRENT_TIMESTAMP", "LOCALTIMESTAMP", "RAND"):
            raise refuse(
                node,
                f"{name}()",
                reason="its value depends on when a batch runs",
                alternative="declare a processing-time column `pt AS PROCTIME()` in CREATE TABLE",
            )
        raise refuse(
            node,
            f"function {name}",
            alternative="the functions microstream SQL knows are listed in the README's SQL "
            "section; compute this one in Python with map_batches",
        )
