"""Joins in SQL: a stream with a static table, two streams, two static frames.

- A stream with a static table (either side in ``FROM``): ``join`` with the static
  side; the stream drives, so RIGHT/FULL joins that would emit unmatched static
  rows are refused.
- Two streams: an inner ``join`` with ``within=`` from the time bounds of ``ON``
  and ``WHERE`` (``a.ts BETWEEN b.ts - INTERVAL ... AND b.ts + INTERVAL ...``), on
  each side's event-time column: its ``WATERMARK`` column, or a column a window
  aggregation emitted (``window_start``, ``window_end``).
- Two windowed relations joined on their window (Flink's window join): when two
  streams are joined by an equality of columns that are each side's window start
  (or end) as a window aggregation emitted it, and there is no other time bound,
  the equality is the bound (``within=(0, 0)`` on those columns): both sides
  emit a window once, when the watermark passes its end, and the join forgets it
  then. Joined on ``TUMBLE`` TVF rows' window starts (their time truncated), the
  join is bounded on the time columns by the window sizes instead.
- Two static frames: Polars' join (the batch result of the same text).

For an inner join, the conjuncts of ``WHERE`` that name one side only are applied
to that side before the join, as the Python twins do.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Literal

import polars as pl
from sqlglot import exp

from microstream.api.frame import StreamFrame
from microstream.exceptions import MicrostreamError, PlanError
from microstream.plan.event_time import trace_event_time
from microstream.sql.expressions import ExpressionLowering, Field, Scope, interval_of, sql_text
from microstream.sql.refusals import refuse
from microstream.sql.relation import Frame, Relation, all_of, and_operands, fresh
from microstream.time.duration import parse_duration

__all__ = ["join_relations"]

_STATIC_HOW: dict[str, Literal["inner", "left", "right", "full"]] = {
    "inner": "inner",
    "left": "left",
    "right": "right",
    "full": "full",
}


def join_relations(
    left: Relation, right: Relation, join: exp.Join, movable: list[exp.Expr]
) -> tuple[Relation, list[exp.Expr]]:
    side = (join.side or "").upper()
    kind = (join.kind or "").upper()
    if join.args.get("using"):
        raise refuse(join, "JOIN ... USING", alternative="write ON a.k = b.k")
    how = (
        "cross"
        if kind == "CROSS"
        else {"": "inner", "LEFT": "left", "RIGHT": "right", "FULL": "full"}[side]
    )
    on = and_operands(join.args.get("on"))
    both = Scope(left.scope.fields + right.scope.fields)

    def sides(node: exp.Expr) -> set[str]:
        found = set()
        for column in node.find_all(exp.Column):
            both.resolve(column)  # ambiguity and unknown names first
            try:
                left.scope.resolve(column)
                found.add("L")
            except PlanError:
                found.add("R")
        return found

    pushed_left: list[exp.Expr] = []
    pushed_right: list[exp.Expr] = []
    keys: list[tuple[str, str]] = []
    bounds: list[exp.Expr] = []
    cross: list[exp.Expr] = []
    rest: list[exp.Expr] = []
    for conj in [*on, *movable]:
        where = sides(conj)
        from_on = any(conj is c for c in on)
        if where == {"L"} and how == "inner":
            pushed_left.append(conj)
        elif where == {"R"} and how in ("inner", "left"):
            if how == "left" and not from_on:
                rest.append(conj)
            else:
                pushed_right.append(conj)
        elif (
            where == {"L", "R"}
            and isinstance(conj, exp.EQ)
            and all(isinstance(x, exp.Column) for x in (conj.this, conj.expression))
        ):
            a, b = conj.this, conj.expression
            if sides(a) == {"R"}:
                a, b = b, a
            keys.append((left.scope.column_of(a), right.scope.column_of(b)))
        elif (
            where == {"L", "R"}
            and left.is_stream
            and right.is_stream
            and _is_time_bound(conj, left, right)
        ):
            bounds.append(conj)
        elif not from_on:
            rest.append(conj)
        else:
            cross.append(conj)
    if how not in ("inner", "cross") and cross:
        raise refuse(
            cross[0],
            f"{how.upper()} JOIN condition {sql_text(cross[0])}",
            alternative="equalities between the two sides' columns only",
        )
    lframe, rframe = left.frame, right.frame
    if pushed_left:
        low = ExpressionLowering(left.scope, lframe.collect_schema())
        lframe = lframe.filter(all_of([low.lower(c) for c in pushed_left]))
    if pushed_right:
        low = ExpressionLowering(right.scope, rframe.collect_schema())
        rframe = rframe.filter(all_of([low.lower(c) for c in pushed_right]))
    left, right = replace(left, frame=lframe), replace(right, frame=rframe)
    if left.is_stream and right.is_stream:
        rel = _stream_join(left, right, how, keys, bounds, join)
    elif left.is_stream or right.is_stream:
        rel = _static_join(left, right, how, keys, join)
    else:
        rel = _static_join(left, right, how, keys, join)
    if cross:
        low = ExpressionLowering(rel.scope, rel.frame.collect_schema())
        rel = replace(rel, frame=rel.frame.filter(all_of([low.lower(c) for c in cross])))
    return rel, rest


def _static_join(
    left: Relation, right: Relation, how: str, keys: list[tuple[str, str]], join: exp.Join
) -> Relation:
    if right.is_stream and not left.is_stream:
        if how not in ("inner", "cross", "right"):
            raise refuse(
                join,
                f"{how.upper()} JOIN of a static table with a stream",
                reason="the stream must drive the join (static rows cannot wait for matches)",
                alternative="put the stream on the left, or use an inner join",
            )
        swapped_how = {"right": "left"}.get(how, how)
        rel = _static_join(right, left, swapped_how, [(r, lk) for lk, r in keys], join)
        # The columns in FROM order, as SQL shows them.
        fields = [f for f in rel.scope.fields if f in _mapped(rel, left)] + [
            f for f in rel.scope.fields if f not in _mapped(rel, left)
        ]
        return replace(rel, scope=Scope(tuple(fields)))
    if left.is_stream and how in ("right", "full"):
        raise refuse(
            join,
            f"{how.upper()} JOIN of a stream with a static table",
            reason="it would emit static rows that no stream row has matched yet",
            alternative="use INNER or LEFT JOIN",
        )
    taken = set(left.frame.collect_schema().names())
    renames = {}
    for c in right.frame.collect_schema().names():
        renames[c] = fresh(c, taken) if c in taken else c
        taken.add(renames[c])
    rframe = right.frame.rename(renames) if any(k != v for k, v in renames.items()) else right.frame
    left_on = [lk for lk, _ in keys]
    right_on = [renames[r] for _, r in keys]
    if how == "cross" or not keys:
        if how not in ("inner", "cross"):
            raise refuse(join, f"{how.upper()} JOIN without an equality of the two sides")
        assert isinstance(rframe, pl.LazyFrame)
        frame: Frame = left.frame.join(rframe, how="cross")
    elif isinstance(left.frame, StreamFrame):
        # RIGHT and FULL with a stream on the left were refused above.
        frame = left.frame.join(
            rframe,
            left_on=left_on,
            right_on=right_on,
            how="left" if how == "left" else "inner",
            coalesce=False,
        )
    else:
        assert isinstance(rframe, pl.LazyFrame)
        frame = left.frame.join(
            rframe,
            left_on=left_on,
            right_on=right_on,
            how=_STATIC_HOW[how],
            coalesce=False,
            maintain_order="left_right",
        )
    fields = list(left.scope.fields) + [
        Field(f.qualifier, f.name, renames[f.column] if f.column else None)
        for f in right.scope.fields
    ]
    return Relation(frame, Scope(tuple(fields)))


def _stream_join(
    left: Relation,
    right: Relation,
    how: str,
    keys: list[tuple[str, str]],
    bounds: list[exp.Expr],
    join: exp.Join,
) -> Relation:
    if how != "inner":
        raise refuse(join, "outer join of two streams")
    assert isinstance(left.frame, StreamFrame) and isinstance(right.frame, StreamFrame)
    if not keys:
        raise refuse(join, "join of two streams without an equality of the two sides")
    lower, upper, times, filters = _join_bounds(bounds, left, right)
    if times is None:
        times = _window_keys(keys, left, right)  # a window join: equal windows, no other bound
    if times is None:
        truncated = _truncated_windows(keys, left, right)  # a window join of TVF rows
        if truncated is not None:
            lower, upper, times = truncated
    kwargs: dict[str, Any] = {}
    if times is not None:
        kwargs = {
            "within": (_signed(lower), _signed(upper)),
            "left_time": times[0],
            "right_time": times[1],
        }
    frame = left.frame.join(
        right.frame,
        left_on=[lk for lk, _ in keys],
        right_on=[r for _, r in keys],
        how="inner",
        **kwargs,
    )
    # Polars' naming: right keys coalesced into the left ones, clashes suffixed.
    lcols = set(left.frame.collect_schema().names())
    key_map = {r: lk for lk, r in keys}
    fields = list(left.scope.fields)
    for f in right.scope.fields:
        if f.column in key_map:
            fields.append(Field(f.qualifier, f.name, key_map[f.column]))
        elif f.column is not None:
            fields.append(
                Field(f.qualifier, f.name, f"{f.column}_right" if f.column in lcols else f.column)
            )
    missing = [
        f.column for f in fields if f.column is not None and f.column not in frame.collect_schema()
    ]
    if missing:
        raise refuse(
            join, "this join's column names", reason=f"cannot place {missing}; rename columns"
        )
    rel = Relation(frame, Scope(tuple(fields)))
    if filters:
        low = ExpressionLowering(rel.scope, frame.collect_schema())
        rel = replace(rel, frame=frame.filter(all_of([low.lower(c) for c in filters])))
    return rel


def _mapped(rel: Relation, left: Relation) -> list[Field]:
    return [
        f
        for f in rel.scope.fields
        if any(f.qualifier == g.qualifier and f.name == g.name for g in left.scope.fields)
    ]


def _linear(node: exp.Expr) -> tuple[exp.Column, timedelta] | None:
    """``col``, ``col + INTERVAL``, ``col - INTERVAL``: the column and the offset."""
    if isinstance(node, exp.Paren):
        return _linear(node.this)
    if isinstance(node, exp.Column):
        return node, timedelta(0)
    if isinstance(node, (exp.Add, exp.Sub)):
        a, b = node.this, node.expression
        if isinstance(b, exp.Interval):
            inner = _linear(a)
            if inner is not None:
                d = interval_of(b)
                return inner[0], inner[1] + (d if isinstance(node, exp.Add) else -d)
        if isinstance(node, exp.Add) and isinstance(a, exp.Interval):
            inner = _linear(b)
            if inner is not None:
                return inner[0], inner[1] + interval_of(a)
    return None


def _is_time_bound(conj: exp.Expr, left: Relation, right: Relation) -> bool:
    """Whether ``conj`` compares time columns of the two sides, shifted by intervals."""
    if isinstance(conj, exp.Between):
        operands = [conj.this, conj.args["low"], conj.args["high"]]
    elif isinstance(conj, (exp.GT, exp.GTE, exp.LT, exp.LTE)):
        operands = [conj.this, conj.expression]
    else:
        return False
    for operand in operands:
        linear = _linear(operand)
        if linear is None:
            return False
        column = linear[0]
        for rel in (left, right):
            try:
                physical = rel.scope.column_of(column)
            except PlanError:
                continue
            if not rel.frame.collect_schema()[physical].is_temporal():
                return False  # a.num >= b.maxn: an ordinary condition
    return True


def _join_bounds(
    bounds: list[exp.Expr], left: Relation, right: Relation
) -> tuple[timedelta, timedelta, tuple[str, str] | None, list[exp.Expr]]:
    """``right_time - left_time`` in ``[lower, upper]`` from the join's time conditions,
    and the conditions on other time columns, to filter the joined rows by.

    A comparison with a time column that is neither side's watermark column (nor a
    window bound a window aggregation emitted), such as Nexmark q4's ``B.date_time <=
    A.expires``, cannot bound the join's state: nothing says when an auction has seen
    its last bid. With a constant bound on the watermark columns both ways beside it
    (``B.date_time <= A.date_time + INTERVAL '10' SECOND``), the join keeps rows for
    that long and the comparison filters its output: the result is the text's. Alone,
    it is refused by name.
    """
    if not bounds:
        return timedelta(0), timedelta(0), None, []
    comparisons: list[tuple[exp.Expr, exp.Expr, type, exp.Expr]] = []
    for conj in bounds:
        if isinstance(conj, exp.Between):
            comparisons.append((conj.args["low"], conj.this, exp.LTE, conj))
            comparisons.append((conj.this, conj.args["high"], exp.LTE, conj))
        else:
            comparisons.append((conj.this, conj.expression, type(conj), conj))
    one = timedelta(microseconds=1)
    lower, upper = timedelta.min, timedelta.max
    times: list[str | None] = [None, None]
    residual: list[tuple[exp.Expr, str, str, list[str]]] = []
    filters: list[exp.Expr] = []
    for a, b, op, conj in comparisons:
        la, lb = _linear(a), _linear(b)
        assert la is not None and lb is not None
        strict = op in (exp.GT, exp.LT)
        if op in (exp.GT, exp.GTE):
            la, lb = lb, la
        # now: a + oa  (<|<=)  b + ob
        (ca, oa), (cb, ob) = la, lb
        try:
            a_left = left.scope.column_of(ca)
            a_is_left = True
        except PlanError:
            a_is_left = False
        if a_is_left:
            lcol, rcol = a_left, right.scope.column_of(cb)
        else:
            rcol, lcol = right.scope.column_of(ca), left.scope.column_of(cb)
        unusable = None
        for col, rel, side in ((lcol, left, "left"), (rcol, right, "right")):
            assert isinstance(rel.frame, StreamFrame)
            marks = [m.column for m in rel.frame.plan.watermark_nodes()]
            if col not in marks and not _emitted_time(rel.frame, col) and unusable is None:
                unusable = (col, side, marks)
        if unusable is not None:
            residual.append((conj, *unusable))
            filters.append(op(this=a.copy(), expression=b.copy()))
            continue
        if a_is_left:
            # left + oa <= right + ob  <=>  right - left >= oa - ob
            lower = max(lower, oa - ob + (one if strict else timedelta(0)))
        else:
            # right + oa <= left + ob  <=>  right - left <= ob - oa
            upper = min(upper, ob - oa - (one if strict else timedelta(0)))
        for i, col in enumerate((lcol, rcol)):
            if times[i] not in (None, col):
                raise refuse(conj, "time bounds on two different columns of one side")
            times[i] = col
    if residual and (lower == timedelta.min or upper == timedelta.max):
        conj, col, side, marks = residual[0]
        raise refuse(
            conj,
            f"a time bound on {col}, which is not the {side} stream's watermark column "
            "(nor a window bound a window aggregation emitted)",
            reason="nothing says when a row has met its last match, so the join could never "
            "forget one",
            alternative=f"bound the join by {marks or 'a WATERMARK column'} both ways with "
            "constant intervals that hold for every match (a.ts BETWEEN b.ts - INTERVAL ... AND "
            "b.ts + INTERVAL ...), and keep this condition beside them",
        )
    if lower == timedelta.min or upper == timedelta.max:
        raise refuse(
            bounds[0],
            "a one-sided time bound in a join of two streams",
            alternative="bound both ways: a.ts BETWEEN b.ts - INTERVAL ... AND b.ts + INTERVAL ...",
        )
    assert times[0] is not None and times[1] is not None
    return lower, upper, (times[0], times[1]), filters


def _signed(value: timedelta) -> str:
    """``within=``'s spelling of a signed duration (``"-600000000us"``)."""
    us = value // timedelta(microseconds=1)
    return f"-{-us}us" if us < 0 else f"{us}us"


