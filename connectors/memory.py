"""In-process source and sink: ``MemoryStream`` and ``sink_memory``.

For tests and notebooks. A memory stream lives in one process: its offsets are
the number of ``add_data`` calls, and it cannot be replayed by another process
(a checkpoint that points past its data is refused by name).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from microstream.exceptions import OffsetError, SchemaMismatchError
from microstream.protocols import Offset, SinkContext, SourceContext

if TYPE_CHECKING:
    from microstream.api.frame import StreamFrame
    from microstream.protocols import QuerySession

__all__ = ["MemoryOffset", "MemorySink", "MemorySinkSpec", "MemorySource", "MemoryStream"]


class MemoryOffset(Offset):
    """Number of ``add_data`` calls covered."""

    batches: int

    def follows_or_equals(self, other: Offset) -> bool:
        return isinstance(other, MemoryOffset) and self.batches >= other.batches

    def distance(self, other: Offset) -> int | None:
        return self.batches - other.batches if isinstance(other, MemoryOffset) else None


class MemoryStream:
    """An in-memory stream that tests and notebooks feed with ``add_data``.

    Parameters
    ----------
    schema
        Column names and dtypes of the rows.
    name
        Identifies the stream in the checkpoint's plan fingerprint; defaults
        to a fresh uuid, so a new stream never silently resumes an old checkpoint.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"x": pl.Int64})
    >>> query = stream.lazy().with_columns(y=pl.col("x") * 2).sink_memory("doubled")
    >>> stream.add_data({"x": [1, 2]})
    MemoryOffset(batches=1)
    >>> query.process_all_available()
    >>> ms.table("doubled")
    shape: (2, 2)
    ┌─────┬─────┐
    │ x   ┆ y   │
    │ --- ┆ --- │
    │ i64 ┆ i64 │
    ╞═════╪═════╡
    │ 1   ┆ 2   │
    │ 2   ┆ 4   │
    └─────┴─────┘
    >>> query.stop()
    """

    kind: ClassVar[str] = "memory"

    def __init__(self, schema: Mapping[str, Any] | pl.Schema, *, name: str | None = None):
        self._schema = pl.Schema(schema)
        self.name = name or f"memory-{uuid.uuid4().hex[:12]}"
        self._batches: list[pl.DataFrame] = []
        self._lock = threading.Lock()

    @property
    def schema(self) -> pl.Schema:
        return self._schema

    def add_data(
        self, data: pl.DataFrame | Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]
    ) -> MemoryOffset:
        """Append one batch of rows; returns the offset that includes it.

        Raises
        ------
        SchemaMismatchError
            If a column is missing or cannot be cast to the stream's dtype.
        """
        frame = data if isinstance(data, pl.DataFrame) else pl.DataFrame(data)
        missing = [c for c in self._schema if c not in frame.columns]
        if missing:
            msg = f"{self.name}: add_data is missing column(s) {missing}; schema is {self._schema}"
            raise SchemaMismatchError(msg)
        try:
            frame = frame.select(
                pl.col(c).cast(dtype, strict=True) for c, dtype in self._schema.items()
            )
        except pl.exceptions.PolarsError as exc:
            msg = f"{self.name}: add_data rows do not fit schema {self._schema}: {exc}"
            raise SchemaMismatchError(msg) from exc
        with self._lock:
            self._batches.append(frame)
            return MemoryOffset(batches=len(self._batches))

    def lazy(self) -> StreamFrame:
        """The stream as a :class:`~microstream.StreamFrame`."""
        from microstream.api.frame import StreamFrame

        return StreamFrame.from_source(self)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name}

    def describe(self) -> str:
        return f"MemoryStream[{self.name}]"

    def build(self, context: SourceContext) -> MemorySource:
        return MemorySource(self)

    def _slice(self, start: int, end: int) -> list[pl.DataFrame]:
        with self._lock:
            if end > len(self._batches):
                msg = (
                    f"{self.describe()} holds {len(self._batches)} batches; the checkpoint asks "
                    f"for batches up to {end}. A memory stream cannot be replayed by another "
                    "process: use a new checkpoint"
                )
                raise OffsetError(msg)
            return self._batches[start:end]

    def _count(self) -> int:
        with self._lock:
            return len(self._batches)


class MemorySource:
    """Runtime side of :class:`MemoryStream`."""

    def __init__(self, stream: MemoryStream):
        self.stream = stream
        self.description = stream.describe()
        self._available_now: int | None = None

    def initial_offset(self) -> MemoryOffset:
        return MemoryOffset(batches=0)

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> MemoryOffset:
        count = self.stream._count()
        if self._available_now is not None:
            count = min(count, self._available_now)
        return MemoryOffset(batches=count)

    def prepare_for_available_now(self) -> None:
        self._available_now = self.stream._count()

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        assert isinstance(start, MemoryOffset) and isinstance(end, MemoryOffset)
        frames = self.stream._slice(start.batches, end.batches)
        if not frames:
            return pl.DataFrame(schema=self.stream.schema)
        return pl.concat(frames, how="vertical", rechunk=False)

    def parse_offset(self, data: dict[str, Any]) -> MemoryOffset:
        return MemoryOffset.model_validate(data)

    def lag(self, end: Offset) -> int | None:
        assert isinstance(end, MemoryOffset)
        return self.stream._count() - end.batches

    def commit(self, end: Offset) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass(frozen=True, eq=False)
class MemorySinkSpec:
    """An in-process table named ``name``, read with ``ms.table(name)``."""

    kind: ClassVar[str] = "memory"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "update", "complete"})
    durable: ClassVar[bool] = False

    name: str
    session: QuerySession | None = None

    def describe(self) -> str:
        return f"MemorySink[{self.name}]"

    def build(self, context: SinkContext) -> MemorySink:
        session = self.session or context.session
        return MemorySink(
            self.name,
            session,
            replace=context.output_mode == "complete",
            schema=context.schema,
            writer=context.query_id,
        )


class MemorySink:
    """Appends (or, in complete mode, replaces) a memory table once per batch id."""

    def __init__(
        self,
        name: str,
        session: QuerySession,
        *,
        replace: bool,
        schema: pl.Schema | None = None,
        writer: str = "",
    ):
        self.name = name
        self.session = session
        self.replace = replace
        self.writer = writer  # the query's id: a replay of its batch is skipped, not another's
        self.description = f"MemorySink[{name}]"
        session.register_table(name, schema, writer=writer or None)

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        self.session.write_table(
            self.name, batch_id, data, replace=self.replace, writer=self.writer
        )

    def stop(self) -> None:
        pass
