"""The aggregation's fold of a batch of a few rows, in Python instead of Polars calls.

A 1-row batch (a file of one row, a message) pays for the batch's partials, a Polars
group-by, and their merge with the stored partials, a concat and a second group-by:
each a fraction of a millisecond of Polars' fixed cost (a plan, its thread pool's
wake-up) for one value. :class:`TinyFold` computes both over the rows' Python values,
and only where the result is provably the one Polars gives, bit for bit:

- every group of the batch holds ONE row (keys all distinct), so a partial is the
  aggregate of one value: no order of summation to match;
- the merge of a group's stored partial with the batch's is an aggregate of TWO
  values, ``old`` then ``fresh``: integer sums that stay in their dtype's range (Polars
  wraps around, which the Polars path keeps doing), float sums of finite values whose
  result is not zero (Polars' sum of two values is ``a + b``, except that its sum
  of ``-0.0`` and ``-0.0`` is ``+0.0``), and ``min``/``max`` of values that are
  neither NaN nor a zero (where Polars' ordering and Python's differ);
- the aggregates are ``len``, ``count``, ``null_count``, ``sum``, ``min``, ``max`` and
  ``mean`` of a plain column of an integer, float or Boolean dtype.

Anything else returns ``None`` and the caller runs the Polars path, which stays the
reference: ``tests/test_tiny_fold.py`` compares the two on random small batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from microstream.operators.aggregates import ORDER_S, ORDER_T, AggregateSpec
from microstream.state.store_rows import POSITION
from microstream.time.windows import END, START, T, WindowSpec, max_time_us

__all__ = ["TINY_ROWS", "TinyFold", "tumbling_pairs"]

TINY_ROWS = 16
"""Batches of at most this many rows (after window assignment) take the Python path;
above it the Polars calls' fixed cost is shared by enough rows to be the cheaper one."""

_KINDS = frozenset({"len", "count", "null_count", "sum", "min", "max", "mean"})
_INT_RANGES: dict[type[pl.DataType], tuple[int, int]] = {
    pl.Int8: (-(1 << 7), (1 << 7) - 1),
    pl.Int16: (-(1 << 15), (1 << 15) - 1),
    pl.Int32: (-(1 << 31), (1 << 31) - 1),
    pl.Int64: (-(1 << 63), (1 << 63) - 1),
    pl.UInt8: (0, (1 << 8) - 1),
    pl.UInt16: (0, (1 << 16) - 1),
    pl.UInt32: (0, (1 << 32) - 1),
    pl.UInt64: (0, (1 << 64) - 1),
}


class _NotExactError(Exception):
    """A value the Python path cannot reproduce exactly: the caller takes Polars' path."""


@dataclass(frozen=True)
class _Column:
    """One state column: how a row's value makes it and how two of them merge."""

    name: str
    dtype: pl.DataType
    source: str | None  # the input column (None: ``len``)
    one: Callable[[Any], Any]  # the partial of one row's value
    two: Callable[[Any, Any], Any]  # the merge of the stored partial with the batch's


