"""Stateful aggregation: ``group_by(...).agg`` and ``group_by_dynamic(...).agg`` on a stream.

Rows are assigned to their windows, late (row, window) pairs are dropped
against the previous batch's watermark, and the rest update per-group state:
partial aggregates for expressions that decompose, the rows themselves for
those that do not (see :mod:`microstream.operators.aggregates`). At the end of the batch
the operator emits by output mode, using the batch's watermark:

- ``append``: each window once, when ``window_end <= watermark``, then its state goes;
- ``update``: every group the batch changed, then closed windows go silently;
- ``complete``: the whole result table, every batch; nothing is evicted.

Without windows, a ``group_by`` closes its groups when a key is an event-time
key (:mod:`microstream.plan.event_time`: the watermarked column or a non-decreasing
function of it, such as its ``dt.truncate``). A global aggregation without one
keeps its groups forever, unless ``state_ttl`` removes the keys not updated for
that long in processing time (the batches' logged timestamps), checked at the
start of every batch before its rows are applied, as Flink's state TTL forgets
idle state: silently, so update mode emits nothing for an expired key, complete
mode stops listing it, and a key that comes back starts again from nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.aggregates import ORDER_S, ORDER_T, AggregateSpec
from microstream.operators.base import StoreBackedOperator, lowest_us
from microstream.operators.big_batch import BIG_BATCH_ROWS, fused_partials
from microstream.operators.dense_partials import DensePartials
from microstream.operators.pair_merge import merge_pairs
from microstream.operators.tiny_fold import TinyFold, tumbling_pairs
from microstream.plan.event_time import EventTimeKey
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    OperatorContext,
    PartitionKeys,
    PlanNode,
    StatefulNode,
    WatermarkNode,
)
from microstream.state.store import StateStore
from microstream.state.store_rows import POSITION, project
from microstream.time.duration import format_duration
from microstream.time.windows import END, START, T, Window, WindowSpec, to_us

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = ["AggregateNode", "AggregationOperator", "EmitPolicy"]

LAST_EMIT, ROWS_SINCE, PENDING = "__last_emit_ms", "__rows_since_emit", "__pending"
UPDATED = "__updated_ms"


@dataclass(frozen=True)
class EmitPolicy:
    """When update mode emits a changed group (Flink's triggers, beyond Spark).

    Without any trigger every changed group is emitted every batch. With
    triggers, a changed group is emitted when one of them fires, and always
    when the watermark passes its window's end (the on-time result); changes
    in the ``allowed_lateness`` after that are emitted as corrections.
    """

    early_every_ms: int | None = None
    every_n_rows: int | None = None
    on_change: tuple[tuple[str, float], ...] = ()
    allowed_lateness_us: int = 0

    @property
    def throttled(self) -> bool:
        return bool(self.early_every_ms or self.every_n_rows or self.on_change)

    def describe(self) -> str:
        parts = []
        if self.early_every_ms:
            parts.append(f"early_every={self.early_every_ms}ms")
        if self.every_n_rows:
            parts.append(f"every_n_rows={self.every_n_rows}")
        if self.on_change:
            parts.append(f"emit_on_change={dict(self.on_change)}")
        if self.allowed_lateness_us:
            parts.append(f"allowed_lateness={format_duration(self.allowed_lateness_us)}")
        return ", ".join(parts)


@dataclass(frozen=True, eq=False)
class AggregateNode(StatefulNode):
    """A grouped aggregation over a stream, with or without event-time windows."""

    input: PlanNode
    keys: tuple[str, ...]
    aggs: tuple[pl.Expr, ...]
    window: Window | None
    watermark: WatermarkNode | None
    input_schema: pl.Schema
    emit: EmitPolicy = EmitPolicy()
    event_key: EventTimeKey | None = None
    """The key whose groups the watermark closes (``group_by`` only; see ``eviction``)."""
    state_ttl_ms: int | None = None
    """Remove a key not updated for this long, in batch timestamps (processing time)."""
    rows_of: str | None = None
    """The verb (``top_k``) that turns each group's result into rows after this node:
    a group's rows are final only when it closes, so only append mode is exact."""

    @property
    def spec(self) -> AggregateSpec:
        return AggregateSpec(list(self.aggs))

    @property
    def eviction(self) -> str | None:
        """How state closes: by ``window`` end, by an event-time ``key``, or never (None)."""
        if self.window is not None:
            if self.watermark is not None and self.window.column == self.watermark.column:
                return "window"
            return None
        return "key" if self.event_key is not None else None

    def result_key(self) -> tuple[str, ...]:
        # The columns that fix the window, then the group keys.
        window = self.window.key_columns() if self.window is not None else ()
        return (*window, *self.keys)

    def can_chain(self) -> bool:
        # Groups that close (by window end or a time key) are final once emitted in
        # append mode, so they may feed another operator; emit triggers revise them.
        return self.eviction is not None and not (
            self.emit.throttled or self.emit.allowed_lateness_us
        )

    def output_delay_us(self) -> int:
        # A window emitted in batch N ends in (wm[N-1], wm[N]]; its rows carry the window
        # start, up to its longest span older. A time key is emitted in (wm[N-1], wm[N]].
        return self.window.max_span_us if self.eviction == "window" and self.window else 0

    def aggregate_schema(self) -> pl.Schema:
        frame = pl.LazyFrame(schema=self.input_schema)
        keys: list[str | pl.Expr] = [*self.keys] or [pl.lit(0).alias("__g")]
        schema = frame.group_by(keys).agg(self.aggs).collect_schema()
        return pl.Schema({k: v for k, v in schema.items() if k not in self.keys and k != "__g"})

    def output_schema(self) -> pl.Schema:
        columns: dict[str, pl.DataType] = {k: self.input_schema[k] for k in self.keys}
        if self.window is not None:
            columns.update(self.window.output_columns(self.input_schema[self.window.column]))
        columns.update(self.aggregate_schema())
        return pl.Schema(columns)

    def describe(self) -> str:
        aggs = ", ".join(str(a) for a in self.aggs)
        if self.window is not None:
            by = f", group_by={list(self.keys)}" if self.keys else ""
            return f"group_by_dynamic({self.window.describe()}{by}).agg({aggs})"
        return f"group_by({list(self.keys)}).agg({aggs})"

    def explain_lines(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        key = self.event_key
        evict = {
            "window": "state evicted when window end <= watermark",
            "key": f"state evicted when {key.column if key else ''} <= watermark"
            if key is None or key.is_event_time
            else f"state evicted when {key.column} < {key.describe()} at the first instant "
            "after the watermark (an event-time key)",
            None: "state kept forever (no watermark on a time key)",
        }[self.eviction]
        if self.eviction is None and self.state_ttl_ms is not None:
            evict = (
                f"a key not updated for {format_duration(self.state_ttl_ms * 1000)} of batch "
                "timestamps is removed (state_ttl, processing time)"
            )
        lines = [pad + self.describe(), f"{pad}  · {evict}"]
        if self.emit.describe():
            lines.append(f"{pad}  · update-mode emission: {self.emit.describe()}")
        lines += [f"{pad}  · {line}" for line in self.spec.strategies()]
        return lines + self.input.explain_lines(depth + 1)

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        # The group keys (an event-time key among them). A row's windows are assigned
        # after the exchange (a sliding window takes a row into several), so the window
        # is not a partition key: one owner holds every window of a key. Without keys,
        # every group lives with one owner.
        return (self.keys,) if self.keys else (SINGLE_PARTITION,)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "aggregate",
            "keys": list(self.keys),
            "window": self.window.fingerprint() if self.window else None,
            "aggs": [str(a) for a in self.aggs],
            "emit": self.emit.describe(),
            # (only when set, so that checkpoints of queries without it keep their plan)
            **({"state_ttl_ms": self.state_ttl_ms} if self.state_ttl_ms is not None else {}),
        }

    def check_output_mode(self, output_mode: str) -> None:
        if self.rows_of is not None and output_mode != "append":
            msg = (
                f"{self.rows_of}() emits each group's rows once, when the watermark closes the "
                "group, so it runs in output_mode='append' (an update would add rows, not "
                f"replace them); got output_mode={output_mode!r}"
            )
            raise PlanError(msg)
        if (self.emit.throttled or self.emit.allowed_lateness_us) and output_mode != "update":
            msg = (
                f"{self.emit.describe()} shape when changed groups are emitted, which only "
                f"output_mode='update' does (append emits each window once, complete every "
                f"group every batch); got output_mode={output_mode!r}"
            )
            raise PlanError(msg)
        if self.emit.allowed_lateness_us and self.eviction != "window":
            msg = "allowed_lateness needs a watermarked group_by_dynamic window"
            raise PlanError(msg)
        for column, _ in self.emit.on_change:
            if column not in self.aggregate_schema():
                msg = (
                    f"emit_on_change: {column!r} is not an aggregate of this query; aggregates "
                    f"are {list(self.aggregate_schema().names())}"
                )
                raise PlanError(msg)
        if self.state_ttl_ms is not None and output_mode == "append":
            msg = (
                "state_ttl removes idle groups without emitting them, and output_mode='append' "
                "emits a group only when it closes, so an expired group's rows would be lost; "
                "use output_mode='update' or 'complete' with state_ttl, or leave state_ttl out"
            )
            raise PlanError(msg)
        if output_mode == "append" and self.eviction is None:
            msg = (
                "output_mode='append' needs windows that close: add with_watermark(col, delay) "
                "on the window's time column (group_by_dynamic) or on a time key of group_by, "
                "so each group is emitted once when the watermark passes it; otherwise use "
                "output_mode='update' or 'complete'"
            )
            raise PlanError(msg)

    def unbounded_state(self, output_mode: str) -> str | None:
        if self.state_ttl_ms is not None:
            return None
        if self.eviction is None:
            if self.window is not None:
                return (
                    f"{self.describe()} keeps every window forever: no with_watermark on its "
                    f"time column {self.window.column!r}; add with_watermark("
                    f"{self.window.column!r}, delay) before it"
                )
            return (
                f"{self.describe()} keeps every group forever: no key is an event time (the "
                "with_watermark column, or a dt.truncate/dt.round/dt.offset_by/dt.date of it, "
                "or it plus a constant duration). Truncate before with_watermark, or add such "
                "a key after it, e.g. with_columns(hour=pl.col(<event time>).dt.truncate('1h'))"
                " and group_by('hour', ...); or bound the state with group_by(..., "
                "state_ttl='1h')"
            )
        if output_mode == "complete":
            return (
                f"{self.describe()} in output_mode='complete' keeps every group forever (the "
                "whole table is re-emitted every batch); output_mode='append' or 'update' "
                "lets the watermark evict closed groups"
            )
        return None

    def build_operator(self, operator_id: str, storage: Storage) -> AggregationOperator:
        return AggregationOperator(self, operator_id, storage)


class AggregationOperator(StoreBackedOperator):
    """Runtime of :class:`AggregateNode`: state stores, late filtering, emission."""

    def __init__(self, node: AggregateNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.kind = "window aggregation" if node.window else "aggregation"
        self.spec = node.spec
        self.key_cols = list(node.keys) + ([START, END] if node.window is not None else [])
        # Key groups follow the group keys only, the partition keys: a row's windows are
        # assigned after the exchange, so one owner holds every window of a key.
        self.hash_cols = list(node.keys) if node.keys else None
        self.out_schema = node.output_schema()
        key_schema: dict[str, pl.DataType] = {k: node.input_schema[k] for k in node.keys}
        if node.window is not None:
            key_schema.update({START: pl.Int64(), END: pl.Int64()})
        prepared = pl.Schema(
            {**node.input_schema, **key_schema, ORDER_T: pl.Int64(), ORDER_S: pl.Int64()}
        )
        self.partials: StateStore | None = None
        self.rows: StateStore | None = None
        self._tiny: TinyFold | None = None
        self._dense: DensePartials | None = None
        # the state of the groups the current batch touched (partials, rows)
        self._touched: tuple[pl.DataFrame | None, pl.DataFrame | None] = (None, None)
        if self.spec.primitives:
            partial_schema = (
                pl.DataFrame(schema=prepared)
                .group_by(self.key_cols)
                .agg(self.spec.partial_exprs())
                .schema
            )
            self.partials = StateStore(
                storage.sub("partials"),
                operator=f"{operator_id}/partials",
                key_columns=self.key_cols,
                hash_columns=self.hash_cols,
                prefix_lookups=False,  # (looked up by whole keys: one candidate per window)
                schema=partial_schema,
                one_row_per_key=True,  # (a group's partials are one row)
            )
            if not self.spec.needs_rows:  # (buffered rows: the batch's rows go to Polars)
                tiny = TinyFold(self.spec, self.key_cols, partial_schema, prepared)
                self._tiny = tiny if tiny.usable else None
            # (a window's start is on the ``every`` grid, its end the start plus the period)
            grid = {START: node.window.every_us} if isinstance(node.window, WindowSpec) else {}
            follows = {END: START} if node.window is not None else {}
            dense = DensePartials(
                self.spec, self.key_cols, partial_schema, prepared, strides=grid, follows=follows
            )
            self._dense = dense if dense.usable else None
        if self.spec.needs_rows:
            row_columns = [*self.key_cols, ORDER_T, ORDER_S]
            row_columns += [c for c in self.spec.buffered_columns() if c not in row_columns]
            self.rows = StateStore(
                storage.sub("rows"),
                operator=f"{operator_id}/rows",
                key_columns=self.key_cols,
                hash_columns=self.hash_cols,
                prefix_lookups=False,  # (looked up by whole keys: one candidate per window)
                schema=pl.Schema({c: prepared[c] for c in row_columns}),
            )
        self.emits: StateStore | None = None
        if node.emit.throttled:
            self.emits = StateStore(
                storage.sub("emits"),
                operator=f"{operator_id}/emits",
                key_columns=self.key_cols,
                hash_columns=self.hash_cols,
                prefix_lookups=False,  # (looked up by whole keys: one candidate per window)
                schema=pl.Schema(
                    {
                        **{c: prepared[c] for c in self.key_cols},
                        LAST_EMIT: pl.Int64(),
                        ROWS_SINCE: pl.Int64(),
                        PENDING: pl.Boolean(),
                        **{f"__emitted_{c}": pl.Float64() for c, _ in node.emit.on_change},
                    }
                ),
            )

        self.updated: StateStore | None = None
        if node.state_ttl_ms is not None:
            self.updated = StateStore(
                storage.sub("updated"),
                operator=f"{operator_id}/updated",
                key_columns=self.key_cols,
                hash_columns=self.hash_cols,
                prefix_lookups=False,  # (looked up by whole keys: one candidate per window)
                schema=pl.Schema({**{c: prepared[c] for c in self.key_cols}, UPDATED: pl.Int64()}),
            )

        self._oldest_update_ms: int | None = None
        # A lower bound of the stored windows' ends (inf: no window; None: unknown, after a
        # load or an eviction): a batch whose watermark cannot close the earliest window
        # evicts and emits nothing without a pass over the state (window eviction only).
        self._end_floor: float | None = None
        self._no_output: pl.DataFrame | None = None

    def _stores(self) -> list[StateStore]:
        return [s for s in (self.partials, self.rows, self.emits, self.updated) if s is not None]

    def load(self, version: int | None, *, key_groups: range | None = None) -> None:
        self._end_floor = None
        super().load(version, key_groups=key_groups)
        self._refresh_oldest()

    def timers_due(self, watermark_us: int | None, now_ms: int) -> bool:
        """Whether a batch is needed without rows: some key's ``state_ttl`` ran out (so
        complete mode stops listing it without waiting for new rows)."""
        ttl, oldest = self.node.state_ttl_ms, self._oldest_update_ms
        return ttl is not None and oldest is not None and oldest + ttl <= now_ms

    def _refresh_oldest(self) -> None:
        if self.updated is not None:
            self._oldest_update_ms = self.updated.frame.get_column(UPDATED).min()  # type: ignore[assignment]

    # -- one batch -------------------------------------------------------------------------

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        (batch,) = inputs
        self._dropped_late = self._updated = self._removed = self._dropped_null_time = 0
        self._touched = (None, None)
        expired = self._expire(ctx.batch_timestamp_ms)
        # A batch of millions of rows: its partials in one plan, no prepared frame (None:
        # the prepared path).
        grouped = self._big_batch(batch, ctx) if batch.height >= BIG_BATCH_ROWS else None
        if grouped is not None:
            updated = self._update_state(None, grouped) if grouped.height else None
        else:
            # (a batch without rows, e.g. the one a moved watermark asks for, has nothing to fold)
            pairs = self._prepare(batch, ctx) if batch.height else None
            updated = self._update_state(pairs) if pairs is not None and pairs.height else None
        self._updated = 0 if updated is None else updated.height
        if self.updated is not None and updated is not None:
            self.updated.apply(
                upserts=updated.select(
                    *self.key_cols, pl.lit(ctx.batch_timestamp_ms, pl.Int64).alias(UPDATED)
                ).cast(self.updated.schema)
            )
        if self.emits is not None and ctx.output_mode == "update":
            out = self._emit_throttled(ctx, updated)
        else:
            out = self._emit(ctx, None if updated is None else project(updated, self.key_cols))
        self._removed += expired
        self._refresh_oldest()
        return out

    def _expire(self, now_ms: int) -> int:
        """Forget the keys not updated for ``state_ttl`` before ``now_ms`` (the batch's
        logged timestamp, so a re-run batch forgets the same keys); how many."""
        if self.updated is None or self.node.state_ttl_ms is None:
            return 0
        gone = self.updated.filter_out(pl.col(UPDATED) + self.node.state_ttl_ms <= now_ms)
        if gone.height:
            keys = gone.select(self.key_cols)
            for store in (self.partials, self.rows, self.emits):
                if store is not None:
                    store.apply(deletes=keys)
        return gone.height

    def _prepare(self, batch: pl.DataFrame, ctx: OperatorContext) -> pl.DataFrame:
        node = self.node
        time_col = (
            node.window.column
            if node.window
            else (node.event_key.column if node.eviction == "key" and node.event_key else None)
        )
        tiny = None
        if isinstance(node.window, WindowSpec):  # (a few rows: their windows in Python)
            time_dtype = node.input_schema[node.window.column]
            tiny = tumbling_pairs(batch, node.window, time_dtype, ctx.batch_id)
        df = tiny if tiny is not None else self._assign(batch, ctx, time_col)
        # Complete mode keeps every group forever, so nothing is late (as in Spark).
        if (
            node.eviction is not None
            and ctx.output_mode != "complete"
            and not self._none_closed(df, ctx.late_watermark_us)
        ):
            # A row is late when its window or group was already closed by wm[N-1].
            late = self._closed_predicate(ctx.late_watermark_us)
            assert late is not None
            df = self._drop_late(
                df,
                late.fill_null(False),
                ctx,
                batch.columns,
                node.input_schema[time_col] if time_col else None,
                has_window=node.window is not None,
            )
        return df

    def _assign(
        self, batch: pl.DataFrame, ctx: OperatorContext, time_col: str | None
    ) -> pl.DataFrame:
        """``batch`` with event time, order and windows, rows without a time dropped."""
        node = self.node
        seq = pl.int_range(pl.len(), dtype=pl.Int64) + ctx.batch_id * (1 << 31)
        if time_col is not None:
            time_us = to_us(time_col)
            df = batch.with_columns(time_us.alias(T), seq.alias(ORDER_S), time_us.alias(ORDER_T))
        else:
            df = batch.with_columns(pl.lit(0, pl.Int64).alias(ORDER_T), seq.alias(ORDER_S))
        if node.window is not None:
            df = self._drop_null_times(
                df, T, ctx, batch.columns, node.input_schema[node.window.column], "has no window"
            )
            df = node.window.assign(df, node.input_schema[node.window.column])
        elif time_col is not None and ctx.output_mode != "complete":
            # A group keyed by a null event time would never close: in append mode it would
            # never be emitted, in update mode never evicted (complete mode keeps it, as Polars).
            df = self._drop_null_times(
                df,
                T,
                ctx,
                batch.columns,
                node.input_schema[time_col],
                f"its event-time key {time_col!r} is null, a group that never closes",
            )
        return df

    def _big_batch(self, batch: pl.DataFrame, ctx: OperatorContext) -> pl.DataFrame | None:
        """A large batch's partials and row counts by :func:`fused_partials`, or ``None``."""
        window = self.node.window
        if not isinstance(window, WindowSpec) or self.rows is not None:
            return None
        late = self.node.eviction is not None and ctx.output_mode != "complete"
        return fused_partials(
            batch,
            window,
            self.node.input_schema[window.column],
            list(self.node.keys),
            self.spec,
            late_watermark_us=ctx.late_watermark_us if late else None,
            count="__n",
        )

    def _update_state(
        self, pairs: pl.DataFrame | None, grouped: pl.DataFrame | None = None
    ) -> pl.DataFrame:
        """Fold the batch into the state; returns the touched keys with their row counts.

        ``grouped``: the batch's partials and row counts already (:meth:`_big_batch`).
        """
        # A few rows, one per group: partials and merge in Python, the same values.
        tiny = self._tiny.partials(pairs) if self._tiny is not None and pairs is not None else None
        # Many rows of small integer keys: counted into a dense array (no hash table).
        dense = (
            self._dense.partials(pairs)
            if pairs is not None
            and tiny is None
            and self._dense is not None
            and pairs.height >= _EAGER_ROWS
            else None
        )
        if grouped is not None:
            batch_partials = grouped
            updated = batch_partials.select(*self.key_cols, "__n")
        elif tiny is not None:
            batch_partials = tiny
            ones = pl.Series("__n", [1] * tiny.height, dtype=pl.get_index_type())
            updated = pl.DataFrame([*(tiny.get_column(k) for k in self.key_cols), ones])
        elif dense is not None:
            batch_partials = dense
            updated = dense.select(*self.key_cols, "__n")
        else:
            assert pairs is not None
            # One pass over the batch gives its partials, its keys and their row counts.
            batch_partials = _group_by(
                pairs, self.key_cols, [*self.spec.partial_exprs(), pl.len().alias("__n")]
            )
            updated = batch_partials.select(*self.key_cols, "__n")
        if self._end_floor is not None and self.node.eviction == "window":
            self._end_floor = min(self._end_floor, lowest_us(updated.get_column(END)))
        if self.partials is not None:
            # (the partials' columns in the state's order and dtypes, in one select)
            schema = self.partials.schema
            as_stored = [pl.col(c).cast(t) for c, t in schema.items()]

            def merge(old: pl.DataFrame, fresh: pl.DataFrame) -> pl.DataFrame:
                if old.height == 0:
                    return fresh  # (no stored partials for these groups: the batch's are)
                if tiny is not None and self._tiny is not None:
                    merged = self._tiny.merge(old, fresh)
                    if merged is not None:
                        return merged
                paired = merge_pairs(old, fresh, self.key_cols, schema, self.spec)
                if paired is not None:
                    return paired
                return _merge_by_position(old, fresh, self.key_cols, schema, self.spec)

            # The stored partials of the batch's groups, merged and written back: one probe.
            fresh = tiny if tiny is not None else batch_partials.select(as_stored)
            merged = self.partials.fold(fresh, merge, positions=True)
        all_rows = None
        if self.rows is not None:
            assert pairs is not None  # (buffered rows: never a big batch's grouped partials)
            columns = self.rows.schema.names()
            old_rows = self.rows.lookup(updated.select(self.key_cols))
            new_rows = pairs.select(columns)
            all_rows = pl.concat([old_rows, new_rows], how="vertical_relaxed").cast(
                self.rows.schema
            )
            self.rows.apply(upserts=all_rows)
        # The state of the touched groups now, for update mode (no second lookup).
        self._touched = (merged if self.partials is not None else None, all_rows)
        return updated

    def _emit(self, ctx: OperatorContext, updated: pl.DataFrame | None) -> pl.DataFrame:
        mode, wm = ctx.output_mode, ctx.watermark_us
        closed = self._closed_predicate(wm)
        if mode == "complete":
            return self._finalize(self._frame(self.partials), self._frame(self.rows))
        if mode == "update":
            if updated is None or updated.height == 0:
                out = self._nothing()
            else:
                out = self._finalize(*self._touched)
            self._evict(wm)
            return out
        assert closed is not None  # append without eviction is refused at plan time
        if self._nothing_closes(wm):
            self._removed = 0
            return self._nothing()
        gone_partials = self.partials.filter_out(closed) if self.partials else None
        gone_rows = self.rows.filter_out(closed) if self.rows else None
        self._removed = (gone_partials if gone_partials is not None else gone_rows).height  # type: ignore[union-attr]
        self._evicted(wm)
        return self._finalize(gone_partials, gone_rows)

    # -- fast paths of batches that close nothing --------------------------------------------

    def _none_closed(self, df: pl.DataFrame, wm: int) -> bool:
        """Whether no row of ``df`` (windows assigned) is in a window closed by ``wm``."""
        if self.node.eviction != "window":
            return False
        return lowest_us(df.get_column(END)) + self.node.emit.allowed_lateness_us > wm

    def _nothing_closes(self, wm: int) -> bool:
        """Whether watermark ``wm`` closes no stored window (then nothing is evicted)."""
        if self.node.eviction != "window":
            return False
        floor = self._end_floor
        if floor is None:
            floor = math.inf
            for store in self._stores():
                if store.rows:
                    floor = min(floor, lowest_us(store.frame.get_column(END)))
        if floor + self.node.emit.allowed_lateness_us > wm:
            self._end_floor = floor
            return True
        self._end_floor = None  # (unknown until asked again: windows close)
        return False

    def _evicted(self, wm: int) -> None:
        """After an eviction by ``wm``: the floor of the stored windows' ends it leaves."""
        if self.node.eviction != "window":
            return
        # Every window left ends after ``wm - allowed_lateness``: a lower bound of their
        # ends with no pass over the state (a pass that builds the whole frame, ~1-2 ms at
        # 30k windows, wasted where the next watermark closes a window again). A small
        # state, or an eviction that removed nothing (the bound tells nothing new), leaves
        # it unknown: the next batch finds the exact floor, cheap on a few rows, which
        # spares the batches after it (a watermark moving by a little each batch, as 1-row
        # batches do) an eviction's pass until a window can close.
        large = sum(store.rows for store in self._stores()) > _FLOOR_PASS_ROWS
        if self._removed and large:
            self._end_floor = wm - self.node.emit.allowed_lateness_us + 1
        else:
            self._end_floor = None

    def _nothing(self) -> pl.DataFrame:
        """The output of a batch that emits no row (built once, copied)."""
        if self._no_output is None:
            self._no_output = self._finalize(self._empty(self.partials), self._empty(self.rows))
        return self._no_output.clear()

    def _emit_throttled(self, ctx: OperatorContext, updated: pl.DataFrame | None) -> pl.DataFrame:
        """Update mode with emit triggers: emit a changed group only when a trigger fires."""
        assert self.emits is not None
        policy, now = self.node.emit, ctx.batch_timestamp_ms
        on_time = self.node.eviction == "window"
        book = self.emits.frame.clear()
        if updated is not None and updated.height:
            known = self.emits.lookup(updated)
            book = (
                updated.join(known, on=self.key_cols, how="left", nulls_equal=True)
                .with_columns(
                    pl.col(ROWS_SINCE).fill_null(0) + pl.col("__n"),
                    pl.lit(True).alias(PENDING),
                )
                .drop("__n")
                .select(self.emits.schema.names())
            )
        # Groups changed earlier but not emitted yet, whose window the watermark passed now.
        if on_time:
            due = self.emits.frame.filter(pl.col(PENDING) & (pl.col(END) <= ctx.watermark_us))
            book = pl.concat([book, due], how="vertical_relaxed").unique(
                self.key_cols, keep="first", maintain_order=True
            )
        if book.height == 0:
            self._evict(ctx.watermark_us)
            return self._nothing()
        keys = book.select(self.key_cols)
        current = self._finalize(self._semi(self.partials, keys), self._semi(self.rows, keys))
        current_keyed = self._with_state_keys(current)
        book = book.join(current_keyed, on=self.key_cols, how="left", nulls_equal=True)
        fire = pl.lit(False)
        if on_time:
            fire = fire | (pl.col(END) <= ctx.watermark_us)
        if policy.early_every_ms:
            fire = (
                fire
                | pl.col(LAST_EMIT).is_null()
                | (now - pl.col(LAST_EMIT) >= policy.early_every_ms)
            )
        if policy.every_n_rows:
            fire = fire | (pl.col(ROWS_SINCE) >= policy.every_n_rows)
        for column, threshold in policy.on_change:
            previous = pl.col(f"__emitted_{column}")
            moved = (pl.col(column).cast(pl.Float64) - previous).abs() > threshold
            fire = fire | previous.is_null() | moved.fill_null(False)
        book = book.with_columns(fire.alias("__fire"))
        fired = book.filter(pl.col("__fire"))
        new_book = book.with_columns(
            pl.when(pl.col("__fire")).then(now).otherwise(pl.col(LAST_EMIT)).alias(LAST_EMIT),
            pl.when(pl.col("__fire")).then(0).otherwise(pl.col(ROWS_SINCE)).alias(ROWS_SINCE),
            (~pl.col("__fire")).alias(PENDING),
            *(
                pl.when(pl.col("__fire"))
                .then(pl.col(c).cast(pl.Float64))
                .otherwise(pl.col(f"__emitted_{c}"))
                .alias(f"__emitted_{c}")
                for c, _ in policy.on_change
            ),
        )
        self.emits.apply(upserts=new_book.select(self.emits.schema.names()))
        out = current_keyed.join(fired.select(self.key_cols), on=self.key_cols, how="semi",
                                 nulls_equal=True).select(current.columns)  # fmt: skip
        self._evict(ctx.watermark_us)
        return out

    def _with_state_keys(self, out: pl.DataFrame) -> pl.DataFrame:
        """The emitted rows with the state key columns (window bounds in microseconds)."""
        window = self.node.window
        if window is None:
            return out
        return out.with_columns(*window.bounds_us())

    def _evict(self, wm: int) -> None:
        closed = self._closed_predicate(wm)
        if closed is None:
            return
        if self._nothing_closes(wm):
            self._removed = 0
            return
        removed = [s.filter_out(closed) for s in self._stores()]
        self._removed = removed[0].height if removed else 0
        self._evicted(wm)

    def _closed_predicate(self, wm: int) -> pl.Expr | None:
        if self.node.eviction == "window":
            return pl.col(END) + self.node.emit.allowed_lateness_us <= wm
        if self.node.eviction == "key" and self.node.event_key is not None:
            return self.node.event_key.closed(wm)
        return None

    def _frame(self, store: StateStore | None) -> pl.DataFrame | None:
        return None if store is None else store.frame

    def _empty(self, store: StateStore | None) -> pl.DataFrame | None:
        return None if store is None else store.frame.clear()

    def _semi(self, store: StateStore | None, keys: pl.DataFrame) -> pl.DataFrame | None:
        return None if store is None else store.lookup(keys)

    def _finalize(self, partials: pl.DataFrame | None, rows: pl.DataFrame | None) -> pl.DataFrame:
        """Results for the groups in ``partials``/``rows``, in the output schema."""
        # One lazy plan from the state rows to the sorted output: Polars fuses the selects.
        parts: list[pl.LazyFrame] = []
        if partials is not None:
            finalized = partials.lazy().select(*self.key_cols, *self.spec.finalize_exprs())
            parts.append(
                finalized.select(
                    *self.key_cols,
                    *(item.rewritten for item in self.spec.items if item.rewritten is not None),
                )
            )
        if rows is not None:
            parts.append(
                rows.lazy()
                .sort([ORDER_T, ORDER_S])
                .group_by(self.key_cols, maintain_order=True)
                .agg(item.original for item in self.spec.buffered)
            )
        result = parts[0]
        if len(parts) == 2:
            result = result.join(parts[1], on=self.key_cols, how="left", nulls_equal=True)
        window = self.node.window
        columns: list[pl.Expr] = [pl.col(k) for k in self.node.keys]
        sort_by: list[str] = list(self.node.keys)
        if window is not None:
            columns += window.output_exprs(self.node.input_schema[window.column])
            sort_by = [*window.key_columns(), *sort_by]
        columns += [pl.col(item.output_name) for item in self.spec.items]
        out = result.select(columns).cast(self.out_schema, strict=False)
        if sort_by:
            # (one thread: a batch's emitted groups are few, and the pool's hand-offs cost
            # more than they save on a loaded machine)
            out = out.sort(sort_by, nulls_last=True, maintain_order=True, multithreaded=False)
        if rows is None and partials is not None and partials.height <= _IN_MEMORY_ROWS:
            # Partials only: every step is row-wise or a stable sort, which give the same
            # bits on either engine, and the in-memory one skips the streaming engine's
            # scheduling (10k emitted groups: ~1.5 -> ~0.3 ms). Buffered rows are grouped
            # (sums of many values), so they stay on the engine that always ran them.
            return out.collect(engine="in-memory")
        return out.collect()


_FLOOR_PASS_ROWS = 10_000
"""Above this many stored rows an eviction leaves the watermark's bound as the floor of the
windows' ends (a pass over the state to find the exact one costs more than an eviction's
pass that may find nothing); up to it, the exact floor is found as before."""

_IN_MEMORY_ROWS = 100_000
"""Up to this many emitted groups a partials-only result is finalized on Polars' in-memory
engine; a larger one (a flush of every window) keeps the default engine's parallel plan."""

_EAGER_ROWS = 10_000
"""Below this many rows Polars' eager group-by is the cheaper one (a lazy plan's fixed cost,
0.1-0.2 ms, dominates: 1 row 0.09 vs 0.30 ms, 10k rows 0.55 vs 0.74 ms); above it the
lazy plan's optimisations win (100k rows: 10.7 ms lazy, 14.8 ms eager)."""


def _merge_by_position(
    old: pl.DataFrame,
    fresh: pl.DataFrame,
    key_cols: list[str],
    schema: pl.Schema,
    spec: AggregateSpec,
) -> pl.DataFrame:
    """The stored partials ``old`` (with the row of ``fresh`` holding each one's key,
    ``POSITION``) merged with the batch's ``fresh``, in the order of ``fresh``.

    Grouped by that position, not by the key columns: one integer instead of the keys
    (strings among them), and the merged rows come back in ``fresh``'s order, so the
    state keeps their hashes. Each group's rows are the stored one, then the batch's,
    the order the merge by key columns summed them in.
    """
    values = [c for c in schema.names() if c not in key_cols]
    at = pl.Series(POSITION, np.arange(fresh.height, dtype=np.uint32))
    both = pl.concat(
        [
            pl.DataFrame([old.get_column(POSITION), *(old.get_column(c) for c in values)]),
            pl.DataFrame([at, *(fresh.get_column(c) for c in values)]),
        ],
        how="vertical_relaxed",
    )
    grouped = _group_by(both, [POSITION], spec.merge_exprs())
    where = grouped.get_column(POSITION).to_numpy()
    if where.size and not bool((where[1:] > where[:-1]).all()):
        # (UInt32: Polars' index type, so the gather takes the positions as they are)
        order = np.empty(where.size, dtype=np.uint32)
        order[where] = np.arange(where.size, dtype=np.uint32)
        grouped = grouped[pl.Series(order)]  # (one gather back into ``fresh``'s order)
    return pl.DataFrame(
        [
            fresh.get_column(c) if c in key_cols else grouped.get_column(c).cast(t)
            for c, t in schema.items()
        ]
    )


def _group_by(frame: pl.DataFrame, keys: list[str], aggs: list[pl.Expr]) -> pl.DataFrame:
    """``frame.group_by(keys).agg(aggs)``, eager or lazy by the frame's size."""
    if frame.height < _EAGER_ROWS:
        return frame.group_by(keys).agg(aggs)
    return frame.lazy().group_by(keys).agg(aggs).collect()
