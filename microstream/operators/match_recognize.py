"""``match_recognize``: row pattern matching on a stream, ONE ROW PER MATCH.

The semantics are SQL:2016's ``MATCH_RECOGNIZE`` as Flink runs it on a stream:

1. Rows are partitioned by ``partition_by`` and ordered by the watermarked event-time
   column ``order_by`` (ties in arrival order). A row is buffered in the operator's
   state until the watermark passes it (``event time <= watermark``): then no earlier
   row can still arrive (it would be late), and it joins the partition's *final* rows.
   Rows that arrive behind the previous batch's watermark are late: dropped, counted
   and routed to the ``on_late`` side output, as every operator does.
2. Over the final rows, matches are found in order: from the partition's *cursor*
   (the first row that may start a match), the matcher (:mod:`.pattern`) looks for the
   preferred mapping of rows to variables (greedy, reluctant, alternation left first)
   whose DEFINE conditions hold. If a mapping preferred to the one found needs a row
   that has not arrived yet, the start is undecided and waits for more rows. A match
   is emitted as one row (the partition columns and the MEASURES) and the cursor moves
   as ``after_match`` says; a start with no match moves the cursor one row.
3. ``within`` bounds a match: its last row is less than ``within`` after its first.
   A start whose bound the watermark has passed is always decided, so rows older than
   ``watermark - within`` leave the state (the rows ``prev`` may still read excepted).

DEFINE conditions that read the current row and ``prev(...)`` only are evaluated
once per row with Polars, over every buffered row of the batch's partitions at once;
conditions that read the rows mapped so far (``first``, ``last``, aggregates of a
variable) are evaluated for each candidate mapping.

State: one store of rows (the partition columns, the columns DEFINE and MEASURES
read, the event time in microseconds, the arrival order and whether the row is
behind the cursor), one key per row, hashed on the partition columns.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.base import StoreBackedOperator
from microstream.operators.pattern import (
    NEED_MORE,
    NO_MATCH,
    Alternation,
    Concatenation,
    Found,
    PatternNode,
    Program,
    Quantified,
    check_pattern,
    compile_pattern,
    parse_pattern,
    variables,
)
from microstream.operators.pattern_refs import Reference, parse_reference, reference_values
from microstream.plan.nodes import (
    SINGLE_PARTITION,
    OperatorContext,
    PartitionKeys,
    PlanNode,
    StatefulNode,
    check_row_wise,
)
from microstream.state.store import StateStore
from microstream.time.duration import format_duration
from microstream.time.watermark import FLUSH_WATERMARK_US
from microstream.time.windows import to_us

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = ["AFTER_MATCH", "MatchRecognizeNode", "MatchRecognizeOperator", "MatchSpec"]

TIME, SEQ, DONE, GROUP = "__mr_t", "__mr_seq", "__mr_done", "__mr_g"
_COND = "__mr_cond_"

AFTER_MATCH = ("skip_past_last_row", "skip_to_next_row", "skip_to_first:", "skip_to_last:")
"""The ``after_match`` strategies; the last two name a variable: ``"skip_to_last:B"``."""


@dataclass(frozen=True)
class _Condition:
    """A variable's DEFINE: its expression, and the references that depend on the mapping."""

    expr: pl.Expr
    mapping_refs: tuple[Reference, ...]
    columns: tuple[str, ...]
    """Every column it reads: input columns and the row-local reference columns."""

    @property
    def row_local(self) -> bool:
        return not self.mapping_refs


