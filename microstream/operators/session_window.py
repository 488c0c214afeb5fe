"""``group_by_session(col, gap=..., group_by=...)``: session windows on a stream.

A session of a key is a run of events each less than or exactly ``gap`` after
the previous one; it spans ``[first event, last event + gap)``. Sessions that
merely touch (the next event exactly ``gap`` after the last) merge, and a late
enough event can bridge two sessions into one. A session closes when the
watermark reaches its end; a row is late if ``event time + gap <=`` the
previous batch's watermark.

State per key is one row per open session (its bounds and partial aggregates,
plus the rows of aggregates that do not decompose); each batch merges the new
events with the open sessions of their keys, vectorised per key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.aggregates import ORDER_S, ORDER_T, AggregateSpec
from microstream.operators.base import StoreBackedOperator, lowest_us
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    OperatorContext,
    PartitionKeys,
    PlanNode,
    StatefulNode,
    WatermarkNode,
)
from microstream.state.store import StateStore
from microstream.time.windows import SessionSpec, T, from_us, to_us

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = ["SessionNode", "SessionOperator"]

S_START, S_END, SID = "__sstart", "__send", "__sid"


@dataclass(frozen=True, eq=False)
class SessionNode(StatefulNode):
    input: PlanNode
    keys: tuple[str, ...]
    aggs: tuple[pl.Expr, ...]
    session: SessionSpec
    watermark: WatermarkNode | None
    input_schema: pl.Schema

    @property
    def spec(self) -> AggregateSpec:
        return AggregateSpec(list(self.aggs))

    def output_schema(self) -> pl.Schema:
        dtype = self.input_schema[self.session.column]
        frame = pl.LazyFrame(schema=self.input_schema)
        keys: list[str | pl.Expr] = [*self.keys] or [pl.lit(0).alias("__g")]
        aggs = frame.group_by(keys).agg(self.aggs).collect_schema()
        columns: dict[str, pl.DataType] = {k: self.input_schema[k] for k in self.keys}
        columns["session_start"] = dtype
        columns["session_end"] = dtype
        columns.update({k: v for k, v in aggs.items() if k not in self.keys and k != "__g"})
        return pl.Schema(columns)

    def describe(self) -> str:
        aggs = ", ".join(str(a) for a in self.aggs)
        by = f", group_by={list(self.keys)}" if self.keys else ""
        return f"group_by_session({self.session.describe()}{by}).agg({aggs})"

    def explain_lines(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        lines = [pad + self.describe(), f"{pad}  · state evicted when session end <= watermark"]
        lines += [f"{pad}  · {line}" for line in self.spec.strategies()]
        return lines + self.input.explain_lines(depth + 1)

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        # Sessions of a key merge across batches, so the group keys alone partition them.
        return (self.keys,) if self.keys else (SINGLE_PARTITION,)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "session",
            "keys": list(self.keys),
            "session": self.session.describe(),
            "aggs": [str(a) for a in self.aggs],
        }

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode == "complete":
            msg = (
                "group_by_session supports output_mode='append' and 'update': closed sessions "
                "leave the state, so there is no complete table to re-emit"
            )
            raise PlanError(msg)
        if output_mode == "append" and self.watermark is None:
            msg = (
                "output_mode='append' over sessions needs with_watermark on the session's "
                f"time column {self.session.column!r}, so sessions can close"
            )
            raise PlanError(msg)

    def unbounded_state(self, output_mode: str) -> str | None:
        if self.watermark is not None:
            return None
        return (
            f"{self.describe()} never closes a session: no with_watermark on "
            f"{self.session.column!r}; add with_watermark({self.session.column!r}, delay) "
            "before it"
        )

    def build_operator(self, operator_id: str, storage: Storage) -> SessionOperator:
        return SessionOperator(self, operator_id, storage)


class SessionOperator(StoreBackedOperator):
    """Runtime of :class:`SessionNode`.

    Each state key (the group keys) holds all open sessions of that key as
    rows, so a batch replaces exactly the sessions of the keys it touched.
    """

    def __init__(self, node: SessionNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.kind = "session window aggregation"
        self.spec = node.spec
        self.keys = list(node.keys)
        self.store_keys = self.keys or ["__g"]
        self.session_cols = [*self.store_keys, S_START]
        self.out_schema = node.output_schema()
        prepared = pl.Schema(
            {
                **node.input_schema,
                "__g": pl.Int8(),
                S_START: pl.Int64(),
                S_END: pl.Int64(),
                ORDER_T: pl.Int64(),
                ORDER_S: pl.Int64(),
            }
        )
        partial = (
            pl.DataFrame(schema=prepared)
            .group_by(self.session_cols)
            .agg(self.spec.partial_exprs())
            .schema
        )
        self.sessions = StateStore(
            storage.sub("sessions"),
            operator=f"{operator_id}/sessions",
            key_columns=self.store_keys,
            schema=pl.Schema({**partial, S_END: pl.Int64()}),
        )
        self.rows: StateStore | None = None
        if self.spec.needs_rows:
            columns = [*self.session_cols, S_END, ORDER_T, ORDER_S]
            columns += [c for c in self.spec.buffered_columns() if c not in columns]
            self.rows = StateStore(
                storage.sub("rows"),
                operator=f"{operator_id}/rows",
                key_columns=self.store_keys,
                schema=pl.Schema({c: prepared[c] for c in columns}),
            )

    def _stores(self) -> list[StateStore]:
        return [s for s in (self.sessions, self.rows) if s is not None]

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        (batch,) = inputs
        self._dropped_late = self._updated = self._removed = self._dropped_null_time = 0
        node, gap = self.node, self.node.session.gap_us
        seq = pl.int_range(pl.len(), dtype=pl.Int64) + ctx.batch_id * (1 << 31)
        df = batch.with_columns(
            to_us(node.session.column).alias(T), seq.alias(ORDER_S), pl.lit(0, pl.Int8).alias("__g")
        )
        df = df.with_columns(pl.col(T).alias(ORDER_T), pl.col(T).alias(S_START))
        df = self._drop_null_times(
            df,
            T,
            ctx,
            batch.columns,
            node.input_schema[node.session.column],
            "belongs to no session",
        )
        # (no row can be late when the earliest one's session ends after the late watermark)
        if (
            node.watermark is not None
            and lowest_us(df.get_column(T)) + gap <= ctx.late_watermark_us
        ):
            late = pl.col(T) + gap <= ctx.late_watermark_us
            df = self._drop_late(
                df, late, ctx, batch.columns, node.input_schema[node.session.column]
            )
        changed = self._merge(df, gap) if df.height else None
        closed = pl.col(S_END) <= ctx.watermark_us
        if ctx.output_mode == "update":
            if changed is None:
                out = self._finalize(self.sessions.frame.clear(), self._rows_of(None))
            else:
                sessions = self.sessions.lookup(changed).join(
                    changed, on=self.session_cols, how="semi", nulls_equal=True
                )
                out = self._finalize(sessions, self._rows_of(changed))
            if node.watermark is not None:
                self._removed = self.sessions.filter_out(closed).height
                if self.rows is not None:
                    self.rows.filter_out(closed)
            return out
        gone = self.sessions.filter_out(closed)
        gone_rows = self.rows.filter_out(closed) if self.rows is not None else None
        self._removed = gone.height
        return self._finalize(gone, gone_rows)

    def _merge(self, df: pl.DataFrame, gap: int) -> pl.DataFrame:
        """Merge new events into their keys' open sessions; returns the changed sessions."""
        keys = self.store_keys
        # Every event is a one-event session [t, t + gap); events at one time share one.
        # (each step below is one lazy plan, one Polars call: not one call per verb; on the
        # in-memory engine, the eager verbs' own, so every sum is the one they gave)
        fresh = (
            df.lazy()
            .group_by(self.session_cols)
            .agg(self.spec.partial_exprs())
            .with_columns((pl.col(S_START) + gap).alias(S_END))
            .select(self.sessions.schema.names())
            .cast(self.sessions.schema)
            .collect(engine="in-memory")
        )
        touched = fresh.select(keys).unique()
        old = self.sessions.lookup(touched)
        combined = pl.concat(
            [
                old.lazy().with_columns(pl.lit(False).alias("__fresh")),
                fresh.lazy().with_columns(pl.lit(True).alias("__fresh")),
            ],
            how="vertical_relaxed",
        ).sort([*keys, S_START], nulls_last=True)
        # A session starts where the start is beyond every earlier end of its key;
        # touching sessions (start == previous end) merge.
        prev_end = pl.col(S_END).cum_max().shift(1).over(keys)
        is_new = (prev_end.is_null() | (pl.col(S_START) > prev_end)).cast(pl.Int64)
        # (a running count of session starts over all keys, not per key: the first row of
        # every key starts one, so (key, count) still names one session, one window pass less)
        merged = (
            combined.with_columns(is_new.cum_sum().alias(SID))
            .group_by([*keys, SID])
            .agg(
                pl.col(S_START).min(),
                pl.col(S_END).max(),
                pl.col("__fresh").any(),
                *self.spec.merge_exprs(),
            )
            .collect(engine="in-memory")
        )
        self.sessions.apply(
            upserts=merged.select(self.sessions.schema.names()).cast(self.sessions.schema)
        )
        if self.rows is not None:
            self._merge_rows(df, touched, merged)
        changed = merged.filter(pl.col("__fresh")).select(self.session_cols)
        self._updated = changed.height
        return changed

    def _merge_rows(self, df: pl.DataFrame, touched: pl.DataFrame, merged: pl.DataFrame) -> None:
        assert self.rows is not None
        columns = self.rows.schema.names()
        old_rows = self.rows.lookup(touched)
        new_rows = df.with_columns(pl.lit(0, pl.Int64).alias(S_END)).select(columns)
        all_rows = pl.concat([old_rows, new_rows], how="vertical_relaxed").drop(S_START, S_END)
        bounds = merged.select(*self.store_keys, S_START, S_END).sort(S_START)
        # Each row belongs to the merged session of its key that starts at or before it.
        assigned = all_rows.sort(ORDER_T).join_asof(
            bounds,
            left_on=ORDER_T,
            right_on=S_START,
            by=self.store_keys,
            strategy="backward",
            check_sortedness=False,
        )
        self.rows.apply(upserts=assigned.select(columns).cast(self.rows.schema))

    def _rows_of(self, sessions: pl.DataFrame | None) -> pl.DataFrame | None:
        if self.rows is None:
            return None
        if sessions is None:
            return self.rows.frame.clear()
        return self.rows.lookup(sessions).join(
            sessions, on=self.session_cols, how="semi", nulls_equal=True
        )

    def _finalize(self, sessions: pl.DataFrame, rows: pl.DataFrame | None) -> pl.DataFrame:
        dtype = self.node.input_schema[self.node.session.column]
        finalized = sessions.select(*self.session_cols, S_END, *self.spec.finalize_exprs())
        result = finalized.select(
            *self.session_cols,
            S_END,
            *(item.rewritten for item in self.spec.items if item.rewritten is not None),
        )
        if rows is not None:
            buffered = (
                rows.sort([ORDER_T, ORDER_S])
                .group_by(self.session_cols, maintain_order=True)
                .agg(item.original for item in self.spec.buffered)
            )
            result = result.join(buffered, on=self.session_cols, how="left", nulls_equal=True)
        out = result.select(
            *self.keys,
            from_us(pl.col(S_START), dtype).alias("session_start"),
            from_us(pl.col(S_END), dtype).alias("session_end"),
            *(pl.col(item.output_name) for item in self.spec.items),
        ).cast(self.out_schema, strict=False)
        return out.sort(["session_start", *self.keys], nulls_last=True, maintain_order=True)
