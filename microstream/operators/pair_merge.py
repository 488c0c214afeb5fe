"""The aggregation's merge of stored partials with a batch's, column by column in numpy.

Each group of a batch has one partial row, and at most one stored partial row (the
fold's ``__fold_position`` names the batch row of each stored one). Polars' path
(:func:`microstream.operators.aggregation._merge_by_position`) concatenates both, groups
by the position and gathers the groups back into the batch's order: a group-by and a
gather of every value column for what is, per group, an aggregate of one or two values.
:func:`merge_pairs` computes those directly (the batch's values, with ``op(stored,
batch)`` written at the stored rows' positions), and only where the result is provably
the one Polars gives, bit for bit (the rules of :mod:`microstream.operators.tiny_fold`):

- state columns merged by ``sum`` (``len``, ``count``, ``null_count``, ``sum``, ``mean``'s
  sum and count) or by ``min``/``max``, of dtype Int64 or Float64, without nulls;
- integer sums that do not overflow (Polars wraps around; that path keeps doing so);
- float sums of finite, non-zero values whose sum is not zero (Polars' sum of a group
  is ``a + b``, or ``a`` for one value, except around zeros' signs);
- ``min``/``max`` of floats neither NaN nor zero (where orderings differ).

Anything else returns ``None`` and the caller runs the Polars path, which stays the
reference: ``tests/test_pair_merge.py`` compares the two on random batches.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from microstream.operators.aggregates import AggregateSpec
from microstream.state.store_rows import POSITION

__all__ = ["merge_pairs"]

_SUMMED = frozenset({"len", "count", "null_count", "sum", "mean"})


def _ops(spec: AggregateSpec) -> dict[str, str] | None:
    """How each state column merges (``sum``, ``min`` or ``max``), or None if one has
    no exact numpy rule here."""
    ops: dict[str, str] = {}
    for p in spec.primitives:
        if p.kind in _SUMMED:
            ops.update(dict.fromkeys(p.state_columns(), "sum"))
        elif p.kind in ("min", "max"):
            ops[p.name] = p.kind
        else:
            return None
    return ops


def _merged(op: str, stored: np.ndarray, batch: np.ndarray) -> np.ndarray | None:
    """``op`` of each stored value with its batch value, or None if Polars' result could
    differ."""
    if stored.dtype == np.float64:
        if not (np.isfinite(stored).all() and np.isfinite(batch).all()):
            return None
        if not (stored.all() and batch.all()):
            return None  # (a zero: its sign decides Polars' sum and min/max)
    if op == "min":
        return np.minimum(stored, batch)
    if op == "max":
        return np.maximum(stored, batch)
    total = stored + batch
    if stored.dtype == np.float64:
        return total if total.all() else None
    # (two's complement: an overflow flips the sign away from both operands')
    return None if (((stored ^ total) & (batch ^ total)) < 0).any() else total


def merge_pairs(
    old: pl.DataFrame,
    fresh: pl.DataFrame,
    key_cols: list[str],
    schema: pl.Schema,
    spec: AggregateSpec,
) -> pl.DataFrame | None:
    """The stored partials ``old`` (with ``__fold_position``: the row of ``fresh``
    holding each one's key, each row at most once) merged with the batch's partials
    ``fresh``, in ``fresh``'s order, or None where Polars' merge must run.

    Examples
    --------
    >>> spec = AggregateSpec([pl.col("x").sum().alias("s")])
    >>> name = spec.primitives[0].name
    >>> schema = pl.Schema({"k": pl.Int64, name: pl.Int64})
    >>> fresh = pl.DataFrame({"k": [1, 2, 3], name: [10, 20, 30]})
    >>> old = pl.DataFrame({name: [5], POSITION: pl.Series([2], dtype=pl.UInt32)})
    >>> merge_pairs(old, fresh, ["k"], schema, spec)[name].to_list()
    [10, 20, 35]
    """
    ops = _ops(spec)
    if ops is None:
        return None
    at = old.get_column(POSITION).to_numpy()
    columns: list[pl.Series] = []
    for name, dtype in schema.items():
        if name in key_cols:
            columns.append(fresh.get_column(name))
            continue
        stored, batch = old.get_column(name), fresh.get_column(name)
        if (
            name not in ops
            or dtype not in (pl.Int64, pl.Float64)
            or stored.dtype != dtype
            or batch.dtype != dtype
            or stored.null_count()
            or batch.null_count()
        ):
            return None
        values = batch.to_numpy()
        if dtype == pl.Float64 and not (np.isfinite(values).all() and values.all()):
            return None  # (a group of one value: Polars' sum of -0.0, NaN, inf differ)
        values = values.copy()  # (to_numpy may hand out Polars' own, read-only buffer)
        merged = _merged(ops[name], stored.to_numpy(), values[at])
        if merged is None:
            return None
        values[at] = merged
        columns.append(pl.Series(name, values, dtype=dtype))
    return pl.DataFrame(columns)
