"""Stream-stream joins: two watermarked streams joined on keys within a time bound.

The semantics are Spark's symmetric hash join with an event-time range
condition. Each side buffers its rows in a
:class:`~microstream.state.segment_buffer.SegmentBuffer`: a segment of rows per
batch with its time range, each row with its key group (hashed on the join keys). A
batch takes the buffered rows in the time range its other side's rows can pair with
(when those are many, only the rows of its keys, a Polars semi join per side),
pairs them with one join of keys, times and positions, appends its new rows, and
marks a kept row by its row id when it first matches (outer joins remember that;
a semi or anti join's left row leaves the buffer at its first match, as it is
never emitted again); the watermark drops the segments wholly below its cut and
filters the few it straddles.
In batch ``N`` (late watermark ``wm[N-1]``, watermark ``wm[N]``):

1. rows whose own side's time ``<= wm[N-1]`` are late: dropped, counted, and
   routed to the ``on_late`` side output when the query asks;
2. the new rows of each side are matched against the other side's buffered and
   new rows; a pair is emitted when its keys are equal and
   ``right_time - left_time`` lies in ``[lower, upper]`` (inclusive), and at
   least one of its rows is new, so no pair is emitted twice;
3. rows are added to their side's buffer with a flag saying whether they ever
   matched (semi and anti: the left rows that did not match yet);
4. a left row can match no future right row once ``left_time + upper <=
   wm[N]`` (a future right row is later than ``wm[N]`` or late), a right row
   once ``right_time - lower <= wm[N]``: such rows leave the buffer, and the
   never-matched ones are emitted with nulls for the other side by outer joins
   (``left``, ``right``, ``full``) or alone by ``anti``. ``semi`` emits a left
   row the first time it matches.

Rows of the output have the columns :meth:`polars.DataFrame.join` gives for the
same ``how``, keys and ``suffix``: an inner or left join's output rows are the
paired rows placed side by side (then the unmatched left rows with nulls), which
is what Polars' join gives (:func:`~microstream.operators.join_output.right_columns_after_left`
checks the columns); the other joins build each output batch with one Polars join
of the rows involved, so naming, coalescing and null filling follow Polars.

A join without a time bound keeps every row forever: allowed (with a warning)
for inner joins, refused for the others, whose unmatched rows could never be
emitted.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.base import StoreBackedOperator, lowest_us
from microstream.operators.join_bounds import (
    signed_duration,
    stream_join_keys,
    stream_join_window,
)
from microstream.operators.join_output import (
    join_output_schema,
    right_columns_after_left,
    side_by_side,
)
from microstream.operators.join_where import parse_join_where
from microstream.plan.nodes import (
    OperatorContext,
    PartitionKeys,
    PlanNode,
    StatefulNode,
)
from microstream.state.segment_buffer import SegmentBuffer
from microstream.state.store import StateStore
from microstream.time.duration import format_duration
from microstream.time.windows import to_us

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = [
    "StreamJoinNode",
    "StreamJoinOperator",
    "join_output_schema",
    "parse_join_where",
    "stream_join_keys",
    "stream_join_window",
]

logger = logging.getLogger("microstream")

ROW_ID = "__row_id"
MATCHED = "__matched"
_PAIR = "__pair"
_AT = "__at"
_LEFT_AT = "__left_at"
_RIGHT_AT = "__right_at"
_TIME = "__time_us"
_STREAM_HOWS = ("inner", "left", "right", "full", "semi", "anti")
_EAGER_ROWS = 20_000
"""Below this many rows (both sides) the pair join runs eagerly: 0.4-0.6 ms instead of
0.75-0.8 ms for a lazy plan on ~1,200 x ~1,100 rows (Nexmark q3's batches)."""


class _TwoStreamOperator(StoreBackedOperator):
    """A join's runtime: fed both sides of a batch at once (its two inputs)."""

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        left, right = inputs
        return self.process_sides(left, right, ctx)

    @abstractmethod
    def process_sides(
        self, left: pl.DataFrame, right: pl.DataFrame, ctx: OperatorContext
    ) -> pl.DataFrame:
        """Join one batch's rows of the two sides; returns what to emit."""


class _TwoStreamNode(StatefulNode):
    """A stateful node over two streams: ``input`` (the left side) and ``right``."""

    right: PlanNode

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input, self.right)

    def explain_lines(self, depth: int = 0) -> list[str]:
        lines = ["  " * depth + self.describe(), "  " * (depth + 1) + "left:"]
        lines.extend(self.input.explain_lines(depth + 2))
        lines.append("  " * (depth + 1) + "right:")
        lines.extend(self.right.explain_lines(depth + 2))
        return lines


