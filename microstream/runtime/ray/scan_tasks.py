"""Reading sources in Ray tasks: one task per split runs the stateless prefix after it.

A source that can split (:class:`~microstream.protocols.SplittableSource`) comes to
:class:`~microstream.runtime.ray.executor.RayStageExecutor` as a
:class:`~microstream.runtime.stages.SplitScan`. For a stateless stage that reads that
source alone and whose steps give the same rows whether they run over the whole batch
or over its parts, concatenated (:func:`cuttable`), one Ray task per split
(:func:`run_split`) reads the split, runs the stage's fused Polars plan over it
(:meth:`StatelessStage.lower`) and cuts its output for every consumer of the stage:

- for an exchange, one frame per owner of the consuming operator, by the key group of
  the exchange's keys (the owners' contiguous ranges, :func:`split_rows`): the driver
  hands the task's object references straight to the owning actors;
- for the sink, the rows whole: the driver gathers them in split order; or, when the
  query has no operator and its sink takes pieces, the task writes its rows as its
  piece of the batch (:func:`~microstream.runtime.ray.sink_parts.write_piece`) and
  returns what it wrote, which the driver commits with the other tasks' pieces.

Every task also returns a :class:`SplitReport`: the rows read and what each watermark
node of the stage saw; the driver sums the rows and takes the largest event time per
node (the maximum over the parts is the maximum over the batch). Row order is fixed
by the split order, so a batch gives the same rows in the same order every run.

A stage that cannot be cut (it combines two sources, reads an earlier stage, or has a
step that looks at the whole batch: ``map_batches``, a static join, an aggregation
or window expression, ``cum_sum``, ``shift``...) runs on the driver, as before, and
the driver reads its sources' splits itself (its rows are needed there anyway).

This module never imports Ray: the executor makes the functions remote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from microstream.exceptions import PlanError
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    PartitionKeys,
    PlanNode,
    StatelessNode,
    WatermarkNode,
    check_row_wise,
    declared_width,
)
from microstream.plan.physical import (
    ExchangeStage,
    PhysicalPlan,
    SinkStage,
    StatelessStage,
    WatermarkObservation,
)
from microstream.plan.processing_time import ProcessingTimeNode
from microstream.runtime.ray.sink_parts import write_piece
from microstream.runtime.ray.wire import Wire
from microstream.state.key_groups import key_groups

if TYPE_CHECKING:
    from microstream.plan.nodes import OperatorContext
    from microstream.protocols import ReadSplit, SinkPart
    from microstream.runtime.ray.sink_parts import SinkTail

__all__ = [
    "SplitReport",
    "Target",
    "combined",
    "consumers",
    "cuttable",
    "report",
    "row_local_step",
    "run_split",
    "split_rows",
    "warm",
]

ROW_VERBS = frozenset(
    {
        "filter",
        "select",
        "with_columns",
        "drop",
        "rename",
        "cast",
        "explode",
        "unnest",
        "drop_nulls",
        "fill_null",
        "fill_nan",
        "unpivot",
    }
)
"""LazyFrame verbs whose result over a batch is their results over its parts,
concatenated (their expressions are row by row: the stream verbs refuse others)."""


@dataclass(frozen=True)
class Target:
    """Where a task's rows go: the owners of an exchange, or the sink (``keys`` None)."""

    keys: PartitionKeys | None
    his: tuple[int, ...] = ()
    """Every owner's key-group upper bound, in owner order."""
    num_key_groups: int = 0

    @property
    def pieces(self) -> int:
        return 1 if self.keys is None else len(self.his)


@dataclass(frozen=True)
class SplitReport:
    """What a task tells the driver besides its rows."""

    rows_read: int
    watermarks: tuple[tuple[int, WatermarkObservation], ...]
    """Each watermark node's observation, by the node's position in the stage's steps."""
    read_ms: float = 0.0
    """How long reading the rows and running the stage over them took (benchmarks)."""
    read_ahead: bool = False
    """Whether an owner took the rows from its read-ahead (:mod:`~microstream.runtime.ray.owner_prefetch`)."""


def split_rows(
    frame: pl.DataFrame, keys: PartitionKeys, his: Sequence[int], num_key_groups: int
) -> list[pl.DataFrame]:
    """``frame``'s rows for each owner (in owner order) by the key group of ``keys``, an
    owner holding the groups below its ``his`` entry; row order is kept within an owner.

    Examples
    --------
    >>> parts = split_rows(pl.DataFrame({"user": ["a", "b", "a"]}), ("user",), [40, 128], 128)
    >>> [p["user"].to_list() for p in parts]  # a: key group 38, b: 49
    [['a', 'a'], ['b']]
    >>> rows = pl.DataFrame({"user": ["a", "b", "a"], "__owner": [1, 2, 3]})
    >>> many = split_rows(rows, ("user",), range(4, 132, 4), 128)  # 32 owners, one pass
    >>> [(i, p.rows()) for i, p in enumerate(many) if p.height]
    [(9, [('a', 1), ('a', 3)]), (12, [('b', 2)])]
    """
    if len(his) == 1:
        return [frame]
    if keys is SINGLE_PARTITION:  # compile places such an operator on one owner
        msg = "a SINGLE_PARTITION input has one owner"
        raise AssertionError(msg)
    assert isinstance(keys, tuple)
    if frame.height == 0:
        return [frame] * len(his)
    groups = key_groups(frame, keys, num_key_groups)
    owner = np.searchsorted(np.array(his, dtype=np.uint32), groups, side="right")
    if len(his) <= 16:  # one filter per owner: faster than a partition up to ~16 owners
        return [frame.filter(pl.Series(owner == i)) for i in range(len(his))]
    # (one pass for many owners: 100k rows to 32 owners, 4.3 ms of filters -> 1.6 ms)
    column = "__owner"
    while column in frame.columns:  # (a name of the query's own would be overwritten)
        column += "_"
    parts = frame.with_columns(pl.Series(column, owner.astype(np.uint32))).partition_by(
        column, maintain_order=True, include_key=False, as_dict=True
    )
    empty = frame.clear()
    return [parts.get((i,), empty) for i in range(len(his))]


