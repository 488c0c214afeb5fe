"""Running one batch of a compiled plan: the seam where runtimes differ.

The driver (:mod:`microstream.runtime.driver`) decides *what* a batch is (its
offsets, watermark, timestamp) and commits it; a :class:`StageExecutor` runs the
stages of the physical plan (:mod:`microstream.plan.physical`) over the batch's
input and returns a :class:`BatchOutput`: the result rows, the rows operators
dropped as late, and what each watermark node saw. Nothing is written into a
shared context: every stage returns its value and the executor keeps them, per
batch, by stage (so a stage feeding two others, one stream on both sides of a
join, runs once).

:class:`LocalStageExecutor` runs every stage in this process, where one owner
holds every key, so an exchange is the identity (:meth:`LocalStageExecutor.exchange`).
A cluster runtime replaces the executor: it places operator stages with the
owners of their keys and moves rows at the exchanges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import polars as pl

from microstream.exceptions import MicrostreamError, SourceError
from microstream.plan.nodes import KeyGroupedOperator
from microstream.plan.physical import (
    FUSED_SCAN_ENGINE,
    STAGE_ENGINE,
    Exchange,
    ExchangeStage,
    OperatorStage,
    PhysicalPlan,
    StatelessStage,
    WatermarkObservation,
)
from microstream.protocols import SplittableSource

PANIC: tuple[type[BaseException], ...] = (Exception, pl.exceptions.PanicException)
"""What a Polars query raises on bad input: errors, and panics on some inputs."""

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage
    from microstream.exceptions import WorkerLostError
    from microstream.plan.nodes import (
        OperatorContext,
        ScanNode,
        StatefulNode,
        StatefulOperator,
        WatermarkNode,
    )
    from microstream.protocols import Offset, ReadSplit, Sink, SinkPart, Source

__all__ = [
    "BatchOutput",
    "LocalStageExecutor",
    "RecoveringStageExecutor",
    "ScanFusingStageExecutor",
    "ScanInput",
    "SinkWritingStageExecutor",
    "SplitReadingStageExecutor",
    "SplitScan",
    "StageExecutor",
    "split_scan",
]


@dataclass(frozen=True)
class BatchOutput:
    """What one batch of a plan gives: the rows for the sink, the late rows of every
    operator (in the order they ran), and each watermark node's observation (absent:
    the node saw no batch, which a plan never leaves out)."""

    rows: pl.DataFrame
    late_rows: tuple[pl.DataFrame, ...]
    watermarks: Mapping[WatermarkNode, WatermarkObservation]
    rows_read: Mapping[ScanNode, int] = field(default_factory=dict)
    """The rows read of every source handed over as a :class:`SplitScan`."""
    parts: tuple[SinkPart, ...] | None = None
    """The batch as pieces workers wrote for a :class:`~microstream.protocols.PartSink`
    (then ``rows`` is empty): the driver commits them instead of adding ``rows``."""
    replaced_workers: tuple[tuple[int, ...], ...] = ()
    """Per restart a cluster runtime made since the previous batch, outside any batch (a
    worker lost while the query idled), the workers it replaced: counted in this batch's
    progress, which is no re-run."""

    @property
    def num_rows(self) -> int:
        """The batch's result rows, wherever they are."""
        if self.parts is None:
            return self.rows.height
        return sum(p.rows for p in self.parts)


@dataclass(frozen=True)
class SplitScan:
    """A source's batch not read yet: its splits, for an executor that reads them
    where it runs the stages (:class:`SplitReadingStageExecutor`)."""

    splits: tuple[ReadSplit, ...]
    """In order: the batch is their rows concatenated."""
    schema: pl.Schema
    """The source's declared schema (what ``declared_width`` widens a split's rows to)."""


@dataclass(frozen=True)
class ScanInput:
    """A source's batch as a lazy scan of its files, for an executor that runs it in one
    Polars plan with the stage reading it (:class:`ScanFusingStageExecutor`)."""

    frame: pl.LazyFrame
    """The scan, at the declared width (as ``declared_width`` gives a read batch)."""
    read: Callable[[], pl.LazyFrame]
    """The batch read eagerly by the source, at the declared width: what the stage runs
    over when the fused plan fails (the source's read names a bad file as before)."""


