"""What every stateful operator runtime shares: its stores, counters and late rows.

An operator is called once per batch, :meth:`StoreBackedOperator.process`, with a
read-only context; what it emits and the rows it dropped as late come back in
one :class:`~microstream.plan.nodes.OperatorOutput`.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import polars as pl

from microstream.plan.nodes import OperatorContext, OperatorOutput
from microstream.runtime.progress import StateOperatorProgress
from microstream.time.watermark import FLUSH_WATERMARK_US, NO_WATERMARK_US
from microstream.time.windows import END, START, from_us

if TYPE_CHECKING:
    from microstream.state.format import StatePart
    from microstream.state.segment_buffer import SegmentBuffer
    from microstream.state.store import StateStore

__all__ = ["StoreBackedOperator", "late_rows_frame", "lowest_us"]

logger = logging.getLogger("microstream")


class StoreBackedOperator(ABC):
    """Load, commit and progress over an operator's state stores, and late-row routing."""

    operator_id: str
    kind: str

    def __init__(self, operator_id: str):
        self.operator_id = operator_id
        self._dropped_late = self._updated = self._removed = self._dropped_null_time = 0
        self._late_rows: list[pl.DataFrame] = []

    def process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> OperatorOutput:
        """One batch: the rows to emit, and the rows dropped as late (see :meth:`_process`)."""
        self._late_rows = []
        try:
            rows = self._process(inputs, ctx)
            return OperatorOutput(rows=rows, late_rows=tuple(self._late_rows))
        finally:
            self._late_rows = []

    @abstractmethod
    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        """Apply the batch's rows (one frame per input) and return what to emit."""

    def _stores(self) -> Sequence[StateStore | SegmentBuffer]:
        raise AssertionError("subclasses list their stores")  # pragma: no cover

    def use_key_groups(self, num_key_groups: int) -> None:
        """Split every store into the checkpoint's number of key groups (before load)."""
        for store in self._stores():
            store.use_key_groups(num_key_groups)

    def load(self, version: int | None, *, key_groups: range | None = None) -> None:
        """Load the state as of ``version``; with ``key_groups``, of that range only (an
        owner of the range: it then commits with :meth:`write_parts`)."""
        for store in self._stores():
            store.load(version, key_groups=key_groups)

    def write_parts(self, version: int, *, leader: bool, fence: str = "") -> dict[str, StatePart]:
        """Each store's part of ``version``, by store name (the owner of a range writes
        its files, ``fence`` in their names; the driver commits the parts,
        :func:`microstream.state.parts.commit_parts`)."""
        return {
            store.operator: store.write_part(version, leader=leader, fence=fence)
            for store in self._stores()
        }

    def commit(self, version: int) -> None:
        for store in self._stores():
            store.commit(version)

    def store_schemas(self) -> dict[str, pl.Schema]:
        return {store.operator: store.schema for store in self._stores()}

    def progress(self) -> StateOperatorProgress:
        return StateOperatorProgress(
            operator_id=self.operator_id,
            kind=self.kind,
            num_rows_total=sum(s.rows for s in self._stores()),
            memory_bytes=sum(s.bytes for s in self._stores()),
            num_rows_updated=self._updated,
            num_rows_removed=self._removed,
            num_rows_dropped_late=self._dropped_late,
            num_rows_dropped_null_time=self._dropped_null_time,
        )

    def _drop_late(
        self,
        df: pl.DataFrame,
        late: pl.Expr,
        ctx: OperatorContext,
        columns: Sequence[str],
        time_dtype: pl.DataType | None,
        *,
        has_window: bool = False,
    ) -> pl.DataFrame:
        """``df`` without its late rows, which are counted and handed to the side output."""
        dropped = df.filter(late)
        if dropped.height == 0:
            return df
        self._dropped_late = dropped.height
        self._late_rows.append(
            late_rows_frame(
                dropped, columns, ctx, self.operator_id, time_dtype, has_window=has_window
            )
        )
        return df.filter(~late)

    def _drop_null_times(
        self,
        df: pl.DataFrame,
        time: str,
        ctx: OperatorContext,
        columns: Sequence[str],
        time_dtype: pl.DataType | None,
        why: str,
    ) -> pl.DataFrame:
        """``df`` without rows whose event time ``time`` is null: they belong to no window
        (as in Spark), so they are counted (``num_rows_dropped_null_time``, this batch, summed
        over calls) and handed to the ``on_late`` side output with the reason."""
        nulls = df.get_column(time).null_count()
        if nulls == 0:
            return df
        logger.warning(
            "%s: %d row(s) with a null event time dropped: %s", self.operator_id, nulls, why
        )
        self._dropped_null_time += nulls
        dropped = df.filter(pl.col(time).is_null())
        self._late_rows.append(
            late_rows_frame(
                dropped, columns, ctx, self.operator_id, time_dtype, has_window=False
            ).with_columns(pl.lit(f"null event time: {why}").alias("reason"))
        )
        return df.filter(pl.col(time).is_not_null())


def late_rows_frame(
    dropped: pl.DataFrame,
    columns: Sequence[str],
    ctx: OperatorContext,
    operator_id: str,
    time_dtype: pl.DataType | None,
    *,
    has_window: bool,
) -> pl.DataFrame:
    """Late rows for the side output: the row, the batch, the watermark missed, the window,
    and why (``reason``: ``"late"`` here; null event times say so). ``late_watermark`` is
    null when there was none yet, or it was the flush's end of time (no datetime shows it)."""
    known = ctx.late_watermark_us not in (NO_WATERMARK_US, FLUSH_WATERMARK_US)
    missed = from_us(
        pl.lit(ctx.late_watermark_us if known else None, pl.Int64),
        time_dtype or pl.Datetime("us", "UTC"),
    ).alias("late_watermark")
    extra: list[pl.Expr] = [
        pl.lit(ctx.batch_id, pl.Int64).alias("batch_id"),
        pl.lit(operator_id).alias("operator"),
        missed,
        pl.lit("late").alias("reason"),
    ]
    if has_window and time_dtype is not None:
        extra += [
            from_us(pl.col(START), time_dtype).alias("window_start"),
            from_us(pl.col(END), time_dtype).alias("window_end"),
        ]
    return dropped.select(*columns, *extra)


_US_PER = {"us": 1, "ms": 1000}


def lowest_us(times: pl.Series) -> float:
    """A lower bound of ``times`` in microseconds since the epoch (``inf``: no value).

    ``times`` is a Datetime (any unit or zone), Date or Int64 microseconds column; the
    bound is exact except for nanoseconds, which round down. It costs one pass over
    the column's integers, no Polars plan: operators ask it whether any row can be late
    or evicted before they build the filter that would find them.

    Examples
    --------
    >>> from datetime import datetime
    >>> lowest_us(pl.Series([datetime(1970, 1, 1, 0, 0, 2), None], dtype=pl.Datetime("ms")))
    2000000
    >>> lowest_us(pl.Series([], dtype=pl.Date))
    inf
    """
    found = times.cast(pl.Int64).min()
    if found is None:
        return math.inf
    low = int(found)  # type: ignore[arg-type]  # (an Int64 column's min)
    dtype = times.dtype
    if isinstance(dtype, pl.Datetime):
        unit = dtype.time_unit or "us"
        return low // 1000 if unit == "ns" else low * _US_PER[unit]
    if isinstance(dtype, pl.Date):
        return low * 86_400_000_000
    return low