@dataclass(frozen=True, eq=False)
class StreamJoinNode(_TwoStreamNode):
    """``left.join(right, ...)`` of two streams (see the module docstring)."""

    chainable: ClassVar[bool] = True

    input: PlanNode  # the left side (StatefulNode's single input)
    right: PlanNode
    left_on: tuple[str, ...]
    right_on: tuple[str, ...]
    how: str
    suffix: str
    left_time: str | None
    right_time: str | None
    lower_us: int | None
    """Bound of ``right_time - left_time`` (inclusive); None: no time bound."""
    upper_us: int | None
    left_schema: pl.Schema
    right_schema: pl.Schema
    nulls_equal: bool = False
    coalesce: bool | None = None
    """Polars' ``coalesce`` of the key columns (``join_where`` keeps both: False)."""

    @property
    def bounded(self) -> bool:
        return self.lower_us is not None and self.upper_us is not None

    def output_schema(self) -> pl.Schema:
        return join_output_schema(
            self.left_schema,
            self.right_schema,
            self.left_on,
            self.right_on,
            self.how,
            self.suffix,
            self.coalesce,
        )

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        # The buffers are keyed (hashed) on the join keys: one owner per key, both sides.
        return (self.left_on, self.right_on)

    def output_delay_us(self) -> int:
        # An emitted row's times can be this much older than the watermark of the batch
        # that emits it; operators downstream judge lateness that much later.
        if not self.bounded:
            return 0
        assert self.lower_us is not None and self.upper_us is not None
        return max(self.upper_us, -self.lower_us, 0)

    def describe(self) -> str:
        if self.bounded:
            assert self.lower_us is not None and self.upper_us is not None
            bound = (
                f", {self.right_time} - {self.left_time} in "
                f"[{signed_duration(self.lower_us)}, {signed_duration(self.upper_us)}]"
            )
        else:
            bound = ", no time bound: state grows forever"
        keys = (
            f"on={list(self.left_on)}"
            if self.left_on == self.right_on
            else f"left_on={list(self.left_on)}, right_on={list(self.right_on)}"
        )
        return f"stream join(how={self.how!r}, {keys}{bound})"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "stream_join",
            "how": self.how,
            "left_on": list(self.left_on),
            "right_on": list(self.right_on),
            "left_time": self.left_time,
            "right_time": self.right_time,
            "lower_us": self.lower_us,
            "upper_us": self.upper_us,
            "left_schema": {k: str(v) for k, v in self.left_schema.items()},
            "right_schema": {k: str(v) for k, v in self.right_schema.items()},
        }

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode != "append":
            msg = (
                f"a stream-stream join emits each joined row once, when it is known: "
                f"output_mode={output_mode!r} is not supported (use 'append', as in Spark)"
            )
            raise PlanError(msg)

    def unbounded_state(self, output_mode: str) -> str | None:
        if self.bounded:
            return None
        return (
            f"{self.describe()} keeps every row of both sides forever; give a time bound, "
            "join(..., within='10m'), on with_watermark columns, so the watermark evicts them"
        )

    def build_operator(self, operator_id: str, storage: Storage) -> StreamJoinOperator:
        return StreamJoinOperator(self, operator_id, storage)


