"""The logical plan of a streaming query: frozen nodes, one per verb.

A plan is data: nodes are frozen dataclasses, so a plan can be printed
(``explain``), fingerprinted (stored in the checkpoint and compared on restart)
and compiled once into a physical plan (:mod:`microstream.plan.physical`).
Transform nodes rewrite LazyFrames (:meth:`TransformNode.lower`); a stateful node
(aggregation, deduplication, a join) names the runtime operator that owns its
state, and the keys its input is partitioned by. An operator is handed a
read-only :class:`OperatorContext` and returns an :class:`OperatorOutput`.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import polars as pl

from microstream.exceptions import PlanError
from microstream.protocols import StaticSide
from microstream.time.watermark import NO_WATERMARK_US

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage
    from microstream.protocols import SourceSpec
    from microstream.runtime.progress import StateOperatorProgress

__all__ = [
    "SINGLE_PARTITION",
    "ConcatNode",
    "KeyGroupedOperator",
    "MapBatchesNode",
    "OperatorContext",
    "OperatorOutput",
    "PartitionKeys",
    "PlanNode",
    "ScanNode",
    "SinglePartition",
    "StatefulNode",
    "StatefulOperator",
    "StatelessNode",
    "StaticJoinNode",
    "TimedOperator",
    "TransformNode",
    "WatermarkNode",
    "chained_nodes",
    "check_row_wise",
    "declared_width",
    "describe_value",
    "lower_plan",
    "planning_context",
    "result_key_columns",
    "scan_projections",
]


@dataclass(frozen=True)
class OperatorContext:
    """What an operator knows of the batch it runs in: read-only.

    ``late_watermark_us`` judges late rows (the previous batch's watermark) and
    ``watermark_us`` drives emission and eviction at the end of this batch, as
    Spark does since 3.4. Both are microseconds since the epoch, already held
    back by the operator's upstream delay (:meth:`StatefulNode.watermark_delay_us`).

    Examples
    --------
    >>> ctx = OperatorContext(batch_id=3, late_watermark_us=0, watermark_us=10,
    ...                       output_mode="append")
    >>> ctx.batch_timestamp_ms
    0
    """

    batch_id: int
    late_watermark_us: int
    watermark_us: int
    output_mode: str
    batch_timestamp_ms: int = 0
    """The batch's logged processing time: processing-time emit triggers use it, so a
    re-run batch decides exactly as the first run did."""
    planning: bool = False
    """True when the plan is only resolved over empty inputs (schema, projections):
    nothing is read and no operator runs."""


@dataclass(frozen=True)
class OperatorOutput:
    """What an operator returns for one batch: the rows to emit downstream, and the
    rows it dropped as late or without an event time (for the ``on_late`` side
    output), in the order it dropped them."""

    rows: pl.DataFrame
    late_rows: tuple[pl.DataFrame, ...] = ()


class SinglePartition:
    """The partitioning of an operator without keys: every row goes to one owner
    (a global aggregation, a window aggregation without ``group_by`` keys). Use
    the one instance, :data:`SINGLE_PARTITION`."""

    def __repr__(self) -> str:
        return "SINGLE_PARTITION"


SINGLE_PARTITION = SinglePartition()

PartitionKeys = tuple[str, ...] | SinglePartition
"""How an operator's input is partitioned: hashed on these columns (never empty), or
:data:`SINGLE_PARTITION`."""


class StatefulOperator(Protocol):
    """The runtime of a stateful node: owns its state store, one per query run."""

    operator_id: str

    def process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> OperatorOutput:
        """Apply one batch's rows, one frame per input of the node (two for a join), and
        return what to emit and what was dropped as late."""
        ...

    def load(self, version: int | None) -> None:
        """Restore the state as of committed batch ``version`` (None: empty)."""
        ...

    def commit(self, version: int) -> None:
        """Persist the state as of batch ``version``."""
        ...

    def progress(self) -> StateOperatorProgress:
        """State size and the counts of the last batch."""
        ...

    def store_schemas(self) -> dict[str, pl.Schema]:
        """The operator's state stores (``op0/partials``, ...) and their schemas."""
        ...


@runtime_checkable
class KeyGroupedOperator(Protocol):
    """An operator whose state is split into key groups (optional for operators): told
    the checkpoint's number of key groups before its state is loaded."""

    def use_key_groups(self, num_key_groups: int) -> None:
        """Use ``num_key_groups`` key groups for every store."""
        ...


@runtime_checkable
class TimedOperator(Protocol):
    """An operator that may need a batch without new rows (optional for operators):
    an event-time timer the watermark reached, a processing-time timer or a state
    TTL that the current time reached (``map_groups_with_state``, ``state_ttl``)."""

    def timers_due(self, watermark_us: int | None, now_ms: int) -> bool:
        """Whether a batch is due now, for ``watermark_us`` and the wall clock ``now_ms``."""
        ...


def planning_context() -> OperatorContext:
    """A context for planning: no state, nothing late, empty inputs."""
    return OperatorContext(
        batch_id=-1,
        late_watermark_us=NO_WATERMARK_US,
        watermark_us=NO_WATERMARK_US,
        output_mode="append",
        planning=True,
    )


class PlanNode(ABC):
    """Base of every plan node."""

    def children(self) -> tuple[PlanNode, ...]:
        return ()

    @abstractmethod
    def describe(self) -> str:
        """One line for ``explain()``."""

    def walk(self) -> list[PlanNode]:
        """Every node once, inputs first (a stable order: positions name sources and
        operators). A node reached twice (one stream feeding both sides of a join) is
        listed at its first position: it is one source, one watermark, one operator."""
        found: list[PlanNode] = []
        seen: set[int] = set()
        for child in self.children():
            for node in child.walk():
                if id(node) not in seen:
                    seen.add(id(node))
                    found.append(node)
        found.append(self)
        return found

    def scans(self) -> list[ScanNode]:
        """Scan nodes in plan order (their position is the source index)."""
        return [n for n in self.walk() if isinstance(n, ScanNode)]

    def stateful_nodes(self) -> list[StatefulNode]:
        return [n for n in self.walk() if isinstance(n, StatefulNode)]

    def watermark_nodes(self) -> list[WatermarkNode]:
        return [n for n in self.walk() if isinstance(n, WatermarkNode)]

    def explain_lines(self, depth: int = 0) -> list[str]:
        lines = ["  " * depth + self.describe()]
        for child in self.children():
            lines.extend(child.explain_lines(depth + 1))
        return lines

    def stateless_steps(self) -> list[str]:
        steps: list[str] = []
        for child in self.children():
            steps.extend(child.stateless_steps())
        return steps

    def schema(self) -> pl.Schema:
        """The output schema, found by planning the query over empty inputs."""
        empty: dict[PlanNode, pl.LazyFrame] = {
            scan: pl.LazyFrame(schema=scan.source.schema) for scan in self.scans()
        }
        try:
            return lower_plan(self, empty, planning_context()).collect_schema()
        except pl.exceptions.PolarsError as exc:
            msg = f"the query cannot be planned: {exc}\nplan:\n" + "\n".join(self.explain_lines())
            raise PlanError(msg) from exc


class TransformNode(PlanNode):
    """A node that rewrites LazyFrames: its result depends on this batch's rows only."""

    @abstractmethod
    def lower(self, frames: Sequence[pl.LazyFrame], ctx: OperatorContext) -> pl.LazyFrame:
        """The node as a Polars lazy query over its inputs' lazy queries (one per child)."""


@dataclass(frozen=True, eq=False)
class ScanNode(PlanNode):
    source: SourceSpec

    def describe(self) -> str:
        return f"Scan {self.source.describe()}"


@dataclass(frozen=True, eq=False)
class StatelessNode(TransformNode):
    """A LazyFrame verb applied as is to every batch (filter, select, ...)."""

    input: PlanNode
    verb: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        parts = [describe_value(a) for a in self.args]
        parts += [f"{k}={describe_value(v)}" for k, v in self.kwargs.items()]
        return f"{self.verb}({', '.join(parts)})"

    def stateless_steps(self) -> list[str]:
        return [*self.input.stateless_steps(), self.describe()]

    def lower(self, frames: Sequence[pl.LazyFrame], ctx: OperatorContext) -> pl.LazyFrame:
        result: pl.LazyFrame = getattr(frames[0], self.verb)(*self.args, **self.kwargs)
        return result


@dataclass(frozen=True, eq=False)
class MapBatchesNode(TransformNode):
    """A user function from DataFrame to DataFrame, called once per batch."""

    input: PlanNode
    function: Callable[[pl.DataFrame], pl.DataFrame]
    output_schema: pl.Schema

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        name = getattr(self.function, "__qualname__", repr(self.function))
        return f"map_batches({name})"

    def stateless_steps(self) -> list[str]:
        return [*self.input.stateless_steps(), self.describe()]

    def lower(self, frames: Sequence[pl.LazyFrame], ctx: OperatorContext) -> pl.LazyFrame:
        return frames[0].map_batches(
            self.function, schema=self.output_schema, validate_output_schema=True
        )


@dataclass(frozen=True, eq=False)
class StaticJoinNode(TransformNode):
    """A join of the stream with a static DataFrame, LazyFrame or changing table."""

    input: PlanNode
    other: pl.LazyFrame | StaticSide
    kwargs: Mapping[str, Any]

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        other = self.other.describe() if isinstance(self.other, StaticSide) else "static LazyFrame"
        parts = [f"{k}={describe_value(v)}" for k, v in self.kwargs.items()]
        return f"join({other}, {', '.join(parts)})"

    def stateless_steps(self) -> list[str]:
        return [*self.input.stateless_steps(), self.describe()]

    def lower(self, frames: Sequence[pl.LazyFrame], ctx: OperatorContext) -> pl.LazyFrame:
        if ctx.planning:
            # Never read the table to plan (scan_projections collects plans); one row of
            # placeholder values: an empty side, or one whose join keys are all null (Polars
            # 2.2 drops null keys first), lets Polars skip the stream's side altogether.
            schema = (
                self.other.schema
                if isinstance(self.other, StaticSide)
                else self.other.collect_schema()
            )
            other = _placeholder_row(schema).lazy()
        elif isinstance(self.other, StaticSide):
            other = self.other.current()
        else:
            other = self.other
        return frames[0].join(other, **self.kwargs)


def _placeholder_row(schema: pl.Schema) -> pl.DataFrame:
    """One row of ``schema``: zero cast to each column's dtype where it casts (0, "0",
    the epoch, ...), null where it does not."""
    columns = []
    for name, dtype in schema.items():
        try:
            column = pl.Series(name, [0]).cast(dtype, strict=False)
        except Exception:  # (a dtype no integer casts to, e.g. an Enum)
            column = pl.Series(name, [None], dtype=dtype)
        columns.append(column)
    return pl.DataFrame(columns, schema=schema)


@dataclass(frozen=True, eq=False)
class ConcatNode(TransformNode):
    """The union of several streams (``ms.concat``), as ``pl.concat`` does for frames."""

    inputs: tuple[PlanNode, ...]
    how: str = "vertical"
    watermark_policy: str = "min"

    def children(self) -> tuple[PlanNode, ...]:
        return self.inputs

    def describe(self) -> str:
        return f"concat(how={self.how!r}, watermark_policy={self.watermark_policy!r})"

    def stateless_steps(self) -> list[str]:
        return [*super().stateless_steps(), self.describe()]

    def lower(self, frames: Sequence[pl.LazyFrame], ctx: OperatorContext) -> pl.LazyFrame:
        return pl.concat(frames, how=self.how)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class WatermarkNode(TransformNode):
    """``with_watermark``: observes the largest event time of every batch of its input.

    Rows pass through unchanged; stateful operators downstream judge them late.
    The stage that evaluates this node collects its input once and returns the
    largest event time and the row count (:meth:`observe`).
    """

    input: PlanNode
    column: str
    delay_us: int
    idle_timeout_us: int | None = None
    on_late: Any = None
    """Where late rows go: a memory table name or a function ``fn(df, batch_id)``."""

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        from microstream.time.duration import format_duration

        idle = (
            f", idle_timeout={format_duration(self.idle_timeout_us)}"
            if self.idle_timeout_us
            else ""
        )
        late = f", on_late={self.on_late!r}" if self.on_late is not None else ""
        return (
            f"with_watermark({self.column!r}, delay={format_duration(self.delay_us)}{idle}{late})"
        )

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "watermark", "column": self.column, "delay_us": self.delay_us}

    def lower(self, frames: Sequence[pl.LazyFrame], ctx: OperatorContext) -> pl.LazyFrame:
        return frames[0]

    def observe(self, df: pl.DataFrame) -> int | None:
        """The largest event time of this batch's rows ``df`` (None: no rows, or all null)."""
        if not df.height:
            return None
        # (a Series kernel, not a query: no plan to optimise for one number)
        value = df.get_column(self.column).dt.epoch("us").max()
        return None if value is None else int(value)  # type: ignore[arg-type]


