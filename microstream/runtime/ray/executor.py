"""The stage executor of RayRuntime: stateful operators in Ray actors, by key-group range.

What runs where, per batch (the driver's trigger loop, write-ahead log, watermark
and sink commit are the local ones, :mod:`microstream.runtime.driver`):

1. **Stateless stages** run on the driver, as locally (reading sources and the
   fused stateless prefix in Ray tasks is a later step).
2. **An exchange** collects its input on the driver and routes every row to the
   owner of its key group: ``key_group = stable_hash(partition keys) %
   num_key_groups`` (:mod:`microstream.state.key_groups`, the hash the state
   stores use), owner ``i`` holding the contiguous range ``key_group_ranges(n,
   num_workers)[i]``. A ``SINGLE_PARTITION`` input goes whole to one worker,
   which owns every key group of that operator.
3. **An operator stage** calls every owner of the operator at once (also those
   that got no rows: the watermark still evicts and emits there); each returns
   its :class:`OperatorOutput`, and the outputs are concatenated in key-group
   order, so a batch's rows come out in the same order every run.
4. **Commit**: every owner writes its range's state files for batch N and
   returns what it wrote; the driver writes each store's manifest of version N
   (:func:`microstream.state.parts.commit_parts`), then, as locally, ``commits/N``.

A worker that dies (its process killed) fails the batch with a
:class:`~microstream.exceptions.WorkerError`; nothing of batch N is committed,
and restarting the query re-runs it from the log with fresh workers, which load
their ranges as of the last committed version.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from microstream.exceptions import WorkerError
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    KeyGroupedOperator,
    OperatorContext,
    OperatorOutput,
    PartitionKeys,
    PlanNode,
    ScanNode,
    StatefulNode,
    StatefulOperator,
    TimedOperator,
    WatermarkNode,
)
from microstream.plan.physical import (
    ExchangeStage,
    OperatorStage,
    PhysicalPlan,
    StatelessStage,
    WatermarkObservation,
)
from microstream.runtime.progress import StateOperatorProgress
from microstream.runtime.ray.worker import OperatorWorker
from microstream.runtime.stages import BatchOutput
from microstream.state.key_groups import key_group_ranges, key_groups
from microstream.state.parts import commit_parts

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage
    from microstream.state.format import StatePart

__all__ = ["RayStageExecutor", "detached"]

logger = logging.getLogger("microstream")


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
    owners, commit through the owners and one manifest per store, schemas from a copy
    of the operator built on the driver (never loaded).
    """

    def __init__(
        self,
        stage: OperatorStage,
        owners: list[_Owner],
        storage: Storage,
        template: StatefulOperator,
        ray: Any,
        num_key_groups: int,
    ) -> None:
        self.operator_id = stage.operator_id
        self.stage = stage
        self.owners = owners
        self._storage = storage
        self._template = template
        self._ray = ray
        self.num_key_groups = num_key_groups
        self._progress = template.progress()

    def process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> OperatorOutput:
        """Every row to the owners of its key group, then the owners' outputs joined."""
        keys = self.stage.node.partition_keys()
        routed = [
            route(frame, key, self.owners, self.num_key_groups) for frame, key in zip(inputs, keys)
        ]
        per_owner = [tuple(parts[i] for parts in routed) for i in range(len(self.owners))]
        return self.process_routed(per_owner, ctx)

    def process_routed(
        self, per_owner: Sequence[tuple[pl.DataFrame, ...]], ctx: OperatorContext
    ) -> OperatorOutput:
        """Each owner's rows (in owner order) through its part of the operator."""
        calls = [
            owner.worker.process.remote(self.operator_id, rows, ctx)
            for owner, rows in zip(self.owners, per_owner)
        ]
        results: list[tuple[OperatorOutput, StateOperatorProgress]] = self._get(
            calls, f"batch {ctx.batch_id}"
        )
        outputs = [output for output, _ in results]
        self._progress = _sum_progress([p for _, p in results])
        frames = [o.rows for o in outputs]
        rows = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
        late = tuple(frame for o in outputs for frame in o.late_rows)
        return OperatorOutput(rows=rows, late_rows=late)

    def load(self, version: int | None) -> None:
        msg = "the workers load their key groups when they are placed (RayStageExecutor)"
        raise AssertionError(msg)

    def commit(self, version: int) -> None:
        """Every owner writes its range of ``version``; then one manifest per store."""
        calls = [
            owner.worker.write_parts.remote(self.operator_id, version, leader=owner.lo == 0)
            for owner in self.owners
        ]
        results: list[dict[str, StatePart]] = self._get(calls, f"the commit of batch {version}")
        for store in results[0]:
            commit_parts(
                self._storage.sub(store),
                [parts[store] for parts in results],
                self.num_key_groups,
            )

    def progress(self) -> StateOperatorProgress:
        return self._progress

    def store_schemas(self) -> dict[str, pl.Schema]:
        return self._template.store_schemas()

    def worker_pids(self) -> list[int]:
        """The process id of every owner, in key-group order."""
        pids: list[int] = self._get([o.worker.pid.remote() for o in self.owners], "pid")
        return pids

    def _get(self, calls: list[Any], what: str) -> Any:
        try:
            return self._ray.get(calls)
        except self._ray.exceptions.RayActorError as exc:
            lost = ", ".join(
                f"worker {o.index} (key groups {o.lo}-{o.hi - 1})" for o in self.owners
            )
            msg = (
                f"a Ray worker of operator {self.operator_id} died during {what} (its owners: "
                f"{lost}): {type(exc).__name__}. Nothing of the batch was committed; restart "
                "the query and it re-runs the batch from its write-ahead log"
            )
            raise WorkerError(msg) from exc
        except self._ray.exceptions.RayTaskError as exc:
            # The operator raised in the worker: raise its own error, as locally.
            if isinstance(exc.cause, BaseException):
                raise exc.cause from None
            raise