class TinyFold:
    """The batch partials and the merge of :class:`AggregationOperator` for tiny batches.

    Parameters
    ----------
    spec
        The operator's aggregates.
    key_cols
        The state's key columns (group keys, then the window's bounds).
    schema
        The partials store's schema: key columns, then the state columns.
    input_schema
        The schema of the rows the partials are computed from (window assigned).

    Examples
    --------
    >>> import polars as pl
    >>> spec = AggregateSpec([pl.len(), pl.col("v").sum()])
    >>> schema = pl.Schema({"k": pl.Int64, "__agg0": pl.Int64, "__agg1": pl.Float64})
    >>> tiny = TinyFold(spec, ["k"], schema, pl.Schema({"k": pl.Int64, "v": pl.Float64}))
    >>> fresh = tiny.partials(pl.DataFrame({"k": [1, 2], "v": [0.5, None]}))
    >>> fresh.rows()
    [(1, 1, 0.5), (2, 1, 0.0)]
    >>> old = pl.DataFrame({"k": [2], "__agg0": [3], "__agg1": [1.25],
    ...                     "__fold_position": pl.Series([1], dtype=pl.UInt32)})
    >>> tiny.merge(old, fresh).rows()
    [(1, 1, 0.5), (2, 4, 1.25)]
    """

    def __init__(
        self,
        spec: AggregateSpec,
        key_cols: list[str],
        schema: pl.Schema,
        input_schema: pl.Schema,
    ) -> None:
        self.key_cols = key_cols
        self.schema = schema
        self.columns: list[_Column] | None = _plan(spec, key_cols, schema, input_schema)
        # (several rows of one float key may be one Polars group, -0.0 and 0.0, NaNs:
        # distinct Python tuples then say nothing; so keys of these dtypes only)
        self._keys_comparable = all(
            schema[k].is_integer()
            or schema[k] in (pl.String, pl.Boolean, pl.Date)
            or isinstance(schema[k], (pl.Datetime, pl.Duration))
            for k in key_cols
        )

    @property
    def usable(self) -> bool:
        """Whether every aggregate has a Python path (else every batch takes Polars')."""
        return self.columns is not None

    def partials(self, rows: pl.DataFrame) -> pl.DataFrame | None:
        """The partials of ``rows`` (one group per row) in the store's schema, or None
        when a key repeats or a value has no exact Python partial."""
        columns = self.columns
        if columns is None or rows.height > TINY_ROWS:
            return None
        if any(rows.get_column(k).dtype != self.schema[k] for k in self.key_cols):
            return None  # (keys the store casts: Polars' path does)
        if rows.height > 1:
            if not self._keys_comparable:
                return None
            keys = list(zip(*(rows.get_column(k).to_list() for k in self.key_cols), strict=True))
            if len(set(keys)) != len(keys):
                return None  # (a group of several rows: a sum of many values is Polars')
        try:
            values = [
                [c.one(v) for v in rows.get_column(c.source).to_list()]
                if c.source is not None
                else [1] * rows.height
                for c in columns
            ]
        except _NotExactError:
            return None
        return pl.DataFrame(
            [
                *(rows.get_column(k) for k in self.key_cols),
                *(
                    pl.Series(c.name, v, dtype=c.dtype)
                    for c, v in zip(columns, values, strict=True)
                ),
            ]
        )

    def merge(self, old: pl.DataFrame, fresh: pl.DataFrame) -> pl.DataFrame | None:
        """``fresh`` (from :meth:`partials`) merged with the stored partials ``old`` of
        some of its groups (with ``__fold_position``, one row per group), in ``fresh``'s
        order, or None when a merged value has no exact Python result."""
        columns = self.columns
        assert columns is not None
        at = old.get_column(POSITION).to_list()
        merged: list[pl.Series] = []
        try:
            for c in columns:
                values = fresh.get_column(c.name).to_list()
                for where, before in zip(at, old.get_column(c.name).to_list(), strict=True):
                    values[where] = c.two(before, values[where])
                merged.append(pl.Series(c.name, values, dtype=c.dtype))
        except _NotExactError:
            return None
        return pl.DataFrame([*(fresh.get_column(k) for k in self.key_cols), *merged])


def tumbling_pairs(
    batch: pl.DataFrame, window: WindowSpec, time_dtype: pl.DataType, batch_id: int
) -> pl.DataFrame | None:
    """``batch`` with its rows' event time, order and tumbling window, as the Polars path
    of the aggregation's ``_prepare`` adds them (``__t``, ``__os``, ``__ot``, ``__start``,
    ``__end``), or None when that path must run: more than :data:`TINY_ROWS` rows, a null
    or far-out time, a time unit whose conversion rounds, or a sliding window.

    Examples
    --------
    >>> import datetime as dt
    >>> import polars as pl
    >>> spec = WindowSpec("ts", every_us=60_000_000, period_us=60_000_000)
    >>> rows = pl.DataFrame({"ts": [dt.datetime(1970, 1, 1, 0, 1, 30)]})
    >>> tumbling_pairs(rows, spec, pl.Datetime("us"), batch_id=0).row(0)[1:]
    (90000000, 0, 90000000, 60000000, 120000000)
    """
    if batch.height > TINY_ROWS or window.period_us != window.every_us:
        return None
    times = batch.get_column(window.column)
    if times.null_count():
        return None  # (rows without a window: the Polars path counts and drops them)
    if isinstance(time_dtype, pl.Datetime) and time_dtype.time_unit in ("us", "ms"):
        scale = 1 if time_dtype.time_unit == "us" else 1000
    elif isinstance(time_dtype, pl.Date):
        scale = 86_400_000_000
    else:
        return None  # (nanoseconds: Polars' epoch rounds them its own way)
    physical = times.to_numpy()
    if physical.dtype.kind not in "mM":
        return None
    every, offset = window.every_us, window.offset_us
    limit = max_time_us(time_dtype) - window.period_us
    ts: list[int] = []
    starts: list[int] = []
    for value in physical.view(np.int64).tolist():
        t = value * scale
        start = (t - offset) // every * every + offset
        if not -_SAFE < t < _SAFE or start > limit:
            return None  # (Int64 arithmetic near its ends, a window past the dtype: Polars')
        ts.append(t)
        starts.append(start)
    seq = batch_id * (1 << 31)
    return pl.DataFrame(
        [
            *batch.get_columns(),
            pl.Series(T, ts, dtype=pl.Int64),
            pl.Series(ORDER_S, range(seq, seq + batch.height), dtype=pl.Int64),
            pl.Series(ORDER_T, ts, dtype=pl.Int64),
            pl.Series(START, starts, dtype=pl.Int64),
            pl.Series(END, [s + window.period_us for s in starts], dtype=pl.Int64),
        ]
    )