class StatefulNode(PlanNode):
    """A node whose result depends on earlier batches: it owns a runtime operator."""

    input: PlanNode

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    @abstractmethod
    def output_schema(self) -> pl.Schema:
        """The schema of the rows the operator emits."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What the checkpoint's plan record keeps of this operator."""

    @abstractmethod
    def build_operator(self, operator_id: str, storage: Storage) -> StatefulOperator:
        """The runtime operator, with its state stores under ``storage``."""

    @abstractmethod
    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        """Per input (as :meth:`children`), the columns its rows are partitioned by, so
        that every row of one state key meets one owner: the operator's state keys as
        they appear in its input, or :data:`SINGLE_PARTITION` when it has none."""

    def check_output_mode(self, output_mode: str) -> None:
        """Raise PlanError if this operator cannot produce ``output_mode``."""

    def unbounded_state(self, output_mode: str) -> str | None:
        """Why this operator's state can only grow in ``output_mode``, and the fix; None
        when its state is bounded (evicted by the watermark, a TTL, or the user's code)."""
        return None

    chainable: ClassVar[bool] = False
    """Whether another stateful operator may consume this one's output: true for
    operators whose rows are final when emitted (joins, deduplication)."""

    def result_key(self) -> tuple[str, ...] | None:
        """The columns identifying a row this operator emits (see :func:`result_key_columns`);
        None (the default): its rows have no stable key."""
        return None

    def can_chain(self) -> bool:
        """Whether this node may feed another stateful node (see ``chainable``); nodes
        whose answer depends on their arguments (an aggregation) override this."""
        return self.chainable

    def output_delay_us(self) -> int:
        """How much older than the watermark the event times of emitted rows may be."""
        return 0

    def watermark_delay_us(self) -> int:
        """How much later than the query's watermarks this operator judges lateness and
        eviction: downstream of operators that emit rows older than the watermark (a
        join emits a pair when its later row arrives), as Spark's per-operator
        watermark propagation does."""
        return sum(n.output_delay_us() for n in self.walk()[:-1] if isinstance(n, StatefulNode))


