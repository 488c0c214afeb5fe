"""The small contracts between the engine and the connectors.

A *spec* is the frozen, comparable description of a source or sink that a
query's plan holds; ``spec.build(context)`` returns the *runtime* object the
trigger loop drives (Bytewax's split of configuration and runtime). Sources
follow Spark's data source contract: ``initial_offset``, ``latest_offset``,
``read(start, end)``, ``commit(end)``, ``stop``.

Offsets are pydantic models serialised as JSON into the write-ahead log; a
source must be able to re-read any logged ``(start, end]`` range exactly, which
is what makes a re-run of an uncommitted batch produce the same rows.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, runtime_checkable

from pydantic import BaseModel, ConfigDict

from microstream.exceptions import MicrostreamError
from microstream.runtime.faults import NO_FAULTS, FaultInjector

if TYPE_CHECKING:
    import polars as pl

    from microstream._typing import OutputMode
    from microstream.checkpoint.storage import Storage

__all__ = [
    "CommittedBatchSink",
    "LaggingSource",
    "MeteredSource",
    "NonReplayableSourceSpec",
    "Offset",
    "PartSink",
    "PartWriter",
    "ProjectingSource",
    "QuerySession",
    "ReadSplit",
    "ScannedBatch",
    "ScanningSource",
    "SideOutput",
    "SideOutputTarget",
    "Sink",
    "SinkContext",
    "SinkPart",
    "SinkSpec",
    "SkippingSource",
    "Source",
    "SourceContext",
    "SourceSpec",
    "SplittableSource",
    "StaticSide",
    "StaticTableAdapter",
    "TableSinkSpec",
]


class Offset(BaseModel):
    """Base of every source offset: a frozen, JSON-serialisable position.

    Subclasses define :meth:`follows_or_equals` so the engine can refuse an
    offset that goes backwards, and :meth:`distance` for the lag in progress.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    @abstractmethod
    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other``."""

    def distance(self, other: Offset) -> int | None:
        """How many units (rows, files, ...) lie between ``other`` and this offset."""
        return None


SideOutputTarget: TypeAlias = "str | Callable[[pl.DataFrame, int], object]"
"""Where side-output rows go: a memory table name (``ms.table(name)``) or a
function called with the rows and the batch id (as ``with_watermark(on_late=)``)."""


class SideOutput(Protocol):
    """The engine's hook for rows a source reads but does not output (dead letters).

    The engine implements it; a source gets it as ``SourceContext.side_output``.
    """

    def declare(self, target: SideOutputTarget, schema: pl.Schema) -> None:
        """Make a memory-table target exist (empty) before its first rows arrive."""
        ...

    def emit(self, target: SideOutputTarget, rows: pl.DataFrame) -> None:
        """Hand over rows found while reading the current batch.

        The engine appends a ``batch_id`` column and routes the rows of each
        target once per batch, after every source of the batch was read.
        """
        ...


class _NoSideOutput:
    """The side output of a source built outside a running query (unit tests)."""

    def declare(self, target: SideOutputTarget, schema: pl.Schema) -> None:
        """Nothing to prepare."""

    def emit(self, target: SideOutputTarget, rows: pl.DataFrame) -> None:
        """Refuse: without a query there is no batch to attach the rows to."""
        msg = f"side-output rows for {target!r} need a running query; this source has none"
        raise MicrostreamError(msg)


NO_SIDE_OUTPUT: SideOutput = _NoSideOutput()


class QuerySession(Protocol):
    """What the engine and the sinks need of the session a query runs in: its memory
    tables (``sink_memory``, side outputs) and its listeners (progress events)."""

    def register_table(
        self, name: str, schema: pl.Schema | None = None, writer: str | None = None
    ) -> None:
        """Make table ``name`` readable (empty, with ``schema``) before its first batch;
        with ``writer`` (a query's id) the table is that query's output: another query
        starts it anew, or is refused while the writer runs."""
        ...

    def write_table(
        self, name: str, batch_id: int, data: pl.DataFrame, *, replace: bool, writer: str = ""
    ) -> bool:
        """Add (or with ``replace``, set) table ``name``'s rows for ``batch_id`` of query
        ``writer`` (its id), once per writer and id; whether they were written (a replayed
        batch is not; another query's batch of the same id is)."""
        ...

    def post(self, method: str, event: object) -> None:
        """Call ``method(event)`` on every listener (``on_query_progress``, ...)."""
        ...

    def unregister_query_run(self, run_id: str) -> None:
        """The run ``run_id`` ended: it is no longer among the active queries."""
        ...


@dataclass(frozen=True)
class SourceContext:
    """What the engine hands a source when it builds the runtime object.

    Attributes
    ----------
    index
        The source's position in the query (``sources/<index>/`` in the checkpoint).
    storage
        The source's own directory in the checkpoint, for logs it must keep
        (the file source's list of files per batch, the rate source's start time).
    query_id
        The query's stable id.
    """

    index: int
    storage: Storage
    query_id: str
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("microstream"))
    faults: FaultInjector = NO_FAULTS
    """Call ``faults.reach("source.after_log")`` after writing a source log entry."""
    side_output: SideOutput = NO_SIDE_OUTPUT
    """Where the source sends rows that are not part of its output (dead letters)."""


@runtime_checkable
class Source(Protocol):
    """A replayable, offset-addressed stream of DataFrames (the runtime side)."""

    description: str

    def initial_offset(self) -> Offset:
        """The offset before the first row this query reads."""
        ...

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> Offset:
        """The end of the next batch that starts at ``start``.

        Bounded by the source's rate limit when ``rate_limited`` is true.
        Returning ``start`` means nothing new.
        """
        ...

    def prepare_for_available_now(self) -> None:
        """Fix the end of the available data; later ``latest_offset`` calls stop there."""
        ...

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """Exactly the rows in ``(start, end]``, with the source's schema."""
        ...

    # Optional capabilities, each a Protocol below: LaggingSource (lag in progress),
    # ProjectingSource (reads only the columns the query uses), MeteredSource
    # (counts in progress), SkippingSource (files left out, in progress).

    def parse_offset(self, data: dict[str, Any]) -> Offset:
        """The offset model of this source from its JSON form in the WAL."""
        ...

    def commit(self, end: Offset) -> None:
        """Everything up to ``end`` is committed; the source may clean up."""
        ...

    def stop(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class LaggingSource(Protocol):
    """A source that knows how far behind a batch end is (optional for sources)."""

    def lag(self, end: Offset) -> int | None:
        """The units (rows, files) available beyond ``end``; reported in progress."""
        ...


@runtime_checkable
class ProjectingSource(Protocol):
    """A source that can read fewer columns (optional for sources).

    The engine finds the columns a query uses (``scan_projections``) and calls
    :meth:`project` once, before the first batch. Batches may then hold only
    those columns; the engine gives the plan every declared column (the others
    as typed nulls that Polars prunes), so the plan resolves as on a LazyFrame.
    """

    def project(self, columns: Sequence[str]) -> None:
        """Read only ``columns`` (in schema order) from now on."""
        ...


@runtime_checkable
class MeteredSource(Protocol):
    """A source with counts of its own for progress (optional for sources)."""

    def metrics(self) -> dict[str, int]:
        """Source-specific counts since the last call (bad records, files skipped, ...)."""
        ...


@runtime_checkable
class SkippingSource(Protocol):
    """A source that may leave files out by policy and names them (optional for sources)."""

    def skipped_files(self) -> list[str]:
        """Files left out (bad or missing) since the last call; [] if none."""
        ...


class ReadSplit(Protocol):
    """A share of one batch of a source that another process reads on its own.

    A split is small and picklable (a frozen dataclass or pydantic model of names,
    paths and offsets: no open files, clients or references to the source), and its
    :meth:`read` needs nothing of the driver: a cluster runtime sends it to a task.
    """

    def read(self) -> pl.DataFrame:
        """The split's rows, exactly as the source's ``read(start, end)`` gives them for
        this share (same columns, dtypes and errors)."""
        ...


@runtime_checkable
class SplittableSource(Protocol):
    """A source whose batches can be read in parts by other processes (optional).

    The driver plans a logged range ``(start, end]`` into splits; the concatenation of
    the splits' reads, in order, equals ``read(start, end)``. A range whose read has
    effects the driver must see (rows for a dead-letter side output, files recorded as
    skipped, counts for progress) is not split: :meth:`plan_splits` returns None and
    the driver reads it with ``read`` as always.
    """

    def plan_splits(self, start: Offset, end: Offset) -> list[ReadSplit] | None:
        """The splits of ``(start, end]`` in order, or None: read it on the driver."""
        ...


@dataclass(frozen=True)
class ScannedBatch:
    """One batch of a source as a lazy scan not run yet (:class:`ScanningSource`).

    The engine runs ``frame`` as part of the stage that reads the source, in one
    Polars query (the scan feeds the stage's steps in the same plan); when that
    query fails it calls ``read``, the source's own read of the batch, which gives
    the rows or the error the source reports for it (naming the file).
    """

    frame: pl.LazyFrame
    """The batch's rows, exactly the columns and order ``read`` gives."""
    rows: int
    """How many rows ``frame`` gives (for progress, known without running it)."""
    read: Callable[[], pl.DataFrame]
    """The same batch read eagerly: ``read(start, end)`` of the source."""


@runtime_checkable
class ScanningSource(Protocol):
    """A source that can hand a batch as a lazy scan (optional for sources).

    ``scan`` returns None when the batch must be read eagerly (its read has effects
    the driver must see, or its files do not all match the schema exactly): the
    driver then calls ``read`` as always.
    """

    def scan(self, start: Offset, end: Offset) -> ScannedBatch | None:
        """The batch ``(start, end]`` as a lazy scan, or None: read it with ``read``."""
        ...


class SourceSpec(Protocol):
    """The frozen description of a source held by a query plan."""

    kind: ClassVar[str]

    @property
    def schema(self) -> pl.Schema:
        """The schema of the rows the source produces, known at plan time."""
        ...

    def identity(self) -> dict[str, Any]:
        """What identifies the input (fingerprinted: a change refuses the checkpoint)."""
        ...

    def describe(self) -> str:
        """A one-line description for ``explain()``, progress and errors."""
        ...

    def build(self, context: SourceContext) -> Source:
        """The runtime source, restored from its logs in ``context.storage``."""
        ...


@runtime_checkable
class NonReplayableSourceSpec(Protocol):
    """A source spec whose source cannot re-read a logged range after a restart (optional).

    The socket source keeps what it received in memory only: a batch re-run after a
    crash finds its rows gone. A durable sink (``SinkSpec.durable``) promises output that
    survives restarts exactly once, which such a source cannot give, so the engine
    refuses the pair when the query starts, unless the user set
    ``acknowledge_not_replayable=True`` on the source (Spark documents its socket
    source as not fault-tolerant; here it is checked).
    """

    acknowledge_not_replayable: bool


@dataclass(frozen=True)
class SinkContext:
    """What the engine hands a sink when it builds the runtime object."""

    query_id: str
    query_name: str | None
    output_mode: OutputMode
    storage: Storage
    session: QuerySession
    schema: pl.Schema | None = None
    """The schema of the batches the sink will receive."""
    key_columns: tuple[str, ...] | None = None
    """The columns that identify a result row, for sinks that upsert in update mode
    (the Delta sink's MERGE): the group keys of the query's aggregation, after the
    window start column of ``group_by_dynamic``; ``()`` for a global aggregation
    (one row). None when rows have no stable key: no aggregation (every row is
    new), a session window (its start moves when sessions merge), ``unique()``."""
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("microstream"))
    faults: FaultInjector = NO_FAULTS
    """Call ``faults.reach("sink.after_data")`` between writing data and committing it."""


@runtime_checkable
class Sink(Protocol):
    """Where batch results go (the runtime side)."""

    description: str

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Write the result of ``batch_id``; idempotent: a replayed batch id changes nothing."""
        ...

    def stop(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class CommittedBatchSink(Protocol):
    """A sink that can tell which batches of its query it holds (optional for sinks).

    The Delta sink reads its ``txn`` (app id = query id), the file sink its
    manifest. On restart the engine asks it: ``offsets/N`` is written before
    batch N reaches the sink, so a sink holding a batch that the write-ahead
    log does not reach means the log was deleted or an older copy of the
    checkpoint restored; the query is refused instead of numbering batches
    again from there (the sink would skip them as replays and lose their rows).
    """

    description: str

    def committed_batch(self) -> int | None:
        """The last batch id of this query (``SinkContext.query_id``) it committed; None: none."""
        ...


class SinkPart(BaseModel):
    """What one worker wrote of a batch for a :class:`PartSink`: a small record sent back
    to the driver (a connector subclasses it with the files it wrote)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int
    """How many of the batch's rows the piece holds."""


@runtime_checkable
class PartWriter(Protocol):
    """Writes one piece of a batch where a :class:`PartSink` keeps its data; picklable, so
    a cluster runtime's workers write their own rows (nothing is visible until the
    driver's :meth:`PartSink.commit_parts`)."""

    def write_part(self, batch_id: int, piece: str, data: pl.DataFrame) -> SinkPart:
        """Write ``data`` (one piece of batch ``batch_id``) as new data files whose names
        hold ``piece`` (unique per batch, attempt and worker) and say what was written;
        checks the rows as the sink's ``add_batch`` would (partition columns...)."""
        ...


@runtime_checkable
class PartSink(Protocol):
    """A sink whose batches may be written by workers and committed by the driver (optional
    for sinks; the file and Delta sinks implement it). The runtime asks
    :meth:`part_writer` once; when it gives one, each batch's pieces are written by the
    workers and :meth:`commit_parts` replaces ``add_batch`` for that batch."""

    description: str

    def part_writer(self) -> PartWriter | None:
        """A writer for the workers, or None when this sink (its output mode, its options)
        needs the whole batch on the driver."""
        ...

    def commit_parts(self, batch_id: int, parts: Sequence[SinkPart]) -> None:
        """Make the pieces of ``batch_id`` visible at once (one commit; idempotent as
        ``add_batch``: a committed batch id changes nothing and its pieces stay orphans)."""
        ...


class SinkSpec(Protocol):
    """The frozen description of a sink held by a query."""

    kind: ClassVar[str]
    output_modes: ClassVar[frozenset[str]]
    durable: ClassVar[bool]
    """Whether the sink outlives the process (and so needs a checkpoint for exactly-once)."""

    def describe(self) -> str: ...

    def build(self, context: SinkContext) -> Sink: ...


class StaticSide(ABC):
    """The static side of a stream-static join, for tables that change between batches.

    Subclass it in a connector: ``current()`` is called once per batch and
    returns the table as it is now (the Delta connector re-reads a table whose
    version moved, and returns its cached frame otherwise).
    """

    schema: pl.Schema

    @abstractmethod
    def describe(self) -> str:
        """One line for ``explain()``."""

    @abstractmethod
    def current(self) -> pl.LazyFrame:
        """The table as it is now (called once per batch)."""


class StaticTableAdapter(Protocol):
    """Lets ``StreamFrame.join`` take a connector's own table object as its static side.

    A connector registers one in the ``microstream.static_tables`` entry-point group
    (the Delta connector: :class:`connectors.delta.DeltaStaticTable`, for a
    ``deltalake.DeltaTable``). ``join`` asks each registered adapter whether it
    ``claims`` an object that is neither a polars frame nor a :class:`StaticSide`, and
    joins with what ``from_table`` returns; the engine never looks at the object's type
    itself. A class whose ``claims`` and ``from_table`` are classmethods qualifies.
    """

    def claims(self, table: object) -> bool:
        """Whether ``table`` is this connector's table object (without importing its library)."""
        ...

    def from_table(self, table: Any) -> StaticSide:
        """The static side that follows ``table``."""
        ...


@runtime_checkable
class TableSinkSpec(SinkSpec, Protocol):
    """A sink spec whose output is one table at one location (optional for sink specs).

    A version of a versioned output (``microstream.replay``, ``ms.read_output``) is such a
    table: replay asks the spec whether its table exists (a write began) and readers
    read it through it, so the engine needs to know nothing of the table format. The
    Delta sink implements it.
    """

    def table_exists(self, directory: Storage) -> bool:
        """Whether ``directory`` (the table's location, as the engine's storage) holds this
        sink's table or the start of one (an attempt that wrote before it was checkpointed)."""
        ...

    def read_table(self, columns: Sequence[str] | None = None) -> pl.DataFrame:
        """The table's rows now, only ``columns`` if given."""
        ...
