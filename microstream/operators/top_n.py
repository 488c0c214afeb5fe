"""A running Top-N per key, in update mode: Flink's Top-N over an unbounded key.

``group_by(k).top_k(n, by=..., rank="rn")`` with no event-time key (Flink's
``ROW_NUMBER() OVER (PARTITION BY k ORDER BY price DESC) <= n``, Nexmark q19) has no
group that ever closes, so its answer is a table that changes: for every key, the
rows ranked 1..n so far. As Flink's Top-N with the row number in its output, the
rows are keyed by ``(k, rn)``: each batch emits, for the keys whose top rows
changed, the rows at the positions that now hold another row, and a sink in update
mode (``output_mode="update"``, result key ``k + (rn,)``) keeps the last row per
position, which is the answer over every row read so far. No position ever empties:
rows are only added, so a key's positions 1..min(count, n) only fill up.

State: at most ``n`` rows per key (the key's current top rows and their rank), kept
for as long as the query runs; the key space is what grows (the operator warns
so, as Flink's Top-N needs a state TTL there). Ties on every ``by`` column keep the
row that came first, as the windowed ``top_k``. Input rows are never late: the
answer does not depend on event time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.base import StoreBackedOperator
from microstream.plan.nodes import OperatorContext, PartitionKeys, PlanNode, StatefulNode
from microstream.state.store import StateStore

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = ["TopNNode", "TopNOperator"]

_ARRIVAL, _WAS = "__arrival", "__was_rank"


@dataclass(frozen=True, eq=False)
class TopNNode(StatefulNode):
    """The ``n`` best rows per key so far, by ``by`` (``descending`` per column)."""

    input: PlanNode
    keys: tuple[str, ...]
    by: tuple[str, ...]
    descending: tuple[bool, ...]
    n: int
    rank: str
    input_schema: pl.Schema

    def output_schema(self) -> pl.Schema:
        rows = [(c, t) for c, t in self.input_schema.items() if c not in self.keys]
        keys = [(c, self.input_schema[c]) for c in self.keys]
        return pl.Schema([*keys, *rows, (self.rank, pl.Int64())])

    def describe(self) -> str:
        order = ", ".join(f"{c}{' desc' if d else ''}" for c, d in zip(self.by, self.descending))
        return f"group_by({list(self.keys)}).top_k({self.n}, by=[{order}], rank={self.rank!r})"

    def explain_lines(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        note = f"running Top-{self.n} per key, updated by (keys, {self.rank}); kept forever"
        return [pad + self.describe(), f"{pad}  · {note}", *self.input.explain_lines(depth + 1)]

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        return (self.keys,)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "top_n",
            "keys": list(self.keys),
            "by": list(self.by),
            "descending": list(self.descending),
            "n": self.n,
            "rank": self.rank,
        }

    def result_key(self) -> tuple[str, ...] | None:
        return (*self.keys, self.rank)

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode != "update":
            msg = (
                f"{self.describe()} has no event-time key, so its rows change as rows arrive: "
                "it runs in output_mode='update' (the sink keeps the last row per "
                f"{[*self.keys, self.rank]}); for rows emitted once, final, group by a window "
                "column instead"
            )
            raise PlanError(msg)

    def unbounded_state(self, output_mode: str) -> str | None:
        return (
            f"{self.describe()} keeps {self.n} rows for every key it has seen, forever: its "
            "keys have no event time to expire them by"
        )

    def build_operator(self, operator_id: str, storage: Storage) -> TopNOperator:
        return TopNOperator(self, operator_id, storage)


class TopNOperator(StoreBackedOperator):
    def __init__(self, node: TopNNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.kind = "topN"
        self.store = StateStore(
            storage.sub("rows"),
            operator=f"{operator_id}/rows",
            key_columns=list(node.keys),
            schema=node.output_schema(),
        )

    def _stores(self) -> list[StateStore]:
        return [self.store]

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        (batch,) = inputs
        node = self.node
        self._dropped_late = self._updated = self._removed = 0
        columns = list(node.output_schema())
        if batch.height == 0:
            return pl.DataFrame(schema=node.output_schema())
        keys = list(node.keys)
        old = self.store.lookup(batch.select(keys).unique())
        # Earlier rows first (the kept ones in rank order, then the batch in arrival
        # order), so a stable sort leaves ties in arrival order.
        candidates = pl.concat(
            [
                old.sort([*keys, node.rank]).rename({node.rank: _WAS}),
                batch.select([c for c in columns if c != node.rank]).with_columns(
                    pl.lit(None, pl.Int64).alias(_WAS)
                ),
            ],
            how="vertical",
        ).with_row_index(_ARRIVAL)
        ranked = (
            candidates.sort(
                [*node.by, _ARRIVAL],
                descending=[*node.descending, False],
                nulls_last=True,
                maintain_order=True,
            )
            .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(keys).alias(node.rank))
            .filter(pl.col(node.rank) <= node.n)
        )
        # A position changed when the row now at it is new, or moved there from another.
        moved = pl.col(_WAS).is_null() | (pl.col(_WAS) != pl.col(node.rank))
        changed = ranked.filter(moved).select(columns)
        if changed.height:
            touched = changed.select(keys).unique()
            rows = ranked.join(touched, on=keys, how="semi", nulls_equal=True).select(columns)
            self.store.apply(upserts=rows)
            self._updated = touched.height
        return changed
