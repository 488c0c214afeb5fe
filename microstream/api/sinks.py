"""The sink verbs of a stream: ``sink(spec)`` and the ``sink_*`` wrappers that start a query.

Every ``sink_*`` verb (those of message systems in ``message_sinks.py``) builds its connector's spec (looked up by name in the
connector registry, never imported) and calls :meth:`SinkVerbs.sink`, which
checks the query against the sink and its output mode and starts it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.api.message_sinks import MessageSinkVerbs
from microstream.api.query import StreamingQuery
from microstream.api.session import Session, default_session
from microstream.exceptions import PlanError, UnboundedStateWarning, user_stacklevel
from microstream.plan.nodes import (
    ConcatNode,
    PlanNode,
    ScanNode,
    chained_nodes,
)
from microstream.protocols import NonReplayableSourceSpec
from microstream.registry import load_connector
from microstream.runtime.base import LocalRuntime, Runtime
from microstream.runtime.driver import ExecutionConfig
from microstream.time.trigger import DEFAULT_TRIGGER, Trigger

if TYPE_CHECKING:
    from microstream._typing import (
        FileFormat,
        OutputMode,
        PostgresSinkMode,
    )
    from microstream.protocols import SinkSpec

__all__ = ["SinkVerbs"]


class SinkVerbs(MessageSinkVerbs):
    """The ``sink`` verbs of :class:`~microstream.api.frame.StreamFrame` (a mixin: the
    frame keeps its plan in ``_plan``); those of message systems and web APIs are in
    :class:`~microstream.api.message_sinks.MessageSinkVerbs`."""

    _plan: PlanNode

    def sink(
        self,
        spec: SinkSpec,
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query writing to any sink: a connector's spec, or your own.

        Every ``sink_*`` verb is this with its connector's spec. A sink spec
        (:class:`microstream.protocols.SinkSpec`) is a frozen description with
        ``kind``, ``output_modes``, ``durable``, ``describe()`` and
        ``build(context)`` returning the runtime :class:`microstream.protocols.Sink`,
        whose ``add_batch(batch_id, df)`` must be idempotent by batch id for
        exactly-once output (a re-run batch comes with the same id and rows).

        ``key_groups`` (every ``sink_*`` verb takes it) is the number of key groups
        the query's state is split into, the unit a worker loads: fixed when the
        checkpoint is created (default 128) and recorded in it. Without it a restart
        uses the recorded number; a different one is refused with ``PlanChangedError``.

        Examples
        --------
        >>> from dataclasses import dataclass, field
        >>> import polars as pl
        >>> import microstream as ms
        >>> class ListSink:
        ...     description = "ListSink"
        ...     def __init__(self, out):
        ...         self.out = out
        ...     def add_batch(self, batch_id, df):
        ...         self.out[batch_id] = df.rows()  # keyed by batch id: idempotent
        ...     def stop(self):
        ...         pass
        >>> @dataclass(frozen=True, eq=False)
        ... class ListSinkSpec:
        ...     out: dict = field(default_factory=dict)
        ...     kind = "list"
        ...     output_modes = frozenset({"append"})
        ...     durable = False
        ...     def describe(self):
        ...         return "ListSink"
        ...     def build(self, context):
        ...         return ListSink(self.out)
        >>> stream = ms.MemoryStream({"x": pl.Int64})
        >>> spec = ListSinkSpec()
        >>> query = stream.lazy().sink(spec)
        >>> _ = stream.add_data({"x": [1, 2]})
        >>> query.process_all_available()
        >>> spec.out
        {0: [(1,), (2,)]}
        >>> query.stop()
        """
        return self._start(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            name=name,
            checkpoint_options=checkpoint_options,
            runtime=runtime,
            key_groups=key_groups,
        )

    def sink_memory(
        self,
        name: str,
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        session: Session | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query into an in-process table read with ``ms.table(name)``.

        The query is named ``name`` too. Without ``checkpoint`` it uses a
        temporary one, removed when the query stops.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"x": pl.Int64})
        >>> query = stream.lazy().sink_memory("doc_memory")
        >>> _ = stream.add_data({"x": [1, 2]})
        >>> query.process_all_available()
        >>> ms.table("doc_memory")["x"].to_list()
        [1, 2]
        >>> query.stop()
        """
        spec = load_connector("memory_sink")(name=name, session=session)
        return self._start(
            spec, output_mode=output_mode, trigger=trigger, checkpoint=checkpoint, name=name,
            session=session, checkpoint_options=checkpoint_options, runtime=runtime, key_groups=key_groups,
        )  # fmt: skip

    def sink_console(
        self,
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
        num_rows: int = 20,
    ) -> StreamingQuery:
        """Start the query printing each batch (at most ``num_rows`` rows of it).

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"x": pl.Int64})
        >>> query = stream.lazy().sink_console()
        >>> _ = stream.add_data({"x": [7]})
        >>> query.process_all_available()
        Batch: 0
        shape: (1, 1)
        ┌─────┐
        │ x   │
        │ --- │
        │ i64 │
        ╞═════╡
        │ 7   │
        └─────┘
        >>> query.stop()
        """
        spec = load_connector("console")(num_rows=num_rows)
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            name=name,
            checkpoint_options=checkpoint_options,
            runtime=runtime,
            key_groups=key_groups,
        )

    def foreach_batch(
        self,
        function: Callable[[pl.DataFrame, int], object],
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query calling ``function(df, batch_id)`` for every batch.

        After a crash the uncommitted batch is handed over again with the same
        id and rows: write idempotently by ``batch_id`` for exactly-once.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> seen = []
        >>> stream = ms.MemoryStream({"x": pl.Int64})
        >>> query = stream.lazy().foreach_batch(
        ...     lambda df, batch_id: seen.append((batch_id, df.height)),
        ...     checkpoint="memory://doc-foreach",
        ... )
        >>> _ = stream.add_data({"x": [1, 2, 3]})
        >>> query.process_all_available()
        >>> seen
        [(0, 3)]
        >>> query.stop()
        """
        spec = load_connector("foreach_batch")(function=function)
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            name=name,
            checkpoint_options=checkpoint_options,
            runtime=runtime,
            key_groups=key_groups,
        )

    def _sink_files(
        self,
        path: str | os.PathLike[str],
        file_format: FileFormat,
        output_mode: OutputMode,
        trigger: Trigger | None,
        checkpoint: str | os.PathLike[str] | None,
        name: str | None,
        storage_options: dict[str, Any] | None,
        partition_by: Sequence[str] | None,
        checkpoint_options: dict[str, Any] | None,
        runtime: Runtime | None,
        key_groups: int | None,
    ) -> StreamingQuery:
        spec = load_connector("file_sink")(
            path=os.fspath(path),
            format=file_format,
            partition_by=list(partition_by) if partition_by else None,
            storage_options=storage_options,
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            name=name,
            checkpoint_options=checkpoint_options,
            runtime=runtime,
            key_groups=key_groups,
        )

    def sink_parquet(
        self,
        path: str | os.PathLike[str],
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
        storage_options: dict[str, Any] | None = None,
        partition_by: Sequence[str] | None = None,
    ) -> StreamingQuery:
        """Start the query writing parquet files with a manifest (exactly-once).

        A batch's files become visible to :func:`ms.read_file_sink` only once its
        manifest entry is written; a crash leaves invisible orphans, never
        duplicates. ``storage_options`` are fsspec options for ``path``;
        ``checkpoint_options`` the same for ``checkpoint`` (each sink verb takes
        it), e.g. ``{"endpoint_url": ..., "key": ..., "secret": ...}`` for an
        ``s3://`` checkpoint; without them s3fs reads the ``AWS_*`` environment.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"x": pl.Int64})
        >>> query = stream.lazy().sink_parquet(
        ...     "memory://doc-parquet/out", checkpoint="memory://doc-parquet/cp"
        ... )
        >>> _ = stream.add_data({"x": [1, 2]})
        >>> query.process_all_available()
        >>> query.stop()
        >>> ms.read_file_sink("memory://doc-parquet/out")["x"].to_list()
        [1, 2]
        """
        return self._sink_files(
            path,
            "parquet",
            output_mode,
            trigger,
            checkpoint,
            name,
            storage_options,
            partition_by,
            checkpoint_options,
            runtime,
            key_groups,
        )

    def sink_csv(
        self,
        path: str | os.PathLike[str],
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
        storage_options: dict[str, Any] | None = None,
        partition_by: Sequence[str] | None = None,
    ) -> StreamingQuery:
        """Start the query writing CSV files with a manifest (see :meth:`sink_parquet`)."""
        return self._sink_files(
            path,
            "csv",
            output_mode,
            trigger,
            checkpoint,
            name,
            storage_options,
            partition_by,
            checkpoint_options,
            runtime,
            key_groups,
        )

    def sink_ndjson(
        self,
        path: str | os.PathLike[str],
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
        storage_options: dict[str, Any] | None = None,
        partition_by: Sequence[str] | None = None,
    ) -> StreamingQuery:
        """Start the query writing NDJSON files with a manifest (see :meth:`sink_parquet`)."""
        return self._sink_files(
            path,
            "ndjson",
            output_mode,
            trigger,
            checkpoint,
            name,
            storage_options,
            partition_by,
            checkpoint_options,
            runtime,
            key_groups,
        )

    def sink_delta(
        self,
        path: str | os.PathLike[str],
        *,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
        storage_options: dict[str, Any] | None = None,
        partition_by: Sequence[str] | None = None,
        merge_schema: bool = False,
        target_file_size: int | None = None,
        log_retention: str | timedelta | None = None,
    ) -> StreamingQuery:
        """Start the query writing a Delta table, exactly once per batch.

        Each batch commits with a Delta application transaction (app id = the
        query id, version = the batch id), so a batch re-run after a crash is
        recognised and skipped. ``output_mode="complete"`` overwrites the table
        every batch (for aggregations); ``output_mode="update"`` MERGEs every
        batch on the aggregation's keys (window start and group keys), the
        transaction in the same commit; a batch without rows makes no commit in
        append and update mode. ``target_file_size`` (bytes) sizes the
        data files; ``log_retention`` (``"1h"``) the log history a new table keeps
        (``delta.logRetentionDuration``). ``merge_schema=True`` lets a batch add
        columns to the table; otherwise a batch whose schema differs is a
        ``SinkError``. ``storage_options`` go to deltalake (``AWS_ENDPOINT_URL``,
        ``AWS_ACCESS_KEY_ID``, ...); ``checkpoint_options`` are fsspec options for
        ``checkpoint`` (``endpoint_url``, ``key``, ``secret``, ...).

        Examples
        --------
        >>> import tempfile
        >>> import polars as pl
        >>> import microstream as ms
        >>> root = tempfile.mkdtemp()
        >>> stream = ms.MemoryStream({"x": pl.Int64})
        >>> query = stream.lazy().sink_delta(f"{root}/table", checkpoint=f"{root}/cp")
        >>> _ = stream.add_data({"x": [1, 2]})
        >>> query.process_all_available()
        >>> _ = stream.add_data({"x": [3]})
        >>> query.process_all_available()
        >>> query.stop()
        >>> pl.read_delta(f"{root}/table").sort("x")["x"].to_list()
        [1, 2, 3]

        Update mode keeps one row per key, replaced as the aggregate changes:

        >>> clicks = ms.MemoryStream({"user": pl.String})
        >>> query = (
        ...     clicks.lazy()
        ...     .group_by("user")
        ...     .agg(pl.len().alias("n"))
        ...     .sink_delta(f"{root}/counts", output_mode="update", checkpoint=f"{root}/cp2")
        ... )
        >>> _ = clicks.add_data({"user": ["a", "b", "a"]})
        >>> query.process_all_available()
        >>> _ = clicks.add_data({"user": ["b"]})
        >>> query.process_all_available()
        >>> query.stop()
        >>> pl.read_delta(f"{root}/counts").sort("user").rows()
        [('a', 2), ('b', 2)]
        """
        spec = load_connector("delta")(
            path=os.fspath(path),
            storage_options=storage_options,
            partition_by=list(partition_by) if partition_by else None,
            merge_schema=merge_schema,
            target_file_size=target_file_size,
            log_retention=log_retention,
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            name=name,
            checkpoint_options=checkpoint_options,
            runtime=runtime,
            key_groups=key_groups,
        )

    def sink_postgres(
        self,
        dsn: str,
        table: str,
        *,
        mode: PostgresSinkMode = "append",
        key: Sequence[str] | None = None,
        progress_table: str = "microstream_progress",
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query writing a PostgreSQL table, exactly once per batch.

        Each batch's rows and a progress row ``(query id, table, batch id)`` in
        ``progress_table`` commit in one transaction, so a batch re-run after a
        crash finds its id there and is skipped. ``mode="append"`` inserts the
        rows with ``COPY``; ``mode="upsert"`` replaces rows by ``key`` (``INSERT
        ... ON CONFLICT``), and is what ``output_mode="update"`` needs (``key``
        defaults to the aggregation's keys); ``output_mode="complete"`` replaces
        the table's rows every batch. The table is created from the first
        batch's schema when missing; an existing table whose columns do not fit
        is a ``SchemaMismatchError``. See :class:`connectors.postgres.PostgresSinkSpec`.

        Parameters
        ----------
        dsn
            A libpq connection string or URL of the database.
        table
            ``"table"`` or ``"schema.table"``.
        mode
            ``"append"`` or ``"upsert"``.
        key
            The columns that identify a row, for ``mode="upsert"``.
        progress_table
            Where each query's last committed batch id is kept.

        Examples
        --------
        >>> import tempfile
        >>> import polars as pl
        >>> import microstream as ms
        >>> from microstream.testing.postgres import PostgresServer
        >>> clicks = ms.MemoryStream({"user": pl.String})
        >>> with PostgresServer() as server:
        ...     query = (
        ...         clicks.lazy().group_by("user").agg(pl.len().alias("n"))
        ...         .sink_postgres(server.dsn, "counts", mode="upsert", output_mode="update",
        ...                        checkpoint=tempfile.mkdtemp())
        ...     )
        ...     _ = clicks.add_data({"user": ["a", "b", "a"]})
        ...     query.process_all_available()
        ...     _ = clicks.add_data({"user": ["b"]})
        ...     query.process_all_available()
        ...     query.stop()
        ...     with server.connect() as conn:
        ...         conn.execute('SELECT * FROM counts ORDER BY "user"').fetchall()
        [('a', 2), ('b', 2)]
        """
        spec = load_connector("postgres_sink")(
            dsn,
            table,
            mode=mode,
            key=None if key is None else list(key),
            progress_table=progress_table,
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            name=name,
            checkpoint_options=checkpoint_options,
            runtime=runtime,
            key_groups=key_groups,
        )

    def _start(
        self,
        spec: SinkSpec,
        *,
        output_mode: OutputMode,
        trigger: Trigger | None,
        checkpoint: str | os.PathLike[str] | None,
        name: str | None,
        session: Session | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        session = session or default_session
        runtime = session.runtime_override or runtime or LocalRuntime()
        if key_groups is not None and (
            isinstance(key_groups, bool)
            or not isinstance(key_groups, int)
            or not 1 <= key_groups <= 65536
        ):
            msg = f"key_groups must be an integer from 1 to 65536; got {key_groups!r} instead"
            raise PlanError(msg)
        if output_mode not in ("append", "update", "complete"):
            msg = f"output_mode must be 'append', 'update' or 'complete'; got {output_mode!r}"
            raise PlanError(msg)
        if output_mode not in spec.output_modes:
            msg = (
                f"{spec.describe()} does not support output_mode={output_mode!r}; it supports "
                f"{sorted(spec.output_modes)}"
            )
            raise PlanError(msg)
        if spec.durable:
            _refuse_unreplayable_sources(self._plan, spec)
        stateful = self._plan.stateful_nodes()
        for node in stateful[:-1]:
            if not node.can_chain():
                msg = (
                    f"{node.describe()} cannot feed another stateful operator: its rows are "
                    "revised or emitted long after their event time. Chains may start with "
                    "stream joins, unique() and aggregations whose groups close by the "
                    "watermark (windows, or a watermarked time key; no emit triggers), which "
                    "then emit each group once, as in append mode; this query has "
                    + " -> ".join(n.describe() for n in stateful)
                )
                raise PlanError(msg)
        if not stateful and output_mode == "complete":
            msg = (
                "output_mode='complete' needs an aggregation (it re-emits the whole result "
                "table every batch); this query has none, so its result is unbounded: "
                "use output_mode='append'"
            )
            raise PlanError(msg)
        if stateful:  # the last operator's output is the query's
            stateful[-1].check_output_mode(output_mode)
        chained = chained_nodes(self._plan)
        for node in stateful:
            why = node.unbounded_state("append" if node in chained else output_mode)
            if why is not None:
                warnings.warn(
                    f"state can only grow: {why}",
                    UnboundedStateWarning,
                    stacklevel=user_stacklevel(),
                )
        if trigger is not None and not isinstance(trigger, Trigger):
            msg = f"trigger must be a ms.Trigger (e.g. Trigger.every('5s')); got {trigger!r}"
            raise TypeError(msg)
        effective = session.trigger_override or trigger or DEFAULT_TRIGGER
        temporary = False
        if checkpoint_options is not None and checkpoint is None:
            msg = (
                "checkpoint_options are fsspec storage options for checkpoint=, which is "
                f"missing; got checkpoint_options={sorted(checkpoint_options)} and no checkpoint"
            )
            raise PlanError(msg)
        if checkpoint is not None:
            location = os.fspath(checkpoint)
        elif spec.durable:
            if name is None:
                msg = (
                    f"{spec.describe()} needs checkpoint= (or name=, for checkpoints/<name>) "
                    "so that a restart continues where it stopped, exactly once"
                )
                raise PlanError(msg)
            location = os.path.join("checkpoints", name)
        else:
            location = tempfile.mkdtemp(prefix="microstream-")
            temporary = True
        concats = [n for n in self._plan.walk() if isinstance(n, ConcatNode)]
        policy = concats[-1].watermark_policy if concats else "min"
        run = runtime.prepare(
            ExecutionConfig(
                watermark_policy=policy,  # type: ignore[arg-type]
                plan=self._plan,
                sink=spec,
                output_mode=output_mode,
                trigger=effective,
                checkpoint_url=location,
                storage_options=checkpoint_options,
                name=name,
                session=session,
                temporary_checkpoint=temporary,
                key_groups=key_groups,
            )
        )
        query = StreamingQuery(run)
        session.register_query(query)
        try:
            run.start()
        except BaseException:
            session.unregister_query_run(run.run_id)
            raise
        return query


def _refuse_unreplayable_sources(plan: PlanNode, sink: SinkSpec) -> None:
    """A durable sink's exactly-once needs sources that replay (see NonReplayableSourceSpec)."""
    for node in plan.walk():
        source = node.source if isinstance(node, ScanNode) else None
        if isinstance(source, NonReplayableSourceSpec) and not source.acknowledge_not_replayable:
            msg = (
                f"{source.describe()} cannot replay: what it received is lost when the query "
                f"stops or crashes, so {sink.describe()} would not hold every row exactly once. "
                "It is meant for demos: write to sink_memory or sink_console, or create the "
                "source with acknowledge_not_replayable=True to accept the loss"
            )
            raise PlanError(msg)