def warm() -> int:
    """Nothing: run once per task slot at the start of a query, so the processes that
    run its split tasks are started, with this module imported, before its first batch."""
    return os.getpid()


def run_split(
    split: ReadSplit,
    schema: pl.Schema,
    stage: StatelessStage,
    ctx: OperatorContext,
    targets: tuple[Target, ...],
    tail: SinkTail | None = None,
    piece: str = "",
) -> tuple[Any, ...]:
    """Read ``split``, run ``stage`` over it and cut the output for ``targets``: every
    target's pieces in order (as :class:`Wire` s), then the :class:`SplitReport` (a
    Ray task's returns). With ``tail``, the sink's rows are written as ``piece`` of
    the batch instead, and its target's return is the ``SinkPart``."""
    started = time.perf_counter()
    df = split.read()
    (scan,) = stage.sources
    lazy, observed = stage.lower({scan: declared_width(df, schema)}, [], ctx)
    out = lazy.collect()
    read_ms = (time.perf_counter() - started) * 1000
    pieces: list[Wire | SinkPart] = []
    for target in targets:
        if target.keys is None:
            pieces.append(Wire.of(out) if tail is None else write_piece(out, tail, ctx, piece))
        else:
            parts = split_rows(out, target.keys, target.his, target.num_key_groups)
            pieces += [Wire.of(part) for part in parts]
    return (*pieces, report(stage, df.height, observed, read_ms))


def combined(a: WatermarkObservation, b: WatermarkObservation) -> WatermarkObservation:
    """Two parts' observations of one watermark node as the whole's: rows summed, the
    largest event time (the maximum over the parts is the maximum over the batch).

    Examples
    --------
    >>> combined(WatermarkObservation(2, 10), WatermarkObservation(3, None))
    WatermarkObservation(rows=5, max_event_us=10)
    """
    times = [t for t in (a.max_event_us, b.max_event_us) if t is not None]
    return WatermarkObservation(a.rows + b.rows, max(times) if times else None)


def report(
    stage: StatelessStage,
    rows_read: int,
    observed: Mapping[WatermarkNode, WatermarkObservation],
    read_ms: float = 0.0,
    read_ahead: bool = False,
) -> SplitReport:
    """What a reader of ``stage``'s source tells the driver besides its rows: the rows it
    read, each watermark node's observation by the node's position in the steps, and how
    long the read and the stage took."""
    position = {id(node): n for n, node in enumerate(stage.steps)}
    seen = tuple((position[id(node)], o) for node, o in observed.items())
    return SplitReport(rows_read, seen, read_ms, read_ahead)


def cuttable(plan: PhysicalPlan) -> set[int]:
    """The stateless stages of ``plan`` that tasks can run per split: one source, no
    earlier stage, only row-by-row steps, read only by exchanges and the sink."""
    feeds_stateless = {
        i for s in plan.stages if isinstance(s, StatelessStage) for i in s.upstream.values()
    }
    out = set()
    for stage in plan.stages:
        if (
            isinstance(stage, StatelessStage)
            and len(stage.sources) == 1
            and not stage.upstream
            and stage.index not in feeds_stateless
            and all(row_local_step(step) for step in stage.steps)
        ):
            out.add(stage.index)
    return out


def consumers(plan: PhysicalPlan, index: int) -> list[ExchangeStage | SinkStage]:
    """The exchanges and the sink that read stage ``index``, in plan order."""
    return [s for s in plan.stages if isinstance(s, ExchangeStage | SinkStage) and s.input == index]


def row_local_step(node: PlanNode) -> bool:
    """Whether ``node``'s rows over a batch are its rows over the batch's parts, concatenated."""
    if isinstance(node, WatermarkNode | ProcessingTimeNode):
        return True  # rows pass unchanged; the largest event time is combined by max
    if not isinstance(node, StatelessNode) or node.verb not in ROW_VERBS:
        return False  # map_batches (once per batch), static joins (the side read per batch)
    exprs = [e for e in _values([*node.args, *node.kwargs.values()]) if isinstance(e, pl.Expr)]
    if node.verb == "select" and exprs and all(not e.meta.root_names() for e in exprs):
        return False  # select(pl.lit(1)) gives one row per batch, not per row
    return _row_local(node.verb, exprs)


def _values(items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, list | tuple):
            out += _values(item)
        elif isinstance(item, dict):
            out += _values(list(item.values()))
        else:
            out.append(item)
    return out


def _row_local(verb: str, exprs: list[pl.Expr]) -> bool:
    """Whether ``exprs`` are row by row (the check the stream verbs already make when a
    query is built, :func:`check_row_wise`, asked again: a node built otherwise)."""
    try:
        check_row_wise(verb, list(exprs))
    except PlanError:
        return False
    return True