def operator_context(ctx: OperatorContext, delay_us: int, output_mode: str) -> OperatorContext:
    """``ctx`` with the watermarks held back by ``delay_us`` and ``output_mode`` (an
    operator feeding another runs in append mode, whatever the query's)."""
    if not delay_us and output_mode == ctx.output_mode:
        return ctx
    return replace(
        ctx,
        late_watermark_us=_minus(ctx.late_watermark_us, delay_us),
        watermark_us=_minus(ctx.watermark_us, delay_us),
        output_mode=output_mode,
    )


def lower_plan(
    plan: PlanNode, inputs: Mapping[PlanNode, pl.LazyFrame], ctx: OperatorContext
) -> pl.LazyFrame:
    """``plan`` as one Polars lazy query over ``inputs`` (a frame for every scan, and for
    any node whose result is already known), for planning: a stateful node not in
    ``inputs`` stands for an empty frame of its output schema, a watermark observes
    nothing.

    Examples
    --------
    >>> import microstream as ms
    >>> frame = ms.MemoryStream({"x": pl.Int64}).lazy().filter(pl.col("x") > 1)
    >>> scan = frame.plan.scans()[0]
    >>> lower_plan(frame.plan, {scan: pl.LazyFrame({"x": [1, 2]})}, planning_context()).collect()
    shape: (1, 1)
    ┌─────┐
    │ x   │
    │ --- │
    │ i64 │
    ╞═════╡
    │ 2   │
    └─────┘
    """
    known = inputs.get(plan)
    if known is not None:
        return known
    if isinstance(plan, StatefulNode):
        for child in plan.children():  # resolved, so errors in its inputs surface here
            lower_plan(child, inputs, ctx)
        return pl.LazyFrame(schema=plan.output_schema())
    if not isinstance(plan, TransformNode):
        msg = f"no input frame for {plan.describe()}"
        raise PlanError(msg)
    return plan.lower([lower_plan(child, inputs, ctx) for child in plan.children()], ctx)


