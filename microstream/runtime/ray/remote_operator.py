"""The driver's handle on a stateful operator whose key groups live in Ray actors.

:class:`RemoteOperator` is what the trigger loop sees of an operator run by
:class:`~microstream.runtime.ray.executor.RayStageExecutor`: it sends each owner its
rows (:func:`route` by key group, or the references of pieces cut elsewhere) in one
call per owner and batch, which also writes the owner's state files of the batch's
version; it gathers the owners' outputs in key-group order, sums their progress, and
at commit writes one manifest per store over the files the owners wrote.
:func:`detached` cuts the copy of the operator's node the owners build it from.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import polars as pl

from microstream.exceptions import WorkerLostError
from microstream.plan.nodes import (
    OperatorContext,
    OperatorOutput,
    PartitionKeys,
    PlanNode,
    StatefulNode,
    StatefulOperator,
    WatermarkNode,
)
from microstream.plan.physical import OperatorStage
from microstream.runtime.progress import StateOperatorProgress
from microstream.runtime.ray.operator_exchange import ExchangeTail
from microstream.runtime.ray.scan_tasks import SplitReport, split_rows
from microstream.runtime.ray.sink_parts import SinkTail, piece_name
from microstream.runtime.ray.wire import Wire
from microstream.runtime.ray.worker import StateWrite
from microstream.state.parts import commit_parts

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage
    from microstream.protocols import SinkPart
    from microstream.state.format import StatePart

__all__ = [
    "TIMER_CHECK_MS",
    "RemoteOperator",
    "RemoteTimedOperator",
    "Routed",
    "detached",
    "route",
]


class Coordinator(Protocol):
    """What an operator's handle asks of the executor that runs the workers
    (:class:`~microstream.runtime.ray.executor.RayStageExecutor`)."""

    version: int | None

    @property
    def fence(self) -> str: ...

    def gather(
        self, calls: list[Any], workers: Sequence[int], what: str, timeout: float | None = -1.0
    ) -> list[Any]: ...

    def recover_between_batches(self, error: WorkerLostError) -> None: ...


Routed = pl.DataFrame | list[Any]
"""One owner's rows of one exchange: a frame (routed by the driver), or the references
of the pieces Ray tasks cut for it (one per split, in split order), or an ``OwnerRead``
and its stage's reference (the owner reads the source itself)."""


@dataclass(frozen=True, eq=False)
class _DetachedInput(PlanNode):
    """Stands for an operator's input in the copy of its node sent to a worker: the
    worker gets rows, never the sources and transforms that made them on the driver."""

    columns: pl.Schema

    def describe(self) -> str:
        return "input (on the driver)"

    def schema(self) -> pl.Schema:
        return self.columns


def detached(node: StatefulNode) -> StatefulNode:
    """A copy of ``node`` to send to a worker: its inputs replaced by their schemas, and
    a node it refers to (its watermark) likewise cut from its own input and side output.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> node = ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"]).plan
    >>> detached(node).input.describe(), detached(node).subset
    ('input (on the driver)', ('k',))
    """
    return _cut(node)  # type: ignore[return-value]


def _cut(node: PlanNode) -> PlanNode:
    clone = copy.copy(node)
    if dataclasses.is_dataclass(node):
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if isinstance(value, WatermarkNode):
                # Operators read their watermark's column and delay: keep the node, cut
                # from its own input (it may also be the operator's input).
                replacement: PlanNode = _cut(value)
            elif isinstance(value, PlanNode):
                replacement = _DetachedInput(value.schema())
            else:
                continue
            object.__setattr__(clone, field.name, replacement)
    if isinstance(clone, WatermarkNode):
        object.__setattr__(clone, "on_late", None)  # late rows are routed by the driver
    return clone


@dataclass(frozen=True)
class _Owner:
    """One actor owning key groups ``[lo, hi)`` of one operator."""

    worker: Any
    """The Ray actor handle."""
    index: int
    lo: int
    hi: int