class StageExecutor(Protocol):
    """Runs the stages of one batch (the seam a runtime replaces)."""

    def start_operators(
        self,
        plan: PhysicalPlan,
        storage: Storage,
        num_key_groups: int,
        version: int | None,
    ) -> dict[StatefulNode, StatefulOperator]:
        """The runtime operators of ``plan``'s operator stages, their state (in
        ``storage``, ``state/`` of the checkpoint) loaded as of committed ``version``
        (None: empty), by node. Called once, when the query starts."""
        ...

    def close(self) -> None:
        """Release what :meth:`start_operators` started (the query ended)."""
        ...

    def run(
        self,
        plan: PhysicalPlan,
        inputs: Mapping[ScanNode, pl.LazyFrame],
        ctx: OperatorContext,
        operators: Mapping[StatefulNode, StatefulOperator],
    ) -> BatchOutput:
        """Run every stage of ``plan`` over ``inputs`` (each source's batch)."""
        ...


@runtime_checkable
class RecoveringStageExecutor(Protocol):
    """A stage executor whose workers can be lost and replaced within a run (a cluster
    runtime's): the driver re-runs a batch that lost workers (:class:`WorkerLostError`)
    after :meth:`recover`, from its log entry, with the same offsets, watermark and
    timestamp."""

    def recover(self, error: WorkerLostError, batch_id: int) -> None:
        """Make every operator as of the state committed before ``batch_id`` again:
        replace the workers ``error`` names (and any found gone meanwhile), reload the
        others. Raises :class:`~microstream.exceptions.WorkerRestartsExhaustedError` when
        the batch may not be tried again."""
        ...


@runtime_checkable
class SplitReadingStageExecutor(Protocol):
    """A stage executor that reads sources' splits itself (a cluster runtime's: tasks
    read them and run the stages after them, so the rows need not pass the driver)."""

    def split_scans(self, plan: PhysicalPlan) -> frozenset[ScanNode]:
        """The sources of ``plan`` it takes as a :class:`SplitScan` when they split (the
        others, and those that do not split, the driver reads as always)."""
        ...

    def run(
        self,
        plan: PhysicalPlan,
        inputs: Mapping[ScanNode, pl.LazyFrame | SplitScan],
        ctx: OperatorContext,
        operators: Mapping[StatefulNode, StatefulOperator],
    ) -> BatchOutput:
        """Run every stage of ``plan``; a source given as a :class:`SplitScan` is read here."""
        ...


def split_scan(
    source: Source, index: int, start: Offset, end: Offset, schema: pl.Schema, batch_id: int
) -> SplitScan | None:
    """Source ``index``'s batch ``(start, end]`` as splits, or None: the source cannot
    split it (or does not split at all) and the driver reads it.

    Raises
    ------
    SourceError
        Planning the splits failed (it names the source and the range).
    """
    if not isinstance(source, SplittableSource):
        return None
    try:
        splits = source.plan_splits(start, end)
    except MicrostreamError:
        raise
    except Exception as exc:
        msg = (
            f"source {index} ({getattr(source, 'description', source)}) failed to plan the "
            f"splits of batch {batch_id} range ({start.model_dump()}, {end.model_dump()}]: {exc}"
        )
        raise SourceError(msg) from exc
    return None if not splits else SplitScan(tuple(splits), schema)


@runtime_checkable
class ScanFusingStageExecutor(Protocol):
    """A stage executor that takes sources' batches as lazy scans (:class:`ScanInput`) and
    runs each with the stage reading it, in one Polars plan."""

    def fused_scans(self, plan: PhysicalPlan) -> frozenset[ScanNode]:
        """The sources of ``plan`` it takes as a :class:`ScanInput` when the source can
        hand one (the others are read as always)."""
        ...

    def run(
        self,
        plan: PhysicalPlan,
        inputs: Mapping[ScanNode, pl.LazyFrame | ScanInput],
        ctx: OperatorContext,
        operators: Mapping[StatefulNode, StatefulOperator],
    ) -> BatchOutput:
        """Run every stage of ``plan``; a source given as a :class:`ScanInput` is scanned
        in the plan of the stage reading it."""
        ...


@runtime_checkable
class SinkWritingStageExecutor(Protocol):
    """A stage executor whose workers may write the sink's data (a cluster runtime's):
    the driver hands it the sink once, before :meth:`StageExecutor.start_operators`;
    a batch whose pieces the workers wrote comes back with ``BatchOutput.parts``, which
    the driver commits with the sink's ``commit_parts``."""

    def use_sink(self, sink: Sink) -> None:
        """The query's sink (a :class:`~microstream.protocols.PartSink` may give a writer)."""
        ...


