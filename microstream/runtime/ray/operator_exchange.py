"""Operator to operator exchange between actors: an operator's owners cut their output
for the owners of the next operator, and the rows never pass through the driver.

When the output of an operator A reaches the exchanges of other operators (B, ...)
only through row-wise stateless stages (the check the sink's tail makes,
:func:`~microstream.runtime.ray.sink_parts.row_wise`), each owner of A runs those
stages on its own output and cuts the rows by the key-group ranges of the owners of
B (:func:`~microstream.runtime.ray.scan_tasks.split_rows`), returning one
:class:`~microstream.runtime.ray.wire.Wire` per owner of B as separate Ray return
values, after a small first return with its late rows and progress
(:meth:`~microstream.runtime.ray.worker.OperatorWorker.process_pieces_into_exchanges`).
The driver gathers only those first returns and hands the references of the pieces to
the owners of B, every owner of B getting its pieces in A's owner order (so its input
is in the same order every run).

:func:`exchange_tail` decides, once per query and operator, whether that applies, and
cuts the stages between A and the exchanges from the rest of the plan (what is sent to
the workers is small and picklable); where it does not, it says why, and the driver
routes the operator's rows as before:

- a stage after A that is not row-wise stateless (``map_batches``, a static join, a
  watermark: its observation is made on the driver) or that also reads a source or
  another operator's output;
- A's output (or a stage after it) also goes to the sink or to such a stage;
- the stages cannot be pickled.

A ``SINGLE_PARTITION`` operator B has one owner: each owner of A sends it one piece,
by reference, like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microstream.plan.physical import (
    ExchangeStage,
    OperatorStage,
    PhysicalPlan,
    SinkStage,
    Stage,
    StatelessStage,
)
from microstream.runtime.ray.scan_tasks import split_rows
from microstream.runtime.ray.sink_parts import cut_stage, row_wise, run_stages
from microstream.runtime.ray.wire import Wire

if TYPE_CHECKING:
    import polars as pl

    from microstream.plan.nodes import OperatorContext, PartitionKeys

__all__ = [
    "ExchangeTail",
    "ExchangeTarget",
    "cut_for_exchanges",
    "exchange_tail",
    "forwarded_stages",
]


@dataclass(frozen=True)
class ExchangeTarget:
    """One exchange fed by an operator's owners: the rows of stage ``input`` cut by the
    key group of ``keys`` for the owners of the consuming operator."""

    exchange: int
    """The exchange's stage index."""
    input: int
    """The stage whose rows the exchange reads (the operator's, or a stage after it)."""
    keys: PartitionKeys
    his: tuple[int, ...]
    """Every owner's key-group upper bound, in owner order."""
    num_key_groups: int


@dataclass(frozen=True)
class ExchangeTail:
    """What an owner of operator ``operator_index`` runs on its output and how it cuts it."""

    operator_index: int
    stages: tuple[StatelessStage, ...]
    """The row-wise stateless stages between the operator and the exchanges, cut from the
    plan above them, in plan order."""
    targets: tuple[ExchangeTarget, ...]
    """The exchanges, in plan order."""

    @property
    def pieces(self) -> int:
        """How many pieces an owner returns (one per owner of every target)."""
        return sum(len(t.his) for t in self.targets)


