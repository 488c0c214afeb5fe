"""Event-time keys: columns that are non-decreasing functions of a watermarked column.

A ``group_by`` key closes with the watermark when it is the event time itself,
and also when it is computed from it by a function that never goes down:
``dt.truncate(every)``, ``dt.round(every)``, ``dt.offset_by(...)``,
``dt.date()``, adding or subtracting a constant duration, renames and aliases,
and chains of these, across ``with_columns``, ``select`` and ``rename``. That
is what lets ``with_watermark("ts", ...).with_columns(hour=pl.col("ts")
.dt.truncate("1h")).group_by("hour")`` forget its hours, as truncating before
``with_watermark`` does.

When a group of key value ``h`` is final. A row is on time in batch N when its
event time ``e`` is after the watermark it is judged by, ``e > wm``, so every
row still to come has ``e >= v``, the smallest value of the event-time column
whose microseconds exceed ``wm``. For a non-decreasing ``f`` every such row has
a key ``f(e) >= f(v)``: the groups with ``h < f(v)`` can receive no more rows.
So the bound is ``f`` applied to the watermark itself (evaluated by Polars, in
the column's dtype), which for ``truncate(every)`` closes hour ``h`` once the
watermark reaches its last microsecond, ``h + every - 1us``, for ``ts + c``
once the watermark reaches ``h - c``, and for the bare column once it reaches
``h`` (the rule of a time key). A row is late when its group is already closed
by the previous batch's watermark (as a window's row is late when its window
is), so no row on time by its event time is ever dropped.

Anything else (a cast, a user function, an expression of two columns) is not
recognised: the key is then an ordinary key, and a query that keeps such
groups forever is warned about when it starts.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from microstream.plan.nodes import (
    ConcatNode,
    PlanNode,
    StatefulNode,
    StatelessNode,
    StaticJoinNode,
    WatermarkNode,
)

__all__ = ["EventTimeKey", "monotone_root", "trace_event_time"]

_MONOTONE_TEMPORAL = ("Truncate", "Round", "OffsetBy")
"""Temporal functions that are non-decreasing in their first input, the others constant."""

_PASS_THROUGH = ("filter", "drop", "drop_nulls", "explode", "unnest", "fill_nan")
"""Stateless verbs that keep every surviving row's value of a column they do not name.
(``fill_nan`` only touches float columns, and an event-time column is never one.)"""

_US_PER_UNIT = {"ns": 1, "us": 1, "ms": 1_000}
_US_PER_DAY = 86_400_000_000
_INT64 = (-(2**63), 2**63 - 1)
_FIRST_US, _LAST_US = -62_135_596_800_000_000, 253_402_300_799_999_999
"""0001-01-01 and 9999-12-31 23:59:59.999999: a watermark outside these (no event yet,
a flush) is no time a key function is evaluated at, as Polars' temporal functions panic
or wrap around there."""


@dataclass(frozen=True, eq=False)
class EventTimeKey:
    """A key column that is ``f(event time)`` for a non-decreasing ``f``.

    ``steps`` rebuild ``f`` from the watermark column: each is ``(column,
    expr)`` with ``expr`` reading only ``column`` (the previous step's value);
    no steps means the key is the watermark column itself.
    """

    column: str
    watermark: WatermarkNode
    time_dtype: pl.DataType
    steps: tuple[tuple[str, pl.Expr], ...] = ()

    @property
    def is_event_time(self) -> bool:
        """Whether the key is the watermark column itself, unchanged."""
        return not self.steps

    def describe(self) -> str:
        """The key as a function of the event time, for ``explain``."""
        text = f"col({self.watermark.column!r})"
        for column, expr in self.steps:
            text = str(expr.meta.undo_aliases()).replace(f'col("{column}")', text)
        return text

    def closed(self, watermark_us: int) -> pl.Expr:
        """Which groups no on-time row can reach any more, at this watermark.

        A predicate over the key column: ``key < f(v)`` where ``v`` is the first
        value of the event-time column after ``watermark_us`` (module docstring).
        A watermark beyond what the key's dtype can hold closes every group, one
        before it none; null keys are never closed (they are no time).
        """
        bound = self._bound(watermark_us)
        if bound is None:
            return pl.lit(watermark_us > 0) & pl.col(self.column).is_not_null()
        return (pl.col(self.column).to_physical() < bound).fill_null(False)

    def _bound(self, watermark_us: int) -> int | None:
        """``f(v)`` as the key dtype's physical integer, or None out of range."""
        if not _FIRST_US <= watermark_us < _LAST_US:
            return None
        first = _first_after(watermark_us, self.time_dtype)
        if first is None:
            return None
        frame = pl.DataFrame({self.watermark.column: pl.Series([first], dtype=pl.Int64)}).select(
            pl.col(self.watermark.column).cast(self.time_dtype)
        )
        try:
            for column, expr in self.steps:
                frame = frame.select(pl.first().alias(column)).select(expr)
            value = frame.select(pl.first().to_physical()).item()
        except (pl.exceptions.PolarsError, pl.exceptions.PanicException):
            return None  # f leaves the dtype's range here: no finite bound
        return None if value is None else int(value)


def _first_after(watermark_us: int, dtype: pl.DataType) -> int | None:
    """The physical value of the first ``dtype`` value whose microseconds exceed ``wm``.

    Rows are judged by their event time in microseconds (truncated, for
    nanoseconds), so the first on-time value is ``wm + 1us`` rounded up to the
    column's unit.
    """
    after = watermark_us + 1
    if isinstance(dtype, pl.Date):
        value = -(-after // _US_PER_DAY)
        if not -(2**31) <= value < 2**31:
            return None
    else:
        assert isinstance(dtype, pl.Datetime)
        unit = dtype.time_unit or "us"
        value = after * 1_000 if unit == "ns" else -(-after // _US_PER_UNIT[unit])
    return value if _INT64[0] <= value <= _INT64[1] else None


def trace_event_time(plan: PlanNode, column: str) -> EventTimeKey | None:
    """``column`` of ``plan``'s output as a non-decreasing function of a watermark column.

    Follows the column back through the stateless verbs to the ``with_watermark``
    that declared its source; None when some step is not known to be monotone
    (or the column does not come from a watermarked column at all).
    """
    found = _trace(plan, column)
    if found is None:
        return None
    mark, steps = found
    dtype = mark.input.schema()[mark.column]
    return EventTimeKey(column=column, watermark=mark, time_dtype=dtype, steps=steps)


_Trace = tuple[WatermarkNode, tuple[tuple[str, pl.Expr], ...]]


def _trace(node: PlanNode, column: str) -> _Trace | None:
    from microstream.plan.processing_time import ProcessingTimeNode

    if isinstance(node, WatermarkNode):
        return (node, ()) if node.column == column else _trace(node.input, column)
    if isinstance(node, StatelessNode):
        step = _through_verb(node, column)
        if step is None:
            return None
        source, expr = step
        found = _trace(node.input, source)
        if found is None or expr is None:
            return found
        return found[0], (*found[1], (source, expr))
    if isinstance(node, ProcessingTimeNode):
        return None if node.name == column else _trace(node.input, column)
    if isinstance(node, (StaticJoinNode, StatefulNode)):
        # A join keeps the stream's columns under their names (the other side's get a
        # suffix); a stateful operator downstream of which the column still has its
        # name emits it as it came (a window's start, a joined row's time), and its
        # ``output_delay_us`` already makes the watermark allow for how late it emits.
        if column not in node.input.schema():
            return None
        return _trace(node.input, column)
    if isinstance(node, ConcatNode):
        # Every input must compute the column by the same function of the same column.
        traces = [_trace(child, column) for child in node.inputs]
        first = traces[0]
        if first is None or any(t is None for t in traces):
            return None
        shape = _shape(first)
        if any(_shape(t) != shape for t in traces if t is not None):
            return None
        return first
    return None  # a scan (no watermark upstream), map_batches (opaque)


def _shape(found: _Trace) -> tuple[str, ...]:
    mark, steps = found
    return (mark.column, *(f"{c}:{e}" for c, e in steps))


def _through_verb(node: StatelessNode, column: str) -> tuple[str, pl.Expr | None] | None:
    """Where ``column`` after ``node`` comes from: ``(input column, expr or None)``.

    ``expr`` is None when the column passes unchanged; the whole answer is None
    when the verb computes it in a way not known to be monotone.
    """
    verb = node.verb
    if verb in ("with_columns", "select"):
        schema = node.input.schema()
        produced, producer = _producer(node, column, schema)
        if not produced:
            return (column, None) if verb == "with_columns" else None
        if producer is None:
            return None
        root = monotone_root(producer)
        if root is None or root not in schema:
            return None
        return (root, None) if _is_bare_column(producer) else (root, producer)
    if verb == "rename":
        return _through_rename(node.args[0], column, node.input.schema())
    if verb == "cast":
        dtypes = node.args[0]
        if isinstance(dtypes, Mapping) and all(isinstance(k, str) for k in dtypes):
            return None if column in dtypes else (column, None)
        return None
    if verb in _PASS_THROUGH:
        return (column, None) if column in node.input.schema() else None
    return None


def _producer(node: StatelessNode, column: str, schema: pl.Schema) -> tuple[bool, pl.Expr | None]:
    """Whether ``with_columns``/``select`` outputs ``column``, and by which expression.

    The expression is the last one outputting it; None when that one outputs
    several columns (``pl.all().dt.truncate(...)``), which is not traced.
    """
    exprs: list[pl.Expr] = []
    for arg in node.args:
        for item in arg if isinstance(arg, (list, tuple)) else [arg]:
            exprs.append(_as_expr(item))
    exprs += [_as_expr(value).alias(name) for name, value in node.kwargs.items()]
    empty = pl.LazyFrame(schema=schema)
    produced, found = False, None
    for expr in exprs:
        try:
            names = empty.select(expr).collect_schema().names()
        except pl.exceptions.PolarsError:
            return True, None  # cannot tell what it outputs: not traced
        if column in names:
            produced, found = True, expr if len(names) == 1 else None
    return produced, found


def _as_expr(value: Any) -> pl.Expr:
    if isinstance(value, pl.Expr):
        return value
    return pl.col(value) if isinstance(value, str) else pl.lit(value)


def _through_rename(
    mapping: Mapping[str, str] | Callable[[str], str], column: str, schema: pl.Schema
) -> tuple[str, None] | None:
    if callable(mapping) and not isinstance(mapping, Mapping):
        sources = [c for c in schema.names() if mapping(c) == column]
    else:
        sources = [old for old, new in mapping.items() if new == column and old in schema]
        if not sources and column in mapping:
            return None  # renamed away
        if not sources:
            sources = [column]
    return (sources[0], None) if len(sources) == 1 else None


def _is_bare_column(expr: pl.Expr) -> bool:
    tree = _tree(expr)
    while isinstance(tree, dict) and "Alias" in tree:
        tree = tree["Alias"][0]
    return isinstance(tree, dict) and "Column" in tree


def monotone_root(expr: pl.Expr) -> str | None:
    """The one column ``expr`` is a non-decreasing function of, or None.

    Examples
    --------
    >>> import polars as pl
    >>> from datetime import timedelta
    >>> monotone_root(pl.col("ts").dt.truncate("1h") + timedelta(minutes=5))
    'ts'
    >>> monotone_root(pl.col("ts").dt.hour()) is None  # goes back to 0 every day
    True
    >>> monotone_root(timedelta(hours=1) - pl.col("ts")) is None  # decreasing
    True
    """
    tree = _tree(expr)
    return None if tree is None else _root(tree)


def _tree(expr: pl.Expr) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the json format is deprecated, still exact
            return json.loads(expr.meta.serialize(format="json"))
    except Exception:  # UDFs may not serialise: not recognised
        return None


def _root(node: Any) -> str | None:
    if not isinstance(node, dict) or len(node) != 1:
        return None
    ((kind, body),) = node.items()
    if kind == "Column" and isinstance(body, str):
        return body
    if kind == "Alias":
        return _root(body[0])
    if kind == "Function":
        function = body.get("function")
        inputs = body.get("input", [])
        if not isinstance(function, dict) or not inputs:
            return None
        temporal = function.get("TemporalExpr")
        if temporal in _MONOTONE_TEMPORAL and all(_constant(i) for i in inputs[1:]):
            return _root(inputs[0])
        if temporal == "Date" and len(inputs) == 1:
            return _root(inputs[0])
        return None
    if kind == "BinaryExpr":
        op, left, right = body.get("op"), body.get("left"), body.get("right")
        if op == "Plus":
            if _constant(right):
                return _root(left)
            if _constant(left):
                return _root(right)
        if op == "Minus" and _constant(right):
            return _root(left)
    return None


def _constant(node: Any) -> bool:
    if not isinstance(node, dict) or len(node) != 1:
        return False
    ((kind, body),) = node.items()
    if kind == "Literal":
        return True
    return kind == "Alias" and _constant(body[0])
