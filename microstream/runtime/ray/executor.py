"""The stage executor of RayRuntime: stateful operators in Ray actors, by key-group range.

What runs where, per batch (the driver's trigger loop, write-ahead log, watermark
and sink commit are the local ones, :mod:`microstream.runtime.driver`):

1. **Sources that split and the stateless prefix after them** run in Ray tasks, one
   per split (:mod:`microstream.runtime.ray.scan_tasks`): each task cuts its rows by
   the owners' key-group ranges, and the owners get the pieces by reference, so the
   rows never pass through the driver; before the sink the pieces come back in split
   order, or, in a query without operators whose sink takes pieces, each task writes
   its rows as its piece of the batch and only what it wrote comes back. A batch of
   one split whose rows all come back to the driver for the sink is read on the
   driver (``read_splits="auto"``): the driver would wait for the one task's rows, so
   a task only adds its round trip. Under ``read_splits="auto"`` the owners of the next
   operator read instead of tasks: its one owner in its batch call
   (:mod:`~microstream.runtime.ray.owner_reads`), or its several owners each a share of
   the splits, cutting the rows for each other (:mod:`~microstream.runtime.ray.shared_reads`).
   Other stateless stages run on the driver, as locally.
2. **An exchange fed on the driver** routes every row to the
   owner of its key group: ``key_group = stable_hash(partition keys) %
   num_key_groups`` (:mod:`microstream.state.key_groups`, the hash the state
   stores use), owner ``i`` holding the contiguous range ``key_group_ranges(n,
   num_workers)[i]``. A ``SINGLE_PARTITION`` input goes whole to one worker,
   which owns every key group of that operator.
3. **An operator stage** calls every owner of the operator at once (also those
   that got no rows: the watermark still evicts and emits there); each returns
   its :class:`OperatorOutput`, and the outputs are concatenated in key-group
   order, so a batch's rows come out in the same order every run.
   When the sink takes pieces (:class:`~microstream.protocols.PartSink`) and only
   row-wise stateless stages follow the last operator, its owners run those stages
   and write their piece of the batch instead of returning rows
   (:mod:`microstream.runtime.ray.sink_parts`); the driver commits the pieces once.
   When the operator's output feeds other operators only through row-wise stateless
   stages, its owners run those stages and cut their output by the next owners'
   key-group ranges (:mod:`microstream.runtime.ray.operator_exchange`): the driver
   gathers only their late rows and progress, and hands the pieces to the next
   owners by reference, in the upstream owner order; the rows never pass through the
   driver. Otherwise (``exchange_paths`` says why) the driver concatenates the
   outputs, runs the stages after them and routes the rows again (item 2).
4. **Commit**: every owner writes its range's state files of version N in its call of
   batch N (item 3: one call per owner and batch) and returns what it wrote; after the
   sink committed the batch, the driver writes each store's manifest of version N
   (:func:`microstream.state.parts.commit_parts`), then, as locally, ``commits/N``.

**Faults.** Every call to the workers is gathered by :meth:`RayStageExecutor.gather`,
which names the workers that are gone: their actor died (its process killed), or they
did not answer within ``worker_timeout`` (hung; treated as dead). That is a
:class:`~microstream.exceptions.WorkerLostError`; the driver calls :meth:`recover`,
which kills and replaces the lost actors and re-opens every owner of every operator
at the version committed before the batch (the live ones too: they hold the failed
attempt's changes), then re-runs the batch from its log entry. After
``max_worker_restarts`` restarts in one batch the query stops with
:class:`~microstream.exceptions.WorkerRestartsExhaustedError`; a restart of the query
re-runs the batch, as after any crash.

**Fencing.** Owners write their state files under names that carry the run id and the
attempt (``deltas/N/<lo>-<hi>.<run>.<attempt>.arrow``,
:func:`microstream.state.format.fenced`); every restart starts a new attempt, and the
driver's manifest lists exactly the files of the calls it accepted. A stale owner (a
replaced actor whose call was still running, an actor of a dead run) that writes late
writes a file no manifest names, which the retention removes.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import WorkerLostError, WorkerRestartsExhaustedError
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    KeyGroupedOperator,
    OperatorContext,
    ScanNode,
    StatefulNode,
    StatefulOperator,
    TimedOperator,
    WatermarkNode,
    declared_width,
)
from microstream.plan.physical import (
    ExchangeStage,
    OperatorStage,
    PhysicalPlan,
    SinkStage,
    StatelessStage,
    WatermarkObservation,
)
from microstream.protocols import PartSink
from microstream.runtime.ray.assignment import Assignment, record_assignment
from microstream.runtime.ray.batch_reads import (
    _by_target,
    _cause,
    _collected,
    _note_reads,
    _Reads,
)
from microstream.runtime.ray.operator_exchange import (
    ExchangeTail,
    exchange_tail,
    forwarded_stages,
)
from microstream.runtime.ray.owner_reads import OwnerRead, owner_stages
from microstream.runtime.ray.remote_operator import (
    TIMER_CHECK_MS,
    RemoteOperator,
    RemoteTimedOperator,
    Routed,
    _Owner,
    detached,
    route,
)
from microstream.runtime.ray.scan_tasks import (
    Target,
    combined,
    consumers,
    cuttable,
    run_split,
    warm,
)
from microstream.runtime.ray.shared_reads import SharedRead, plan_shares, shared_stages
from microstream.runtime.ray.sink_parts import SinkTail, piece_name, sink_tail
from microstream.runtime.ray.worker import OperatorWorker
from microstream.runtime.stages import BatchOutput, SplitScan
from microstream.state.key_groups import key_group_ranges

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage
    from microstream.protocols import PartWriter, Sink

__all__ = ["TIMER_CHECK_MS", "RayStageExecutor", "detached", "route"]

logger = logging.getLogger("microstream")

START_TIMEOUT_S = 60.0
"""The least time starting actors and loading their state may take (a new actor starts a
process and imports Polars and microstream, slow on a busy machine), whatever the
worker timeout; once running, every call has the worker timeout."""


class RayStageExecutor:
    """Runs a batch's stages with its stateful operators in Ray actors (module docstring).

    Parameters
    ----------
    ray
        The imported ``ray`` module (imported by :class:`~microstream.runtime.ray.RayRuntime`).
    connect
        Connects to (or starts) Ray; called once, when a query with operators starts.
    num_workers
        How many actors share the key groups of every operator.
    worker_options
        Passed to the actors' ``.options(...)`` (``num_cpus``, ``resources``, ``runtime_env``...).
    worker_timeout_s
        How long one call to the workers may take before the workers that did not answer
        are treated as dead (None: no limit).
    max_worker_restarts
        How many times one batch may lose workers and run again.
    checkpoint
        The checkpoint's root, where the key-group assignment is recorded (None: not recorded).
    read_splits
        ``"auto"``: a batch of one split whose rows all go to a sink the driver writes is
        read on the driver; ``"tasks"``: every split in a task (:class:`RayRuntime`).
    """

    def __init__(
        self,
        ray: Any,
        connect: Any,
        num_workers: int,
        worker_options: Mapping[str, Any] | None = None,
        *,
        worker_timeout_s: float | None = None,
        max_worker_restarts: int = 3,
        checkpoint: Storage | None = None,
        read_splits: str = "auto",
    ) -> None:
        self._ray = ray
        self.read_splits = read_splits
        self._connect = connect
        self.num_workers = num_workers
        self.worker_options = dict(worker_options or {})
        self.worker_timeout_s = worker_timeout_s
        self.max_worker_restarts = max_worker_restarts
        self._checkpoint = checkpoint
        self.run_id = str(uuid.uuid4())
        """Set to the driver's run id by RayRuntime; the first part of every fence."""
        self.attempt = 0
        """Starts of the workers in this run: 0 at start, one more at every recovery."""
        self.version: int | None = None
        """The state version every operator last committed (or loaded at start)."""
        self.restarts = 0
        """How many times the workers were restarted in this run (progress, tests)."""
        self.replaced: list[int] = []
        """The index of every worker replaced in this run, in order."""
        self._between: list[tuple[int, ...]] = []
        """Per restart between batches (a timer check found workers lost), the workers it
        replaced, not yet reported in a batch's progress (:attr:`BatchOutput.replaced_workers`)."""
        self.assignment: Assignment | None = None
        self.workers: list[Any] = []
        self._actor_class: Any = None
        self._storage: Storage | None = None
        self._operators: dict[StatefulNode, RemoteOperator] = {}
        self._restarts_in: tuple[int | None, int] = (None, 0)  # (batch id, restarts)
        self.driver_rows = 0
        """Rows that passed through the driver in this run: routed at exchanges (from a
        source read on the driver, a stateless stage run there, an operator feeding
        another where its owners cannot cut the rows themselves) or gathered from
        split tasks for the sink; tests."""
        self.split_tasks = 0
        """Ray tasks started to read splits, in this run."""
        self.owner_reads = 0
        """Batches of a stage whose source the one owner of the next operator read itself
        (:mod:`~microstream.runtime.ray.owner_reads`), in this run."""
        self.owner_read_ahead = 0
        """Of :attr:`owner_reads`, those the owner took from its read-ahead
        (:mod:`~microstream.runtime.ray.owner_prefetch`), in this run."""
        self.shared_reads = 0
        """Batches of a stage whose splits the several owners of the next operator read in
        shares and cut for each other (:mod:`~microstream.runtime.ray.shared_reads`)."""
        self._owner_stages: frozenset[int] = frozenset()
        self._shared_stages: frozenset[int] = frozenset()
        self._plan: PhysicalPlan | None = None  # (when owners read sources: re-warmed)
        self._cut: tuple[PhysicalPlan, set[int]] | None = None
        self._remotes: dict[Any, Any] = {}
        self._stage_refs: dict[StatelessStage, Any] = {}
        self._tail_ref: Any = None  # the split tasks' sink tail, sent once per run
        self._writer: PartWriter | None = None
        self.sink_tail: SinkTail | None = None
        """Set at start when the owners of the last operator write the sink's pieces (in
        a query without operators: the split tasks of the stage the sink reads)."""
        self._empty = pl.DataFrame()  # (the batch's rows when its pieces were written)
        self._exchanges: dict[int, tuple[ExchangeTail, Any]] = {}  # operator stage -> tail, ref
        self._forwarded: frozenset[int] = frozenset()  # stateless stages the owners run
        self.exchange_paths: dict[str, str] = {}
        """Per operator whose output feeds another operator: ``"actors"`` when its owners
        send the rows to the next owners, else why the driver routes them
        (:func:`~microstream.runtime.ray.operator_exchange.exchange_tail`)."""

    @property
    def fence(self) -> str:
        """What this attempt's owners put in their state files' names: the run id's first
        part and the attempt (:func:`microstream.state.format.fenced`)."""
        return f"{self.run_id.split('-')[0]}.{self.attempt}"

    def use_sink(self, sink: Sink) -> None:
        """Called by the driver with the query's sink before :meth:`start_operators`: a
        :class:`~microstream.protocols.PartSink` that gives a writer has its batches
        written by the owners where the plan allows (:func:`sink_tail`)."""
        self._writer = sink.part_writer() if isinstance(sink, PartSink) else None

    def start_operators(
        self,
        plan: PhysicalPlan,
        storage: Storage,
        num_key_groups: int,
        version: int | None,
    ) -> dict[StatefulNode, StatefulOperator]:
        if self.split_scans(plan):
            self._warm_tasks()
        stages = plan.operators()
        if not stages:  # a stateless query needs no actors; its split tasks may write
            self._use_tail(plan)
            return {}
        self._connect()
        ray = self._ray
        self._actor_class = ray.remote(OperatorWorker).options(
            **{"num_cpus": 0, "max_restarts": 0, **self.worker_options}
        )
        self.version = version
        self._storage = storage
        self.workers = [self._actor_class.remote(storage) for _ in range(self.num_workers)]
        ranges = key_group_ranges(num_key_groups, self.num_workers)
        for n, stage in enumerate(stages):
            single = all(k is SINGLE_PARTITION for k in stage.node.partition_keys())
            if single:
                index = n % len(self.workers)  # spread single-owner operators
                owners = [_Owner(self.workers[index], index, 0, num_key_groups)]
            else:
                owners = [_Owner(self.workers[i], i, lo, hi) for i, (lo, hi) in enumerate(ranges)]
            template = stage.node.build_operator(stage.operator_id, storage.sub(stage.operator_id))
            if isinstance(template, KeyGroupedOperator):
                template.use_key_groups(num_key_groups)
            kind = RemoteTimedOperator if isinstance(template, TimedOperator) else RemoteOperator
            self._operators[stage.node] = kind(
                stage, owners, storage, template, self, num_key_groups
            )
        if self._checkpoint is not None:
            self.assignment = record_assignment(
                self._checkpoint,
                {op.operator_id: [(o.lo, o.hi, o.index) for o in op.owners] for op in self._ops()},
                num_workers=self.num_workers,
                num_key_groups=num_key_groups,
                since_batch=0 if version is None else version + 1,
                run_id=self.run_id,
            )
        self._open_all(version, "the start of the query")
        self._use_tail(plan)
        self._use_exchanges(plan)
        self._use_owner_reads(plan)
        return dict(self._operators)

    def _use_owner_reads(self, plan: PhysicalPlan) -> None:
        """Which stages' sources the one owner of the next operator reads in its call
        (:func:`owner_stages`; ``read_splits="auto"`` only)."""
        if self.read_splits != "auto":
            return
        consumer = {i: s for s in plan.operators() for i in s.inputs}

        def single_owner(exchange: ExchangeStage) -> bool:
            return len(self._operators[consumer[exchange.index].node].owners) == 1

        dumps = self._ray.cloudpickle.dumps
        self._owner_stages = owner_stages(plan, single_owner, dumps)
        self._shared_stages = shared_stages(plan, self._cuttable(plan), single_owner, dumps)
        self._plan = plan
        self._warm_owners(plan)

    def _warm_owners(self, plan: PhysicalPlan) -> None:
        """Send every owner the stages it will read sources for (:meth:`OperatorWorker.warm`),
        at the start and after a restart, so their code is imported before a batch. A
        worker that cannot unpickle one (a ``map_batches`` function of a module only the
        driver can import) leaves every stage where it ran before: the driver or tasks."""
        if not self._owner_stages and not self._shared_stages:
            return
        consumer = {i: s for s in plan.operators() for i in s.inputs}
        per_worker: dict[int, list[Any]] = {}
        for stage in plan.stages:
            if isinstance(stage, StatelessStage) and stage.index in self._owner_stages:
                exchange = next(c for c in consumers(plan, stage.index))
                (owner,) = self._operators[consumer[exchange.index].node].owners
                per_worker.setdefault(owner.index, []).append(self._stage_ref(stage))
            elif isinstance(stage, StatelessStage) and stage.index in self._shared_stages:
                exchange = next(c for c in consumers(plan, stage.index))
                for owner in self._operators[consumer[exchange.index].node].owners:
                    per_worker.setdefault(owner.index, []).append(self._stage_ref(stage))
        indexes = sorted(per_worker)
        calls = [self.workers[i].warm.remote(*per_worker[i]) for i in indexes]
        timeout = max(self.worker_timeout_s or 0, START_TIMEOUT_S)
        try:
            self.gather(calls, indexes, "the start of the owners' reads", timeout)
        except WorkerLostError:
            raise
        except Exception as exc:  # the stage did not unpickle there: read as before
            logger.warning(
                "RayRuntime reads the sources on the driver or in tasks, not in the owners: "
                "a worker cannot load a stage (%s: %s); make the functions it calls "
                "importable on the workers (Ray's runtime_env) to let the owners read",
                type(exc).__name__,
                exc,
            )
            self._owner_stages = self._shared_stages = frozenset()

    def _stage_ref(self, stage: StatelessStage) -> Any:
        """``stage`` in Ray's object store, put once per run (split tasks and owners read it)."""
        ref = self._stage_refs.get(stage)
        if ref is None:
            ref = self._stage_refs[stage] = self._ray.put(stage)
        return ref

    def _use_exchanges(self, plan: PhysicalPlan) -> None:
        """Which operators' owners cut their output for the next operators' owners
        (:func:`exchange_tail`); each tail is put in Ray's object store once."""
        consumer = {i: s for s in plan.operators() for i in s.inputs}

        def owners(exchange: ExchangeStage) -> tuple[tuple[int, ...], int]:
            operator = self._operators[consumer[exchange.index].node]
            return tuple(o.hi for o in operator.owners), operator.num_key_groups

        dumps = self._ray.cloudpickle.dumps
        for stage in plan.operators():
            tail = exchange_tail(plan, stage.index, owners, dumps)
            if isinstance(tail, ExchangeTail):
                self._exchanges[stage.index] = (tail, self._ray.put(tail))
                self.exchange_paths[stage.operator_id] = "actors"
            elif tail is not None:
                self.exchange_paths[stage.operator_id] = tail
                logger.info(
                    "RayRuntime routes the output of operator %s to the next operator on the "
                    "driver: %s",
                    stage.operator_id,
                    tail,
                )
        self._forwarded = forwarded_stages([tail for tail, _ in self._exchanges.values()])

    def _use_tail(self, plan: PhysicalPlan) -> None:
        """Whether workers (or split tasks) write the sink's pieces (:func:`sink_tail`)."""
        if self._writer is None:
            return
        dumps = self._ray.cloudpickle.dumps
        self.sink_tail = sink_tail(plan, self._writer, dumps, self._cuttable(plan))
        if self.sink_tail is not None:
            self._empty = pl.DataFrame(schema=plan.logical.schema())

    def _ops(self) -> list[RemoteOperator]:
        return list(self._operators.values())

    def _open_all(self, version: int | None, what: str) -> None:
        calls = [(op, op.reopen(self.workers, version)) for op in self._ops()]
        timeout = self.worker_timeout_s
        if timeout is not None:
            timeout = max(timeout, START_TIMEOUT_S)
        for op, opened in calls:
            self.gather(opened, [o.index for o in op.owners], f"{what} ({op.operator_id})", timeout)

    # -- faults ------------------------------------------------------------------------

    def gather(
        self, calls: list[Any], workers: Sequence[int], what: str, timeout: float | None = -1.0
    ) -> list[Any]:
        """The results of ``calls`` (one per worker index in ``workers``), within
        ``timeout`` seconds (default: the worker timeout).

        Raises
        ------
        WorkerLostError
            Workers died or did not answer in time; it names them.
        Exception
            What an operator raised in a worker (its own error, as locally).
        """
        ray = self._ray
        errors = ray.exceptions
        lost_types = (errors.RayActorError, errors.ObjectLostError, errors.WorkerCrashedError)
        if timeout is not None and timeout < 0:
            timeout = self.worker_timeout_s
        limit = timeout
        try:
            results: list[Any] = ray.get(calls, timeout=timeout)
            return results
        except errors.GetTimeoutError:
            timeout = 0  # the time is up: who has not answered now is hung
        except lost_types:
            pass  # someone died: give the others their time, then name who is gone
        except errors.RayTaskError as exc:
            raise _cause(exc) from None
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=timeout)
        finished = set(ready)
        dead, hung = [], []
        for index, ref in zip(workers, calls):
            if ref not in finished:
                hung.append(index)
                continue
            try:
                ray.get(ref, timeout=0)
            except lost_types:
                dead.append(index)
            except errors.RayTaskError as exc:
                raise _cause(exc) from None
        parts = []
        if dead:
            parts.append(f"Ray worker(s) {sorted(set(dead))} died")
        if hung:
            parts.append(
                f"Ray worker(s) {sorted(set(hung))} did not answer within "
                f"{limit:g} s ("
                + ("worker_timeout" if limit == self.worker_timeout_s else "starting actors")
                + ")"
            )
        msg = f"{' and '.join(parts) or 'a Ray worker was lost'} during {what}"
        raise WorkerLostError(msg, frozenset(dead) | frozenset(hung))

    def recover(self, error: WorkerLostError, batch_id: int) -> None:
        """Replace the workers ``error`` names and re-open every owner at the version
        committed before ``batch_id`` (the driver then re-runs the batch)."""
        self._restart(error, None if batch_id == 0 else batch_id - 1, batch_id)

    def recover_between_batches(self, error: WorkerLostError) -> None:
        """Replace the workers ``error`` names and re-open every owner at the last
        committed version (a loss found while no batch runs); the next batch's output
        reports them to the driver's progress (:meth:`run`): that batch is no re-run."""
        self._restart(error, self.version, None if self.version is None else self.version + 1)
        self._between.append(tuple(sorted(error.workers)))

    def _restart(self, error: WorkerLostError, version: int | None, batch: int | None) -> None:
        while True:
            last_batch, count = self._restarts_in
            count = count + 1 if last_batch == batch else 1
            self._restarts_in = (batch, count)
            if count > self.max_worker_restarts:
                msg = (
                    f"{error}; batch {batch} lost Ray workers {count} time"
                    f"{'s' if count > 1 else ''} and RayRuntime "
                    f"restarts them at most max_worker_restarts={self.max_worker_restarts} "
                    "times per batch. Nothing of the batch was committed; restart the query "
                    "and it re-runs the batch from its write-ahead log (the workers' logs, "
                    "under Ray's session directory, say why they died)"
                )
                raise WorkerRestartsExhaustedError(msg) from error
            self.attempt += 1
            self.restarts += 1
            for index in sorted(error.workers):
                logger.warning("replacing Ray worker %s: %s", index, error)
                self._kill(self.workers[index])
                self.workers[index] = self._actor_class.remote(self._storage)
                self.replaced.append(index)
            try:
                self._open_all(version, f"the restart of the workers for batch {batch}")
                if self._plan is not None:
                    self._warm_owners(self._plan)
            except WorkerLostError as again:
                error = again
                continue
            self.version = version
            return

    def _kill(self, worker: Any) -> None:
        try:
            self._ray.kill(worker, no_restart=True)
        except Exception:  # already gone: nothing to release
            logger.debug("Ray worker already gone", exc_info=True)

    def worker_pids(self) -> list[int]:
        """The process id of every worker, by worker index (crash tests kill them)."""
        return self.gather(
            [w.pid.remote() for w in self.workers], range(len(self.workers)), "a pid request"
        )

    def close(self) -> None:
        for worker in self.workers:
            self._kill(worker)
        self.workers = []

    def run(
        self,
        plan: PhysicalPlan,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
        ctx: OperatorContext,
        operators: Mapping[StatefulNode, StatefulOperator],
    ) -> BatchOutput:
        output = self._run(plan, inputs, ctx)
        if self._between:  # reported once: the driver adds them to this batch's progress
            output = dataclasses.replace(output, replaced_workers=tuple(self._between))
            self._between = []
        return output

    def _run(
        self,
        plan: PhysicalPlan,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
        ctx: OperatorContext,
    ) -> BatchOutput:
        results: list[pl.LazyFrame | None] = [None] * len(plan.stages)
        routed: dict[int, list[Routed]] = {}
        forwarded: dict[int, list[Routed]] = {}  # exchange -> per owner its pieces' references
        late: list[pl.DataFrame] = []
        watermarks: dict[WatermarkNode, WatermarkObservation] = {}
        reads = _Reads()
        consumer = {i: s for s in plan.operators() for i in s.inputs}
        cut = self._cuttable(plan)
        launched: dict[int, list[list[Any]]] = {}  # stage -> each split's task returns
        owned: dict[int, list[Any]] = {}  # stage -> its owner's pieces: OwnerRead, stage
        shared: dict[int, list[Routed]] = {}  # stage -> per owner its pieces from the readers
        for stage in plan.stages:
            if isinstance(stage, StatelessStage):
                if stage.index in self._forwarded:
                    continue  # run by the owners of the operator before it
                scans = [s for s in stage.sources if isinstance(inputs[s], SplitScan)]
                if scans and self._owner_reads(stage, inputs, cut):
                    owned[stage.index] = self._owner_read(stage, inputs, ctx, reads)
                    continue
                if scans and stage.index in self._shared_stages:
                    shared[stage.index] = self._share_reads(plan, stage, inputs, ctx, reads)
                    continue
                if scans and stage.index in cut and not self._on_driver(plan, stage, inputs):
                    launched[stage.index] = self._launch(plan, stage, inputs, ctx, reads)
                    continue
                frames = {s: self._read(inputs[s], s, reads) for s in stage.sources}
                frame, observed = stage.lower(frames, results, ctx)
                watermarks.update(observed)
                results[stage.index] = frame
            elif isinstance(stage, ExchangeStage):
                operator = self._operators[consumer[stage.index].node]
                if stage.index in forwarded:  # cut by the owners of the operator before
                    routed[stage.index] = forwarded[stage.index]
                    continue
                if stage.input in owned:  # the one owner reads the source in its call
                    routed[stage.index] = [owned[stage.input]]
                    continue
                if stage.input in shared:  # the owners read it in shares and cut it
                    routed[stage.index] = shared[stage.input]
                    continue
                if stage.input in launched:
                    # Each owner gets every task's piece for it (in split order) by
                    # reference: the rows go from the tasks to the actors.
                    first = reads.offsets[(stage.input, stage.index)]
                    routed[stage.index] = [
                        [returns[first + k] for returns in launched[stage.input]]
                        for k in range(len(operator.owners))
                    ]
                    continue
                rows = _collected(results, stage.input)
                self.driver_rows += rows.height
                routed[stage.index] = list(
                    route(rows, stage.exchange.keys, operator.owners, operator.num_key_groups)
                )
            elif isinstance(stage, OperatorStage):
                operator = self._operators[stage.node]
                per_owner = [
                    tuple(routed[i][k] for i in stage.inputs) for k in range(len(operator.owners))
                ]
                tail = self.sink_tail
                if tail is not None and tail.operator_index == stage.index:
                    # The owners write the batch's pieces; the tail's stages ran with them.
                    output, parts = operator.process_into_sink(
                        per_owner, stage.context(ctx), (tail, ctx)
                    )
                    _note_reads(plan, stage, operator, owned, reads)
                    late.extend(output.late_rows)
                    watermarks.update(self._reported(plan, launched, reads))
                    return self._written(late, watermarks, reads, parts)
                exchange = self._exchanges.get(stage.index)
                if exchange is not None:
                    output, cut_refs = operator.process_into_exchanges(
                        per_owner, stage.context(ctx), (*exchange, ctx)
                    )
                    _note_reads(plan, stage, operator, owned, reads)
                    late.extend(output.late_rows)
                    forwarded.update(_by_target(exchange[0], cut_refs))
                    continue
                output = operator.process_routed(per_owner, stage.context(ctx))
                _note_reads(plan, stage, operator, owned, reads)
                late.extend(output.late_rows)
                results[stage.index] = output.rows.lazy()
            else:  # the sink stage, last
                if stage.input in launched:
                    first = reads.offsets[(stage.input, stage.index)]
                    refs = [returns[first] for returns in launched[stage.input]]
                    pieces = self._gather_tasks(refs, f"the rows of stage {stage.index}")
                    if self._writes(stage.input):  # the tasks wrote them: SinkParts
                        watermarks.update(self._reported(plan, launched, reads))
                        return self._written(late, watermarks, reads, pieces)
                    rows = pl.concat([p.frame() for p in pieces], how="vertical")
                    self.driver_rows += rows.height
                else:
                    rows = _collected(results, stage.input)
                watermarks.update(self._reported(plan, launched, reads))
                return BatchOutput(
                    rows=rows,
                    late_rows=tuple(late),
                    watermarks=watermarks,
                    rows_read=reads.rows,
                )
        msg = "a physical plan ends with its sink stage"
        raise AssertionError(msg)

    # -- sources read in tasks -----------------------------------------------------------

    def split_scans(self, plan: PhysicalPlan) -> frozenset[ScanNode]:
        """The sources of the stages Ray tasks run per split (``SplitReadingStageExecutor``):
        the driver hands them over unread when they split."""
        cut = self._cuttable(plan) | self._owner_stages
        return frozenset(
            scan
            for stage in plan.stages
            if isinstance(stage, StatelessStage) and stage.index in cut
            for scan in stage.sources
        )

    def _warm_tasks(self) -> None:
        """Start the processes for split tasks now, not in the first batch (a Ray worker
        process starts and imports Polars and microstream in seconds): one task per CPU."""
        task = self._remote(warm, 1)
        cpus = int(self._ray.cluster_resources().get("CPU", 1))
        calls = [task.remote() for _ in range(max(1, min(cpus, 8)))]
        self._gather_tasks(calls, "the start of the split tasks", START_TIMEOUT_S)

    def _cuttable(self, plan: PhysicalPlan) -> set[int]:
        if self._cut is None or self._cut[0] is not plan:
            self._cut = (plan, cuttable(plan))
        return self._cut[1]

    def _remote(self, function: Any, num_returns: int) -> Any:
        self._connect()
        remote = self._remotes.get(function)
        if remote is None:
            remote = self._remotes[function] = self._ray.remote(function)
        # Retried when the task's worker dies, not when the source raises: that is the
        # query's error, as locally.
        return remote.options(num_returns=num_returns, max_retries=3, retry_exceptions=False)

    def _launch(
        self,
        plan: PhysicalPlan,
        stage: StatelessStage,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
        ctx: OperatorContext,
        reads: _Reads,
    ) -> list[list[Any]]:
        """One task per split of the stage's source; each task's returns."""
        (scan,) = stage.sources
        split = inputs[scan]
        assert isinstance(split, SplitScan)
        targets: list[Target] = []
        for target in consumers(plan, stage.index):
            reads.offsets[(stage.index, target.index)] = sum(t.pieces for t in targets)
            if isinstance(target, SinkStage):
                targets.append(Target(None))
                continue
            operator = self._operators[
                next(s for s in plan.operators() if target.index in s.inputs).node
            ]
            targets.append(
                Target(
                    target.exchange.keys,
                    tuple(o.hi for o in operator.owners),
                    operator.num_key_groups,
                )
            )
        task = self._remote(run_split, sum(t.pieces for t in targets) + 1)
        stage_ref = self._stage_ref(stage)  # sent once per run, not with every task
        self.split_tasks += len(split.splits)
        reads.scans[stage.index] = scan
        if not self._writes(stage.index):
            return [
                task.remote(s, split.schema, stage_ref, ctx, tuple(targets)) for s in split.splits
            ]
        if self._tail_ref is None:
            self._tail_ref = self._ray.put(self.sink_tail)
        fence = self.fence  # a new attempt, new pieces: a re-run never reuses a name
        return [
            task.remote(
                s,
                split.schema,
                stage_ref,
                ctx,
                tuple(targets),
                self._tail_ref,
                piece_name(fence, k, split=True),
            )
            for k, s in enumerate(split.splits)
        ]

    def _owner_reads(
        self,
        stage: StatelessStage,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
        cut: set[int],
    ) -> bool:
        """Whether the one owner after ``stage`` reads its source this batch: always when
        tasks cannot run the stage (``map_batches``), else when the batch has one split
        (with several, tasks read them in parallel)."""
        if stage.index not in self._owner_stages:
            return False
        (scan,) = stage.sources
        split = inputs[scan]
        return isinstance(split, SplitScan) and (stage.index not in cut or len(split.splits) == 1)

    def _owner_read(
        self,
        stage: StatelessStage,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
        ctx: OperatorContext,
        reads: _Reads,
    ) -> list[Any]:
        """The pieces that make the owner read ``stage``'s source and run it: the
        :class:`OwnerRead`, then the stage's object reference (put once per run)."""
        (scan,) = stage.sources
        split = inputs[scan]
        assert isinstance(split, SplitScan)
        reads.scans[stage.index] = scan
        self.owner_reads += 1
        return [OwnerRead(split.splits, split.schema, ctx), self._stage_ref(stage)]

    def _share_reads(
        self,
        plan: PhysicalPlan,
        stage: StatelessStage,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
        ctx: OperatorContext,
        reads: _Reads,
    ) -> list[Routed]:
        """The owners of the operator after ``stage`` read its source's splits in shares
        and cut the rows for each other (:mod:`~microstream.runtime.ray.shared_reads`):
        the reports gathered here (a lost reader is named now), and per owner the
        references of its pieces, in split order."""
        (scan,) = stage.sources
        split = inputs[scan]
        assert isinstance(split, SplitScan)
        (exchange,) = consumers(plan, stage.index)
        assert isinstance(exchange, ExchangeStage), "shared_stages feed one exchange"
        consumer = next(s for s in plan.operators() if exchange.index in s.inputs)
        operator = self._operators[consumer.node]
        owners = operator.owners
        target = Target(
            exchange.exchange.keys, tuple(o.hi for o in owners), operator.num_key_groups
        )
        stage_ref = self._stage_ref(stage)
        calls, readers, of = [], [], {}  # of: split position -> (call, its place in it)
        for owner, (positions, ahead) in zip(owners, plan_shares(split.splits, len(owners))):
            if not positions:
                continue
            share = SharedRead(
                tuple(split.splits[k] for k in positions), split.schema, ctx, target, ahead
            )
            method = owner.worker.read_share.options(num_returns=1 + len(positions) * len(owners))
            returns = method.remote(share, stage_ref)
            for place, k in enumerate(positions):
                of[k] = (returns, 1 + place * len(owners))
            calls.append(returns)
            readers.append(owner.index)
        what = f"the reads of batch {ctx.batch_id}, stage {stage.index}"
        reads.known[stage.index] = self.gather([c[0] for c in calls], readers, what)
        reads.scans[stage.index] = scan
        self.shared_reads += 1
        return [
            [of[k][0][of[k][1] + j] for k in range(len(split.splits))] for j in range(len(owners))
        ]

    def _on_driver(
        self,
        plan: PhysicalPlan,
        stage: StatelessStage,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
    ) -> bool:
        """Whether the driver reads the splits of ``stage`` this batch, which tasks could
        read: one split (a task would read it alone while the driver waits for it) whose
        rows all come back here for the sink, under ``read_splits="auto"``."""
        if self.read_splits != "auto" or self._writes(stage.index):
            return False
        (scan,) = stage.sources
        split = inputs[scan]
        return (
            isinstance(split, SplitScan)
            and len(split.splits) == 1
            and all(isinstance(t, SinkStage) for t in consumers(plan, stage.index))
        )

    def _writes(self, index: int) -> bool:
        """Whether the split tasks of stage ``index`` write the sink's pieces (a query
        without operators whose sink reads that stage: :func:`sink_tail`)."""
        tail = self.sink_tail
        return tail is not None and not tail.stages and tail.operator_index == index

    def _read(self, frame: pl.LazyFrame | SplitScan, scan: ScanNode, reads: _Reads) -> pl.LazyFrame:
        """A source's batch for a stage that runs on the driver: its splits read here, in
        order (the rows are needed here anyway; a task would only add a round trip)."""
        if not isinstance(frame, SplitScan):
            return frame
        pieces = [split.read() for split in frame.splits]
        rows = pieces[0] if len(pieces) == 1 else pl.concat(pieces, how="vertical")
        reads.rows[scan] = rows.height
        return declared_width(rows, frame.schema)

    def _written(
        self,
        late: list[pl.DataFrame],
        watermarks: dict[WatermarkNode, WatermarkObservation],
        reads: _Reads,
        parts: Sequence[Any],
    ) -> BatchOutput:
        """A batch whose rows workers or tasks wrote as the sink's ``parts``."""
        return BatchOutput(
            rows=self._empty,
            late_rows=tuple(late),
            watermarks=watermarks,
            rows_read=reads.rows,
            parts=tuple(parts),
        )

    def _reported(
        self, plan: PhysicalPlan, launched: Mapping[int, list[list[Any]]], reads: _Reads
    ) -> dict[WatermarkNode, WatermarkObservation]:
        """:meth:`_observations` of the reports of the tasks ``launched`` (stage -> each
        split's task returns, the report last)."""
        for index, returns in launched.items():
            reads.reports[index] = [r[-1] for r in returns]
        return self._observations(plan, reads)

    def _observations(
        self, plan: PhysicalPlan, reads: _Reads
    ) -> dict[WatermarkNode, WatermarkObservation]:
        """Every task's report gathered: rows read per source, and each watermark node's
        observation over the whole batch (rows summed, the largest event time)."""
        seen: dict[WatermarkNode, WatermarkObservation] = {}
        gathered = {
            index: self._gather_tasks(refs, f"the reads of stage {index}")
            for index, refs in reads.reports.items()
        }
        for index, reports in [*gathered.items(), *reads.known.items()]:
            stage = plan.stages[index]
            assert isinstance(stage, StatelessStage)
            reads.rows[reads.scans[index]] = sum(r.rows_read for r in reports)
            self.owner_read_ahead += sum(r.read_ahead for r in reports)
            for report in reports:
                for position, observation in report.watermarks:
                    node = stage.steps[position]
                    assert isinstance(node, WatermarkNode)
                    before = seen.get(node)
                    seen[node] = observation if before is None else combined(before, observation)
        return seen

    def _gather_tasks(self, refs: list[Any], what: str, timeout: float | None = -1.0) -> list[Any]:
        """The results of tasks; what a source raised in one, as locally; a task whose
        worker died past its retries is a :class:`WorkerLostError` (the batch re-runs)."""
        ray = self._ray
        errors = ray.exceptions
        if timeout is not None and timeout < 0:
            timeout = self.worker_timeout_s
        try:
            results: list[Any] = ray.get(refs, timeout=timeout)
        except errors.RayTaskError as exc:
            raise _cause(exc) from None
        except (errors.WorkerCrashedError, errors.ObjectLostError, errors.GetTimeoutError) as exc:
            msg = f"a Ray task reading a source was lost during {what}: {type(exc).__name__}"
            raise WorkerLostError(msg, frozenset()) from exc
        return results