class RemoteOperator:
    """The driver's handle on a stateful operator whose key groups live in Ray actors.

    It is what the trigger loop sees (``StatefulOperator``): progress summed over the
    owners, one manifest per store at commit over the state files the owners wrote in
    their batch's call, schemas from a copy of the operator built on the driver (never
    loaded).
    """

    def __init__(
        self,
        stage: OperatorStage,
        owners: list[_Owner],
        storage: Storage,
        template: StatefulOperator,
        executor: Coordinator,
        num_key_groups: int,
    ) -> None:
        self.operator_id = stage.operator_id
        self.stage = stage
        self.owners = owners
        self.node = detached(stage.node)
        """What the owners build the operator from (sent again when they are re-opened)."""
        self._storage = storage
        self._template = template
        self._executor = executor
        self.num_key_groups = num_key_groups
        self._progress = template.progress()
        self._written: tuple[int, str, list[dict[str, StatePart]]] | None = None
        """(version, fence, per owner its parts) of the last batch the owners processed and
        wrote: what :meth:`commit` commits."""
        self.reports: list[SplitReport] = []
        """What the owners read themselves in the last batch's call (an ``OwnerRead`` per
        input they read, :mod:`~microstream.runtime.ray.owner_reads`), in owner then
        input order."""

    def process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> OperatorOutput:
        """Every row to the owners of its key group, then the owners' outputs joined."""
        keys = self.stage.node.partition_keys()
        routed = [
            route(frame, key, self.owners, self.num_key_groups) for frame, key in zip(inputs, keys)
        ]
        per_owner = [tuple(parts[i] for parts in routed) for i in range(len(self.owners))]
        return self.process_routed(per_owner, ctx)

    def process_routed(
        self, per_owner: Sequence[tuple[Routed, ...]], ctx: OperatorContext
    ) -> OperatorOutput:
        """Each owner's rows (in owner order) through its part of the operator: per
        input a frame, or the references of the pieces Ray tasks made for it."""
        output, _ = self._run(per_owner, ctx, None)
        return output

    def process_into_sink(
        self,
        per_owner: Sequence[tuple[Routed, ...]],
        ctx: OperatorContext,
        sink: tuple[SinkTail, OperatorContext],
    ) -> tuple[OperatorOutput, list[SinkPart]]:
        """As :meth:`process_routed`, each owner then writing its output's piece of the
        batch through ``sink`` (the tail and the batch's context): the output without
        rows, and the pieces in owner order (:mod:`~microstream.runtime.ray.sink_parts`)."""
        return self._run(per_owner, ctx, sink)

    def process_into_exchanges(
        self,
        per_owner: Sequence[tuple[Routed, ...]],
        ctx: OperatorContext,
        tail: tuple[ExchangeTail, Any, OperatorContext],
    ) -> tuple[OperatorOutput, list[list[Any]]]:
        """As :meth:`process_routed`, each owner then cutting its output for the next
        operators' owners (``tail``: the :class:`ExchangeTail`, its object reference, the
        batch's context; :mod:`~microstream.runtime.ray.operator_exchange`): the output
        without rows (its late rows gathered), and per owner (in owner order) the
        references of its pieces, target after target, each target's in its owner order."""
        self._started()
        exchange, tail_ref, batch = tail
        fence = self._executor.fence
        returns = []
        for owner, rows in zip(self.owners, per_owner):
            counts, pieces = _arguments(rows)
            method = owner.worker.process_pieces_into_exchanges.options(
                num_returns=1 + exchange.pieces
            )
            returns.append(
                method.remote(
                    self.operator_id,
                    ctx,
                    counts,
                    tail_ref,
                    batch,
                    *pieces,
                    write=self._write(owner, ctx, fence),
                )
            )
        # Only the first return (late rows, progress, state written) comes to the driver;
        # the pieces stay in Ray's object store until the next owners read them.
        results: list[tuple[Any, ...]] = self._get([r[0] for r in returns], f"batch {ctx.batch_id}")
        self._progress = _sum_progress([r[1] for r in results])
        self._written = (ctx.batch_id, fence, [r[2] for r in results])
        self.reports = [read for r in results for read in r[3]]
        late = tuple(wire.frame() for r in results for wire in r[0])
        return OperatorOutput(rows=_NO_ROWS, late_rows=late), [list(r[1:]) for r in returns]

    def _started(self) -> None:
        """A batch starts on the owners."""
        self._written = None
        self.reports = []

    @staticmethod
    def _write(owner: _Owner, ctx: OperatorContext, fence: str) -> StateWrite:
        """What ``owner`` writes of the batch's state version in the batch's call."""
        return StateWrite(version=ctx.batch_id, leader=owner.lo == 0, fence=fence)

    def _run(
        self,
        per_owner: Sequence[tuple[Routed, ...]],
        ctx: OperatorContext,
        sink: tuple[SinkTail, OperatorContext] | None,
    ) -> tuple[OperatorOutput, list[SinkPart]]:
        self._started()
        fence = self._executor.fence
        calls = [
            _process_call(
                owner.worker,
                self.operator_id,
                rows,
                ctx,
                self._write(owner, ctx, fence),
                None if sink is None else (*sink, piece_name(fence, owner.index)),
            )
            for owner, rows in zip(self.owners, per_owner)
        ]
        # per owner: its output rows, its late rows (Arrow tables as :class:`Wire`), its
        # progress, its state files written, its reads' reports, and the sink's piece
        # when it wrote one
        results: list[tuple[Any, ...]] = self._get(calls, f"batch {ctx.batch_id}")
        self._progress = _sum_progress([r[2] for r in results])
        self._written = (ctx.batch_id, fence, [r[3] for r in results])
        self.reports = [read for r in results for read in r[4]]
        frames = [r[0].frame() for r in results]
        rows = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
        late = tuple(wire.frame() for r in results for wire in r[1])
        parts: list[SinkPart] = [r[5] for r in results if len(r) == 6]
        return OperatorOutput(rows=rows, late_rows=late), parts

    def load(self, version: int | None) -> None:
        msg = "the workers load their key groups when they are placed (RayStageExecutor)"
        raise AssertionError(msg)

    def commit(self, version: int) -> None:
        """One manifest per store over the files every owner wrote of ``version`` in its
        call of the batch (no call to the owners: the sink has committed the batch, and
        the manifest makes their fenced files the state's version ``version``)."""
        written, self._written = self._written, None
        fence = self._executor.fence
        if written is None or written[:2] != (version, fence):
            # Every batch calls every owner (with or without rows) before its commit, in
            # the attempt that commits it: anything else is a bug, never a fault.
            msg = (
                f"operator {self.operator_id}: commit of state version {version} (attempt "
                f"{fence}) without its owners' files; they wrote "
                f"{'nothing' if written is None else f'version {written[0]} ({written[1]})'}"
            )
            raise AssertionError(msg)
        results = written[2]
        for store in results[0]:
            commit_parts(
                self._storage.sub(store),
                [parts[store] for parts in results],
                self.num_key_groups,
            )
        self._executor.version = version

    def progress(self) -> StateOperatorProgress:
        return self._progress

    def store_schemas(self) -> dict[str, pl.Schema]:
        return self._template.store_schemas()

    def worker_pids(self) -> list[int]:
        """The process id of every owner, in key-group order."""
        pids: list[int] = self._get([o.worker.pid.remote() for o in self.owners], "pid")
        return pids

    def reopen(self, workers: Sequence[Any], version: int | None) -> list[Any]:
        """Point the owners at ``workers`` (by index) and have each build the operator and
        load its range as of ``version``; the calls, to gather."""
        self.owners = [dataclasses.replace(o, worker=workers[o.index]) for o in self.owners]
        return [
            o.worker.open.remote(
                self.operator_id,
                self.node,
                num_key_groups=self.num_key_groups,
                key_groups=(o.lo, o.hi),
                version=version,
            )
            for o in self.owners
        ]

    def _get(self, calls: list[Any], what: str) -> Any:
        return self._executor.gather(
            calls, [o.index for o in self.owners], f"{what} of operator {self.operator_id}"
        )


