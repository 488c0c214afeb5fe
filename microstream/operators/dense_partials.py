"""The aggregation's batch partials over small integer keys, by counting in numpy.

A batch of 100k rows in ~30k groups (10k keys, three 1-minute windows) costs Polars'
group-by ~6-7 ms: a hash table over the rows of three Int64 columns. When every key
column is an integer (or Boolean) whose values in the batch span a small range, and
the window's start is on a grid (``every``), each group is one cell of a dense array:
its index is the keys' offsets from their minimum, in mixed radix. ``np.bincount`` then
gives each cell's row count and sums in one pass over the rows (~1 ms), and the
present cells are the groups.

Taken only where the result is Polars' partial, or as exact as Polars' own:

- aggregates ``len``, ``count``, ``null_count``, ``sum`` and ``mean`` of a plain
  column of dtype Int64 or Float64, without nulls; key columns without nulls;
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
        The largest dense array, as a multiple of the batch's rows (plus 65,536).

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
        max_cells: int = 4,
    ) -> None:
        self.key_cols = key_cols
        self.schema = schema
        self.strides = strides or {}
        self.follows = follows or {}
        self.max_cells = max_cells
        self.columns = _plan(spec, key_cols, schema, input_schema)
        self._keys_usable = all(
            input_schema.get(k) is not None
            and (input_schema[k].is_integer() or input_schema[k] == pl.Boolean)
            and input_schema[k] != pl.UInt64  # (its values above 2**63 do not fit Int64)
            and input_schema[k] == schema[k]
            for k in key_cols
        ) and all(v in key_cols and v not in self.follows for v in self.follows.values())

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
        keys = {k: rows.get_column(k) for k in self.key_cols}
        if any(s.null_count() for s in keys.values()):
            return None
        if any(c.source is not None and rows.get_column(c.source).null_count() for c in columns):
            return None  # (a null value: counts and sums skip it, the cells would not)
        values = {k: s.to_numpy() for k, s in keys.items()}
        codes: dict[str, _Code] = {}
        cells = 1
        limit = self.max_cells * rows.height + (1 << 16)
        for name in self.key_cols:
            if name in self.follows:
                continue
            v = values[name]
            if v.dtype == np.bool_:
                v = values[name] = v.view(np.uint8)
            low, high = int(v.min()), int(v.max())
            stride = self.strides.get(name, 1)
            radix = (high - low) // stride + 1
            cells *= radix
            if cells > limit:
                return None
            codes[name] = _Code(low, stride, radix)
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
            gap = values[name].astype(np.int64) - values[base].astype(np.int64)
            if gap.size and not (gap == gap[0]).all():
                return None
            offsets[name] = int(gap[0])
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
        rest = present
        digits: dict[str, np.ndarray] = {}
        for name, code in reversed(codes.items()):
            rest, digit = np.divmod(rest, code.radix)
            digits[name] = digit * code.stride + code.low
        for name, base in self.follows.items():
            digits[name] = digits[base] + offsets[name]
        frame = pl.DataFrame(
            [
                *(_key_series(k, digits[k], self.schema[k]) for k in self.key_cols),
                *(out[c.name] for c in columns),
                pl.Series(_N, n, dtype=pl.get_index_type()),
            ]
        )
        return frame


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
