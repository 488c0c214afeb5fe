"""The rate source: ``rows_per_second`` generated rows, for tests, demos and benchmarks.

Like Spark's ``rate`` source, it produces ``timestamp`` and ``value`` columns.
Row ``i`` has ``value == i`` and ``timestamp == start + i / rows_per_second``
seconds (floored to the microsecond). ``start`` is written to the checkpoint
the first time the source is built and reused on every restart, so any range
of rows can be regenerated exactly.
"""

from __future__ import annotations

import time
from dataclasses import KW_ONLY, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microstream.exceptions import OffsetError
from microstream.protocols import Offset, SourceContext

__all__ = ["RateOffset", "RateSource", "RateSourceSpec"]

_SCHEMA = pl.Schema({"timestamp": pl.Datetime("us"), "value": pl.Int64()})
_START_FILE = "start.json"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US_PER_S = 1_000_000


def _now_us() -> int:
    """Microseconds since the epoch (a module function so tests can replace the clock)."""
    return time.time_ns() // 1000


def _to_epoch_us(moment: datetime) -> int:
    # A naive datetime is read as UTC, as polars reads naive timestamps.
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
    return (aware - _EPOCH) // timedelta(microseconds=1)


class RateOffset(Offset):
    """The number of rows generated so far (the next row's value).

    Examples
    --------
    >>> RateOffset(rows=10).distance(RateOffset(rows=4))
    6
    """

    rows: int = Field(ge=0)

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other``."""
        return self.rows >= _rate_offset(other, "compare with").rows

    def distance(self, other: Offset) -> int | None:
        """Rows between ``other`` and this offset."""
        return self.rows - _rate_offset(other, "measure from").rows


def _rate_offset(offset: Offset, action: str) -> RateOffset:
    if not isinstance(offset, RateOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a RateOffset"
        raise OffsetError(msg)
    return offset


class _RateStart(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    start_us: int
    """Timestamp of row 0, in microseconds since the Unix epoch (UTC)."""


@dataclass(frozen=True)
class RateSourceSpec:
    """Generated rows at a fixed rate: ``timestamp`` (``Datetime("us")``) and ``value`` (``Int64``).

    Parameters
    ----------
    rows_per_second
        How many rows become due every second (> 0).
    num_partitions
        Rows are split into this many partitions by ``value % num_partitions``;
        a batch lists partition 0's rows, then partition 1's, ..., each in
        ascending ``value`` (so batches look like Spark's partitioned output,
        deterministically).
    start_timestamp
        Timestamp of row 0 (a naive datetime is UTC). Default: when the query
        first starts. Rows due before now are produced at once (bounded by
        ``max_rows_per_trigger``). Timestamps in the output are naive UTC.
    max_rows_per_trigger
        At most this many rows per batch (not applied to ``Trigger.once()``).

    Examples
    --------
    >>> spec = RateSourceSpec(100, num_partitions=2)
    >>> spec.schema
    Schema([('timestamp', Datetime(time_unit='us', time_zone=None)), ('value', Int64)])
    >>> RateSourceSpec(0)
    Traceback (most recent call last):
    ...
    ValueError: rows_per_second must be a positive int; got 0
    """

    kind: ClassVar[str] = "rate"

    rows_per_second: int
    _: KW_ONLY
    num_partitions: int = 1
    start_timestamp: datetime | None = None
    max_rows_per_trigger: int | None = None

    def __post_init__(self) -> None:
        for name in ("rows_per_second", "num_partitions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive int; got {value!r}"
                raise ValueError(msg)
        limit = self.max_rows_per_trigger
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            msg = f"max_rows_per_trigger must be a positive int or None; got {limit!r}"
            raise ValueError(msg)
        if self.start_timestamp is not None and not isinstance(self.start_timestamp, datetime):
            msg = f"start_timestamp must be a datetime or None; got {self.start_timestamp!r}"
            raise ValueError(msg)

    @property
    def schema(self) -> pl.Schema:
        """``{"timestamp": Datetime("us"), "value": Int64}``."""
        return _SCHEMA

    def identity(self) -> dict[str, Any]:
        """The rate and start: changing them would change the rows of a replayed range."""
        start = None if self.start_timestamp is None else _to_epoch_us(self.start_timestamp)
        return {"rows_per_second": self.rows_per_second, "start_us": start}

    def describe(self) -> str:
        """One line: ``RateSource[rows_per_second=10, num_partitions=1]``."""
        return (
            f"RateSource[rows_per_second={self.rows_per_second}, "
            f"num_partitions={self.num_partitions}]"
        )

    def build(self, context: SourceContext) -> RateSource:
        """The runtime source; its start time is read from (or first written to) the checkpoint."""
        return RateSource(self, context)


class RateSource:
    """The runtime side of :class:`RateSourceSpec`.

    Keeps one file in the source's checkpoint directory: ``start.json``, the
    timestamp of row 0 in microseconds since the epoch.
    """

    def __init__(self, spec: RateSourceSpec, context: SourceContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        storage = context.storage
        if storage.exists(_START_FILE):
            self.start_us = storage.read_model(_START_FILE, _RateStart).start_us
        else:
            given = spec.start_timestamp
            self.start_us = _now_us() if given is None else _to_epoch_us(given)
            storage.write_model(_START_FILE, _RateStart(start_us=self.start_us), overwrite=False)
        self._fixed_end: int | None = None

    def _due(self) -> int:
        elapsed = _now_us() - self.start_us
        return max(0, elapsed * self.spec.rows_per_second // _US_PER_S)

    def initial_offset(self) -> RateOffset:
        """No rows yet."""
        return RateOffset(rows=0)

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> RateOffset:
        """All rows due by now (or by :meth:`prepare_for_available_now`), rate limited."""
        begin = _rate_offset(start, "start a batch at").rows
        end = max(begin, self._due() if self._fixed_end is None else self._fixed_end)
        limit = self.spec.max_rows_per_trigger
        if rate_limited and limit is not None:
            end = min(end, begin + limit)
        return RateOffset(rows=end)

    def prepare_for_available_now(self) -> None:
        """Stop at the rows due now."""
        self._fixed_end = self._due()

    def lag(self, end: Offset) -> int | None:
        """Rows due but not yet in a batch ending at ``end``."""
        return max(0, self._due() - _rate_offset(end, "measure lag from").rows)

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """Rows ``start.rows .. end.rows - 1``, partition by partition.

        Examples
        --------
        >>> from microstream.checkpoint.storage import Storage
        >>> from microstream.protocols import SourceContext
        >>> spec = RateSourceSpec(2, num_partitions=2, start_timestamp=datetime(2024, 1, 1))
        >>> ctx = SourceContext(index=0, storage=Storage("memory://doctest-rate"), query_id="q")
        >>> spec.build(ctx).read(RateOffset(rows=0), RateOffset(rows=4))
        shape: (4, 2)
        ┌─────────────────────────┬───────┐
        │ timestamp               ┆ value │
        │ ---                     ┆ ---   │
        │ datetime[μs]            ┆ i64   │
        ╞═════════════════════════╪═══════╡
        │ 2024-01-01 00:00:00     ┆ 0     │
        │ 2024-01-01 00:00:01     ┆ 2     │
        │ 2024-01-01 00:00:00.500 ┆ 1     │
        │ 2024-01-01 00:00:01.500 ┆ 3     │
        └─────────────────────────┴───────┘
        """
        first = _rate_offset(start, "read from").rows
        stop = _rate_offset(end, "read to").rows
        if stop < first:
            msg = f"{self.description}: cannot read ({first}, {stop}]: the end is before the start"
            raise OffsetError(msg)
        n = self.spec.num_partitions
        # Partition p holds the values v with v % n == p; its first one at or after `first`:
        parts = [
            pl.int_range(first + (p - first) % n, stop, step=n, dtype=pl.Int64, eager=True)
            for p in range(n)
        ]
        value = pl.concat(parts) if n > 1 else parts[0]
        frame = pl.DataFrame({"value": value})
        return frame.select(
            timestamp=(
                pl.col("value") * _US_PER_S // self.spec.rows_per_second + self.start_us
            ).cast(pl.Datetime("us")),
            value=pl.col("value"),
        )

    def parse_offset(self, data: dict[str, Any]) -> RateOffset:
        """A :class:`RateOffset` from its JSON form in the write-ahead log."""
        try:
            return RateOffset.model_validate(data)
        except ValidationError as exc:
            msg = (
                f"{self.description}: {data!r} is not a rate source offset "
                f"(expected {{'rows': <int >= 0>}}): {exc.errors()[0]['msg']}"
            )
            raise OffsetError(msg) from None

    def commit(self, end: Offset) -> None:
        """Nothing to clean up: rows are computed, not stored."""

    def stop(self) -> None:
        """Nothing to release."""
