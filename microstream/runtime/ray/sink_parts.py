"""Workers write the sink's data: the tail of a plan that runs where its rows are.

When a sink can take its batches in pieces (:class:`~microstream.protocols.PartSink`:
the file and Delta sinks) and the rows after the plan's last operator reach the sink
only through row-wise stateless stages, each owner of that operator runs those
stages on its own output and writes its piece of the batch with the sink's
:class:`~microstream.protocols.PartWriter` (:func:`write_piece`); the driver gets
back only what was written (a :class:`~microstream.protocols.SinkPart` per owner,
with its row count) and commits every piece at once (``PartSink.commit_parts``: one
Delta commit with the batch's transaction, one file-sink manifest entry). Rows of
the batch never travel to the driver. A query without operators does the same from
its split tasks (:mod:`~microstream.runtime.ray.scan_tasks`): when the sink reads a
stage the tasks run per split, each task writes its rows as a piece (a tail without
stages), the pieces in split order.

:func:`sink_tail` decides, once per query, whether a plan qualifies and cuts the
tail's stages from the rest of the plan (so what is sent to the workers is small
and picklable); :func:`write_piece` is what a worker runs per batch, and what a
Ray task running a stateless query's stages can call with its rows the same way.

A piece's files are named with the piece (``<run>.<attempt>-w<worker>``, or
``<run>.<attempt>-s<split>`` from a split task, see :func:`piece_name`), so every attempt of a batch writes new files; only the pieces
of the attempt the driver commits become visible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.plan.nodes import PlanNode, StatelessNode
from microstream.plan.physical import PhysicalPlan, SinkStage, StatelessStage

if TYPE_CHECKING:
    from microstream.plan.nodes import OperatorContext
    from microstream.protocols import PartWriter, SinkPart

__all__ = [
    "SinkTail",
    "cut_stage",
    "piece_name",
    "row_wise",
    "run_stages",
    "sink_tail",
    "write_piece",
]

ROW_WISE_VERBS = frozenset(
    {
        "cast",
        "drop",
        "drop_nulls",
        "explode",
        "fill_nan",
        "fill_null",
        "filter",
        "rename",
        "select",
        "unnest",
        "unpivot",
        "with_columns",
    }
)
"""Stateless verbs whose result for a row depends on that row alone (their expressions
are checked row-wise when the query is built), so running them on each owner's rows
gives the rows of running them on the batch. ``map_batches`` (a function of the whole
batch), joins with static tables and unions keep the batch on the driver."""


@dataclass(frozen=True, eq=False)
class _OwnerRows(PlanNode):
    """Stands for the operator's output in the tail sent to the workers: each owner's rows."""

    columns: pl.Schema

    def describe(self) -> str:
        return "the owner's operator output"

    def schema(self) -> pl.Schema:
        return self.columns


@dataclass(frozen=True)
class SinkTail:
    """What an owner of the plan's last operator needs to write its piece of a batch."""

    operator_index: int
    """The stage index of the operator whose output the tail reads (in a query without
    operators: of the stage split tasks run, whose rows each task writes)."""
    stages: tuple[StatelessStage, ...]
    """The stateless stages between the operator and the sink, cut from the plan above."""
    output: int
    """The stage whose rows the sink gets (the operator's, or the tail's last)."""
    writer: PartWriter


def sink_tail(
    plan: PhysicalPlan,
    writer: PartWriter,
    dumps: Callable[[Any], bytes],
    split_stages: Collection[int] = (),
) -> SinkTail | None:
    """The tail of ``plan`` its last operator's owners can run and write with ``writer``
    (without operators: the split tasks of the stage the sink reads, when it is one of
    ``split_stages``, each writing its rows); None when the sink must get the batch on
    the driver: no operator (and the sink reads no split stage), a stage after the last
    operator that is not row-wise stateless (or reads a source), or a tail that ``dumps``
    (Ray's pickler) cannot send.

    Examples
    --------
    >>> import microstream as ms
    >>> from microstream.plan.physical import compile
    >>> frame = ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"])
    >>> plan = compile(frame.with_columns(n=pl.col("k").str.len_chars()).plan)
    >>> tail = sink_tail(plan, writer=None, dumps=lambda x: b"")
    >>> [s.describe() for s in tail.stages]
    ['[2] -> with_columns(n=col("k").str.len_chars())']
    >>> sink_tail(compile(frame.map_batches(lambda df: df).plan), None, lambda x: b"") is None
    True
    >>> sink_tail(compile(frame.plan), None, lambda x: b"").stages  # the operator's rows
    ()
    >>> stateless = compile(ms.MemoryStream({"k": pl.String}).lazy().filter(pl.col("k") > "a").plan)
    >>> sink_tail(stateless, None, lambda x: b"") is None  # the stage runs on the driver
    True
    >>> sink_tail(stateless, None, lambda x: b"", split_stages={0}).operator_index
    0
    """
    operators = plan.operators()
    sink = plan.stages[-1]
    assert isinstance(sink, SinkStage)
    if not operators:
        if sink.input not in split_stages:
            return None
        return _sendable(SinkTail(sink.input, (), sink.input, writer), dumps)
    last = operators[-1]
    position = plan.stages.index(last)
    known = {last.index}
    tail: list[StatelessStage] = []
    for stage in plan.stages[position + 1 : -1]:
        if not isinstance(stage, StatelessStage) or stage.sources:
            return None
        if not set(stage.upstream.values()) <= known:
            return None
        if not row_wise(stage):
            return None
        tail.append(cut_stage(stage))
        known.add(stage.index)
    if sink.input not in known:
        return None
    return _sendable(SinkTail(last.index, tuple(tail), sink.input, writer), dumps)