class RemoteTimedOperator(RemoteOperator):
    """A :class:`RemoteOperator` whose operator has timers (``TimedOperator``): a batch
    without rows is due when any owner says so."""

    def timers_due(self, watermark_us: int | None, now_ms: int) -> bool:
        calls = [
            o.worker.timers_due.remote(self.operator_id, watermark_us, now_ms) for o in self.owners
        ]
        due: list[bool] = self._get(calls, "a timer check")
        return any(due)


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
    if len(owners) == 1:
        return [frame]
    if keys is SINGLE_PARTITION:  # compile places such an operator on one owner
        msg = "a SINGLE_PARTITION input has one owner"
        raise AssertionError(msg)
    assert isinstance(keys, tuple)
    if frame.height == 0:
        return [frame] * len(owners)
    groups = key_groups(frame, keys, num_key_groups)
    his = np.array([o.hi for o in owners], dtype=np.uint32)
    owner = np.searchsorted(his, groups, side="right")
    return [frame.filter(pl.Series(owner == i)) for i in range(len(owners))]


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
    """

    def __init__(
        self,
        ray: Any,
        connect: Any,
        num_workers: int,
        worker_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._ray = ray
        self._connect = connect
        self.num_workers = num_workers
        self.worker_options = dict(worker_options or {})
        self.workers: list[Any] = []
        self._operators: dict[StatefulNode, RemoteOperator] = {}

    def start_operators(
        self,
        plan: PhysicalPlan,
        storage: Storage,
        num_key_groups: int,
        version: int | None,
    ) -> dict[StatefulNode, StatefulOperator]:
        stages = plan.operators()
        if not stages:
            return {}  # a stateless query needs no actors (nor Ray)
        self._connect()
        ray = self._ray
        actor_class = ray.remote(OperatorWorker).options(
            **{"num_cpus": 0, "max_restarts": 0, **self.worker_options}
        )
        self.workers = [actor_class.remote(storage) for _ in range(self.num_workers)]
        ranges = key_group_ranges(num_key_groups, self.num_workers)
        opened = []
        for n, stage in enumerate(stages):
            single = all(k is SINGLE_PARTITION for k in stage.node.partition_keys())
            if single:
                index = n % len(self.workers)  # spread single-owner operators
                owners = [_Owner(self.workers[index], index, 0, num_key_groups)]
            else:
                owners = [_Owner(self.workers[i], i, lo, hi) for i, (lo, hi) in enumerate(ranges)]
            node = detached(stage.node)
            opened += [
                o.worker.open.remote(
                    stage.operator_id,
                    node,
                    num_key_groups=num_key_groups,
                    key_groups=(o.lo, o.hi),
                    version=version,
                )
                for o in owners
            ]
            template = stage.node.build_operator(stage.operator_id, storage.sub(stage.operator_id))
            if isinstance(template, KeyGroupedOperator):
                template.use_key_groups(num_key_groups)
            kind = RemoteTimedOperator if isinstance(template, TimedOperator) else RemoteOperator
            self._operators[stage.node] = kind(
                stage, owners, storage, template, ray, num_key_groups
            )
        if self._operators:
            next(iter(self._operators.values()))._get(opened, "the start of the query")
        return dict(self._operators)

    def worker_pids(self) -> list[int]:
        """The process id of every worker, by worker index (crash tests kill them)."""
        pids: list[int] = self._ray.get([w.pid.remote() for w in self.workers])
        return pids

    def close(self) -> None:
        for worker in self.workers:
            try:
                self._ray.kill(worker, no_restart=True)
            except Exception:  # already gone: nothing to release
                logger.debug("Ray worker already gone", exc_info=True)
        self.workers = []

    def run(
        self,
        plan: PhysicalPlan,
        inputs: Mapping[ScanNode, pl.LazyFrame],
        ctx: OperatorContext,
        operators: Mapping[StatefulNode, StatefulOperator],
    ) -> BatchOutput:
        results: list[pl.LazyFrame | None] = [None] * len(plan.stages)
        routed: dict[int, list[pl.DataFrame]] = {}
        late: list[pl.DataFrame] = []
        watermarks: dict[WatermarkNode, WatermarkObservation] = {}
        consumer = {i: s for s in plan.operators() for i in s.inputs}
        for stage in plan.stages:
            if isinstance(stage, StatelessStage):
                frame, observed = stage.lower(inputs, results, ctx)
                watermarks.update(observed)
                results[stage.index] = frame
            elif isinstance(stage, ExchangeStage):
                operator = self._operators[consumer[stage.index].node]
                rows = _collected(results, stage.input)
                routed[stage.index] = route(
                    rows, stage.exchange.keys, operator.owners, operator.num_key_groups
                )
            elif isinstance(stage, OperatorStage):
                operator = self._operators[stage.node]
                per_owner = [
                    tuple(routed[i][k] for i in stage.inputs) for k in range(len(operator.owners))
                ]
                output = operator.process_routed(per_owner, stage.context(ctx))
                late.extend(output.late_rows)
                results[stage.index] = output.rows.lazy()
            else:  # the sink stage, last
                rows = _collected(results, stage.input)
                return BatchOutput(rows=rows, late_rows=tuple(late), watermarks=watermarks)
        msg = "a physical plan ends with its sink stage"
        raise AssertionError(msg)


def _collected(results: list[pl.LazyFrame | None], index: int) -> pl.DataFrame:
    frame = results[index]
    assert frame is not None, f"stage {index} has not run"
    return frame.collect()