def _minus(watermark_us: int, delay_us: int) -> int:
    """A watermark held back by ``delay_us``; "no watermark yet" stays so (no Int64 underflow)."""
    return max(watermark_us - delay_us, NO_WATERMARK_US)


def chained_nodes(plan: PlanNode) -> frozenset[PlanNode]:
    """The stateful nodes of ``plan`` that feed another stateful node."""
    found: set[PlanNode] = set()
    for node in plan.stateful_nodes():
        found.update(n for n in node.walk()[:-1] if isinstance(n, StatefulNode))
    return frozenset(found)


def scan_projections(plan: PlanNode) -> dict[ScanNode, tuple[str, ...] | None]:
    """The columns the query reads of each source (None: every column).

    Polars finds them: every part of the plan that is collected on its own (each
    stateful node's inputs, each watermark's column, the result) is collected once
    over empty probe sources, whose ``with_columns`` argument is what projection
    pushdown asks of them. A source that feeds ``concat`` (whose inputs must keep
    equal columns) or a plan that cannot be probed reads every column.
    """
    from polars.io.plugins import register_io_source

    scans = plan.scans()
    wanted: dict[ScanNode, set[str] | None] = {scan: set() for scan in scans}

    def probe(scan: ScanNode) -> pl.LazyFrame:
        schema = pl.Schema(scan.source.schema)

        def source(with_columns: list[str] | None, *_: Any) -> Any:
            found = wanted[scan]
            if with_columns is None or found is None:
                wanted[scan] = None
            else:
                found.update(with_columns)
            yield pl.DataFrame(schema=schema).select(with_columns or list(schema))

        return register_io_source(source, schema=schema)

    inputs: dict[PlanNode, pl.LazyFrame] = {scan: probe(scan) for scan in scans}
    ctx = planning_context()
    try:
        parts = [lower_plan(plan, inputs, ctx)]
        for node in plan.walk():
            if isinstance(node, StatefulNode):
                parts.extend(lower_plan(child, inputs, ctx) for child in node.children())
            elif isinstance(node, WatermarkNode):
                parts.append(lower_plan(node.input, inputs, ctx).select(node.column))
            elif isinstance(node, ConcatNode):
                for child in node.inputs:
                    for scan in child.scans():
                        wanted[scan] = None
        for part in parts:
            part.collect()
    except Exception:  # a user function that fails on empty input, say: read everything
        return dict.fromkeys(scans)
    return {
        scan: None
        if not found or len(found) == len(scan.source.schema)
        else tuple(c for c in scan.source.schema if c in found)
        for scan, found in wanted.items()
    }