def row_wise(stage: StatelessStage) -> bool:
    """Whether every step of ``stage`` is a row-wise stateless verb (:data:`ROW_WISE_VERBS`):
    running it on each owner's rows gives the rows of running it on the batch.

    Examples
    --------
    >>> import microstream as ms
    >>> from microstream.plan.physical import compile
    >>> frame = ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"])
    >>> row_wise(compile(frame.filter(pl.col("k") != "a").plan).stages[-2])
    True
    >>> row_wise(compile(frame.map_batches(lambda df: df).plan).stages[-2])
    False
    """
    return all(isinstance(s, StatelessNode) and s.verb in ROW_WISE_VERBS for s in stage.steps)


def _sendable(tail: SinkTail, dumps: Callable[[Any], bytes]) -> SinkTail | None:
    try:
        dumps(tail)
    except Exception:  # the sink's writer (or a value in the tail) stays with the driver
        return None
    return tail


def cut_stage(stage: StatelessStage) -> StatelessStage:
    """``stage`` with the nodes it reads from earlier stages replaced by their schemas
    (what is sent to a worker that runs it over its own rows, :func:`run_stages`)."""
    memo: dict[int, PlanNode] = {}

    def clone(node: PlanNode) -> PlanNode:
        done = memo.get(id(node))
        if done is not None:
            return done
        if node in stage.upstream:
            copy: PlanNode = _OwnerRows(node.schema())
        else:
            copy = dataclasses.replace(node)  # type: ignore[type-var]
            for f in dataclasses.fields(node):  # type: ignore[arg-type]
                value = getattr(node, f.name)
                if isinstance(value, PlanNode):
                    object.__setattr__(copy, f.name, clone(value))
        memo[id(node)] = copy
        return copy

    return dataclasses.replace(
        stage,
        output=clone(stage.output),
        upstream={clone(n): i for n, i in stage.upstream.items()},
        steps=tuple(clone(s) for s in stage.steps),  # type: ignore[misc]
    )


def piece_name(fence: str, worker: int, *, split: bool = False) -> str:
    """The piece of a batch one worker (or, with ``split``, the task of split ``worker``)
    writes in one attempt: its files carry it.

    Examples
    --------
    >>> piece_name("3f9a2c1e.2", 1)
    '3f9a2c1e.2-w1'
    >>> piece_name("3f9a2c1e.2", 1, split=True)  # never a worker's name
    '3f9a2c1e.2-s1'
    """
    return f"{fence}-{'s' if split else 'w'}{worker}"


def write_piece(rows: pl.DataFrame, tail: SinkTail, ctx: OperatorContext, piece: str) -> SinkPart:
    """Run ``tail``'s stages over ``rows`` (this worker's output of the operator, or a split
    task's rows) and write
    the result as ``piece`` of batch ``ctx.batch_id``; what was written (nothing is
    visible until the driver commits it).

    Examples
    --------
    >>> import microstream as ms
    >>> from microstream.plan.nodes import OperatorContext
    >>> from microstream.plan.physical import compile
    >>> from microstream.protocols import SinkPart
    >>> class Counter:
    ...     def write_part(self, batch_id, piece, data):
    ...         return SinkPart(rows=data.height)
    >>> frame = ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"])
    >>> plan = compile(frame.filter(pl.col("k") != "b").plan)
    >>> tail = sink_tail(plan, Counter(), lambda x: b"")
    >>> ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0,
    ...                       output_mode="append")
    >>> write_piece(pl.DataFrame({"k": ["a", "b"]}), tail, ctx, "run.0-w0").rows
    1
    """
    frame = run_stages(rows, tail.operator_index, tail.stages, ctx)[tail.output]
    assert frame is not None
    return tail.writer.write_part(ctx.batch_id, piece, frame.collect())


def run_stages(
    rows: pl.DataFrame, index: int, stages: Sequence[StatelessStage], ctx: OperatorContext
) -> list[pl.LazyFrame | None]:
    """Every stage's lazy result, by stage index, when stage ``index`` gave ``rows`` and
    ``stages`` (cut by :func:`cut_stage`, in plan order) read only it and each other.

    Examples
    --------
    >>> import microstream as ms
    >>> from microstream.plan.nodes import OperatorContext
    >>> from microstream.plan.physical import compile
    >>> frame = ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"])
    >>> plan = compile(frame.filter(pl.col("k") != "b").plan)
    >>> ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0,
    ...                       output_mode="append")
    >>> out = run_stages(pl.DataFrame({"k": ["a", "b"]}), 2, [cut_stage(plan.stages[3])], ctx)
    >>> out[3].collect()["k"].to_list()
    ['a']
    """
    size = max([index, *(s.index for s in stages)]) + 1
    results: list[pl.LazyFrame | None] = [None] * size
    results[index] = rows.lazy()
    for stage in stages:
        results[stage.index] = stage.lower({}, results, ctx)[0]
    return results