def exchange_tail(
    plan: PhysicalPlan,
    operator_index: int,
    owners: Callable[[ExchangeStage], tuple[tuple[int, ...], int]],
    dumps: Callable[[Any], bytes],
) -> ExchangeTail | str | None:
    """The tail the owners of the operator at stage ``operator_index`` can run and cut for
    the next operators' owners (``owners``: an exchange's consumer's key-group upper
    bounds and number of key groups), or why the driver routes its rows; None when its
    rows feed no other operator.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.plan.physical import compile
    >>> counts = (
    ...     ms.MemoryStream({"k": pl.String, "v": pl.Int64}).lazy()
    ...     .group_by("k").agg(n=pl.len())
    ... )
    >>> chained = counts.with_columns(m=pl.col("n") % 2).group_by("m").agg(c=pl.len())
    >>> plan = compile(chained.plan)
    >>> tail = exchange_tail(plan, 2, lambda exchange: ((64, 128), 128), lambda x: b"")
    >>> [s.describe() for s in tail.stages], tail.pieces
    (['[2] -> with_columns(m=[(col("n")) % (dyn int: 2)])'], 2)
    >>> exchange_tail(plan, 5, lambda exchange: ((128,), 128), lambda x: b"") is None
    True
    >>> batchwise = counts.map_batches(lambda df: df).group_by("n").agg(c=pl.len())
    >>> exchange_tail(compile(batchwise.plan), 2, lambda e: ((128,), 128), lambda x: b"")
    'stage 3 after it is not row-wise stateless (map_batches)'
    """
    stages = plan.stages
    if not _feeds_operator(stages, operator_index):
        return None
    known = {operator_index}
    tail: list[StatelessStage] = []
    targets: list[ExchangeTarget] = []
    for stage in stages[operator_index + 1 :]:
        reads = _reads(stage)
        if not reads & known:
            continue
        if isinstance(stage, ExchangeStage):
            his, num_key_groups = owners(stage)
            targets.append(
                ExchangeTarget(stage.index, stage.input, stage.exchange.keys, his, num_key_groups)
            )
        elif isinstance(stage, SinkStage):
            return "the sink reads its rows too"
        elif isinstance(stage, StatelessStage):
            if stage.sources or not reads <= known:
                return f"stage {stage.index} after it also reads other rows"
            if not row_wise(stage):
                verbs = sorted({s.describe().split("(")[0] for s in stage.steps})
                return (
                    f"stage {stage.index} after it is not row-wise stateless ({', '.join(verbs)})"
                )
            tail.append(cut_stage(stage))
            known.add(stage.index)
        else:  # operators read exchanges only
            msg = f"operator stage {stage.index} reads stage {sorted(reads)} directly"
            raise AssertionError(msg)
    out = ExchangeTail(operator_index, tuple(tail), tuple(targets))
    try:
        dumps(out)
    except Exception as exc:  # a value in the stages stays with the driver
        return f"the stages after it cannot be sent to the workers ({type(exc).__name__})"
    return out


def cut_for_exchanges(rows: pl.DataFrame, tail: ExchangeTail, ctx: OperatorContext) -> list[Wire]:
    """``tail``'s stages run over ``rows`` (one owner's output of the operator), then each
    target's rows cut by owner: the pieces, target after target, in owner order.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.plan.nodes import OperatorContext
    >>> from microstream.plan.physical import compile
    >>> counts = ms.MemoryStream({"k": pl.String}).lazy().group_by("k").agg(n=pl.len())
    >>> plan = compile(counts.group_by("n").agg(c=pl.len()).plan)
    >>> tail = exchange_tail(plan, 2, lambda exchange: ((100, 128), 128), lambda x: b"")
    >>> ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0,
    ...                       output_mode="append")
    >>> rows = pl.DataFrame({"k": ["a", "b", "c"], "n": [1, 2, 1]}, schema_overrides={"n": pl.UInt32})
    >>> [piece.frame()["n"].to_list() for piece in cut_for_exchanges(rows, tail, ctx)]
    [[2], [1, 1]]
    >>> # (n=2 is in key group 83, n=1 in 120: the owners hold [0, 100) and [100, 128))
    """
    results = run_stages(rows, tail.operator_index, tail.stages, ctx)
    frames: dict[int, pl.DataFrame] = {}
    pieces: list[Wire] = []
    for target in tail.targets:
        frame = frames.get(target.input)
        if frame is None:
            lazy = results[target.input]
            assert lazy is not None, f"stage {target.input} is not in the tail"
            frame = frames[target.input] = lazy.collect()
        parts = split_rows(frame, target.keys, target.his, target.num_key_groups)
        pieces += [Wire.of(part) for part in parts]
    return pieces


def _feeds_operator(stages: Sequence[Stage], index: int) -> bool:
    """Whether the rows of stage ``index`` reach an exchange (through any stages)."""
    reached = {index}
    for stage in stages[index + 1 :]:
        if _reads(stage) & reached:
            if isinstance(stage, ExchangeStage):
                return True
            reached.add(stage.index)
    return False


def _reads(stage: Stage) -> set[int]:
    """The stages ``stage`` reads."""
    if isinstance(stage, StatelessStage):
        return set(stage.upstream.values())
    if isinstance(stage, ExchangeStage | SinkStage):
        return {stage.input}
    if isinstance(stage, OperatorStage):
        return set(stage.inputs)
    return set()


def forwarded_stages(tails: Sequence[ExchangeTail]) -> frozenset[int]:
    """The stateless stages the owners run (the driver skips them)."""
    return frozenset(s.index for tail in tails for s in tail.stages)
