"""The logical plan of a streaming query: frozen nodes, one per verb.

A plan is data: nodes are frozen dataclasses, so a plan can be printed
(``explain``), fingerprinted (stored in the checkpoint and compared on restart)
and compiled, every batch, into Polars lazy queries over the batch's input.
Stateless nodes rewrite a LazyFrame; a stateful node (aggregation,
deduplication) materialises its input, hands it to its runtime operator, which
owns the state, and continues lazily from the operator's output.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
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
    "BatchContext",
    "ConcatNode",
    "KeyGroupedOperator",
    "MapBatchesNode",
    "PlanNode",
    "ScanNode",
    "StatefulNode",
    "StatefulOperator",
    "StatelessNode",
    "StaticJoinNode",
    "TimedOperator",
    "WatermarkNode",
    "chained_nodes",
    "check_row_wise",
    "declared_width",
    "describe_value",
    "result_key_columns",
    "scan_projections",
]


class StatefulOperator(Protocol):
    """The runtime of a stateful node: owns its state store, one per query run."""

    operator_id: str

    def process(self, batch: pl.DataFrame, ctx: BatchContext) -> pl.DataFrame:
        """Apply one batch's rows (late rows dropped) and return what to emit."""
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


@dataclass
class BatchContext:
    """What one run of the plan over one batch needs besides the input.

    ``late_watermark_us`` judges late rows (the previous batch's watermark) and
    ``watermark_us`` drives emission and eviction at the end of this batch, as
    Spark does since 3.4. Both are microseconds since the epoch.
    """

    batch_id: int
    late_watermark_us: int
    watermark_us: int
    output_mode: str
    batch_timestamp_ms: int = 0
    """The batch's logged processing time: processing-time emit triggers use it, so a
    re-run batch decides exactly as the first run did."""
    operators: Mapping[PlanNode, StatefulOperator] = field(default_factory=dict)
    planning: bool = False
    max_event_us: dict[WatermarkNode, int | None] = field(default_factory=dict)
    """Filled by watermark nodes: the largest event time of this batch per input."""
    rows_per_input: dict[WatermarkNode, int] = field(default_factory=dict)
    late_rows: list[pl.DataFrame] = field(default_factory=list)
    """Rows stateful operators dropped as late, with why (for the ``on_late`` side output)."""
    results: dict[PlanNode, pl.LazyFrame] = field(default_factory=dict)
    """Materialised results of this batch, so a node feeding two branches (both sides of
    a self-join) runs once."""
    chained: frozenset[PlanNode] = frozenset()
    """Stateful nodes whose output feeds another stateful node (:func:`chained_nodes`):
    they run in append mode, whatever the query's, so what they emit is final."""


def planning_context() -> BatchContext:
    """A context for planning: no state, nothing late, empty inputs."""
    return BatchContext(
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

    @abstractmethod
    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        """The node as a Polars lazy query over the batch's per-source inputs."""

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
        empty = {scan: pl.LazyFrame(schema=scan.source.schema) for scan in self.scans()}
        try:
            return self.execute(empty, planning_context()).collect_schema()
        except pl.exceptions.PolarsError as exc:
            msg = f"the query cannot be planned: {exc}\nplan:\n" + "\n".join(self.explain_lines())
            raise PlanError(msg) from exc


@dataclass(frozen=True, eq=False)
class ScanNode(PlanNode):
    source: SourceSpec

    def describe(self) -> str:
        return f"Scan {self.source.describe()}"

    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        return inputs[self]


@dataclass(frozen=True, eq=False)
class StatelessNode(PlanNode):
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

    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        lf = self.input.execute(inputs, ctx)
        result: pl.LazyFrame = getattr(lf, self.verb)(*self.args, **self.kwargs)
        return result


@dataclass(frozen=True, eq=False)
class MapBatchesNode(PlanNode):
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

    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        return self.input.execute(inputs, ctx).map_batches(
            self.function, schema=self.output_schema, validate_output_schema=True
        )


@dataclass(frozen=True, eq=False)
class StaticJoinNode(PlanNode):
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

    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        if ctx.planning:
            # Never read the table to plan (scan_projections collects plans); one row of
            # nulls, as an empty side would let Polars skip the stream's side altogether.
            schema = (
                self.other.schema
                if isinstance(self.other, StaticSide)
                else self.other.collect_schema()
            )
            other = pl.DataFrame(schema=schema).clear(1).lazy()
        elif isinstance(self.other, StaticSide):
            other = self.other.current()
        else:
            other = self.other
        return self.input.execute(inputs, ctx).join(other, **self.kwargs)


@dataclass(frozen=True, eq=False)
class ConcatNode(PlanNode):
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

    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        frames = [child.execute(inputs, ctx) for child in self.inputs]
        return pl.concat(frames, how=self.how)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class WatermarkNode(PlanNode):
    """``with_watermark``: observes the largest event time of every batch of its input.

    Rows pass through unchanged; stateful operators downstream judge them late.
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

    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        lf = self.input.execute(inputs, ctx)
        if ctx.planning:
            return lf
        if self in ctx.results:
            return ctx.results[self]
        df = lf.collect()
        ctx.rows_per_input[self] = df.height
        if df.height:
            value = df.select(pl.col(self.column).dt.epoch("us").max()).item()
            ctx.max_event_us[self] = None if value is None else int(value)
        ctx.results[self] = df.lazy()
        return ctx.results[self]


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

    def context_for(self, ctx: BatchContext) -> BatchContext:
        """``ctx`` with the watermarks this operator judges by.

        Downstream of operators that emit rows older than the watermark (a join
        emits a pair when its later row arrives), lateness and eviction are judged
        that much later, as Spark's per-operator watermark propagation does.
        """
        delay = sum(n.output_delay_us() for n in self.walk()[:-1] if isinstance(n, StatefulNode))
        # An operator feeding another emits final rows only: append, whatever the query's mode.
        mode = "append" if self in ctx.chained else ctx.output_mode
        if not delay and mode == ctx.output_mode:
            return ctx
        return replace(
            ctx,
            late_watermark_us=_minus(ctx.late_watermark_us, delay),
            watermark_us=_minus(ctx.watermark_us, delay),
            output_mode=mode,
        )

    def execute(self, inputs: Mapping[ScanNode, pl.LazyFrame], ctx: BatchContext) -> pl.LazyFrame:
        if ctx.planning:
            self.input.execute(inputs, ctx)
            return pl.LazyFrame(schema=self.output_schema())
        if self not in ctx.results:
            lf = self.input.execute(inputs, ctx)
            out = ctx.operators[self].process(lf.collect(), self.context_for(ctx))
            ctx.results[self] = out.lazy()
        return ctx.results[self]


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

    inputs = {scan: probe(scan) for scan in scans}
    ctx = planning_context()
    try:
        parts = [plan.execute(inputs, ctx)]
        for node in plan.walk():
            if isinstance(node, StatefulNode):
                parts.extend(child.execute(inputs, ctx) for child in node.children())
            elif isinstance(node, WatermarkNode):
                parts.append(node.input.execute(inputs, ctx).select(node.column))
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


def declared_width(df: pl.DataFrame, schema: pl.Schema) -> pl.LazyFrame:
    """A source's batch as the plan sees it: every declared column, in order.

    A source told to read fewer columns (:func:`scan_projections`) returns
    only those. The plan still names the others (``rename``, ``drop``, ``cast``
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
    if df.width == len(schema):
        return df.lazy()
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in schema.items() if name not in df]
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
                "stream is split into batches. Aggregates over the whole stream need the "
                "stateful verbs group_by/group_by_dynamic, which this version does not have yet; "
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