@dataclass(frozen=True)
class MatchSpec:
    """A ``match_recognize`` call, checked and compiled: what the node and the operator need.

    Build it with :meth:`build`, which raises :class:`~microstream.PlanError` for
    anything the operator cannot run, naming the argument.
    """

    tree: PatternNode
    program: Program
    conditions: Mapping[int, _Condition]
    """DEFINE per variable index; a variable without DEFINE accepts every row."""
    row_local_refs: tuple[Reference, ...]
    """References of DEFINE computed as columns over the buffered rows."""
    measure_refs: tuple[Reference, ...]
    measure_columns: tuple[str, ...]
    state_columns: tuple[str, ...]
    max_prev: int
    output_schema: pl.Schema
    skip: str
    skip_variable: int | None
    reference_dtypes: Mapping[str, pl.DataType] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        schema: pl.Schema,
        partition_by: Sequence[str],
        order_by: str,
        pattern: str,
        define: Mapping[str, pl.Expr],
        measures: Mapping[str, pl.Expr],
        after_match: str,
    ) -> MatchSpec:
        """Check and compile a ``match_recognize`` call over input ``schema``."""
        tree = parse_pattern(pattern)
        check_pattern(tree, pattern)
        program = compile_pattern(tree)
        names = variables(tree)
        index = {name: i for i, name in enumerate(names)}
        unknown = [v for v in define if v not in index]
        if unknown:
            msg = f"define names {unknown}, which pattern {pattern!r} does not use (its variables: {list(names)})"
            raise PlanError(msg)
        clash = [m for m in measures if m in partition_by]
        if clash:
            msg = f"measures {clash} have the names of partition_by columns; rename them"
            raise PlanError(msg)

        references: dict[str, Reference] = {}

        def read(expr: Any, where: str) -> tuple[list[str], list[Reference]]:
            if not isinstance(expr, pl.Expr):
                msg = f"{where} must be a Polars expression; got {expr!r}"
                raise PlanError(msg)
            try:
                check_row_wise("match_recognize", [expr])
            except PlanError:
                msg = (
                    f"{where} ({expr}) reads other rows of the frame; DEFINE and MEASURES are "
                    "evaluated row by row: use ms.pattern.sum('A.price'), ms.pattern.prev('price'), "
                    "... for aggregates and navigation"
                )
                raise PlanError(msg) from None
            columns, refs = [], []
            for name in expr.meta.root_names():
                ref = parse_reference(name, names, schema, where)
                if ref is None:
                    columns.append(name)
                else:
                    refs.append(references.setdefault(ref.name, ref))
            return columns, refs

        conditions: dict[int, _Condition] = {}
        row_local: dict[str, Reference] = {}
        used: dict[str, None] = dict.fromkeys([*partition_by, order_by])
        for var, expr in define.items():
            columns, refs = read(expr, f"define[{var!r}]")
            local = [r for r in refs if r.row_local]
            row_local.update((r.name, r) for r in local)
            conditions[index[var]] = _Condition(
                expr=expr,
                mapping_refs=tuple(r for r in refs if not r.row_local),
                columns=tuple(dict.fromkeys([*columns, *(r.name for r in local)])),
            )
            used.update(dict.fromkeys(columns))
        measure_columns: dict[str, None] = {}
        measure_refs: dict[str, Reference] = {}
        for name, expr in measures.items():
            columns, refs = read(expr, f"measures[{name!r}]")
            measure_columns.update(dict.fromkeys(columns))
            measure_refs.update((r.name, r) for r in refs)
        used.update(measure_columns)
        used.update((r.column, None) for r in references.values() if r.column is not None)
        dtypes = {name: ref.dtype(schema) for name, ref in references.items()}
        planning = pl.DataFrame(schema={**schema, **dtypes})
        for var, expr in define.items():
            try:
                dtype = planning.select(expr).dtypes[0]
            except pl.exceptions.PolarsError as exc:
                msg = f"define[{var!r}] ({expr}) cannot be evaluated: {exc}"
                raise PlanError(msg) from exc
            if not isinstance(dtype, pl.Boolean | pl.Null):
                msg = f"define[{var!r}] must be a boolean condition; {expr} is {dtype}"
                raise PlanError(msg)
        try:
            measured = planning.select(
                *partition_by, *(expr.alias(name) for name, expr in measures.items())
            )
        except pl.exceptions.PolarsError as exc:
            msg = f"measures cannot be evaluated: {exc}"
            raise PlanError(msg) from exc
        skip, skip_variable = _after_match(after_match, index)
        prevs = [r.offset for r in references.values() if r.function == "prev"]
        return cls(
            tree=tree,
            program=program,
            conditions=conditions,
            row_local_refs=tuple(row_local.values()),
            measure_refs=tuple(measure_refs.values()),
            measure_columns=tuple(measure_columns),
            state_columns=tuple(c for c in schema if c in used),
            max_prev=max(prevs, default=0),
            output_schema=measured.schema,
            skip=skip,
            skip_variable=skip_variable,
            reference_dtypes=dtypes,
        )

    @property
    def memo(self) -> bool:
        """Whether every DEFINE depends on the row alone (the matcher may memoise)."""
        return all(c.row_local for c in self.conditions.values())

    def has_unbounded_quantifier(self) -> bool:
        def walk(node: PatternNode) -> bool:
            if isinstance(node, Quantified):
                return node.high is None or walk(node.node)
            if isinstance(node, Concatenation):
                return any(walk(child) for child in node.items)
            if isinstance(node, Alternation):
                return any(walk(child) for child in node.options)
            return False

        return walk(self.tree)


