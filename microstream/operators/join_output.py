"""The rows a stream-stream join emits, built as :meth:`polars.DataFrame.join` would.

The join operator (:mod:`microstream.operators.stream_join`) decides which rows pair
and which leave its buffers unmatched; this module knows the output's columns: their
names, order and dtypes for each ``how``, ``suffix`` and ``coalesce``.
"""

from __future__ import annotations

import polars as pl

__all__ = ["join_output_schema"]


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
