"""The LazyFrame verbs a stream refuses at plan time, each with why and what to use instead."""

from __future__ import annotations

__all__ = ["NOT_YET_VERBS", "UNSUPPORTED_VERBS"]

# Verbs of LazyFrame that have no meaning on an unbounded stream, and what to use.
UNSUPPORTED_VERBS: dict[str, str] = {
    "sort": "a stream has no end to sort up to; sort inside foreach_batch, or sort the "
    "sink's output when you read it",
    "tail": "a stream has no last rows; use a windowed aggregation or read the sink's output",
    "head": "a stream has no first rows to stop at; use Trigger.once() on a bounded source, "
    "or filter",
    "limit": "a stream has no first rows to stop at; use filter",
    "slice": "row positions are not defined on an unbounded stream; use filter",
    "with_row_index": "row positions are not defined on an unbounded stream; use the source's "
    "offsets, or a key column",
    "reverse": "a stream has no end to reverse from",
    "shift": "rows have no stable neighbours across micro-batches; use a windowed aggregation",
    "gather_every": "row positions are not defined on an unbounded stream; use filter",
    "top_k": "a stream has no final order; use a windowed aggregation",
    "bottom_k": "a stream has no final order; use a windowed aggregation",
    "interpolate": "interpolation needs neighbouring rows of the whole stream",
    "collect": "a stream never ends; start it with a sink_* verb, e.g. sink_memory(name), "
    "and read ms.table(name)",
    "count": "a stream never ends; use group_by(...).agg(pl.len())",
    "describe": "a stream never ends; describe the sink's output instead",
    "pivot": "the output columns would depend on values not seen yet",
    "merge_sorted": "a stream has no final order",
    "max": "a stream never ends; use group_by(...).agg(...)",
    "min": "a stream never ends; use group_by(...).agg(...)",
    "sum": "a stream never ends; use group_by(...).agg(...)",
    "mean": "a stream never ends; use group_by(...).agg(...)",
    "median": "a stream never ends; use group_by(...).agg(...)",
    "std": "a stream never ends; use group_by(...).agg(...)",
    "var": "a stream never ends; use group_by(...).agg(...)",
    "quantile": "a stream never ends; use group_by(...).agg(...)",
    "null_count": "a stream never ends; use group_by(...).agg(...)",
    "first": "a stream has no final first row; use group_by(...).agg(pl.first(...))",
    "last": "a stream has no last row; use group_by(...).agg(pl.last(...))",
}
NOT_YET_VERBS: tuple[str, ...] = ("rolling",)
"""Stateful verbs of LazyFrame that this version does not have on a stream yet."""
