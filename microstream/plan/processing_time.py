"""Processing time as a column: the batch's logged timestamp on every row.

Flink's ``PROCTIME()`` and Spark's ``current_timestamp()`` in a streaming query
give each row the time it is processed. Here that time is the batch's
``batch_timestamp_ms``, written to the batch's WAL entry before it runs: every
row of a batch gets the same value, and a batch re-run after a crash gets the
value of its first run, so the output of a query that windows or filters on
processing time is as deterministic as any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from microstream.exceptions import PlanError
from microstream.plan.nodes import OperatorContext, PlanNode, TransformNode

__all__ = ["PROCESSING_TIME_DTYPE", "ProcessingTimeNode", "processing_time_node"]

PROCESSING_TIME_DTYPE = pl.Datetime("ms")
"""Milliseconds, as the logged timestamp; UTC without a time zone, like most event-time
columns (and Nexmark's ``TIMESTAMP(3)``), so the two compare and window alike."""


@dataclass(frozen=True, eq=False)
class ProcessingTimeNode(TransformNode):
    """``with_processing_time(name)``: adds the batch's logged timestamp as column ``name``."""

    input: PlanNode
    name: str

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        return f"with_processing_time({self.name!r})"

    def stateless_steps(self) -> list[str]:
        return [*self.input.stateless_steps(), self.describe()]

    def lower(self, frames: Sequence[pl.LazyFrame], ctx: OperatorContext) -> pl.LazyFrame:
        stamp = pl.lit(ctx.batch_timestamp_ms, pl.Int64).cast(PROCESSING_TIME_DTYPE)
        return frames[0].with_columns(stamp.alias(self.name))


def processing_time_node(input: PlanNode, schema: pl.Schema, name: str) -> ProcessingTimeNode:
    """The node for ``with_processing_time(name)`` over ``input``, checked at plan time."""
    if not isinstance(name, str) or not name:
        msg = f"with_processing_time(name=) must be a non-empty column name; got {name!r}"
        raise PlanError(msg)
    if name in schema:
        # Replacing a column (an event time, say) with the clock is almost surely a mistake.
        msg = (
            f"with_processing_time({name!r}): the stream already has a column {name!r} "
            f"({schema[name]}); choose another name, or drop or rename that column first"
        )
        raise PlanError(msg)
    return ProcessingTimeNode(input, name)
