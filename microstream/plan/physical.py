"""The physical plan: the stages one batch of a query runs as, compiled once.

:func:`compile` cuts the logical plan (:mod:`microstream.plan.nodes`) into
stages, listed in dependency order (a stage's inputs come before it):

1. **Stateless stages**: a tree of transform nodes (``filter``, ``with_columns``,
   static joins, ``with_watermark``, ``concat``, ``map_batches``, ...) fused into
   one Polars lazy plan over the stage's inputs: the batch of a source (one
   stage per source's prefix; sources that meet in a ``concat`` share one), an
   operator's output (the steps after it), or a stage feeding several others
   (one stream on both sides of a join), which is built once per batch. A
   watermark node in a stage collects its input there: the stage returns the
   largest event time it saw (:class:`WatermarkObservation`).
2. **An exchange** before every input of a stateful operator (two for a join):
   its rows go to the owner of their partition keys
   (:meth:`~microstream.plan.nodes.StatefulNode.partition_keys`), or all to one
   owner (:data:`~microstream.plan.nodes.SINGLE_PARTITION`).
3. **An operator stage**: the stateful node with its operator id (``op0``,
   ``op1``, ... in plan order, the names of its state in the checkpoint), the
   watermark delay and the output mode it runs with.
4. **The sink stage**: the query's result for the batch.

A runtime executes the stages (:mod:`microstream.runtime.stages`); in one
process an exchange is the identity, since one owner holds every key.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import polars as pl

from microstream.exceptions import PlanError
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    OperatorContext,
    PartitionKeys,
    PlanNode,
    ScanNode,
    StatefulNode,
    StatelessNode,
    TransformNode,
    WatermarkNode,
    chained_nodes,
    operator_context,
)

__all__ = [
    "FUSED_SCAN_ENGINE",
    "FUSED_SCAN_VERBS",
    "STAGE_ENGINE",
    "Exchange",
    "ExchangeStage",
    "OperatorStage",
    "PhysicalPlan",
    "SinkStage",
    "Stage",
    "StatelessStage",
    "WatermarkObservation",
    "compile",
    "explain_lines",
]


@dataclass(frozen=True)
class Exchange:
    """Where an operator input's rows go: hashed on ``keys``, or all to one owner.

    Examples
    --------
    >>> Exchange(("user",)).describe()
    "Exchange(hash ['user'])"
    >>> from microstream.plan.nodes import SINGLE_PARTITION
    >>> Exchange(SINGLE_PARTITION).describe()
    'Exchange(single partition)'
    """

    keys: PartitionKeys

    def describe(self) -> str:
        if self.keys is SINGLE_PARTITION:
            return "Exchange(single partition)"
        return f"Exchange(hash {list(self.keys)})"  # type: ignore[arg-type]


StageEngine = Literal["in-memory", "streaming"]
"""The Polars engines a stage is collected with."""

STAGE_ENGINE: Final[StageEngine] = "in-memory"
"""The Polars engine that collects a stateless stage's rows (its watermarks', its
consumer's). A batch is rows already in memory and a stage a few row-wise steps: the
in-memory engine runs them without the streaming engine's task scheduling, whose fixed
cost dominates such plans (Polars 2.1, ``df.lazy().collect()``: 6 us in-memory, 40 us
streaming; with the declared width's placeholders: 28 vs 74 us)."""


FUSED_SCAN_ENGINE: Final[StageEngine] = "streaming"
"""The Polars engine that runs a stateless stage together with the lazy scan of its
source's files (:meth:`StatelessStage.fuses_scan`): the streaming engine decodes the
files in morsels on every core and runs the stage's steps on them in the same
pipeline, where the in-memory engine would run the steps over the decoded batch
afterwards (one 92k-row Nexmark bid file, q22's ``str.split_exact``: 7.9 ms scan and
steps in one streaming plan against 13-21 ms for the steps alone over the read
frame)."""

FUSED_SCAN_VERBS: Final = frozenset(
    {"cast", "drop", "drop_nulls", "fill_nan", "fill_null", "filter", "rename", "select",
     "with_columns"}
)  # fmt: skip
"""The verbs a stage fused with its source's scan may hold: each row's result depends on
that row alone (their expressions are checked row-wise when the query is built) and keeps
its place, so the streaming engine, which runs them morsel by morsel in order, gives the
rows, values and order of the in-memory engine over the whole batch."""


@dataclass(frozen=True)
class WatermarkObservation:
    """What a stage saw at a watermark node in one batch: its rows, the largest event
    time (microseconds since the epoch; None without rows or with null times only)."""

    rows: int
    max_event_us: int | None


@dataclass(frozen=True, eq=False)
class StatelessStage:
    """Transform nodes fused into one Polars lazy plan, ending at ``output``."""

    index: int
    output: PlanNode
    sources: tuple[ScanNode, ...]
    """The sources whose batch the stage reads."""
    upstream: Mapping[PlanNode, int]
    """The nodes computed by earlier stages (operators, shared stages), by stage index."""
    steps: tuple[TransformNode, ...]
    """The nodes the stage evaluates, inputs first."""

    def lower(
        self,
        inputs: Mapping[ScanNode, pl.LazyFrame],
        results: Sequence[pl.LazyFrame | None],
        ctx: OperatorContext,
        collected: dict[PlanNode, pl.DataFrame] | None = None,
        engine: StageEngine = STAGE_ENGINE,
    ) -> tuple[pl.LazyFrame, dict[WatermarkNode, WatermarkObservation]]:
        """The stage's lazy plan for one batch, and what its watermark nodes saw (the
        rows each collected go into ``collected``, by node, when given; collected
        with ``engine``)."""
        observed: dict[WatermarkNode, WatermarkObservation] = {}

        def build(node: PlanNode) -> pl.LazyFrame:
            if isinstance(node, ScanNode):
                return inputs[node]
            index = self.upstream.get(node)
            if index is not None:
                frame = results[index]
                assert frame is not None, f"stage {index} runs before stage {self.index}"
                return frame
            assert isinstance(node, TransformNode)
            lf = node.lower([build(child) for child in node.children()], ctx)
            if isinstance(node, WatermarkNode) and not ctx.planning:
                df = lf.collect(engine=engine)  # the watermark sees every row, once
                observed[node] = WatermarkObservation(df.height, node.observe(df))
                if collected is not None:
                    collected[node] = df
                lf = df.lazy()
            return lf

        return build(self.output), observed

    def evaluate(
        self,
        inputs: Mapping[ScanNode, pl.LazyFrame],
        results: Sequence[pl.LazyFrame | pl.DataFrame | None],
        ctx: OperatorContext,
        engine: StageEngine = STAGE_ENGINE,
    ) -> tuple[pl.LazyFrame | pl.DataFrame, dict[WatermarkNode, WatermarkObservation]]:
        """:meth:`lower`, with fewer Polars calls: a stage that ends at its watermark node
        (``with_watermark`` before an operator) returns the rows that node collected, so
        its consumer does not collect them again (before: the watermark's collect, a
        ``select`` of the largest time, then the consumer's collect of the same rows).
        ``results`` holds earlier stages' results, a collected one as rows.
        """
        lazy_results = [r.lazy() if isinstance(r, pl.DataFrame) else r for r in results]
        collected: dict[PlanNode, pl.DataFrame] = {}
        frame, observed = self.lower(inputs, lazy_results, ctx, collected, engine)
        rows = collected.get(self.output)
        return (frame if rows is None else rows), observed

    def fuses_scan(self) -> bool:
        """Whether the stage may run in one plan with the lazy scan of its sources' files:
        it reads sources only (no earlier stage's rows), every step is a row-wise verb
        of :data:`FUSED_SCAN_VERBS` or a watermark (``map_batches``, static joins and
        unions see the whole batch or need not keep the order: they run as before), and
        a step calls a function (a string, temporal, struct, ... kernel, or
        ``when/then``): the work the streaming engine spreads over the cores morsel by
        morsel, where the in-memory engine runs each such expression on one thread.
        Column picks, arithmetic, comparisons and casts cost less than the read, and a
        stage of only those keeps the eager read (with its read-ahead, which overlaps the
        read with the batch before; measured on the Nexmark queries: q0, q1, q2 are
        slower fused, q14, q21, q22 faster, ``benchmarks/README.md``).

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> frame = ms.MemoryStream({"x": pl.Int64}).lazy()
        >>> compile(frame.filter(pl.col("x").abs() > 1).plan).stages[0].fuses_scan()
        True
        >>> compile(frame.filter(pl.col("x") > 1).plan).stages[0].fuses_scan()  # no function
        False
        >>> compile(frame.map_batches(lambda df: df).plan).stages[0].fuses_scan()
        False
        """
        row_wise = all(
            isinstance(step, WatermarkNode)
            or (isinstance(step, StatelessNode) and step.verb in FUSED_SCAN_VERBS)
            for step in self.steps
        )
        return (
            not self.upstream
            and row_wise
            and any(
                isinstance(step, StatelessNode)
                and _calls_function([*step.args, *step.kwargs.values()])
                for step in self.steps
            )
        )

    def describe(self) -> str:
        reads = [scan.describe() for scan in self.sources]
        reads += [f"[{i}]" for i in sorted(set(self.upstream.values()))]
        return " -> ".join([", ".join(reads), *(step.describe() for step in self.steps)])


@dataclass(frozen=True, eq=False)
class ExchangeStage:
    """Rows of stage ``input`` routed by ``exchange`` to the owners of their keys."""

    index: int
    input: int
    exchange: Exchange

    def describe(self) -> str:
        return f"{self.exchange.describe()} <- [{self.input}]"


@dataclass(frozen=True, eq=False)
class OperatorStage:
    """A stateful operator over its exchanged inputs (one per node child)."""

    index: int
    node: StatefulNode
    operator_id: str
    inputs: tuple[int, ...]
    delay_us: int
    """How far behind the query's watermarks this operator judges (upstream emit delay)."""
    append_only: bool
    """It feeds another operator, so it runs in append mode (its rows are final)."""

    def context(self, ctx: OperatorContext) -> OperatorContext:
        """The batch's context as this operator sees it."""
        mode = "append" if self.append_only else ctx.output_mode
        return operator_context(ctx, self.delay_us, mode)

    def describe(self) -> str:
        notes = []
        if self.delay_us:
            from microstream.time.duration import format_duration

            notes.append(f"watermark held back {format_duration(self.delay_us)}")
        if self.append_only:
            notes.append("append mode: feeds another operator")
        note = f" ({'; '.join(notes)})" if notes else ""
        inputs = ", ".join(f"[{i}]" for i in self.inputs)
        return f"{self.operator_id} {self.node.describe()}{note} <- {inputs}"


@dataclass(frozen=True, eq=False)
class SinkStage:
    """The query's result, handed to the sink."""

    index: int
    input: int

    def describe(self) -> str:
        return f"Sink <- [{self.input}]"


Stage = StatelessStage | ExchangeStage | OperatorStage | SinkStage


@dataclass(frozen=True, eq=False)
class PhysicalPlan:
    """The stages of a query in dependency order; the sink stage is last."""

    logical: PlanNode
    stages: tuple[Stage, ...]

    def operators(self) -> list[OperatorStage]:
        return [s for s in self.stages if isinstance(s, OperatorStage)]

    def exchanges(self) -> list[ExchangeStage]:
        return [s for s in self.stages if isinstance(s, ExchangeStage)]

    def fusable_scans(self) -> frozenset[ScanNode]:
        """The sources whose batch may be handed as a lazy scan run in one plan with the
        stage reading it: read by one stage only, which :meth:`StatelessStage.fuses_scan`
        (a source read by two stages would be scanned twice)."""
        readers: Counter[ScanNode] = Counter()
        fusing: set[ScanNode] = set()
        for stage in self.stages:
            if isinstance(stage, StatelessStage):
                readers.update(stage.sources)
                if stage.fuses_scan():
                    fusing.update(stage.sources)
        return frozenset(scan for scan in fusing if readers[scan] == 1)

    def explain_lines(self) -> list[str]:
        """One line per stage, ``[index]`` first; ``<- [i]`` names a stage's inputs."""
        return [f"[{stage.index}] {stage.describe()}" for stage in self.stages]


def compile(plan: PlanNode) -> PhysicalPlan:
    """The physical plan of ``plan`` (see the module docstring).

    Raises
    ------
    PlanError
        A stateful node declares no partition keys for one of its inputs (an empty
        tuple: it must name its keys, or say :data:`SINGLE_PARTITION`).

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"k": pl.String, "v": pl.Int64}, name="kv")
    >>> frame = stream.lazy().filter(pl.col("v") > 0).group_by("k").agg(pl.col("v").sum())
    >>> print("\\n".join(compile(frame.plan).explain_lines()))
    [0] Scan MemoryStream[kv] -> filter([(col("v")) > (dyn int: 0)])
    [1] Exchange(hash ['k']) <- [0]
    [2] op0 group_by(['k']).agg(col("v").sum()) <- [1]
    [3] Sink <- [2]
    """
    consumers: Counter[int] = Counter({id(plan): 1})  # the sink consumes the root
    feeds_operator: set[int] = set()
    for node in plan.walk():
        for child in node.children():
            consumers[id(child)] += 1
            if isinstance(node, StatefulNode):
                feeds_operator.add(id(child))

    def is_output(node: PlanNode) -> bool:
        if node is plan or id(node) in feeds_operator:
            return not isinstance(node, StatefulNode)
        # A transform read by several consumers is built once; a source's batch is
        # simply read by each.
        return isinstance(node, TransformNode) and consumers[id(node)] > 1

    chained = chained_nodes(plan)
    stages: list[Stage] = []
    stage_of: dict[int, int] = {}  # node id -> index of the stage that outputs it
    operators = 0
    for node in plan.walk():
        if isinstance(node, StatefulNode):
            inputs = []
            keys = node.partition_keys()
            if len(keys) != len(node.children()):
                msg = (
                    f"{node.describe()} declares {len(keys)} partitionings for "
                    f"{len(node.children())} inputs; give one per input"
                )
                raise PlanError(msg)
            for side, (child, key) in enumerate(zip(node.children(), keys)):
                if key is not SINGLE_PARTITION and not key:
                    msg = (
                        f"{node.describe()} declares no partition keys for its input {side}: "
                        "return its state key columns, or SINGLE_PARTITION when it has none"
                    )
                    raise PlanError(msg)
                stages.append(ExchangeStage(len(stages), stage_of[id(child)], Exchange(key)))
                inputs.append(len(stages) - 1)
            stages.append(
                OperatorStage(
                    index=len(stages),
                    node=node,
                    operator_id=f"op{operators}",
                    inputs=tuple(inputs),
                    delay_us=node.watermark_delay_us(),
                    append_only=node in chained,
                )
            )
            operators += 1
            stage_of[id(node)] = len(stages) - 1
        elif is_output(node):
            stages.append(_stateless_stage(len(stages), node, stage_of))
            stage_of[id(node)] = len(stages) - 1
    stages.append(SinkStage(len(stages), stage_of[id(plan)]))
    return PhysicalPlan(logical=plan, stages=tuple(stages))


def _stateless_stage(
    index: int,
    output: PlanNode,
    stage_of: Mapping[int, int],
) -> StatelessStage:
    """The stage ending at ``output``: its transform nodes back to sources and to nodes
    earlier stages give."""
    sources: list[ScanNode] = []
    upstream: dict[PlanNode, int] = {}
    steps: list[TransformNode] = []

    def visit(node: PlanNode) -> None:
        if isinstance(node, ScanNode):
            if node not in sources:
                sources.append(node)
            return
        if node is not output and (isinstance(node, StatefulNode) or id(node) in stage_of):
            upstream[node] = stage_of[id(node)]
            return
        assert isinstance(node, TransformNode)
        for child in node.children():
            visit(child)
        steps.append(node)

    visit(output)
    return StatelessStage(
        index=index,
        output=output,
        sources=tuple(sources),
        upstream=upstream,
        steps=tuple(steps),
    )


def _calls_function(values: Sequence[Any]) -> bool:
    """Whether an expression among ``values`` (a verb's arguments, nested in lists and
    dicts) calls a function or ``when/then``; an expression that does not serialise (a
    Python UDF) counts as not (its stage keeps the in-memory engine)."""
    for value in values:
        if isinstance(value, pl.Expr):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the json format is deprecated, still exact
                    tree = json.loads(value.meta.serialize(format="json"))
            except Exception:
                continue
            if _has_function(tree):
                return True
        elif (isinstance(value, (list, tuple)) and _calls_function(value)) or (
            isinstance(value, Mapping) and _calls_function(list(value.values()))
        ):
            return True
    return False


def _has_function(node: Any) -> bool:
    if isinstance(node, list):
        return any(_has_function(item) for item in node)
    if isinstance(node, dict):
        if "Function" in node or "Ternary" in node:
            return True
        return any(_has_function(v) for k, v in node.items() if k != "Literal")
    return False


def explain_lines(plan: PlanNode) -> list[str]:
    """What ``explain()`` prints: the logical plan, one node a line with the sources
    last, then the physical plan's stages in the order they run.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"x": pl.Int64}, name="xs")
    >>> print("\\n".join(explain_lines(stream.lazy().filter(pl.col("x") > 1).plan)))
    filter([(col("x")) > (dyn int: 1)])
      Scan MemoryStream[xs]
    <BLANKLINE>
    Physical plan:
      [0] Scan MemoryStream[xs] -> filter([(col("x")) > (dyn int: 1)])
      [1] Sink <- [0]
    """
    stages = ["  " + line for line in compile(plan).explain_lines()]
    return [*plan.explain_lines(), "", "Physical plan:", *stages]
