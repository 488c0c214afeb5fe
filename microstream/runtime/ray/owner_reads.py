"""A source's batch read by the one owner of the operator it feeds, in its batch call.

When every row a stateless stage makes goes to one actor (the operator after its one
exchange has one owner: ``num_workers=1``, or a keyless operator, which lives whole
in one actor), reading the source's splits in Ray tasks, or on the driver, only adds
a hop: the task's rows (or the driver's) go through Ray's object store to the owner,
which waits for them, and on one machine each hop costs a task start, a copy and a
few scheduler round trips (q11 at one worker, 100k-event batches: about 15 ms per
batch of the 50 the Ray batch took beyond the operator's own time). So the owner
reads the splits itself, runs the stage and then the operator, in the one call it
gets per batch (:meth:`~microstream.runtime.ray.worker.OperatorWorker.process_pieces`):
the driver sends an :class:`OwnerRead` (the splits, the source's schema, the batch's
context; a few hundred bytes) followed by the stage's object reference (put in Ray's
object store once per run; Ray resolves it before the call runs), and the owner
returns, with the operator's output, a :class:`~microstream.runtime.ray.scan_tasks.SplitReport`
per read (rows read, what each watermark node saw), as a split task would.

Which stages (:func:`owner_stages`, decided once per query at start): a stage that
reads one source and no earlier stage, feeds no other stateless stage, whose one
consumer is one exchange, whose steps are row by row (:func:`~microstream.runtime.ray.scan_tasks.cuttable`)
or ``map_batches`` (a function of the whole batch: the owner reads every split of the
batch, concatenated in split order, so it gets the batch the driver would), and which
pickles. A static join (its side read per batch) stays on the driver. Under
``read_splits="auto"`` a stage tasks can run (row by row) is read by its owner when
the batch has one split; with several, tasks read them in parallel, as before; a
``map_batches`` stage, which tasks cannot run, is always read by its owner instead of
the driver.

The batch re-runs as every batch does when the owner is lost: the driver's log entry
has the offsets, so the splits are planned and read again by the new owner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.plan.nodes import MapBatchesNode, declared_width
from microstream.plan.physical import ExchangeStage, PhysicalPlan, StatelessStage
from microstream.runtime.ray.owner_prefetch import OwnerReadAhead, next_splits
from microstream.runtime.ray.scan_tasks import (
    SplitReport,
    consumers,
    cuttable,
    report,
    row_local_step,
)

if TYPE_CHECKING:
    from microstream.plan.nodes import OperatorContext
    from microstream.protocols import ReadSplit

__all__ = ["OwnerRead", "owner_stages", "read_for_owner"]


@dataclass(frozen=True)
class OwnerRead:
    """One batch of a stage's source for the stage's one owner to read: in the owner's
    call, right before the stage itself (:func:`read_for_owner`)."""

    splits: tuple[ReadSplit, ...]
    """In order: the batch is their rows concatenated."""
    schema: pl.Schema
    """The source's declared schema."""
    ctx: OperatorContext
    """The batch's context (the stage's steps may read the batch's time)."""


def owner_stages(
    plan: PhysicalPlan,
    single_owner: Callable[[ExchangeStage], bool],
    dumps: Callable[[Any], bytes],
) -> frozenset[int]:
    """The stateless stages of ``plan`` whose source the owner of the next operator can
    read (module docstring); ``single_owner`` says whether an exchange's operator has
    one owner, ``dumps`` is Ray's pickler (a stage it cannot pickle stays where it ran).

    Examples
    --------
    >>> import microstream as ms
    >>> from microstream.plan.physical import compile
    >>> stream = ms.MemoryStream({"k": pl.String, "n": pl.Int64})
    >>> frame = stream.lazy().map_batches(lambda df: df).group_by("k").agg(pl.col("n").sum())
    >>> plan = compile(frame.plan)
    >>> sorted(owner_stages(plan, lambda exchange: True, lambda x: b""))
    [0]
    >>> sorted(owner_stages(plan, lambda exchange: False, lambda x: b""))
    []
    """
    row_by_row = cuttable(plan)
    feeds_stateless = {
        i for s in plan.stages if isinstance(s, StatelessStage) for i in s.upstream.values()
    }
    out = set()
    for stage in plan.stages:
        if not isinstance(stage, StatelessStage) or len(stage.sources) != 1:
            continue
        if stage.upstream or stage.index in feeds_stateless:
            continue
        readers = consumers(plan, stage.index)
        if len(readers) != 1 or not isinstance(readers[0], ExchangeStage):
            continue
        if not single_owner(readers[0]):
            continue
        if stage.index not in row_by_row and not _batch_steps(stage):
            continue
        try:
            dumps(stage)
        except Exception:  # a value in a step stays with the driver
            continue
        out.add(stage.index)
    return frozenset(out)


def _batch_steps(stage: StatelessStage) -> bool:
    """Whether ``stage``'s steps are ``map_batches`` or row by row (a static join's side,
    read per batch, stays on the driver)."""
    return all(isinstance(s, MapBatchesNode) or row_local_step(s) for s in stage.steps)


def read_for_owner(
    read: OwnerRead, stage: StatelessStage, ahead: OwnerReadAhead | None = None
) -> tuple[pl.DataFrame, SplitReport]:
    """Read ``read``'s splits, run ``stage`` over their rows: the stage's rows, and what
    the driver gets instead of them (rows read, watermark observations). With ``ahead``,
    the splits come from its read-ahead when it read exactly these, and the splits the
    source expects next are noted for it to read ahead (``defer``: the caller starts them)
    (:mod:`~microstream.runtime.ray.owner_prefetch`)."""
    started = time.perf_counter()
    frames: Sequence[pl.DataFrame]
    hits = 0
    if ahead is None:
        frames = [split.read() for split in read.splits]
    else:
        hits = ahead.hits
        frames = ahead.read(stage.index, read.splits)
        ahead.defer(stage.index, next_splits(read.splits))  # started after the operator
    rows = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
    (scan,) = stage.sources
    lazy, observed = stage.lower({scan: declared_width(rows, read.schema)}, [], read.ctx)
    out = lazy.collect()
    read_ms = (time.perf_counter() - started) * 1000
    return out, report(
        stage, rows.height, observed, read_ms, ahead is not None and ahead.hits > hits
    )