_SAFE = 1 << 62
"""Times (microseconds) within this of zero: the window arithmetic cannot overflow Int64."""


def _plan(
    spec: AggregateSpec, key_cols: list[str], schema: pl.Schema, input_schema: pl.Schema
) -> list[_Column] | None:
    """Each state column's Python rules, or None if an aggregate has none."""
    out: list[_Column] = []
    for p in spec.primitives:
        if p.kind not in _KINDS:
            return None
        if p.kind == "len":
            out.append(_Column(p.name, schema[p.name], None, _one_len, _int_sum(schema[p.name])))
            continue
        assert p.input is not None
        if not p.input.meta.is_column():
            return None  # (an expression over the row: Polars evaluates it)
        source = p.input.meta.output_name()
        dtype = input_schema.get(source)
        if dtype is None or not (dtype.is_integer() or dtype.is_float() or dtype == pl.Boolean):
            return None
        names = p.state_columns()
        if p.kind in ("count", "null_count"):
            counts: Callable[[Any], Any] = _one_count if p.kind == "count" else _one_null_count
            out.append(_Column(p.name, schema[p.name], source, counts, _int_sum(schema[p.name])))
        elif p.kind == "sum":
            target = schema[p.name]
            one, two = _sum_rules(target)
            out.append(_Column(p.name, target, source, one, two))
        elif p.kind in ("min", "max"):
            target = schema[p.name]
            pick = min if p.kind == "min" else max
            out.append(_Column(p.name, target, source, _one_same, _extreme(pick, target)))
        else:  # mean: a Float64 sum of the values and their count
            total, count = names
            out.append(_Column(total, schema[total], source, _one_float, _float_sum))
            out.append(_Column(count, schema[count], source, _one_count, _int_sum(schema[count])))
    if [*key_cols, *(c.name for c in out)] != schema.names():
        return None  # (the store holds other columns than these: not this operator's layout)
    return out


def _one_len(_: Any) -> int:
    return 1


def _one_count(value: Any) -> int:
    return 0 if value is None else 1


def _one_null_count(value: Any) -> int:
    return 1 if value is None else 0


def _one_same(value: Any) -> Any:
    return value


def _one_float(value: Any) -> float:
    # (Polars' ``cast(Float64)`` of an integer rounds to nearest as ``float`` does; a
    # group of one null sums to 0.0)
    return 0.0 if value is None else float(value)


def _sum_rules(target: pl.DataType) -> tuple[Callable[[Any], Any], Callable[[Any, Any], Any]]:
    if target.is_float():
        return (lambda v: 0.0 if v is None else v), (
            _float_sum if target == pl.Float64 else _raise2
        )
    # (a Boolean's sum counts its true values; an integer's keeps its value)
    return (lambda v: 0 if v is None else int(v)), _int_sum(target)


def _int_sum(target: pl.DataType) -> Callable[[Any, Any], Any]:
    bounds = _INT_RANGES.get(type(target))
    if bounds is None:
        return _raise2
    lo, hi = bounds

    def two(a: Any, b: Any) -> int:
        if a is None or b is None:
            raise _NotExactError
        total = a + b
        if not lo <= total <= hi:
            raise _NotExactError  # (Polars wraps around: its path keeps doing so)
        return int(total)

    return two


def _float_sum(a: Any, b: Any) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        raise _NotExactError
    total = float(a) + float(b)
    if total == 0.0:
        # (-0.0 + -0.0 is -0.0 in Python, +0.0 in Polars' sum, which starts from +0.0)
        raise _NotExactError
    return total


def _extreme(pick: Callable[[Any, Any], Any], target: pl.DataType) -> Callable[[Any, Any], Any]:
    is_float = target.is_float()

    def two(a: Any, b: Any) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        if is_float and (a == 0.0 or b == 0.0 or math.isnan(a) or math.isnan(b)):
            raise _NotExactError
        return pick(a, b)

    return two


def _raise2(a: Any, b: Any) -> Any:
    raise _NotExactError