def _after_match(after_match: str, index: Mapping[str, int]) -> tuple[str, int | None]:
    if after_match in ("skip_past_last_row", "skip_to_next_row"):
        return after_match, None
    head, _, var = after_match.partition(":")
    if head in ("skip_to_first", "skip_to_last") and var:
        if var not in index:
            msg = f"after_match={after_match!r} names variable {var!r}, which the pattern does not use (its variables: {list(index)})"
            raise PlanError(msg)
        return head, index[var]
    msg = (
        "after_match must be 'skip_past_last_row', 'skip_to_next_row', "
        f"'skip_to_first:VAR' or 'skip_to_last:VAR'; got {after_match!r} instead"
    )
    raise PlanError(msg)


@dataclass(frozen=True, eq=False)
class MatchRecognizeNode(StatefulNode):
    input: PlanNode
    partition_by: tuple[str, ...]
    order_by: str
    pattern: str
    define: tuple[tuple[str, pl.Expr], ...]
    measures: tuple[tuple[str, pl.Expr], ...]
    after_match: str
    within_us: int | None
    input_schema: pl.Schema

    @cached_property
    def spec(self) -> MatchSpec:
        return MatchSpec.build(
            schema=self.input_schema,
            partition_by=self.partition_by,
            order_by=self.order_by,
            pattern=self.pattern,
            define=dict(self.define),
            measures=dict(self.measures),
            after_match=self.after_match,
        )

    def output_schema(self) -> pl.Schema:
        return self.spec.output_schema

    def describe(self) -> str:
        by = f"partition_by={list(self.partition_by)}, " if self.partition_by else ""
        within = f", within={format_duration(self.within_us)}" if self.within_us is not None else ""
        return (
            f"match_recognize({by}order_by={self.order_by!r}, pattern={str(self.spec.tree)!r}, "
            f"after_match={self.after_match!r}{within})"
        )

    def explain_lines(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        lines = [pad + self.describe()]
        for var, expr in self.define:
            how = (
                "per row, vectorised"
                if self.spec.conditions[self.spec.program.variables.index(var)].row_local
                else "per candidate mapping"
            )
            lines.append(f"{pad}  · define {var}: {expr} ({how})")
        lines += [f"{pad}  · measure {name}: {expr}" for name, expr in self.measures]
        bound = (
            "rows leave the state once the watermark passes them by within"
            if self.within_us is not None
            else "rows of an open match stay until it completes or fails (no within)"
        )
        return [*lines, f"{pad}  · {bound}", *self.input.explain_lines(depth + 1)]

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        return (self.partition_by,) if self.partition_by else (SINGLE_PARTITION,)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "match_recognize",
            "partition_by": list(self.partition_by),
            "order_by": self.order_by,
            "pattern": str(self.spec.tree),
            "define": {var: str(expr) for var, expr in self.define},
            "measures": {name: str(expr) for name, expr in self.measures},
            "after_match": self.after_match,
            "within_us": self.within_us,
        }

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode != "append":
            msg = (
                f"match_recognize emits each match once, when it is decided: use "
                f"output_mode='append' (got {output_mode!r})"
            )
            raise PlanError(msg)

    def unbounded_state(self, output_mode: str) -> str | None:
        if self.within_us is None and self.spec.has_unbounded_quantifier():
            return (
                f"{self.describe()} keeps the rows of a match that can still grow for as long "
                "as its unbounded quantifier keeps accepting rows; give within='1h' to bound a "
                "match"
            )
        if self.spec.max_prev and self.partition_by:
            # PREV reads the partition's previous rows, however old: they stay per key.
            return (
                f"{self.describe()} keeps the last {self.spec.max_prev} row(s) of every "
                "partition key it has seen, for prev(...) to read; partition by keys that "
                "take a bounded number of values, or compare with first(...) of the match"
            )
        return None

    def build_operator(self, operator_id: str, storage: Storage) -> MatchRecognizeOperator:
        return MatchRecognizeOperator(self, operator_id, storage)