def declared_width(df: pl.DataFrame | pl.LazyFrame, schema: pl.Schema) -> pl.LazyFrame:
    """A source's batch as the plan sees it: every declared column, in order.

    A source told to read fewer columns (:func:`scan_projections`) returns
    only those (as rows, or as a lazy scan of its files). The plan still names the others (``rename``, ``drop``, ``cast``
    of a column the result does not use), so they come back as typed nulls:
    the plan then resolves exactly as it would on a LazyFrame of the full
    schema, and Polars' projection pushdown removes the placeholders again,
    since the probe found nothing downstream reads them.

    Examples
    --------
    >>> schema = pl.Schema({"a": pl.Int64, "b": pl.String})
    >>> declared_width(pl.DataFrame({"a": [1]}), schema).collect_schema()
    Schema([('a', Int64), ('b', String)])
    """
    have: pl.DataFrame | pl.Schema = df if isinstance(df, pl.DataFrame) else df.collect_schema()
    if (have.width if isinstance(have, pl.DataFrame) else len(have)) == len(schema):
        return df.lazy()
    missing = [
        pl.lit(None, dtype).alias(name) for name, dtype in schema.items() if name not in have
    ]
    return df.lazy().with_columns(missing).select(schema.names())


def result_key_columns(plan: PlanNode) -> tuple[str, ...] | None:
    """The columns identifying a row of the query's result, for upserting sinks.

    A ``group_by`` aggregation's group keys; a ``group_by_dynamic``'s window
    start column followed by its group keys (the window start fixes the window,
    its period being fixed). None when the result has no stable key: no
    aggregation, sessions (merging sessions changes ``session_start``),
    deduplication. This is the query's *last* operator's key (operators before
    it in a chain emit final rows); the sink checks that the columns are still
    in the output.
    """
    stateful = plan.stateful_nodes()
    return stateful[-1].result_key() if stateful else None


