"""A source's batch read by the several owners of the operator it feeds, each a share of
its splits, and the rows sent from owner to owner.

At one owner the owner reads its source in its call (:mod:`~microstream.runtime.ray.owner_reads`).
At several, a keyed operator's rows were read by one Ray task per split: the task cut
its rows by the owners' key-group ranges and the owners got the pieces by reference.
On one machine each task costs a task start and a hand-over through Ray's scheduler
(about 15 ms per 100k-event batch, measured at one worker before owners read), and a
task has no read-ahead. Here the owners read instead: split ``k`` of the batch goes to
owner ``k % N`` (:func:`shares`), which reads it (from its read-ahead when it read
exactly that split ahead), runs the stage over it and cuts the stage's rows by the
owners' key-group ranges (:func:`read_share`, the actor method
:meth:`~microstream.runtime.ray.worker.OperatorWorker.read_share`). Its call returns
the :class:`~microstream.runtime.ray.scan_tasks.SplitReport` of its share first, then
per split one piece per owner, as separate Ray return values: the driver gathers the
reports only, and hands each owner, in its one processing call of the batch, the
pieces cut for it in split order (the rows an owner gets are in the order the split
tasks gave, so every result is the same). The rows go from actor to actor through
Ray's object store, never through the driver.

The driver gathers the shares' reports before it calls the owners to process: a lost
reader is named by that gather (the batch re-runs from its log entry, as any batch that
loses a worker), not by the failure of another owner's call whose argument it could
not make. A batch's splits are read exactly once per attempt, each by one owner.

Read-ahead: the driver tells each reader which of the next batch's splits (the
source's ``ahead``, :func:`~microstream.runtime.ray.owner_prefetch.next_splits`) it
will get by the same rule, and the reader reads them once its operator ran
(:class:`~microstream.runtime.ray.owner_prefetch.OwnerReadAhead`: taken only when the
next batch's share is exactly those splits at the same version).

This module never imports Ray: the executor makes the calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microstream.plan.nodes import declared_width
from microstream.plan.physical import ExchangeStage, PhysicalPlan, StatelessStage
from microstream.runtime.ray.owner_prefetch import OwnerReadAhead, VersionedSplit, next_splits
from microstream.runtime.ray.scan_tasks import (
    SplitReport,
    Target,
    combined,
    consumers,
    report,
    split_rows,
)
from microstream.runtime.ray.wire import Wire

if TYPE_CHECKING:
    import polars as pl

    from microstream.plan.nodes import OperatorContext, WatermarkNode
    from microstream.plan.physical import WatermarkObservation
    from microstream.protocols import ReadSplit

__all__ = ["SharedRead", "plan_shares", "read_share", "shared_stages", "shares"]


@dataclass(frozen=True)
class SharedRead:
    """One owner's share of a batch of a stage's source: the splits it reads, and how
    it cuts the stage's rows for the owners of the next operator."""

    splits: tuple[ReadSplit, ...]
    """In the batch's split order."""
    schema: pl.Schema
    """The source's declared schema."""
    ctx: OperatorContext
    """The batch's context (the stage's steps may read the batch's time)."""
    target: Target
    """The exchange's keys and every owner's key-group upper bound."""
    ahead: tuple[VersionedSplit, ...] = ()
    """The next batch's splits this owner will read by the same rule, to read ahead."""


def shares(num_splits: int, num_owners: int) -> list[tuple[int, ...]]:
    """Per owner (in owner order) the positions of the splits it reads: split ``k`` to
    owner ``k % num_owners``.

    Examples
    --------
    >>> shares(5, 2)
    [(0, 2, 4), (1, 3)]
    >>> shares(1, 3)
    [(0,), (), ()]
    """
    return [tuple(range(i, num_splits, num_owners)) for i in range(num_owners)]


def plan_shares(
    splits: Sequence[ReadSplit], num_owners: int
) -> list[tuple[tuple[int, ...], tuple[VersionedSplit, ...]]]:
    """Per owner (in owner order): the positions of the splits it reads this batch, and
    the next batch's splits it will read (the source's ``ahead``, shared by the same
    rule), for its read-ahead.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Split:
    ...     name: str
    ...     ahead: tuple = ()
    ...     def read(self): ...
    ...     def version(self): return self.name
    >>> plan = plan_shares([Split("a"), Split("b", ahead=(Split("c"), Split("d")))], 2)
    >>> [(positions, [s.name for s in ahead]) for positions, ahead in plan]
    [((0,), ['c']), ((1,), ['d'])]
    """
    following = next_splits(splits)
    ahead = shares(len(following), num_owners)
    return [
        (positions, tuple(following[k] for k in later))
        for positions, later in zip(shares(len(splits), num_owners), ahead)
    ]


