"""The trigger loop: one micro-batch after another, logged ahead, committed after.

This module is the whole life of a running query, readable top to bottom:

1. ``start``: take the checkpoint lock, load or create the metadata (refusing
   an incompatible plan), build the runtime sources and sink.
2. ``recover``: if the last WAL entry ``offsets/N`` has no ``commits/N``, batch
   N is re-run with exactly the logged ranges and batch timestamp; sinks are
   idempotent per batch id, so its effect lands once.
3. ``loop``: wait for the trigger; ask each source for its latest offset; if
   anything is new, write ``offsets/N`` (atomically, never overwritten), read
   exactly those ranges, run the plan as one Polars query, hand the result to
   the sink with N, write ``commits/N``, let sources clean up, publish progress.

Any exception stops the query with the checkpoint consistent: the WAL entry
of the failed batch stays, so a restart re-runs it.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from microstream.checkpoint.log import (
    Checkpoint,
    CommitEntry,
    OffsetEntry,
    PlanRecord,
    SourceOffsets,
)
from microstream.exceptions import (
    CheckpointCorruptError,
    MicrostreamError,
    OffsetError,
    SinkError,
    SourceError,
    WorkerLostError,
)
from microstream.plan.nodes import (
    OperatorContext,
    ScanNode,
    TimedOperator,
    chained_nodes,
    declared_width,
    result_key_columns,
    scan_projections,
)
from microstream.plan.physical import compile as compile_plan
from microstream.protocols import (
    CommittedBatchSink,
    LaggingSource,
    MeteredSource,
    Offset,
    PartSink,
    ProjectingSource,
    QuerySession,
    ScanningSource,
    Sink,
    SinkContext,
    SkippingSource,
    Source,
    SourceContext,
)
from microstream.runtime.faults import FaultInjector
from microstream.runtime.progress import (
    BatchDurations,
    QueryIdleEvent,
    QueryProgress,
    QueryProgressEvent,
    QueryStartedEvent,
    QueryTerminatedEvent,
    SinkProgress,
    SourceProgress,
)
from microstream.runtime.side_output import SourceSideOutput
from microstream.runtime.stages import (
    LocalStageExecutor,
    RecoveringStageExecutor,
    ScanFusingStageExecutor,
    ScanInput,
    SinkWritingStageExecutor,
    SplitReadingStageExecutor,
    SplitScan,
    StageExecutor,
    split_scan,
)
from microstream.time.watermark import (
    FLUSH_WATERMARK_US,
    NO_WATERMARK_US,
    WatermarkInput,
    WatermarkTracker,
)

if TYPE_CHECKING:
    from microstream._typing import OutputMode, QueryState
    from microstream.plan.nodes import PlanNode, StatefulNode, StatefulOperator
    from microstream.protocols import ScannedBatch, SinkSpec
    from microstream.time.trigger import Trigger

__all__ = ["ExecutionConfig", "StreamExecution"]

logger = logging.getLogger("microstream")

IDLE_POLL_S = 0.01
"""How often an idle as-fast-as-possible query looks for new data (Spark: 10 ms)."""


@dataclass(frozen=True)
class ExecutionConfig:
    """Everything a query needs to run, fixed when its sink is called."""

    plan: PlanNode
    sink: SinkSpec
    output_mode: OutputMode
    trigger: Trigger
    checkpoint_url: str
    name: str | None
    session: QuerySession
    temporary_checkpoint: bool = False
    storage_options: dict[str, Any] | None = field(default=None, repr=False)
    """fsspec storage options for the checkpoint URL (may hold credentials: not in repr)."""
    lock_timeout_s: float = 30.0
    progress_history: int = 100
    watermark_policy: Literal["min", "max"] = "min"
    key_groups: int | None = None
    """Key groups of a new checkpoint (None: the recorded number, or the default)."""


class StreamExecution:
    """Runs one query on a background thread (see the module docstring)."""

    def __init__(self, config: ExecutionConfig, executor: StageExecutor | None = None):
        self.config = config
        self.executor: StageExecutor = executor if executor is not None else LocalStageExecutor()
        """Runs each batch's stages (the runtime's part; see runtime/stages.py)."""
        self.run_id = str(uuid.uuid4())
        self.faults = FaultInjector.from_env()
        self.checkpoint = Checkpoint(config.checkpoint_url, config.storage_options)
        self.state: QueryState = "initializing"
        self.status_message = "Initializing"
        self.is_trigger_active = False
        self.is_data_available = False
        self.exception: BaseException | None = None
        self.recent_progress: deque[QueryProgress] = deque(maxlen=config.progress_history)
        self.query_id = ""
        self._sources: list[Source] = []
        self._sink: Sink | None = None
        self._committed: list[Offset] = []
        self._next_batch_id = 0
        self._pending: OffsetEntry | None = None
        self._last_trigger_start: float | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._wake = False
        self._checks_started = 0
        self._idle_after_check = -1
        self._batches_done = 0
        self._thread: threading.Thread | None = None
        plan = config.plan
        self._scans = plan.scans()
        self._scan_sources = [scan.source for scan in self._scans]
        self._watermark_nodes = plan.watermark_nodes()
        self._stateful_nodes = plan.stateful_nodes()
        self._chained = chained_nodes(plan)
        self._projections = scan_projections(plan)
        self.physical = compile_plan(plan)  # once: every batch runs these stages
        self._fused_scans: frozenset[ScanNode] | None = None  # asked of the executor once
        self._operators: dict[StatefulNode, StatefulOperator] = {}
        self._timed: list[TimedOperator] = []
        self._lagging: list[LaggingSource | None] = []
        self._metered: list[MeteredSource | None] = []
        self._skipping: list[SkippingSource | None] = []
        self.watermark = WatermarkTracker(
            [WatermarkInput(n.delay_us, n.idle_timeout_us) for n in self._watermark_nodes],
            policy=config.watermark_policy,
        )
        self._last_watermark_us = NO_WATERMARK_US
        self._flushed = False
        self._routed_sides: set[str] = set()  # side outputs the current batch routed
        self._restarts: list[list[int]] = []  # per loss in the current batch: workers replaced
        # Rows sources set aside while reading (the Kafka source's dead letters).
        self._source_side_output = SourceSideOutput(config.session)

    # -- life cycle -------------------------------------------------------------------------

    def plan_record(self) -> PlanRecord:
        plan = self.config.plan
        return PlanRecord(
            sources=[{"kind": s.kind, **s.identity()} for s in self._scan_sources],
            stateful=[
                *(n.fingerprint() for n in self._watermark_nodes),
                *(n.fingerprint() for n in self._stateful_nodes),
            ],
            stateless=plan.stateless_steps(),
            output_mode=self.config.output_mode,
            sink=self.config.sink.kind,
        )

    def start(self) -> None:
        """Prepare on the caller's thread (so set-up errors raise there), then run."""
        cp = self.checkpoint
        cp.acquire_lock(self.run_id, timeout_s=self.config.lock_timeout_s)
        try:
            cp.remove_temporary_files()
            meta = cp.load_or_create(
                self.config.name, self.plan_record(), key_groups=self.config.key_groups
            )
            self.query_id = self._source_side_output.writer = meta.id
            self._sources = [
                spec.build(
                    SourceContext(
                        index=i,
                        storage=cp.storage.sub(f"sources/{i}"),
                        query_id=meta.id,
                        faults=self.faults,
                        side_output=self._source_side_output,
                    )
                )
                for i, spec in enumerate(self._scan_sources)
            ]
            # Sources that can read fewer columns read only those the query uses.
            for scan, src in zip(self._scans, self._sources):
                columns = self._projections.get(scan)
                if columns is not None and isinstance(src, ProjectingSource):
                    src.project(columns)
            self._sink = self.config.sink.build(
                SinkContext(
                    query_id=meta.id,
                    query_name=self.config.name,
                    output_mode=self.config.output_mode,
                    storage=cp.storage.sub("sinks"),
                    session=self.config.session,
                    schema=self.config.plan.schema(),
                    # Update-mode sinks that upsert (Delta's MERGE) match rows on these.
                    key_columns=result_key_columns(self.config.plan),
                    faults=self.faults,
                )
            )
            for mark in self._watermark_nodes:
                if isinstance(mark.on_late, str):  # readable before the first late row
                    self.config.session.register_table(mark.on_late)
            if isinstance(self.executor, SinkWritingStageExecutor):
                self.executor.use_sink(self._sink)  # its workers may write the pieces
            self._restore_position()
            state_version = self._next_batch_id - 1 if self._next_batch_id > 0 else None
            self._operators = self.executor.start_operators(
                self.physical, cp.storage.sub("state"), meta.key_groups, state_version
            )
            # Optional capabilities, found once: the loop asks them every batch or poll.
            self._timed = [op for op in self._operators.values() if isinstance(op, TimedOperator)]
            self._lagging = [
                src if isinstance(src, LaggingSource) else None for src in self._sources
            ]
            self._metered = [
                src if isinstance(src, MeteredSource) else None for src in self._sources
            ]
            self._skipping = [
                src if isinstance(src, SkippingSource) else None for src in self._sources
            ]
            if self.config.trigger.kind == "available_now":
                # "Available now" means at start, on the caller's thread: data that
                # arrives while the query thread spins up belongs to the next run.
                for src in self._sources:
                    src.prepare_for_available_now()
        except BaseException:
            self._close()
            raise
        self.state = "active"
        self._thread = threading.Thread(
            target=self._run,
            name=f"microstream-{self.config.name or self.query_id[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _restore_position(self) -> None:
        cp = self.checkpoint
        latest = cp.latest_offsets()
        commit = cp.latest_commit()
        if not cp.is_new:
            self._refuse_lost_log(latest)
        if latest is None:
            if commit is not None:
                msg = f"checkpoint {cp.display()} has commits/ but no offsets/: it is corrupt"
                raise CheckpointCorruptError(msg)
            self._committed = [s.initial_offset() for s in self._sources]
            self._next_batch_id = 0
            return
        if len(latest.sources) != len(self._sources):
            msg = (
                f"checkpoint file {cp.display(f'offsets/{latest.batch_id}.json')} logs "
                f"{len(latest.sources)} sources; the query has {len(self._sources)}"
            )
            raise CheckpointCorruptError(msg)
        self._check_ranges(latest)
        committed_id = commit.batch_id if commit is not None else -1
        if commit is not None and commit.watermark_us is not None:
            self.watermark.restore(commit.watermark_us, commit.max_event_us)
            self._last_watermark_us = commit.watermark_us
            self._flushed = commit.watermark_us >= FLUSH_WATERMARK_US
        if committed_id == latest.batch_id:
            self._committed = self._parse_ends(latest)
        elif committed_id == latest.batch_id - 1:
            # offsets/N without commits/N: batch N must be re-run as logged.
            self._pending = latest
            self._committed = self._parse_starts(latest)
        else:
            msg = (
                f"checkpoint {cp.display()} is inconsistent: the last offsets entry is batch "
                f"{latest.batch_id} but the last commit is batch {committed_id}"
            )
            raise CheckpointCorruptError(msg)
        self._next_batch_id = latest.batch_id + 1 if self._pending is None else latest.batch_id

    def _refuse_lost_log(self, latest: OffsetEntry | None) -> None:
        """Refuse a write-ahead log that lost batches the sink or the state remember."""
        sink, held = self._sink, None
        if isinstance(sink, CommittedBatchSink):
            try:
                held = sink.committed_batch()
            except MicrostreamError:
                raise
            except Exception as exc:
                msg = f"sink {sink.description} cannot tell which batches it holds: {exc}"
                raise SinkError(msg) from exc
        description = sink.description if sink is not None else None
        self.checkpoint.refuse_lost_log(self.query_id, latest, description, held)

    def _check_ranges(self, entry: OffsetEntry) -> None:
        """Refuse a logged range ``(start, end]`` that ends before it starts, by file and source."""
        where = self.checkpoint.display(f"offsets/{entry.batch_id}.json")
        for i, (src, logged) in enumerate(zip(self._sources, entry.sources)):
            try:
                end = src.parse_offset(logged.end)
                # None: from the source's beginning, where nothing can end before.
                start = None if logged.start is None else src.parse_offset(logged.start)
            except OffsetError as exc:
                msg = f"checkpoint file {where} is corrupt: {exc}"
                raise CheckpointCorruptError(msg) from exc
            if start is not None and not end.follows_or_equals(start):
                msg = (
                    f"checkpoint file {where} is corrupt: source {i} ({src.description}) ends at "
                    f"{logged.end} before its start {logged.start}, and a range never goes "
                    "backwards. Restore the file from a backup of the checkpoint"
                )
                raise CheckpointCorruptError(msg)

    def _parse_ends(self, entry: OffsetEntry) -> list[Offset]:
        return [src.parse_offset(s.end) for src, s in zip(self._sources, entry.sources)]

    def _parse_starts(self, entry: OffsetEntry) -> list[Offset]:
        return [
            src.initial_offset() if s.start is None else src.parse_offset(s.start)
            for src, s in zip(self._sources, entry.sources)
        ]

    def stop(self, timeout: float | None = None) -> None:
        """Ask the loop to stop after the current batch and wait for it."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def join(self, timeout: float | None) -> bool:
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def is_active(self) -> bool:
        return self.state in ("initializing", "active")

    def operator_store_schemas(self) -> list[dict[str, pl.Schema]]:
        """Per stateful operator, in plan order, its state stores and their schemas."""
        return [op.store_schemas() for op in self._operators.values()]

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        session = self.config.session
        session.post(
            "on_query_started",
            QueryStartedEvent(
                id=self.query_id, run_id=self.run_id, name=self.config.name, timestamp=_now()
            ),
        )
        trigger = self.config.trigger
        try:
            if self._pending is not None:
                self._run_batch(self._pending, recovered=True)
                self._pending = None
            for src, end in zip(self._sources, self._committed):
                src.commit(end)  # idempotent: finishes clean-up a crash may have cut short
            ran = False
            while not self._stop.is_set():
                self._wait_for_trigger(after_batch=ran)
                if self._stop.is_set():
                    break
                ran = self._trigger_once()
                if trigger.kind == "once" or (trigger.kind == "available_now" and not ran):
                    break
            self.state = "stopped"
            self.status_message = "Stopped"
        except BaseException as exc:
            self.exception = exc
            self.state = "failed"
            self.status_message = f"Terminated with exception: {exc}"
            logger.error("query %s failed: %s", self.config.name or self.query_id, exc)
        finally:
            self.is_trigger_active = False
            self._close()
            with self._cond:
                self._cond.notify_all()
            session.post(
                "on_query_terminated",
                QueryTerminatedEvent(
                    id=self.query_id,
                    run_id=self.run_id,
                    exception=None if self.exception is None else repr(self.exception),
                    timestamp=_now(),
                ),
            )
            session.unregister_query_run(self.run_id)

    def _wait_for_trigger(self, *, after_batch: bool) -> None:
        """Wait until the next check is due. An as-fast-as-possible trigger polls only
        after a check that ran nothing: a batch, with data or without, may have left more
        to do (a file that arrived meanwhile, the watermark it moved), and the next check
        then costs one listing rather than a poll interval."""
        trigger = self.config.trigger
        if trigger.kind != "processing_time":
            return
        interval = trigger.interval.total_seconds()
        if self._last_trigger_start is None:
            return
        if interval > 0:
            due = self._last_trigger_start + interval
        elif not self.is_data_available and not after_batch:
            due = time.monotonic() + IDLE_POLL_S
        else:
            return
        if interval > 0:
            self.status_message = "Waiting for next trigger"
        with self._cond:
            while not self._stop.is_set():
                remaining = due - time.monotonic()
                if remaining <= 0 or (interval == 0 and self._wake):
                    break
                self._cond.wait(remaining)
            self._wake = False

    def _trigger_once(self) -> bool:
        """One trigger: run a batch if any source has new data. Returns whether one ran."""
        with self._cond:
            self._checks_started += 1
            check = self._checks_started
        self._last_trigger_start = time.monotonic()
        self.is_trigger_active = True
        self.status_message = "Getting offsets from sources"
        t0 = time.perf_counter()
        rate_limited = self.config.trigger.kind != "once"
        ends = []
        for i, (src, start) in enumerate(zip(self._sources, self._committed)):
            end = src.latest_offset(start, rate_limited=rate_limited)
            if not end.follows_or_equals(start):
                msg = (
                    f"source {i} ({src.description}) returned latest offset {end.model_dump()} "
                    f"before the committed offset {start.model_dump()}; offsets must not go back"
                )
                raise OffsetError(msg)
            ends.append(end)
        has_data = any(end != start for end, start in zip(ends, self._committed))
        watermark_us: int | None = None
        if self.watermark.enabled:
            watermark_us = self.watermark.advance()
            if not has_data and self._flush_due():
                # available_now(flush=True): the input is drained; close every window.
                watermark_us = self.watermark.current_us = FLUSH_WATERMARK_US
        if not has_data and not self._no_data_batch_due(watermark_us):
            self.is_data_available = False
            self.is_trigger_active = False
            self.status_message = "Waiting for data to arrive"
            with self._cond:
                self._idle_after_check = max(self._idle_after_check, check)
                self._cond.notify_all()
            self.config.session.post(
                "on_query_idle",
                QueryIdleEvent(id=self.query_id, run_id=self.run_id, timestamp=_now()),
            )
            return False
        self.is_data_available = has_data
        entry = OffsetEntry(
            batch_id=self._next_batch_id,
            batch_timestamp_ms=int(time.time() * 1000),
            watermark_us=watermark_us,
            late_watermark_us=self._last_watermark_us if watermark_us is not None else None,
            sources=[
                SourceOffsets(
                    index=i,
                    description=src.description,
                    start=start.model_dump(mode="json"),
                    end=end.model_dump(mode="json"),
                )
                for i, (src, start, end) in enumerate(zip(self._sources, self._committed, ends))
            ],
        )
        t_wal = time.perf_counter()
        self.faults.reach("batch.before_wal")
        self.checkpoint.check_lock()
        self.checkpoint.write_offsets(entry)
        self.faults.reach("batch.after_wal")
        offsets_ms = (t_wal - t0) * 1000
        wal_ms = (time.perf_counter() - t_wal) * 1000
        self._run_batch(entry, recovered=False, offsets_ms=offsets_ms, wal_ms=wal_ms)
        return True

    def _route_late_rows(self, batch_id: int, late: pl.DataFrame) -> None:
        target = next((n.on_late for n in self._watermark_nodes if n.on_late is not None), None)
        if target is None:
            return  # dropped, and counted in progress
        if isinstance(target, str):
            session = self.config.session
            session.write_table(target, batch_id, late, replace=False, writer=self.query_id)
        else:
            target(late, batch_id)

    def _no_data_batch_due(self, watermark_us: int | None) -> bool:
        """A batch without new rows runs when the watermark moved and state may be evicted,
        or when an operator's timer is due (:meth:`_timers_due`)."""
        moved = (
            watermark_us is not None
            and bool(self._stateful_nodes)
            # complete mode evicts nothing, but operators feeding others emit on watermark
            and (self.config.output_mode != "complete" or bool(self._chained))
            and watermark_us > self._last_watermark_us
        )
        return moved or self._timers_due(watermark_us)

    def _timers_due(self, watermark_us: int | None) -> bool:
        """Whether an operator with timers (``map_groups_with_state``) needs a batch now.

        Such operators have ``timers_due(watermark_us, now_ms)``: an event-time
        timer the watermark reached, a processing-time timer or a state TTL
        that the current time reached. The batch's logged timestamp is taken
        after this check, so it is at or after ``now_ms``.
        """
        now_ms = int(time.time() * 1000)
        return any(operator.timers_due(watermark_us, now_ms) for operator in self._timed)

    def _flush_due(self) -> bool:
        trigger = self.config.trigger
        return (
            trigger.kind == "available_now"
            and trigger.flush
            and not self._flushed
            and bool(self._stateful_nodes)
            and not self._no_data_batch_due(self.watermark.current_us)
        )

    def _run_batch(
        self,
        entry: OffsetEntry,
        *,
        recovered: bool,
        offsets_ms: float = 0.0,
        wal_ms: float = 0.0,
    ) -> None:
        """Run the batch ``entry`` logs. When a cluster runtime lost workers in it, the
        runtime replaces them at the last committed state and the batch runs again from
        ``entry`` (same ranges, watermark, timestamp; the sink is idempotent per batch id,
        and side outputs an attempt routed are not routed again): exactly once, in this run."""
        self._routed_sides = set()
        self._restarts = []
        while True:
            try:
                self._attempt_batch(
                    entry, recovered=recovered, offsets_ms=offsets_ms, wal_ms=wal_ms
                )
                return
            except WorkerLostError as exc:
                if not isinstance(self.executor, RecoveringStageExecutor):
                    raise
                logger.warning("batch %s lost workers, re-running it: %s", entry.batch_id, exc)
                self.executor.recover(exc, entry.batch_id)  # raises when out of restarts
                self._restarts.append(sorted(exc.workers))
                recovered = True

    def _attempt_batch(
        self,
        entry: OffsetEntry,
        *,
        recovered: bool,
        offsets_ms: float = 0.0,
        wal_ms: float = 0.0,
    ) -> None:
        batch_id = entry.batch_id
        started = time.perf_counter() - (offsets_ms + wal_ms) / 1000
        self.is_trigger_active = True
        self.status_message = f"Processing batch {batch_id}"
        starts = self._parse_starts(entry)
        ends = self._parse_ends(entry)

        t_read = time.perf_counter()
        inputs: dict[ScanNode, pl.LazyFrame | ScanInput] = {}
        splits: dict[ScanNode, SplitScan] = {}  # read by the executor (in Ray tasks)
        splitting = self.executor if isinstance(self.executor, SplitReadingStageExecutor) else None
        wanted = frozenset() if splitting is None else splitting.split_scans(self.physical)
        fused = self._fusable()
        rows_in: list[int] = []
        self._source_side_output.begin(batch_id)
        for i, (src, start, end) in enumerate(zip(self._sources, starts, ends)):
            schema = self._scan_sources[i].schema
            if start == end:
                df = pl.DataFrame(schema=schema)
            elif self._scans[i] in wanted and (
                split := split_scan(src, i, start, end, schema, batch_id)
            ):
                splits[self._scans[i]] = split
                rows_in.append(0)  # counted where the splits are read
                continue
            elif self._scans[i] in fused and (scanned := self._scan(i, src, start, end, batch_id)):
                rows_in.append(scanned.rows)
                inputs[self._scans[i]] = ScanInput(
                    declared_width(scanned.frame, schema),
                    functools.partial(self._read_declared, i, src, start, end, batch_id),
                )
                continue
            else:
                df = self._read(i, src, start, end, batch_id)
            rows_in.append(df.height)
            inputs[self._scans[i]] = declared_width(df, schema)
        if "sources" not in self._routed_sides:
            self._source_side_output.route()  # dead letters, once per target and batch
            self._routed_sides.add("sources")
        self.faults.reach("batch.after_read")

        t_compute = time.perf_counter()
        ctx = OperatorContext(
            batch_id=batch_id,
            late_watermark_us=_for_operators(entry.late_watermark_us),
            watermark_us=_for_operators(entry.watermark_us),
            output_mode=self.config.output_mode,
            batch_timestamp_ms=entry.batch_timestamp_ms,
        )
        if splits and splitting is not None:
            output = splitting.run(self.physical, {**inputs, **splits}, ctx, self._operators)  # type: ignore[dict-item]  # no ScanInput: a splitting executor fuses none
            rows_in = [output.rows_read.get(scan, n) for scan, n in zip(self._scans, rows_in)]
        else:
            output = self.executor.run(self.physical, inputs, ctx, self._operators)  # type: ignore[arg-type]  # a ScanInput only for a fusing executor
        self._restarts.extend(list(lost) for lost in output.replaced_workers)
        result = output.rows
        if output.late_rows and "late" not in self._routed_sides:
            self._route_late_rows(batch_id, pl.concat(output.late_rows, how="diagonal_relaxed"))
            self._routed_sides.add("late")
        self.faults.reach("batch.after_compute")

        t_sink = time.perf_counter()
        assert self._sink is not None
        self.checkpoint.check_lock()
        try:
            if output.parts is not None and isinstance(self._sink, PartSink):
                self._sink.commit_parts(batch_id, output.parts)  # written by the workers
            else:
                self._sink.add_batch(batch_id, result)
        except MicrostreamError:
            raise
        except Exception as exc:
            msg = f"sink {self._sink.description} failed to write batch {batch_id}: {exc}"
            raise SinkError(msg) from exc
        self.faults.reach("batch.after_sink")

        t_commit = time.perf_counter()
        for operator in self._operators.values():
            operator.commit(batch_id)
        self.faults.reach("batch.before_commit")
        self.checkpoint.check_lock()
        maxima: list[int | None] = []
        if self.watermark.enabled:
            seen = output.watermarks
            self.watermark.observe(
                [seen[n].max_event_us if n in seen else None for n in self._watermark_nodes]
            )
            maxima = self.watermark.maxima()
        self.checkpoint.write_commit(
            CommitEntry(
                batch_id=batch_id,
                committed_at=_now(),
                num_output_rows=output.num_rows,
                watermark_us=entry.watermark_us,
                max_event_us=maxima,
            )
        )
        self.faults.reach("batch.after_commit")
        self._committed = ends
        self._next_batch_id = batch_id + 1
        if entry.watermark_us is not None:
            self._last_watermark_us = entry.watermark_us
            self._flushed = entry.watermark_us >= FLUSH_WATERMARK_US
        # Lag after and before the batch, asked before a source cleans up what it committed.
        lags = [
            (None, None) if src is None else (src.lag(end), src.lag(start))
            for src, start, end in zip(self._lagging, starts, ends)
        ]
        for src, end in zip(self._sources, ends):
            src.commit(end)
        t_end = time.perf_counter()

        durations = BatchDurations(
            latest_offset=offsets_ms,
            wal=wal_ms,
            read=(t_compute - t_read) * 1000,
            compute=(t_sink - t_compute) * 1000,
            sink=(t_commit - t_sink) * 1000,
            commit=(t_end - t_commit) * 1000,
            total=(t_end - started) * 1000,
        )
        self._publish_progress(
            entry, starts, ends, rows_in, output.num_rows, durations, recovered, lags
        )

    def _fusable(self) -> frozenset[ScanNode]:
        """The sources the executor takes as lazy scans (:class:`ScanFusingStageExecutor`)
        and that can hand one (:class:`ScanningSource`); found once, at the first batch."""
        if self._fused_scans is None:
            executor = self.executor
            wanted = (
                executor.fused_scans(self.physical)
                if isinstance(executor, ScanFusingStageExecutor)
                and not isinstance(executor, SplitReadingStageExecutor)
                else frozenset()
            )
            self._fused_scans = frozenset(
                scan
                for scan, src in zip(self._scans, self._sources)
                if scan in wanted and isinstance(src, ScanningSource)
            )
        return self._fused_scans

    def _scan(
        self, i: int, src: Source, start: Offset, end: Offset, batch_id: int
    ) -> ScannedBatch | None:
        """Source ``i``'s batch as a lazy scan, or None: it is read as always."""
        assert isinstance(src, ScanningSource)  # only sources :meth:`_fusable` kept
        try:
            return src.scan(start, end)
        except MicrostreamError:
            raise
        except Exception as exc:
            msg = (
                f"source {i} ({src.description}) failed to plan the scan of batch {batch_id} "
                f"range ({start.model_dump()}, {end.model_dump()}]: {exc}"
            )
            raise SourceError(msg) from exc

    def _read(self, i: int, src: Source, start: Offset, end: Offset, batch_id: int) -> pl.DataFrame:
        """Source ``i``'s batch ``(start, end]``, read (errors name the source and range)."""
        try:
            return src.read(start, end)
        except MicrostreamError:
            raise  # already names the source, file or offset
        except Exception as exc:
            msg = (
                f"source {i} ({src.description}) failed to read batch {batch_id} "
                f"range ({start.model_dump()}, {end.model_dump()}]: {exc}"
            )
            raise SourceError(msg) from exc

    def _read_declared(
        self, i: int, src: Source, start: Offset, end: Offset, batch_id: int
    ) -> pl.LazyFrame:
        """:meth:`_read` at the declared width (a scanned batch's eager read)."""
        return declared_width(
            self._read(i, src, start, end, batch_id), self._scan_sources[i].schema
        )

    def _publish_progress(
        self,
        entry: OffsetEntry,
        starts: list[Offset],
        ends: list[Offset],
        rows_in: list[int],
        rows_out: int,
        durations: BatchDurations,
        recovered: bool,
        lags: list[tuple[int | None, int | None]],
    ) -> None:
        total_in = sum(rows_in)
        previous = self.recent_progress[-1] if self.recent_progress else None
        total_s = max(durations.total / 1000, 1e-9)
        if previous is not None:
            since = (_now() - previous.timestamp).total_seconds()
            input_rate = total_in / since if since > 0 else 0.0
        else:
            input_rate = total_in / total_s
        sources = []
        for i, src in enumerate(self._sources):
            lag, lag_before = lags[i]
            sources.append(
                SourceProgress(
                    description=src.description,
                    start_offset=starts[i].model_dump(mode="json"),
                    end_offset=ends[i].model_dump(mode="json"),
                    num_input_rows=rows_in[i],
                    lag=lag,
                    num_input_units=(
                        max(0, lag_before - lag)
                        if lag is not None and lag_before is not None
                        else None
                    ),
                    metrics=metered.metrics() if (metered := self._metered[i]) else {},
                    skipped_files=skipping.skipped_files()
                    if (skipping := self._skipping[i])
                    else [],
                )
            )
        assert self._sink is not None
        progress = QueryProgress(
            id=self.query_id,
            run_id=self.run_id,
            name=self.config.name,
            batch_id=entry.batch_id,
            timestamp=_now(),
            batch_timestamp_ms=entry.batch_timestamp_ms,
            recovered=recovered,
            num_input_rows=total_in,
            num_output_rows=rows_out,
            input_rows_per_second=input_rate,
            processed_rows_per_second=total_in / total_s,
            durations_ms=durations,
            watermark=_from_us(entry.watermark_us),
            late_watermark=_from_us(entry.late_watermark_us),
            state_operators=[op.progress() for op in self._operators.values()],
            sources=sources,
            sink=SinkProgress(description=self._sink.description, num_output_rows=rows_out),
            worker_restarts=len(self._restarts),
            replaced_workers=[worker for lost in self._restarts for worker in lost],
        )
        self.recent_progress.append(progress)
        try:
            self.checkpoint.storage.append_line(
                f"progress/{self.run_id}.jsonl", progress.model_dump_json()
            )
        except Exception:  # progress is for humans; never fail a committed batch on it
            logger.warning("could not write progress of batch %s", entry.batch_id, exc_info=True)
        with self._cond:
            self._batches_done += 1
            self._cond.notify_all()
        self.config.session.post("on_query_progress", QueryProgressEvent(progress=progress))

    # -- helpers for StreamingQuery ------------------------------------------------------

    def process_all_available(self, timeout: float | None = None) -> bool:
        """Block until a check for new data that started after this call found none."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._checks_started + 1
            # An as-fast-as-possible query polls when idle; no need to wait for the poll.
            self._wake = True
            self._cond.notify_all()
            while self._idle_after_check < target and self.is_active:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 0.5)
        return True

    def _close(self) -> None:
        try:
            self.executor.close()
        except Exception:
            logger.warning("the stage executor failed to close", exc_info=True)
        for src in self._sources:
            try:
                src.stop()
            except Exception:
                logger.warning("source %s failed to stop", src.description, exc_info=True)
        if self._sink is not None:
            try:
                self._sink.stop()
            except Exception:
                logger.warning("sink %s failed to stop", self._sink.description, exc_info=True)
        self.checkpoint.release_lock()
        if self.config.temporary_checkpoint and self.checkpoint.storage.is_local:
            shutil.rmtree(self.checkpoint.storage.root, ignore_errors=True)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _for_operators(watermark_us: int | None) -> int:
    """A logged watermark for the operators: a query without one never has late rows."""
    return NO_WATERMARK_US if watermark_us is None else watermark_us


def _from_us(value: int | None) -> datetime | None:
    """A watermark for progress: None before the first event, the flush one as datetime.max."""
    if value is None or value == NO_WATERMARK_US:
        return None
    try:
        return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=value)
    except OverflowError:
        return datetime.max.replace(tzinfo=timezone.utc)
