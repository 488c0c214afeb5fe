"""``unique(subset=..., keep="first")`` on a stream: deduplication with bounded state.

The first row of each key, in arrival order, is emitted once; later rows with
a seen key are dropped. The state of seen keys is bounded by the watermark:

- with the event-time column in ``subset``: a key is forgotten once its event
  time ``<= watermark`` (no later row can carry it without being late);
- with ``within=`` (Spark's ``dropDuplicatesWithinWatermark``): a key is
  forgotten once its first event time ``+ within <= watermark``;
- otherwise it is kept forever (state grows with the number of keys).

Rows with event time ``<=`` the previous batch's watermark are late and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.base import StoreBackedOperator
from microstream.plan.nodes import (
    OperatorContext,
    PartitionKeys,
    PlanNode,
    StatefulNode,
    WatermarkNode,
)
from microstream.state.store import StateStore
from microstream.time.duration import format_duration
from microstream.time.windows import T, to_us

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = ["DedupNode", "DedupOperator"]

EXPIRE = "__expire_us"


@dataclass(frozen=True, eq=False)
class DedupNode(StatefulNode):
    chainable: ClassVar[bool] = True  # emits input rows as they arrive, never revised

    input: PlanNode
    subset: tuple[str, ...]
    watermark: WatermarkNode | None
    within_us: int | None
    input_schema: pl.Schema

    @property
    def expiry(self) -> str | None:
        if self.watermark is None:
            return None
        if self.within_us is not None:
            return "within"
        if self.watermark.column in self.subset:
            return "event_time"
        return None

    def output_schema(self) -> pl.Schema:
        return self.input_schema

    def describe(self) -> str:
        within = f", within={format_duration(self.within_us)}" if self.within_us is not None else ""
        return f"unique(subset={list(self.subset)}, keep='first'{within})"

    def explain_lines(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        note = {
            "within": "a key is forgotten when its first event time + within <= watermark",
            "event_time": "a key is forgotten when its event time <= watermark",
            None: "keys are kept forever (no watermark on the subset)",
        }[self.expiry]
        return [pad + self.describe(), f"{pad}  · {note}", *self.input.explain_lines(depth + 1)]

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        return (self.subset,)  # the seen keys (every column when unique() had no subset)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "unique", "subset": list(self.subset), "within_us": self.within_us}

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode == "complete":
            msg = "unique() emits each first row once: use output_mode='append'"
            raise PlanError(msg)

    def unbounded_state(self, output_mode: str) -> str | None:
        if self.expiry is not None:
            return None
        return (
            f"{self.describe()} remembers every key forever: the subset has no watermarked "
            "event-time column and within= is not given; add with_watermark(col, delay) and "
            "put col in subset, or give within='10m' (Spark's dropDuplicatesWithinWatermark)"
        )

    def build_operator(self, operator_id: str, storage: Storage) -> DedupOperator:
        return DedupOperator(self, operator_id, storage)


class DedupOperator(StoreBackedOperator):
    def __init__(self, node: DedupNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.kind = "deduplication"
        schema = {c: node.input_schema[c] for c in node.subset}
        schema[EXPIRE] = pl.Int64()
        self.store = StateStore(
            storage.sub("keys"),
            operator=f"{operator_id}/keys",
            key_columns=list(node.subset),
            schema=pl.Schema(schema),
        )

    def _stores(self) -> list[StateStore]:
        return [self.store]

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        (batch,) = inputs
        node = self.node
        self._dropped_late = self._updated = self._removed = 0
        columns = list(batch.columns)
        subset = list(node.subset)
        df = batch
        if node.watermark is not None:
            # As Spark: with a watermark, rows behind it are late even when the event
            # time is not in the subset; a null event time is never late.
            df = df.with_columns(to_us(node.watermark.column).alias(T))
            late = (pl.col(T) <= ctx.late_watermark_us).fill_null(False)
            df = self._drop_late(df, late, ctx, columns, node.input_schema[node.watermark.column])
        if node.expiry is not None:
            # Spark's dropDuplicatesWithinWatermark treats a null event time as the epoch,
            # so such a key expires at once; with the time in the subset it never does.
            expire = (
                pl.col(T).fill_null(0) + node.within_us if node.expiry == "within" else pl.col(T)
            )
            df = df.with_columns(expire.alias(EXPIRE))
        else:
            df = df.with_columns(pl.lit(None, pl.Int64).alias(EXPIRE))
        firsts = df.unique(subset=subset, keep="first", maintain_order=True)
        seen = self.store.lookup(firsts.select(subset))  # only the partitions these keys hash to
        fresh = firsts.join(seen, on=subset, how="anti", nulls_equal=True)
        if fresh.height:
            self.store.apply(upserts=fresh.select(self.store.schema.names()))
        self._updated = fresh.height
        if node.expiry is not None:
            self._removed = self.store.filter_out(pl.col(EXPIRE) <= ctx.watermark_us).height
        return fresh.select(columns)