def read_share(
    read: SharedRead, stage: StatelessStage, ahead: OwnerReadAhead | None = None
) -> tuple[Any, ...]:
    """``read``'s splits read (from ``ahead`` when it read exactly these), ``stage`` run
    over each and its rows cut by owner: the report of the share, then per split one
    :class:`Wire` per owner (the returns of the owner's call). The read-ahead of
    ``read.ahead`` is noted on ``ahead`` (``defer``: the owner starts it after its
    operator ran).

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from dataclasses import dataclass
    >>> from microstream.plan.nodes import OperatorContext
    >>> from microstream.plan.physical import StatelessStage, compile
    >>> @dataclass(frozen=True)
    ... class Split:
    ...     users: tuple
    ...     def read(self): return pl.DataFrame({"user": list(self.users)})
    >>> stream = ms.MemoryStream({"user": pl.String})
    >>> plan = compile(stream.lazy().filter(pl.col("user") != "c").group_by("user").agg(n=pl.len()).plan)
    >>> stage = next(s for s in plan.stages if isinstance(s, StatelessStage))
    >>> ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0,
    ...                       output_mode="append")
    >>> target = Target(("user",), (40, 128), 128)  # a: key group 38, b: 49
    >>> shared = SharedRead((Split(("a", "b", "c")), Split(("b",))), stream.schema, ctx, target)
    >>> done, *pieces = read_share(shared, stage)
    >>> done.rows_read, [piece.frame()["user"].to_list() for piece in pieces]
    (4, [['a'], ['b'], [], ['b']])
    """
    started = time.perf_counter()
    if ahead is None:
        frames = [split.read() for split in read.splits]
        took = False
    else:
        hits = ahead.hits
        frames = ahead.read(stage.index, read.splits)
        took = ahead.hits > hits
        ahead.defer(stage.index, read.ahead)
    (scan,) = stage.sources
    target = read.target
    assert target.keys is not None, "owners share the reads of an exchange's rows"
    seen: dict[WatermarkNode, WatermarkObservation] = {}
    pieces: list[Wire] = []
    for rows in frames:
        lazy, observed = stage.lower({scan: declared_width(rows, read.schema)}, [], read.ctx)
        for node, observation in observed.items():
            before = seen.get(node)
            seen[node] = observation if before is None else combined(before, observation)
        parts = split_rows(lazy.collect(), target.keys, target.his, target.num_key_groups)
        pieces += [Wire.of(part) for part in parts]
    read_ms = (time.perf_counter() - started) * 1000
    done: SplitReport = report(stage, sum(f.height for f in frames), seen, read_ms, took)
    return (done, *pieces)


def shared_stages(
    plan: PhysicalPlan,
    cut: set[int] | frozenset[int],
    single_owner: Callable[[ExchangeStage], bool],
    dumps: Callable[[Any], bytes],
) -> frozenset[int]:
    """The stateless stages of ``plan`` whose source the owners of the next operator read
    in shares: stages tasks could run per split (``cut``:
    :func:`~microstream.runtime.ray.scan_tasks.cuttable`) whose one consumer is the
    exchange of an operator with several owners, and which pickle (a stage that does not
    stays where it ran).

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.plan.physical import compile
    >>> from microstream.runtime.ray.scan_tasks import cuttable
    >>> stream = ms.MemoryStream({"k": pl.String, "n": pl.Int64})
    >>> plan = compile(stream.lazy().filter(pl.col("n") > 0).group_by("k").agg(pl.col("n").sum()).plan)
    >>> sorted(shared_stages(plan, cuttable(plan), lambda exchange: False, lambda x: b""))
    [0]
    >>> sorted(shared_stages(plan, cuttable(plan), lambda exchange: True, lambda x: b""))
    []
    """
    out = set()
    for stage in plan.stages:
        if not isinstance(stage, StatelessStage) or stage.index not in cut:
            continue
        readers = consumers(plan, stage.index)
        if len(readers) != 1 or not isinstance(readers[0], ExchangeStage):
            continue
        if single_owner(readers[0]):
            continue
        try:
            dumps(stage)
        except Exception:  # a value in a step stays with the driver
            continue
        out.add(stage.index)
    return frozenset(out)