def _emitted_time(frame: StreamFrame, column: str) -> bool:
    """Whether ``column`` is an event time an operator judges lateness by safely.

    That is the watermark column shifted by a constant ``c >= 0`` (none at all for
    a window's start as a window aggregation emits it, the size for its end): a row
    on time has such a value after the watermark. A truncation (``window_start``
    of a TVF's rows) is earlier than the row's own time, so the join would drop
    rows on time as late: not accepted.
    """
    key = trace_event_time(frame.plan, column)
    if key is None:
        return False
    if not key.steps:
        return True
    probe = datetime(2001, 2, 3, 4, 5, 6, 789123)
    values = pl.DataFrame({key.watermark.column: [probe]}).select(
        pl.col(key.watermark.column).cast(key.time_dtype)
    )
    try:
        for source, expr in key.steps:
            if not _shift_only(expr):
                return False
            values = values.select(pl.first().alias(source)).select(expr)
        shifted = values.item()
    except pl.exceptions.PolarsError:
        return False
    start = pl.Series([probe]).cast(key.time_dtype).item()
    return isinstance(shifted, datetime) and shifted >= start


def _shift_only(expr: pl.Expr) -> bool:
    """Whether ``expr`` is a column plus or minus constants (no function of it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the json format is deprecated, still exact
        tree = json.loads(expr.meta.serialize(format="json"))

    def shift(node: Any) -> bool:
        if not isinstance(node, dict) or len(node) != 1:
            return False
        ((kind, body),) = node.items()
        if kind in ("Column", "Literal"):
            return True
        if kind == "Alias":
            return shift(body[0])
        if kind == "BinaryExpr" and body.get("op") in ("Plus", "Minus"):
            return shift(body.get("left")) and shift(body.get("right"))
        return False

    return shift(tree)


def _window_keys(
    keys: list[tuple[str, str]], left: Relation, right: Relation
) -> tuple[str, str] | None:
    """The first equality of two window starts (or ends) as window aggregations emitted
    them: a join on it is a window join, bounded by ``within=(0, 0)`` on those columns."""
    assert isinstance(left.frame, StreamFrame) and isinstance(right.frame, StreamFrame)
    for lk, rk in keys:
        if _emitted_time(left.frame, lk) and _emitted_time(right.frame, rk):
            return lk, rk
    return None


def _truncated_windows(
    keys: list[tuple[str, str]], left: Relation, right: Relation
) -> tuple[timedelta, timedelta, tuple[str, str]] | None:
    """A window join of TVF rows: an equality of two window starts that are each side's
    event time truncated (``TUMBLE``'s ``window_start``). Rows of equal starts lie less
    than a window apart, so that bounds the join on the event-time columns themselves
    (judging lateness by a truncated start would drop rows on time)."""
    assert isinstance(left.frame, StreamFrame) and isinstance(right.frame, StreamFrame)
    one = timedelta(microseconds=1)
    for lk, rk in keys:
        found = [_truncation(left.frame, lk), _truncation(right.frame, rk)]
        if found[0] is None or found[1] is None:
            continue
        (ltime, lsize), (rtime, rsize) = found[0], found[1]
        # left in [h, h + lsize), right in [h, h + rsize): right - left in (-lsize, rsize).
        return -(lsize - one), rsize - one, (ltime, rtime)
    return None


def _truncation(frame: StreamFrame, column: str) -> tuple[str, timedelta] | None:
    """``(time column, size)`` when ``column`` is ``time.dt.truncate(size)`` of a
    watermark column the frame still has."""
    key = trace_event_time(frame.plan, column)
    if key is None or len(key.steps) != 1:
        return None
    time = key.watermark.column
    if time not in frame.collect_schema() or not _emitted_time(frame, time):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the json format is deprecated, still exact
        tree = json.loads(key.steps[0][1].meta.undo_aliases().meta.serialize(format="json"))
    body = tree.get("Function", {}) if isinstance(tree, dict) else {}
    inputs = body.get("input", [])
    if body.get("function") != {"TemporalExpr": "Truncate"} or len(inputs) != 2:
        return None
    size = inputs[1].get("Literal", {}).get("Scalar", {}).get("String")
    if inputs[0] != {"Column": key.steps[0][0]} or not isinstance(size, str):
        return None
    try:
        return time, parse_duration(size, name="truncate")
    except MicrostreamError:
        return None