class MatchRecognizeOperator(StoreBackedOperator):
    """Runtime of :class:`MatchRecognizeNode` (see the module's docstring)."""

    def __init__(self, node: MatchRecognizeNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.kind = "match_recognize"
        self.spec = node.spec
        self.keys = list(node.partition_by) or [GROUP]
        columns = {c: node.input_schema[c] for c in self.spec.state_columns}
        if not node.partition_by:
            columns[GROUP] = pl.Int8()
        schema = pl.Schema({**columns, TIME: pl.Int64(), SEQ: pl.Int64(), DONE: pl.Boolean()})
        self.store = StateStore(
            storage.sub("rows"),
            operator=f"{operator_id}/rows",
            key_columns=[*self.keys, SEQ],
            hash_columns=self.keys,
            schema=schema,
            one_row_per_key=True,
        )
        self._index = {name: i for i, name in enumerate(self.spec.program.variables)}

    def _stores(self) -> list[StateStore]:
        return [self.store]

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        (batch,) = inputs
        self._dropped_late = self._updated = self._removed = self._dropped_null_time = 0
        node = self.node
        time_dtype = node.input_schema[node.order_by]
        seq = pl.int_range(pl.len(), dtype=pl.Int64) + ctx.batch_id * (1 << 31)
        df = batch.with_columns(to_us(node.order_by).alias(TIME), seq.alias(SEQ))
        df = self._drop_null_times(df, TIME, ctx, batch.columns, time_dtype, "cannot be ordered")
        late = pl.col(TIME) <= ctx.late_watermark_us
        df = self._drop_late(df, late, ctx, batch.columns, time_dtype)
        if df.height:
            if not node.partition_by:
                df = df.with_columns(pl.lit(0, pl.Int8).alias(GROUP))
            self.store.insert(
                df.with_columns(pl.lit(False).alias(DONE)).select(self.store.schema.names())
            )
            self._updated = df.height
        return self._match(ctx.watermark_us)

    def _match(self, watermark: int) -> pl.DataFrame:
        state = self.store.frame
        ready = state.filter((pl.col(TIME) <= watermark) & ~pl.col(DONE)).select(self.keys)
        if ready.height == 0:
            return pl.DataFrame(schema=self.spec.output_schema)
        work = (
            state.join(ready.unique(), on=self.keys, how="semi", nulls_equal=True)
            .sort(TIME, SEQ)
            .with_columns(
                _row_local(ref, self.keys).alias(ref.name) for ref in self.spec.row_local_refs
            )
            .with_columns(
                cond.expr.fill_null(False).alias(f"{_COND}{var}")
                for var, cond in self.spec.conditions.items()
                if cond.row_local
            )
        )
        found: list[tuple[dict[str, list[Any]], list[Found]]] = []
        evicted: list[pl.DataFrame] = []
        marked: list[pl.DataFrame] = []
        for part in work.partition_by(self.keys, maintain_order=True):
            matches, cursor = self._match_partition(part, watermark)
            keep_from = max(cursor - self.spec.max_prev, 0)
            if keep_from:
                evicted.append(part.slice(0, keep_from).select(*self.keys, SEQ))
            newly_done = part.slice(keep_from, cursor - keep_from).filter(~pl.col(DONE))
            if newly_done.height:
                marked.append(newly_done.select(self.store.schema.names()))
            if matches:
                found.append((self._columns(part), matches))
        upserts = pl.concat(marked).with_columns(pl.lit(True).alias(DONE)) if marked else None
        deletes = pl.concat(evicted) if evicted else None
        self.store.apply(upserts=upserts, deletes=deletes)
        self._removed = deletes.height if deletes is not None else 0
        return self._measures(found)

    def _match_partition(self, part: pl.DataFrame, watermark: int) -> tuple[list[Found], int]:
        """The matches decided in one partition (rows in event-time order), and the new cursor."""
        spec, within = self.spec, self.node.within_us
        times: list[int] = part.get_column(TIME).to_list()
        available = bisect.bisect_right(times, watermark)
        cursor = int(part.get_column(DONE).sum())
        conditions = spec.conditions
        local: dict[int, list[bool]] = {
            var: part.get_column(f"{_COND}{var}").to_list()
            for var, cond in conditions.items()
            if cond.row_local
        }
        evaluate = _MappingConditions(self, part) if not spec.memo else None
        matches: list[Found] = []
        start = cursor
        while start < available:
            origin = times[start]

            def accept(var: int, row: int, labels: list[int], start: int = start) -> bool:
                cond = local.get(var)
                if cond is not None:
                    return cond[row]
                if var not in conditions:
                    return True
                assert evaluate is not None
                return evaluate(var, start, row, labels)

            def fits(row: int, origin: int = origin) -> bool:
                return within is None or times[row] - origin < within

            more = watermark != FLUSH_WATERMARK_US and (
                within is None or origin + within > watermark + 1
            )
            outcome = spec.program.match(
                start, available, accept, fits=fits, more_may_come=more, memo=spec.memo
            )
            if outcome == NEED_MORE:
                break
            if outcome == NO_MATCH:
                start += 1
                continue
            assert isinstance(outcome, Found)
            matches.append(outcome)
            start = self._next_start(outcome)
        return matches, start

    def _next_start(self, match: Found) -> int:
        skip, var = self.spec.skip, self.spec.skip_variable
        if skip == "skip_past_last_row":
            return match.end
        if skip == "skip_to_next_row" or var not in match.labels:
            return match.start + 1
        labels = match.labels
        at = (
            labels.index(var)
            if skip == "skip_to_first"
            else len(labels) - 1 - labels[::-1].index(var)
        )
        # SQL:2016 makes skipping to the match's own first row an error; a stream
        # cannot stop for it, so such a match continues at the next row instead.
        return match.start + at if at > 0 else match.start + 1

    def _columns(self, part: pl.DataFrame) -> dict[str, list[Any]]:
        return {c: part.get_column(c).to_list() for c in part.columns}

    def _measures(self, found: list[tuple[dict[str, list[Any]], list[Found]]]) -> pl.DataFrame:
        spec = self.spec
        if not found:
            return pl.DataFrame(schema=spec.output_schema)
        refs = spec.measure_refs
        names = [*self.keys, *(c for c in spec.measure_columns if c not in self.keys)]
        columns: dict[str, list[Any]] = {
            c: [] for c in [*names, *(r.name for r in refs), TIME, SEQ]
        }
        for data, matches in found:
            for match in matches:
                last = match.end - 1
                for c in names:
                    columns[c].append(data[c][last])
                values = reference_values(refs, data, match.start, match.labels, self._index)
                for ref, value in zip(refs, values, strict=True):
                    columns[ref.name].append(value)
                columns[TIME].append(data[TIME][match.start])
                columns[SEQ].append(data[SEQ][match.start])
        schema = {**self.store.schema, **spec.reference_dtypes}
        frame = pl.DataFrame(columns, schema={c: schema[c] for c in columns})
        out = frame.sort(TIME, SEQ).select(
            *self.node.partition_by, *(expr.alias(name) for name, expr in self.node.measures)
        )
        return out.cast(dict(spec.output_schema))  # type: ignore[arg-type]


def _row_local(ref: Reference, keys: list[str]) -> pl.Expr:
    assert ref.column is not None
    if ref.function == "last":
        return pl.col(ref.column)
    return pl.col(ref.column).shift(ref.offset).over(keys)


class _MappingConditions:
    """DEFINE conditions that read the rows mapped so far, evaluated per candidate
    mapping over a one-row frame (results cached by row and reference values)."""

    def __init__(self, operator: MatchRecognizeOperator, part: pl.DataFrame):
        self.spec = operator.spec
        self.index = operator._index
        self.data = operator._columns(part)
        self.schema = {**part.schema, **self.spec.reference_dtypes}
        self.cache: dict[tuple[Any, ...], bool] = {}

    def __call__(self, var: int, start: int, row: int, labels: list[int]) -> bool:
        cond = self.spec.conditions[var]
        values = reference_values(cond.mapping_refs, self.data, start, labels, self.index)
        key = (var, row, *values)
        try:
            cached = self.cache.get(key)
        except TypeError:  # an unhashable value (a list column): evaluate every time
            cached, key = None, ()
        if cached is not None:
            return cached
        row_values: dict[str, list[Any]] = {c: [self.data[c][row]] for c in cond.columns}
        row_values.update((r.name, [v]) for r, v in zip(cond.mapping_refs, values, strict=True))
        frame = pl.DataFrame(row_values, schema={c: self.schema[c] for c in row_values})
        result = bool(frame.select(cond.expr.fill_null(False)).item())
        if key:
            self.cache[key] = result
        return result
