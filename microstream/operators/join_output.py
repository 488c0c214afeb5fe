"""The rows a stream-stream join emits, built as :meth:`polars.DataFrame.join` would.

The join operator (:mod:`microstream.operators.stream_join`) decides which rows pair
and which leave its buffers unmatched; this module knows the output's columns: their
names, order and dtypes for each ``how``, ``suffix`` and ``coalesce``.
"""

from __future__ import annotations

import polars as pl

__all__ = ["join_output_schema", "right_columns_after_left", "side_by_side"]


def join_output_schema(
    left: pl.Schema,
    right: pl.Schema,
    left_on: tuple[str, ...],
    right_on: tuple[str, ...],
    how: str,
    suffix: str,
    coalesce: bool | None = None,
) -> pl.Schema:
    """The schema Polars gives ``left.join(right, ...)`` (row order and values aside)."""
    if how in ("semi", "anti"):
        return left
    probe = pl.LazyFrame(schema=left).join(
        pl.LazyFrame(schema=right),
        left_on=list(left_on),
        right_on=list(right_on),
        how=how,  # type: ignore[arg-type]
        suffix=suffix,
        coalesce=coalesce,
    )
    return probe.collect_schema()


def right_columns_after_left(
    left: pl.Schema,
    right: pl.Schema,
    left_on: tuple[str, ...],
    right_on: tuple[str, ...],
    how: str,
    suffix: str,
    coalesce: bool | None,
) -> list[tuple[str, str]] | None:
    """For an inner or left join whose output is the left columns, then some right columns:
    those right columns as ``(right name, output name)``; None for any other join.

    The join operator then builds its output rows by placing the paired rows side by side
    (and nulls after a left row without a pair), with no Polars join: this is checked
    against :func:`join_output_schema`, names and dtypes, so a case Polars names otherwise
    (another ``how``, a suffix that collides again) keeps the Polars join.

    Examples
    --------
    >>> left = pl.Schema({"id": pl.Int64, "t": pl.Datetime("us")})
    >>> right = pl.Schema({"ref": pl.Int64, "t": pl.Datetime("us"), "x": pl.Float64})
    >>> right_columns_after_left(left, right, ("id",), ("ref",), "left", "_r", None)
    [('t', 't_r'), ('x', 'x')]
    >>> right_columns_after_left(left, right, ("id",), ("ref",), "inner", "_r", False)
    [('ref', 'ref'), ('t', 't_r'), ('x', 'x')]
    >>> right_columns_after_left(left, right, ("id",), ("ref",), "full", "_r", None) is None
    True
    """
    if how not in ("inner", "left"):
        return None
    # (Polars' default for inner and left joins: the right keys are dropped, coalesced
    # into the left ones, which a pair shares.)
    drop_keys = True if coalesce is None else coalesce
    columns = [
        (name, f"{name}{suffix}" if name in left else name)
        for name in right
        if not (drop_keys and name in right_on)
    ]
    expected = pl.Schema({**left, **{out: right[name] for name, out in columns}})
    actual = join_output_schema(left, right, left_on, right_on, how, suffix, coalesce)
    if len(expected) != len(left) + len(columns) or list(expected.items()) != list(actual.items()):
        return None
    return columns


def side_by_side(
    left: pl.DataFrame,
    right: pl.DataFrame,
    right_columns: list[tuple[str, str]],
    lonely: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """An inner or left join's output rows from its pairs, without a Polars join.

    ``left`` and ``right`` hold the pairs' rows, pair ``i`` in row ``i`` of each;
    ``right_columns`` as :func:`right_columns_after_left` gives them; ``lonely``: left
    rows without a pair (a left join), appended with nulls for the right columns.
    These are the rows, values and order a left join of the pairs gives (an inner
    join's rows in some order), without hashing the keys again.

    Examples
    --------
    >>> left = pl.DataFrame({"id": [1, 2], "t": [10, 20]})
    >>> right = pl.DataFrame({"ref": [1, 2], "t": [11, 25], "x": [0.5, 1.5]})
    >>> columns = [("t", "t_r"), ("x", "x")]
    >>> side_by_side(left, right, columns, pl.DataFrame({"id": [3], "t": [30]})).rows()
    [(1, 10, 11, 0.5), (2, 20, 25, 1.5), (3, 30, None, None)]
    """
    placed = right.select([pl.col(name).alias(out) for name, out in right_columns])
    out = left.hstack(placed.get_columns())
    if lonely is None or lonely.height == 0:
        return out
    nulls = [pl.lit(None, dtype).alias(name) for name, dtype in placed.schema.items()]
    return pl.concat([out, lonely.select(*left.columns, *nulls)], how="vertical")