TIMER_CHECK_MS = 100
"""How often an idle query asks the owners of an operator with timers whether one is due
while the watermark stands still (the driver polls every 10 ms; a round trip to every
actor each time would keep them busy): processing-time timers and state TTLs fire within
this long of their time, event-time timers at the first poll after the watermark moved."""


class RemoteTimedOperator(RemoteOperator):
    """A :class:`RemoteOperator` whose operator has timers (``TimedOperator``): a batch
    without rows is due when any owner says so."""

    _quiet: tuple[int | None, int] | None = None
    """(watermark, time in ms) of the last check that found no timer due, until a batch."""

    def _started(self) -> None:
        super()._started()
        self._quiet = None  # a batch changes the owners' timers

    def timers_due(self, watermark_us: int | None, now_ms: int) -> bool:
        """Whether any owner has a timer due (asked at most every ``TIMER_CHECK_MS`` while
        the watermark stands still); a worker lost meanwhile (between batches) is replaced
        at the last committed version first."""
        quiet = self._quiet
        if quiet is not None and quiet[0] == watermark_us and now_ms - quiet[1] < TIMER_CHECK_MS:
            return False
        while True:
            calls = [
                o.worker.timers_due.remote(self.operator_id, watermark_us, now_ms)
                for o in self.owners
            ]
            try:
                answers: list[bool] = self._get(calls, "a timer check")
            except WorkerLostError as exc:
                self._executor.recover_between_batches(exc)
                continue
            due = any(answers)
            self._quiet = None if due else (watermark_us, now_ms)
            return due