class LocalStageExecutor:
    """Every stage in this process, in plan order (the default).

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.plan.nodes import OperatorContext
    >>> from microstream.plan.physical import compile
    >>> frame = ms.MemoryStream({"x": pl.Int64}).lazy().filter(pl.col("x") > 1)
    >>> scan = frame.plan.scans()[0]
    >>> ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0, output_mode="append")
    >>> out = LocalStageExecutor().run(
    ...     compile(frame.plan), {scan: pl.LazyFrame({"x": [1, 2, 3]})}, ctx, {}
    ... )
    >>> out.rows["x"].to_list()
    [2, 3]
    """

    def start_operators(
        self,
        plan: PhysicalPlan,
        storage: Storage,
        num_key_groups: int,
        version: int | None,
    ) -> dict[StatefulNode, StatefulOperator]:
        operators: dict[StatefulNode, StatefulOperator] = {}
        for stage in plan.operators():
            op_id = stage.operator_id
            operator = stage.node.build_operator(op_id, storage.sub(op_id))
            if isinstance(operator, KeyGroupedOperator):
                operator.use_key_groups(num_key_groups)
            operator.load(version)
            operators[stage.node] = operator
        return operators

    def close(self) -> None:
        """Nothing to release: the operators live with the driver."""

    def exchange(
        self, frame: pl.LazyFrame | pl.DataFrame, exchange: Exchange
    ) -> pl.LazyFrame | pl.DataFrame:
        """The rows ``exchange`` routes to this process: all of them (one owner)."""
        return frame

    def fused_scans(self, plan: PhysicalPlan) -> frozenset[ScanNode]:
        """The sources whose one reading stage is row-wise (:meth:`PhysicalPlan.fusable_scans`)."""
        return plan.fusable_scans()

    def run(
        self,
        plan: PhysicalPlan,
        inputs: Mapping[ScanNode, pl.LazyFrame | ScanInput],
        ctx: OperatorContext,
        operators: Mapping[StatefulNode, StatefulOperator],
    ) -> BatchOutput:
        # A stage's result: a lazy plan its consumer collects, or rows (a stage that
        # collected itself: an operator's output, a stage with a watermark node).
        results: list[pl.LazyFrame | pl.DataFrame | None] = [None] * len(plan.stages)
        late: list[pl.DataFrame] = []
        watermarks: dict[WatermarkNode, WatermarkObservation] = {}
        for stage in plan.stages:
            frame: pl.LazyFrame | pl.DataFrame
            if isinstance(stage, StatelessStage):
                frame, observed = _evaluate(stage, inputs, results, ctx)
                watermarks.update(observed)
            elif isinstance(stage, ExchangeStage):
                frame = self.exchange(_result(results, stage.input), stage.exchange)
            elif isinstance(stage, OperatorStage):
                batches = tuple(_rows(_result(results, i)) for i in stage.inputs)
                output = operators[stage.node].process(batches, stage.context(ctx))
                late.extend(output.late_rows)
                frame = output.rows
            else:  # the sink stage, last
                rows = _rows(_result(results, stage.input))
                return BatchOutput(rows=rows, late_rows=tuple(late), watermarks=watermarks)
            results[stage.index] = frame
        msg = "a physical plan ends with its sink stage"
        raise AssertionError(msg)


def _evaluate(
    stage: StatelessStage,
    inputs: Mapping[ScanNode, pl.LazyFrame | ScanInput],
    results: list[pl.LazyFrame | pl.DataFrame | None],
    ctx: OperatorContext,
) -> tuple[pl.LazyFrame | pl.DataFrame, dict[WatermarkNode, WatermarkObservation]]:
    """``stage`` over the batch; a stage reading a :class:`ScanInput` collected at once, in
    one streaming plan with the scan. When that plan fails the stage runs as before over
    the source's eager read, which raises the source's error for a bad file, or gives
    the rows over which the stage's own error (an expression's) comes back as before."""
    if not any(isinstance(inputs[scan], ScanInput) for scan in stage.sources):
        return stage.evaluate(inputs, results, ctx)  # type: ignore[arg-type]  # no ScanInput
    sources = {s: inputs[s] for s in stage.sources}
    scanned = {s: i.frame if isinstance(i, ScanInput) else i for s, i in sources.items()}
    try:
        frame, observed = stage.evaluate(scanned, results, ctx, FUSED_SCAN_ENGINE)
        if isinstance(frame, pl.LazyFrame):
            frame = frame.collect(engine=FUSED_SCAN_ENGINE)
        return frame, observed
    except MicrostreamError:
        raise
    except PANIC:
        pass  # the eager path below reports it as the unfused stage would
    read = {s: i.read() if isinstance(i, ScanInput) else i for s, i in sources.items()}
    return stage.evaluate(read, results, ctx)


def _result(
    results: list[pl.LazyFrame | pl.DataFrame | None], index: int
) -> pl.LazyFrame | pl.DataFrame:
    frame = results[index]
    assert frame is not None, f"stage {index} has not run"
    return frame


def _rows(frame: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """A stage's result as rows (collected once: rows already are)."""
    return frame if isinstance(frame, pl.DataFrame) else frame.collect(engine=STAGE_ENGINE)