class StreamJoinOperator(_TwoStreamOperator):
    """Runtime of :class:`StreamJoinNode`: one buffer per side, matching, eviction."""

    kind = "stream join"

    def __init__(self, node: StreamJoinNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        extra = {ROW_ID: pl.Int64(), MATCHED: pl.Boolean()}
        # Rows appended by batch and evicted by time; key columns recorded as the keyed
        # store that kept the buffers before (join keys + row id), whose state loads.
        self.left, self.right = (
            SegmentBuffer(
                storage.sub(name),
                operator=f"{operator_id}/{name}",
                key_columns=[*on, ROW_ID],
                hash_columns=list(on),
                schema=pl.Schema({**schema, **extra}),
                time_column=time if node.bounded else None,
                row_id_column=ROW_ID,
                flag_column=MATCHED,
            )
            for name, on, schema, time in (
                ("left", node.left_on, node.left_schema, node.left_time),
                ("right", node.right_on, node.right_schema, node.right_time),
            )
        )
        # Whether a side's rows must remember that they matched: for the unmatched rows
        # outer joins and anti emit, and for semi's first match.
        self._track = (
            node.how in ("left", "full", "semi", "anti"),
            node.how in ("right", "full"),
        )
        # What does not change between batches, built once: most batches of a selective
        # join have few rows, where building these costs as much as using them.
        self._out_schema = node.output_schema()
        self._right_out = right_columns_after_left(
            node.left_schema,
            node.right_schema,
            node.left_on,
            node.right_on,
            node.how,
            node.suffix,
            node.coalesce,
        )
        self._empty = (
            pl.DataFrame(schema=self.left.schema),
            pl.DataFrame(schema=self.right.schema),
        )
        self._no_pairs = pl.DataFrame(schema={_LEFT_AT: pl.Int64(), _RIGHT_AT: pl.Int64()})

    def _stores(self) -> list[SegmentBuffer]:
        return [self.left, self.right]

    def process_sides(
        self, left: pl.DataFrame, right: pl.DataFrame, ctx: OperatorContext
    ) -> pl.DataFrame:
        node = self.node
        self._updated = self._removed = self._dropped_null_time = 0
        left, late_left = self._arrivals(left, node.left_time, node.left_schema, ctx, side=0)
        right, late_right = self._arrivals(right, node.right_time, node.right_schema, ctx, side=1)
        self._dropped_late = late_left + late_right
        self._updated = left.height + right.height

        # The buffered rows a new row of the other side can pair with: those in the time
        # range the other side's new rows reach; when they are many, only those with the
        # batch's keys (one semi join per side: cheaper than pairing them all).
        old_left = self._candidates(0, right)
        old_right = self._candidates(1, left)
        if old_left.height + old_right.height > left.height + right.height:
            old_left = _with_keys(old_left, right, node.right_on, node.left_on, node.nulls_equal)
            old_right = _with_keys(old_right, left, node.left_on, node.right_on, node.nulls_equal)
        all_left = _stacked(old_left, left)
        all_right = _stacked(old_right, right)
        if all_left.height and all_right.height:
            pairs = self._pairs(all_left, all_right, old_left.height, old_right.height)
        else:  # (every pair needs a row of each side)
            pairs = self._no_pairs

        # Flags: a row matched now or before; semi emits a left row at its first match.
        # New rows go in with their flag; a kept row is marked when it first matches.
        newly_matched = all_left.clear()
        leaving: pl.Series | None = None  # (buffered left rows that leave now, by row id)
        for side, (store, arrived, old, at) in enumerate(
            ((self.left, left, old_left, _LEFT_AT), (self.right, right, old_right, _RIGHT_AT))
        ):
            if not self._track[side] or pairs.height == 0:
                store.insert(arrived)
                continue
            hit = np.zeros(old.height + arrived.height, dtype=bool)
            hit[pairs.get_column(at).to_numpy()] = True
            old_hit = pl.Series(hit[: old.height])
            first = old.filter(old_hit & ~old.get_column(MATCHED)).with_columns(
                pl.lit(True).alias(MATCHED)
            )
            flagged = arrived.with_columns(pl.Series(MATCHED, hit[old.height :]))
            if side == 0 and node.how in ("semi", "anti"):
                # A matched left row of a semi or anti join is never emitted again (semi
                # emits it now, anti never): it leaves the buffer instead of being kept with
                # its flag (a buffered one before this batch's eviction).
                store.insert(flagged.filter(~pl.col(MATCHED)))
                leaving = old.filter(old_hit).get_column(ROW_ID)
            else:
                store.insert(flagged)
                if first.height:
                    store.mark(first.get_column(ROW_ID))
            if side == 0 and node.how == "semi":  # (what semi emits)
                newly_matched = pl.concat([first, flagged.filter(pl.col(MATCHED))], how="vertical")

        # Rows no future row of the other side can match leave the buffers.
        gone_left = gone_right = None
        if node.bounded:
            assert node.lower_us is not None and node.upper_us is not None
            assert node.left_time is not None and node.right_time is not None
            wm = ctx.watermark_us
            # (the rows that leave are built only where they are emitted)
            gone_left = self._evict(0, node.upper_us, wm, leaving)
            gone_right = self._evict(1, -node.lower_us, wm)
        if pairs.height == 0 and not self._removed:
            # Nothing paired and nothing left a buffer: no output row, whatever ``how``.
            return pl.DataFrame(schema=self._out_schema)
        return self._emit(all_left, all_right, pairs, newly_matched, gone_left, gone_right)

    # -- fast paths --------------------------------------------------------------------------

    def _candidates(self, side: int, other: pl.DataFrame) -> pl.DataFrame:
        """The buffered rows of ``side`` a new row of the other side (``other``) can pair
        with by time (or more: every row when most are): ``right_time - left_time`` in
        ``[lower, upper]`` puts a buffered left row in ``[min(new right) - upper,
        max(new right) - lower]``, a buffered right row in ``[min(new left) + lower,
        max(new left) + upper]``. A bound shorter than a batch's span keeps a sliver."""
        node = self.node
        store = self.left if side == 0 else self.right
        if other.height == 0 or store.rows == 0:
            return self._empty[side]
        if not node.bounded:
            return store.frame
        assert node.lower_us is not None and node.upper_us is not None
        time = node.right_time if side == 0 else node.left_time
        assert time is not None
        span = _span_us(other.get_column(time))
        if span is None:  # (no time: no row of ``other`` pairs)
            return self._empty[side]
        low, high = span
        if side == 0:
            return store.rows_between(low - node.upper_us, high - node.lower_us)
        return store.rows_between(low + node.lower_us, high + node.upper_us)

    def _evict(
        self, side: int, bound_us: int, wm: int, leaving: pl.Series | None = None
    ) -> pl.DataFrame | None:
        """Evict the side's rows with ``time + bound_us <= wm`` and count them; returns them
        when the join emits a side's rows that leave (None otherwise). The rows whose row id
        is in ``leaving`` go first, and are not returned."""
        store = self.left if side == 0 else self.right
        if leaving is not None and len(leaving):
            self._removed += store.mark(leaving, removed=True)
        how = self.node.how
        if how == "full" or how in (("left", "anti") if side == 0 else ("right",)):
            gone = store.evict_through(wm - bound_us)
            self._removed += gone.height
            return gone
        self._removed += store.drop_through(wm - bound_us)
        return None

    # -- steps -------------------------------------------------------------------------------

    def _arrivals(
        self,
        df: pl.DataFrame,
        time: str | None,
        schema: pl.Schema,
        ctx: OperatorContext,
        *,
        side: int,
    ) -> tuple[pl.DataFrame, int]:
        """A side's new rows (late ones dropped: how many) with row ids, ``matched = false``."""
        self._dropped_late = 0
        if df.height == 0:
            return self._empty[side], 0
        if time is not None:
            df = self._drop_null_times(
                df, time, ctx, list(schema), schema[time], "can never be matched in time"
            )
            # (the filter only when some row can be late: most batches have none)
            if lowest_us(df.get_column(time)) <= ctx.late_watermark_us:
                df = self._drop_late(
                    df, to_us(time) <= ctx.late_watermark_us, ctx, list(schema), schema[time]
                )
        # Unique per side and batch; a re-run batch gives the same ids.
        row_id = (
            pl.int_range(pl.len(), dtype=pl.Int64) * 2 + side + ctx.batch_id * (1 << 33)
        ).alias(ROW_ID)
        rows = df.select(*schema.names(), row_id, pl.lit(False).alias(MATCHED))
        return rows, self._dropped_late

    def _pairs(
        self, left: pl.DataFrame, right: pl.DataFrame, old_left: int, old_right: int
    ) -> pl.DataFrame:
        """Pairs that join now (positions in ``left`` and ``right``): equal keys, the time
        condition, at least one row new."""
        node = self.node
        probe_keys = [f"__k{i}" for i in range(len(node.left_on))]

        def side(on: tuple[str, ...], time: str | None) -> list[pl.Expr]:
            columns = [pl.col(c).alias(k) for c, k in zip(on, probe_keys)]
            if time is not None:
                columns.append(to_us(time).alias(_TIME))
            return [*columns, pl.int_range(pl.len(), dtype=pl.Int64).alias(_AT)]

        # Rows at or after ``old`` in each frame are the batch's new rows.
        condition = (pl.col(_AT) >= old_left) | (pl.col(f"{_AT}_r") >= old_right)
        if node.bounded:
            assert node.lower_us is not None and node.upper_us is not None
            gap = pl.col(f"{_TIME}_r") - pl.col(_TIME)
            condition = condition & (gap >= node.lower_us) & (gap <= node.upper_us)
        positions = [pl.col(_AT).alias(_LEFT_AT), pl.col(f"{_AT}_r").alias(_RIGHT_AT)]
        left_side, right_side = (
            side(node.left_on, node.left_time),
            side(node.right_on, node.right_time),
        )
        if left.height + right.height < _EAGER_ROWS:
            # (eager: a lazy plan's fixed cost is most of the work on a few thousand rows)
            joined = left.select(left_side).join(
                right.select(right_side),
                on=probe_keys,
                how="inner",
                suffix="_r",
                nulls_equal=node.nulls_equal,
            )
            return joined.filter(condition).select(positions)
        lazy = (
            left.lazy()
            .select(left_side)
            .join(
                right.lazy().select(right_side),
                on=probe_keys,
                how="inner",
                suffix="_r",
                nulls_equal=node.nulls_equal,
            )
        )
        return lazy.filter(condition).select(positions).collect()

    def _emit(
        self,
        all_left: pl.DataFrame,
        all_right: pl.DataFrame,
        pairs: pl.DataFrame,
        newly_matched: pl.DataFrame,
        gone_left: pl.DataFrame | None,
        gone_right: pl.DataFrame | None,
    ) -> pl.DataFrame:
        node = self.node
        left_columns = list(node.left_schema)
        if node.how == "semi":
            return newly_matched.select(left_columns)
        if node.how == "anti":
            if gone_left is None:
                return pl.DataFrame(schema=node.left_schema)
            return gone_left.filter(~pl.col(MATCHED)).select(left_columns)

        if self._right_out is not None:
            lonely = None
            if node.how == "left" and gone_left is not None and gone_left.height:
                lonely = gone_left.filter(~pl.col(MATCHED))
            right_names = [name for name, _ in self._right_out]
            return side_by_side(
                # (``frame[names]``: columns picked without a query plan)
                all_left[left_columns][pairs.get_column(_LEFT_AT)],
                # (no right column in the output, e.g. every one a coalesced key: nothing to
                # gather, and a frame of no columns has no rows to gather from)
                all_right[right_names][pairs.get_column(_RIGHT_AT)]
                if right_names
                else pl.DataFrame(),
                self._right_out,
                lonely,
            )

        # Rows of the output, each with a pair number: a joined pair shares one, an unmatched
        # row gets one of its own; one Polars join then builds the rows as Polars would.
        n = pairs.height
        pair_no = pl.int_range(pl.len(), dtype=pl.Int64)
        # (Gathered by position: no join on row ids.)
        pair_col = pl.Series(_PAIR, range(n), dtype=pl.Int64)
        lefts = [all_left[left_columns][pairs.get_column(_LEFT_AT)].with_columns(pair_col)]
        rights = [
            all_right[node.right_schema.names()][pairs.get_column(_RIGHT_AT)].with_columns(pair_col)
        ]
        if node.how in ("left", "full") and gone_left is not None:
            lonely = gone_left.filter(~pl.col(MATCHED)).select(left_columns)
            lefts.append(lonely.with_columns((pair_no + n).alias(_PAIR)))
            n += lonely.height
        if node.how in ("right", "full") and gone_right is not None:
            lonely = gone_right.filter(~pl.col(MATCHED)).select(node.right_schema.names())
            rights.append(lonely.with_columns((pair_no + n).alias(_PAIR)))
        left_rows = pl.concat(lefts, how="vertical")
        right_rows = pl.concat(rights, how="vertical")
        out = left_rows.join(
            right_rows,
            left_on=[*node.left_on, _PAIR],
            right_on=[*node.right_on, _PAIR],
            how=node.how,  # type: ignore[arg-type]
            suffix=node.suffix,
            nulls_equal=True,  # pairs decided already; null keys of a pair stay paired
            coalesce=node.coalesce,
        )
        return out[self._out_schema.names()]


def _stacked(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """The buffered rows, then the batch's (no copy when one of them is empty)."""
    if old.height == 0:
        return new
    if new.height == 0:
        return old
    return pl.concat([old, new], how="vertical")


def _span_us(times: pl.Series) -> tuple[int, int] | None:
    """Bounds of ``times`` (Datetime of any unit, Date) in microseconds since the epoch, as
    :func:`~microstream.time.windows.to_us` gives them or wider (nanoseconds round out);
    None: no value. Two reductions of the integers, no Polars plan.

    Examples
    --------
    >>> from datetime import date
    >>> _span_us(pl.Series([date(1970, 1, 2), None, date(1970, 1, 1)]))
    (0, 86400000000)
    >>> _span_us(pl.Series([-1_500, 2_500], dtype=pl.Datetime("ns")))
    (-2, 3)
    """
    physical = times.to_physical()
    low, high = physical.min(), physical.max()
    if low is None or high is None:
        return None
    low, high = int(low), int(high)  # type: ignore[arg-type]  # (integers' bounds)
    dtype = times.dtype
    if isinstance(dtype, pl.Date):
        return low * 86_400_000_000, high * 86_400_000_000
    assert isinstance(dtype, pl.Datetime), dtype
    unit = dtype.time_unit or "us"
    if unit == "ns":
        return low // 1000, -(-high // 1000)
    if unit == "ms":
        return low * 1000, high * 1000
    return low, high


def _with_keys(
    rows: pl.DataFrame,
    other: pl.DataFrame,
    other_on: tuple[str, ...],
    on: tuple[str, ...],
    nulls_equal: bool,
) -> pl.DataFrame:
    """The ``rows`` whose join keys ``on`` occur in ``other`` (as ``other_on``)."""
    if other.height == 0 or rows.height == 0:
        return rows.clear()
    # Keys with a null never match unless nulls_equal: the semi join drops them as the pair
    # join would.
    return rows.join(
        other.select(other_on),
        left_on=list(on),
        right_on=list(other_on),
        how="semi",
        nulls_equal=nulls_equal,
    )


# -- join_asof of two streams --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StreamAsofJoinNode(_TwoStreamNode):
    """``left.join_asof(right, ...)`` of two streams, strategy ``"backward"``.

    Each left row is emitted, with the latest right row of its ``by`` key at or
    before its time (within ``tolerance``), once the watermark guarantees that
    no such right row can still arrive: when ``left_time <= wm[N]`` (a right row
    arriving later is later than ``wm[N]`` or late). Left rows wait in state until
    then; right rows stay while a future left row could pick them: per key, the
    rows after the watermark and the latest one at or before it (none older than
    ``wm - tolerance``), pruned whenever the key is touched.
    """

    chainable: ClassVar[bool] = True

    input: PlanNode  # the left side
    right: PlanNode
    left_time: str
    right_time: str
    by_left: tuple[str, ...]
    by_right: tuple[str, ...]
    tolerance_us: int | None
    suffix: str
    allow_exact_matches: bool
    left_schema: pl.Schema
    right_schema: pl.Schema

    def _asof(self, left: pl.LazyFrame, right: pl.LazyFrame) -> pl.LazyFrame:
        tolerance = None if self.tolerance_us is None else timedelta(microseconds=self.tolerance_us)
        return left.join_asof(
            right,
            left_on=self.left_time,
            right_on=self.right_time,
            by_left=list(self.by_left),
            by_right=list(self.by_right),
            strategy="backward",
            suffix=self.suffix,
            tolerance=tolerance,
            allow_exact_matches=self.allow_exact_matches,
            check_sortedness=False,  # both sides are sorted by time before the join
        )

    def output_schema(self) -> pl.Schema:
        probe = self._asof(
            pl.LazyFrame(schema=self.left_schema), pl.LazyFrame(schema=self.right_schema)
        )
        return probe.collect_schema()

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        # The state is keyed by the ``by`` columns (the verb requires them).
        return (self.by_left, self.by_right)

    def describe(self) -> str:
        tolerance = (
            f", tolerance={format_duration(self.tolerance_us)}"
            if self.tolerance_us is not None
            else ""
        )
        return (
            f"stream join_asof(on {self.left_time!r} >= {self.right_time!r}, "
            f"by_left={list(self.by_left)}, by_right={list(self.by_right)}{tolerance})"
        )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "stream_join_asof",
            "left_time": self.left_time,
            "right_time": self.right_time,
            "by_left": list(self.by_left),
            "by_right": list(self.by_right),
            "tolerance_us": self.tolerance_us,
            "left_schema": {k: str(v) for k, v in self.left_schema.items()},
            "right_schema": {k: str(v) for k, v in self.right_schema.items()},
        }

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode != "append":
            msg = f"a stream join_asof emits each left row once: output_mode={output_mode!r} is not supported (use 'append')"
            raise PlanError(msg)

    def build_operator(self, operator_id: str, storage: Storage) -> StreamAsofJoinOperator:
        return StreamAsofJoinOperator(self, operator_id, storage)


class StreamAsofJoinOperator(_TwoStreamOperator):
    """Runtime of :class:`StreamAsofJoinNode`: waiting left rows, candidate right rows."""

    kind = "stream join_asof"

    def __init__(self, node: StreamAsofJoinNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.left = StateStore(
            storage.sub("left"),
            operator=f"{operator_id}/left",
            key_columns=list(node.by_left),
            schema=node.left_schema,
        )
        self.right = StateStore(
            storage.sub("right"),
            operator=f"{operator_id}/right",
            key_columns=list(node.by_right),
            schema=node.right_schema,
        )

    def _stores(self) -> list[StateStore]:
        return [self.left, self.right]

    def process_sides(
        self, left: pl.DataFrame, right: pl.DataFrame, ctx: OperatorContext
    ) -> pl.DataFrame:
        node = self.node
        self._updated = self._removed = self._dropped_null_time = 0
        left, late_left = self._on_time(left, node.left_time, node.left_schema, ctx)
        right, late_right = self._on_time(right, node.right_time, node.right_schema, ctx)
        self._dropped_late = late_left + late_right
        self._updated = left.height + right.height
        self._append(self.left, left, node.by_left)
        self._append(self.right, right, node.by_right)
        # Left rows whose time the watermark passed: no right row before them can come.
        wm = ctx.watermark_us
        due = self.left.filter_out(to_us(node.left_time) <= wm)
        out = pl.DataFrame(schema=node.output_schema())
        if due.height:
            keys = due.select(
                [pl.col(a).alias(b) for a, b in zip(node.by_left, node.by_right)]
            ).unique()
            candidates = self.right.lookup(keys)
            out = (
                node._asof(due.lazy().sort(node.left_time), candidates.lazy().sort(node.right_time))
                .collect()
                .select(node.output_schema().names())
            )
        touched = pl.concat(
            [
                right.select(node.by_right),
                due.select([pl.col(a).alias(b) for a, b in zip(node.by_left, node.by_right)]),
            ],
            how="vertical",
        ).unique()
        self._prune(touched, wm)
        self._removed = due.height
        return out

    def _on_time(
        self, df: pl.DataFrame, time: str, schema: pl.Schema, ctx: OperatorContext
    ) -> tuple[pl.DataFrame, int]:
        self._dropped_late = 0
        if df.height:
            df = self._drop_null_times(
                df,
                time,
                ctx,
                list(schema),
                schema[time],
                "has no row of the other side at or before it",
            )
            df = self._drop_late(
                df, to_us(time) <= ctx.late_watermark_us, ctx, list(schema), schema[time]
            )
        return df[schema.names()], self._dropped_late

    def _append(self, store: StateStore, rows: pl.DataFrame, by: tuple[str, ...]) -> None:
        if rows.height == 0:
            return
        old = store.lookup(rows.select(by).unique())
        store.apply(upserts=pl.concat([old, rows], how="vertical"))

    def _prune(self, keys: pl.DataFrame, wm: int) -> None:
        """For ``keys``: keep right rows after ``wm`` and the latest at or before it."""
        if keys.height == 0:
            return
        node = self.node
        rows = self.right.lookup(keys)
        if rows.height == 0:
            return
        t = to_us(node.right_time)
        settled = t <= wm
        latest = (t == t.filter(settled).max().over(list(node.by_right))).fill_null(False)
        keep = ~settled | latest
        if node.tolerance_us is not None:
            keep = keep & (t > wm - node.tolerance_us)
        kept = rows.filter(keep)
        if kept.height < rows.height:
            self.right.apply(upserts=kept, deletes=keys)