def describe_value(value: Any) -> str:
    """A stable, readable text for a verb argument (used in fingerprints)."""
    if isinstance(value, pl.Expr):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (pl.DataType, type)):
        return str(value)
    return repr(value)


# Aggregations and order-dependent functions give per-batch answers that differ
# from the answer over the whole stream, so they are refused in row-wise verbs.
_ROW_DEPENDENT = ("Agg", "Len", "Over", "Sort", "SortBy", "Slice", "Gather", "Filter", "Window")


def check_row_wise(verb: str, exprs: list[Any]) -> None:
    """Refuse expressions whose value for a row depends on other rows of the batch.

    ``pl.col("x").sum()`` or ``cum_sum()`` inside ``with_columns`` would give a
    per-batch answer on a stream and a whole-table answer on a static frame;
    the two must agree, so such expressions need a stateful verb instead.
    """
    for expr in exprs:
        if not isinstance(expr, pl.Expr):
            continue
        separable: bool | None
        try:
            separable = expr.meta.is_row_separable()
        except Exception:  # a UDF cannot be inspected without a schema
            separable = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the json format is deprecated, still exact
                tree = json.loads(expr.meta.serialize(format="json"))
        except Exception:  # UDFs may not serialise
            tree = None
        bad = _find_row_dependent(tree) if tree is not None else None
        if separable is False or bad is not None:
            what = bad or "an order- or batch-dependent function"
            msg = (
                f"{verb}({expr}) cannot run on a stream: {what} makes each row's value depend "
                "on the other rows of the micro-batch, so the result would change with how the "
                "stream is split into batches. Aggregates over the whole stream are "
                "group_by(...).agg or group_by_dynamic(...).agg (kept in state across batches); "
                "if a per-batch answer is what you want, say so with map_batches(fn) or "
                "foreach_batch(fn)"
            )
            raise PlanError(msg)


def _find_row_dependent(node: Any) -> str | None:
    if isinstance(node, str):
        return "len()" if node == "Len" else None
    if isinstance(node, list):
        for item in node:
            found = _find_row_dependent(item)
            if found:
                return found
        return None
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ROW_DEPENDENT:
                return f"an aggregation ({key.lower()})" if key == "Agg" else key.lower()
            if key == "Literal":
                continue
            found = _find_row_dependent(value)
            if found:
                return found
    return None
