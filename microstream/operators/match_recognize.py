"""``match_recognize``: row pattern matching on a stream, ONE ROW PER MATCH.

The semantics are SQL:2016's ``MATCH_RECOGNIZE`` as Flink runs it on a stream:

1. Rows are partitioned by ``partition_by`` and ordered by the watermarked event-time
   column ``order_by`` (ties in arrival order). A row is buffered in the operator's
   state until the watermark passes it (``event time <= watermark``): then no earlier
   row can still arrive (it would be late), and it joins the partition's *final* rows.
   Rows that arrive behind the previous batch's watermark are late: dropped, counted
   and routed to the ``on_late`` side output, as every operator does.
2. Over the final rows, matches are found in order: from the partition's *cursor*
   (the first row that may start a match), the matcher (:mod:`.pattern`) looks for the
   preferred mapping of rows to variables (greedy, reluctant, alternation left first)
   whose DEFINE conditions hold. If a mapping preferred to the one found needs a row
   that has not arrived yet, the start is undecided and waits for more rows. A match
   is emitted as one row (the partition columns and the MEASURES) and the cursor moves
   as ``after_match`` says; a start with no match moves the cursor one row.
3. ``within`` bounds a match: its last row is less than ``within`` after its first.
   A start whose bound the watermark has passed is always decided, so rows older than
   ``watermark - within`` leave the state (the rows ``prev`` may still read excepted).

DEFINE conditions that read the current row and ``prev(...)`` only are evaluated
once per row with Polars, over every buffered row of the batch's partitions at once;
conditions that read the rows mapped so far (``first``, ``last``, aggregates of a
variable) are evaluated for each candidate mapping.

State: one store of rows (the partition columns, the columns DEFINE and MEASURES
read, the event time in microseconds, the arrival order and whether the row is
behind the cursor), one key per row, hashed on the partition columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.base import StoreBackedOperator
from microstream.operators.match_finder import (
    DONE,
    GROUP,
    NUMBER,
    SEQ,
    TIME,
    MatchFinder,
)
from microstream.operators.match_spec import AFTER_MATCH, MatchSpec
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    OperatorContext,
    PartitionKeys,
    PlanNode,
    StatefulNode,
)
from microstream.state.store import StateStore
from microstream.time.duration import format_duration
from microstream.time.windows import to_us

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = ["AFTER_MATCH", "MatchRecognizeNode", "MatchRecognizeOperator", "MatchSpec"]


@dataclass(frozen=True, eq=False)
class MatchRecognizeNode(StatefulNode):
    input: PlanNode
    partition_by: tuple[str, ...]
    order_by: str
    pattern: str
    define: tuple[tuple[str, pl.Expr], ...]
    measures: tuple[tuple[str, pl.Expr], ...]
    after_match: str
    within_us: int | None
    input_schema: pl.Schema
    rows_per_match: str = "one"

    @cached_property
    def spec(self) -> MatchSpec:
        return MatchSpec.build(
            schema=self.input_schema,
            partition_by=self.partition_by,
            order_by=self.order_by,
            pattern=self.pattern,
            define=dict(self.define),
            measures=dict(self.measures),
            after_match=self.after_match,
            rows_per_match=self.rows_per_match,
        )

    def output_schema(self) -> pl.Schema:
        return self.spec.output_schema

    def describe(self) -> str:
        by = f"partition_by={list(self.partition_by)}, " if self.partition_by else ""
        within = f", within={format_duration(self.within_us)}" if self.within_us is not None else ""
        rows = ", rows_per_match='all'" if self.rows_per_match == "all" else ""
        return (
            f"match_recognize({by}order_by={self.order_by!r}, pattern={str(self.spec.tree)!r}, "
            f"after_match={self.after_match!r}{within}{rows})"
        )

    def explain_lines(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        lines = [pad + self.describe()]
        for var, expr in self.define:
            how = (
                "per row, vectorised"
                if self.spec.conditions[self.spec.program.variables.index(var)].row_local
                else "per candidate mapping"
            )
            lines.append(f"{pad}  · define {var}: {expr} ({how})")
        lines += [f"{pad}  · measure {name}: {expr}" for name, expr in self.measures]
        bound = (
            "rows leave the state once the watermark passes them by within"
            if self.within_us is not None
            else "rows of an open match stay until it completes or fails (no within)"
        )
        return [*lines, f"{pad}  · {bound}", *self.input.explain_lines(depth + 1)]

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        return (self.partition_by,) if self.partition_by else (SINGLE_PARTITION,)

    def fingerprint(self) -> dict[str, Any]:
        printed = {
            "kind": "match_recognize",
            "partition_by": list(self.partition_by),
            "order_by": self.order_by,
            "pattern": str(self.spec.tree),
            "define": {var: str(expr) for var, expr in self.define},
            "measures": {name: str(expr) for name, expr in self.measures},
            "after_match": self.after_match,
            "within_us": self.within_us,
        }
        if self.rows_per_match != "one":  # older checkpoints' records stay equal
            printed["rows_per_match"] = self.rows_per_match
        return printed

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode != "append":
            msg = (
                f"match_recognize emits each match once, when it is decided: use "
                f"output_mode='append' (got {output_mode!r})"
            )
            raise PlanError(msg)

    def unbounded_state(self, output_mode: str) -> str | None:
        if self.within_us is None and self.spec.has_unbounded_quantifier():
            return (
                f"{self.describe()} keeps the rows of a match that can still grow for as long "
                "as its unbounded quantifier keeps accepting rows; give within='1h' to bound a "
                "match"
            )
        if self.spec.max_prev and self.partition_by:
            # PREV reads the partition's previous rows, however old: they stay per key.
            return (
                f"{self.describe()} keeps the last {self.spec.max_prev} row(s) of every "
                "partition key it has seen, for prev(...) to read; partition by keys that "
                "take a bounded number of values, or compare with first(...) of the match"
            )
        return None

    def build_operator(self, operator_id: str, storage: Storage) -> MatchRecognizeOperator:
        return MatchRecognizeOperator(self, operator_id, storage)


class MatchRecognizeOperator(StoreBackedOperator):
    """Runtime of :class:`MatchRecognizeNode` (see the module's docstring): the rows store,
    a count of matches per partition when MEASURES read ``match_number()``, and the
    :class:`~microstream.operators.match_finder.MatchFinder`."""

    def __init__(self, node: MatchRecognizeNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.kind = "match_recognize"
        self.spec = node.spec
        self.keys = list(node.partition_by) or [GROUP]
        columns = {c: node.input_schema[c] for c in self.spec.state_columns}
        if not node.partition_by:
            columns[GROUP] = pl.Int8()
        schema = pl.Schema({**columns, TIME: pl.Int64(), SEQ: pl.Int64(), DONE: pl.Boolean()})
        self.store = StateStore(
            storage.sub("rows"),
            operator=f"{operator_id}/rows",
            key_columns=[*self.keys, SEQ],
            hash_columns=self.keys,
            schema=schema,
            one_row_per_key=True,
        )
        self.counts: StateStore | None = None
        if self.spec.numbers_matches:
            self.counts = StateStore(
                storage.sub("matches"),
                operator=f"{operator_id}/matches",
                key_columns=self.keys,
                schema=pl.Schema({**{k: columns[k] for k in self.keys}, NUMBER: pl.Int64()}),
            )
        self.finder = MatchFinder(node, self.keys)

    def _stores(self) -> list[StateStore]:
        return [self.store] if self.counts is None else [self.store, self.counts]

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        (batch,) = inputs
        self._dropped_late = self._updated = self._removed = self._dropped_null_time = 0
        node = self.node
        time_dtype = node.input_schema[node.order_by]
        seq = pl.int_range(pl.len(), dtype=pl.Int64) + ctx.batch_id * (1 << 31)
        df = batch.with_columns(to_us(node.order_by).alias(TIME), seq.alias(SEQ))
        df = self._drop_null_times(df, TIME, ctx, batch.columns, time_dtype, "cannot be ordered")
        late = pl.col(TIME) <= ctx.late_watermark_us
        df = self._drop_late(df, late, ctx, batch.columns, time_dtype)
        if df.height:
            if not node.partition_by:
                df = df.with_columns(pl.lit(0, pl.Int8).alias(GROUP))
            self.store.insert(
                df.with_columns(pl.lit(False).alias(DONE)).select(self.store.schema.names())
            )
            self._updated = df.height
        counts = self.counts
        decided = self.finder.run(
            self.store.frame, ctx.watermark_us, counts.lookup if counts is not None else None
        )
        upserts = None
        if decided.done is not None:
            upserts = decided.done.select(self.store.schema.names()).with_columns(
                pl.lit(True).alias(DONE)
            )
        self.store.apply(upserts=upserts, deletes=decided.evicted)
        if counts is not None and decided.counts is not None:
            counts.apply(upserts=decided.counts)
        self._removed = decided.evicted.height if decided.evicted is not None else 0
        return decided.output
