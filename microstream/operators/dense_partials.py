"""The aggregation's batch partials over small integer keys, by counting in numpy.

A batch of 100k rows in ~30k groups (10k keys, three 1-minute windows) costs Polars'
group-by ~6-7 ms: a hash table over the rows of three Int64 columns. When the window's
start is on a grid (``every``) and integer (or Boolean) key columns span a small range
in the batch, each of their combinations is one cell of a dense array: its index is the
keys' offsets from their minimum, in mixed radix (the window's start first, then the
widest columns, while the cells stay within the rows plus 64k). ``np.bincount`` then
gives each cell's row count and sums in one pass over the rows (~1 ms), and the present
cells are the groups. The other key columns (a string, a time, a column with nulls, an
integer too wide to count by) must hold one value per cell, a function of the counted
keys (a name of an id, a shard of a key), which is checked against one row per cell
every batch; once a batch fails that check the operator keeps Polars' group-by.

Taken only where the result is Polars' partial, or as exact as Polars' own:

- aggregates ``len``, ``count``, ``null_count``, ``sum`` and ``mean`` of a plain
  column of dtype Int64 or Float64, without nulls; counted key columns without nulls,
  the others of dtypes whose equal values are one Polars group (no floats);
- integer sums and counts are computed in float64 only while every partial sum stays
  below 2**53, where float64 holds every integer exactly, so they are Polars' values;
- a Float64 sum is the sum of the group's values in row order. Polars' group-by of a
  batch this size (the lazy plan, :data:`~microstream.operators.aggregation._EAGER_ROWS`
  rows or more) sums a group's values in the order its morsels happen to be combined,
  which differs from run to run in the last bits (~15% of the benchmark's groups between
  two runs of the same plan); the row-order sum is one of those sums and deterministic.
  Values that are NaN, infinite or zero (whose sign Polars' sum treats its own way) and
  sums that cancel to zero go Polars' way.

Anything else returns ``None`` and the caller runs Polars' group-by, which stays the
reference: ``tests/test_dense_partials.py`` compares the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from microstream.operators.aggregates import AggregateSpec

__all__ = ["DensePartials"]

_EXACT_INT = float(1 << 53)
"""Float64 holds every integer below this exactly: sums of integers below it are exact."""

_N = "__n"


@dataclass(frozen=True)
class _Column:
    """One state column: counted (``source`` None: rows; else the column's rows, no
    nulls) or summed from ``source``."""

    name: str
    dtype: pl.DataType
    source: str | None
    how: str  # "count", "zero" or "sum"


@dataclass(frozen=True)
class _Code:
    """How a key column's values map to their digit of a cell's index."""

    low: int
    stride: int
    radix: int


class DensePartials:
    """The batch partials of :class:`~microstream.operators.aggregation.AggregationOperator`
    for batches whose keys are small integers.

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
    strides
        Key columns whose values lie on a grid (a window start: multiples of ``every``
        plus an offset): their step. Other key columns step by 1.
    follows
        Key columns that are another key column plus a constant (a window's end: its
        start plus the period): ``{column: that other column}``; checked per batch.
    max_cells
        The largest dense array, as a multiple of the batch's rows (plus 65,536). More
        cells than rows cost more than they save: 180k cells for 100k rows (5 keys, two
        narrow ones counted) took ~3x the time of 90k with one of them checked instead.

    Examples
    --------
    >>> spec = AggregateSpec([pl.len(), pl.col("v").sum()])
    >>> schema = pl.Schema({"k": pl.Int64, "__agg0": pl.Int64, "__agg1": pl.Float64})
    >>> dense = DensePartials(spec, ["k"], schema, pl.Schema({"k": pl.Int64, "v": pl.Float64}))
    >>> dense.partials(pl.DataFrame({"k": [7, 5, 7], "v": [0.5, 2.0, 1.0]})).rows()
    [(5, 1, 2.0, 1), (7, 2, 1.5, 2)]
    """

    def __init__(
        self,
        spec: AggregateSpec,
        key_cols: list[str],
        schema: pl.Schema,
        input_schema: pl.Schema,
        strides: dict[str, int] | None = None,
        follows: dict[str, str] | None = None,
        max_cells: int = 1,
    ) -> None:
        self.key_cols = key_cols
        self.schema = schema
        self.strides = strides or {}
        self.follows = follows or {}
        self.max_cells = max_cells
        self.columns = _plan(spec, key_cols, schema, input_schema)
        self._keys_usable = all(
            input_schema.get(k) is not None
            and _comparable(input_schema[k])
            and input_schema[k] != pl.UInt64  # (its values above 2**63 do not fit Int64)
            and input_schema[k] == schema[k]
            for k in key_cols
        ) and all(
            v in key_cols and v not in self.follows and schema[k] == pl.Int64 == schema[v]
            for k, v in self.follows.items()
        )
        # (at least one column to count cells by: an integer or Boolean key, or a window)
        self._keys_usable &= any(
            schema[k].is_integer() or schema[k] == pl.Boolean for k in key_cols
        )
        # Key columns found not to be functions of the coded ones once: Polars' group-by
        # from then on (a check per batch that fails costs ~1-2 ms at 100k rows).
        self._dependent_failed = False

    @property
    def usable(self) -> bool:
        """Whether the aggregates and keys can ever take this path."""
        return self.columns is not None and self._keys_usable

    def partials(self, rows: pl.DataFrame) -> pl.DataFrame | None:
        """The partials of ``rows`` in the store's schema, in the order of their keys'
        cells, with each group's row count ``__n``; or None where Polars' group-by runs."""
        columns = self.columns
        if columns is None or not self._keys_usable or rows.height == 0:
            return None
        if any(c.source is not None and rows.get_column(c.source).null_count() for c in columns):
            return None  # (a null value: counts and sums skip it, the cells would not)
        keys = {k: rows.get_column(k) for k in self.key_cols}
        coded = self._codes(keys, self.max_cells * rows.height + (1 << 16))
        if coded is None:
            return None
        codes, values, dependent = coded
        if dependent and self._dependent_failed:
            return None
        cells = math.prod(code.radix for code in codes.values())
        index = np.zeros(rows.height, dtype=np.int64)
        for name, code in codes.items():
            digit = values[name].astype(np.int64, copy=False) - code.low
            if code.stride != 1:
                on_grid = digit
                digit = digit // code.stride  # (numpy's divmod is ~10x slower than these)
                if (digit * code.stride != on_grid).any():
                    return None
            index *= code.radix
            index += digit
        offsets: dict[str, int] = {}
        for name, base in self.follows.items():
            gap = keys[name].to_numpy().astype(np.int64) - values[base].astype(np.int64)
            if gap.size and not (gap == gap[0]).all():
                return None
            offsets[name] = int(gap[0])
        # A key column that is not coded must be one value within each cell (a function of
        # the coded keys, as a name of an id is): checked against any row of its cell.
        some_row = np.empty(cells, dtype=np.int64)
        if dependent:
            some_row[index] = np.arange(rows.height)  # (which row of a cell wins: any)
            at = pl.Series(some_row[index])
            if not all(keys[k].gather(at).eq_missing(keys[k]).all() for k in dependent):
                self._dependent_failed = True  # (not functions of the coded keys: Polars')
                return None
        counts = np.bincount(index, minlength=cells)
        present = np.flatnonzero(counts)
        n = counts[present]
        out: dict[str, pl.Series] = {}
        sums: dict[str, np.ndarray | None] = {}  # (a sum and a mean of one column: one pass)
        for c in columns:
            if c.how == "count":
                out[c.name] = pl.Series(c.name, n, dtype=c.dtype)
            elif c.how == "zero":
                out[c.name] = pl.Series(c.name, np.zeros(n.size, np.int64), dtype=c.dtype)
            else:
                assert c.source is not None
                if c.source not in sums:
                    sums[c.source] = _sum(rows.get_column(c.source), index, counts)
                total = sums[c.source]
                if total is None or (c.dtype == pl.Int64 and total.dtype != np.int64):
                    return None
                if c.dtype == pl.Float64:
                    total = total.astype(np.float64, copy=False)
                out[c.name] = pl.Series(c.name, total[present], dtype=c.dtype)
        key_out: dict[str, pl.Series] = {}
        rest = present
        for name, code in reversed(codes.items()):
            rest, digit = rest // code.radix, rest % code.radix
            key_out[name] = _key_series(name, digit * code.stride + code.low, self.schema[name])
        for name, base in self.follows.items():
            key_out[name] = (key_out[base] + offsets[name]).alias(name)
        if dependent:
            some = pl.Series(some_row[present])
            key_out.update({k: keys[k].gather(some) for k in dependent})
        return pl.DataFrame(
            [
                *(key_out[k] for k in self.key_cols),
                *(out[c.name] for c in columns),
                pl.Series(_N, n, dtype=pl.get_index_type()),
            ]
        )

    def _codes(
        self, keys: dict[str, pl.Series], limit: int
    ) -> tuple[dict[str, _Code], dict[str, np.ndarray], list[str]] | None:
        """The key columns coded into a cell's index (window start first, then the widest
        integer columns while the cells stay within ``limit``), their values, and the key
        columns left to be functions of them; None if a column can be neither."""
        ranges: list[tuple[bool, int, str, int, int]] = []
        values: dict[str, np.ndarray] = {}
        dependent: list[str] = []
        for name, series in keys.items():
            if name in self.follows:
                continue
            if series.null_count() or not (series.dtype.is_integer() or series.dtype == pl.Boolean):
                if name in self.strides or not _comparable(series.dtype):
                    return None
                dependent.append(name)  # (a string, a null, a time: one value per cell?)
                continue
            v = series.to_numpy()
            if v.dtype == np.bool_:
                v = v.view(np.uint8)
            values[name] = v
            low, high = int(v.min()), int(v.max())
            stride = self.strides.get(name, 1)
            # (the window's start first: never a function of the group keys)
            ranges.append((name not in self.strides, -(high - low) // stride, name, low, stride))
        codes: dict[str, _Code] = {}
        cells = 1
        for _, minus_span, name, low, stride in sorted(ranges):
            radix = 1 - minus_span
            if cells * radix > limit:
                if name in self.strides:
                    return None
                dependent.append(name)
                continue
            cells *= radix
            codes[name] = _Code(low, stride, radix)
        return codes, values, dependent


def _comparable(dtype: pl.DataType) -> bool:
    """Whether equal values of ``dtype`` (``eq_missing``) are exactly one group of Polars'
    group-by: not floats (NaN, -0.0), nor nested or categorical dtypes."""
    return (
        dtype.is_integer()
        or dtype in (pl.String, pl.Binary, pl.Boolean, pl.Date, pl.Time)
        or isinstance(dtype, (pl.Datetime, pl.Duration))
    )


def _key_series(name: str, values: np.ndarray, dtype: pl.DataType) -> pl.Series:
    if dtype == pl.Boolean:
        return pl.Series(name, values.astype(np.bool_))
    return pl.Series(name, values, dtype=pl.Int64).cast(dtype)


def _sum(source: pl.Series, index: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    """Each cell's sum of ``source`` (row order; Int64 for an Int64 column, exact), or
    None if not exact."""
    cells = counts.size
    values = source.to_numpy()
    if values.dtype == np.int64:
        low, high = int(values.min()), int(values.max())
        if max(-low, high) * values.size >= _EXACT_INT:
            return None  # (a sum could pass 2**53, where float64 rounds integers)
        total = np.bincount(index, weights=values.astype(np.float64), minlength=cells)
        return total.astype(np.int64)  # (exact below 2**53; a mean casts it back exactly)
    if values.dtype != np.float64:
        return None
    if not (np.isfinite(values).all() and values.all()):
        return None  # (NaN, inf, or a zero whose sign Polars' sum decides its own way)
    total = np.bincount(index, weights=values, minlength=cells)
    if not total[counts > 0].all():
        return None  # (a group's values cancel to zero: the sign is Polars')
    return total


def _plan(
    spec: AggregateSpec, key_cols: list[str], schema: pl.Schema, input_schema: pl.Schema
) -> list[_Column] | None:
    """Each state column's rule, or None if an aggregate has none here."""
    out: list[_Column] = []
    for p in spec.primitives:
        if p.kind == "len":
            out.append(_Column(p.name, schema[p.name], None, "count"))
            continue
        if p.kind not in ("count", "null_count", "sum", "mean") or p.input is None:
            return None
        if not p.input.meta.is_column():
            return None  # (an expression over the row: Polars evaluates it)
        source = p.input.meta.output_name()
        dtype = input_schema.get(source)
        if dtype not in (pl.Int64, pl.Float64):
            return None
        if p.kind == "count":
            out.append(_Column(p.name, schema[p.name], source, "count"))
        elif p.kind == "null_count":
            out.append(_Column(p.name, schema[p.name], source, "zero"))
        elif p.kind == "sum":
            if schema[p.name] != dtype:
                return None
            out.append(_Column(p.name, schema[p.name], source, "sum"))
        else:  # mean: a Float64 sum of the values (cast) and their count
            total, count = p.state_columns()
            if schema[total] != pl.Float64:
                return None
            out.append(_Column(total, schema[total], source, "sum"))
            out.append(_Column(count, schema[count], source, "count"))
    if any(c.dtype != pl.Int64 for c in out if c.how != "sum"):
        return None
    if [*key_cols, *(c.name for c in out)] != schema.names():
        return None  # (the store holds other columns than these: not this operator's layout)
    return out