def route(
    frame: pl.DataFrame, keys: PartitionKeys, owners: Sequence[_Owner], num_key_groups: int
) -> list[pl.DataFrame]:
    """``frame``'s rows for each owner (in owner order), by the key group of ``keys``;
    row order is kept within an owner (every row of a key goes to one owner).

    Examples
    --------
    >>> owners = [_Owner(None, 0, 0, 40), _Owner(None, 1, 40, 128)]  # a: group 38, b: 49
    >>> parts = route(pl.DataFrame({"user": ["a", "b", "a"]}), ("user",), owners, 128)
    >>> [p["user"].to_list() for p in parts]
    [['a', 'a'], ['b']]
    """
    return split_rows(frame, keys, [o.hi for o in owners], num_key_groups)


def _sum_progress(parts: list[StateOperatorProgress]) -> StateOperatorProgress:
    first = parts[0]
    return StateOperatorProgress(
        operator_id=first.operator_id,
        kind=first.kind,
        num_rows_total=sum(p.num_rows_total for p in parts),
        memory_bytes=sum(p.memory_bytes for p in parts),
        num_rows_updated=sum(p.num_rows_updated for p in parts),
        num_rows_removed=sum(p.num_rows_removed for p in parts),
        num_rows_dropped_late=sum(p.num_rows_dropped_late for p in parts),
        num_rows_dropped_null_time=sum(p.num_rows_dropped_null_time for p in parts),
    )


def _process_call(
    worker: Any,
    operator_id: str,
    inputs: tuple[Routed, ...],
    ctx: OperatorContext,
    write: StateWrite,
    sink: tuple[SinkTail, OperatorContext, str] | None = None,
) -> Any:
    """The actor call for one owner: frames the driver routed as Arrow tables
    (:class:`Wire`), the pieces Ray tasks cut by reference (Ray resolves references
    given as arguments before the call runs), what to write of the batch's state
    version; with ``sink`` (the tail, the batch's context, the piece's name) the owner
    writes its output as that piece of the batch."""
    counts, pieces = _arguments(inputs)
    if sink is None:
        return worker.process_pieces.remote(operator_id, ctx, counts, *pieces, write=write)
    return worker.process_pieces_into_sink.remote(
        operator_id, ctx, counts, sink, *pieces, write=write
    )


def _arguments(inputs: tuple[Routed, ...]) -> tuple[tuple[int, ...], list[Any]]:
    """An owner's inputs as call arguments: how many pieces each input has, and the
    pieces (a frame the driver routed as one :class:`Wire`, references as they are)."""
    counts = tuple(1 if isinstance(x, pl.DataFrame) else len(x) for x in inputs)
    pieces = [p for x in inputs for p in ([Wire.of(x)] if isinstance(x, pl.DataFrame) else x)]
    return counts, pieces


_NO_ROWS = pl.DataFrame()
"""The rows of an operator's output that went to the next owners, not to the driver."""
