"""Finding the decided matches of ``match_recognize`` in buffered rows, and their output.

:class:`MatchFinder` is the matching half of the operator, without its state store:
given the buffered rows (input columns, event time ``__mr_t``, arrival ``__mr_seq``,
``__mr_done`` for rows behind a partition's cursor) and the watermark, it finds in
each partition with rows the watermark passed the matches that are decided (see
:mod:`microstream.operators.match_recognize` for the semantics), says which rows
the cursor passed and which may leave the state, and builds the output:

- ONE ROW PER MATCH (``rows_per_match="one"``): the partition columns and the
  MEASURES with *final* semantics (every row of the match; a plain column is its
  last row);
- ALL ROWS PER MATCH (``"all"``): one row per row of the match, in order: the
  partition columns, the ``order_by`` column, the MEASURES with *running* semantics
  (the rows of the match up to that row; a plain column is that row), then the other
  input columns, as SQL:2016 orders them. Overlapping matches (``skip_to_next_row``)
  repeat rows, one copy per match.

``classifier()`` is the variable of the current row (the match's last row with ONE
ROW PER MATCH); ``match_number()`` numbers the matches of a partition from 1, from
counts the caller keeps. ``next(col, n)`` in DEFINE reads the row ``n`` after the one
tried, so a row is tried only once ``n`` final rows follow it (or at a flush, where
there is none: null).

The same finder over every row at once with the flush watermark is the batch
result (:func:`match_static`): ``MATCH_RECOGNIZE`` over static frames.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import polars as pl

from microstream.operators.match_spec import MatchSpec
from microstream.operators.pattern import NEED_MORE, NO_MATCH, Found
from microstream.operators.pattern_refs import Reference, reference_values
from microstream.time.watermark import FLUSH_WATERMARK_US
from microstream.time.windows import to_us

__all__ = ["DONE", "GROUP", "NUMBER", "SEQ", "TIME", "Decided", "MatchFinder", "match_static"]

TIME, SEQ, DONE, GROUP = "__mr_t", "__mr_seq", "__mr_done", "__mr_g"
NUMBER = "__mr_n"
"""The count of a partition's matches so far (the state of ``match_number()``)."""
_COND = "__mr_cond_"


class MatchNode(Protocol):
    """What the finder reads of a ``match_recognize`` plan node."""

    @property
    def spec(self) -> MatchSpec: ...
    @property
    def partition_by(self) -> tuple[str, ...]: ...
    @property
    def order_by(self) -> str: ...
    @property
    def measures(self) -> tuple[tuple[str, pl.Expr], ...]: ...
    @property
    def within_us(self) -> int | None: ...
    @property
    def input_schema(self) -> pl.Schema: ...


Counts = Callable[[pl.DataFrame], pl.DataFrame]
"""The matches counted so far for some partitions: keys in, keys and ``__mr_n`` out."""


@dataclass(frozen=True)
class Decided:
    """What one call of :meth:`MatchFinder.run` decided."""

    output: pl.DataFrame
    done: pl.DataFrame | None
    """Rows the cursor passed this time (the state's columns), to mark done."""
    evicted: pl.DataFrame | None
    """Keys and ``__mr_seq`` of rows no match or ``prev`` can read again."""
    counts: pl.DataFrame | None
    """Keys and ``__mr_n`` of the partitions that found matches (``match_number()``)."""


class MatchFinder:
    """The decided matches of a :class:`MatchNode`'s buffered rows."""

    def __init__(self, node: MatchNode, keys: list[str]):
        self.node = node
        self.spec: MatchSpec = node.spec
        self.keys = keys
        self.index = {name: i for i, name in enumerate(self.spec.program.variables)}

    def run(self, state: pl.DataFrame, watermark: int, counts: Counts | None) -> Decided:
        """Match every partition of ``state`` with rows the watermark passed."""
        spec = self.spec
        ready = state.filter((pl.col(TIME) <= watermark) & ~pl.col(DONE)).select(self.keys)
        if ready.height == 0:
            return Decided(pl.DataFrame(schema=spec.output_schema), None, None, None)
        work = (
            state.join(ready.unique(), on=self.keys, how="semi", nulls_equal=True)
            .sort(TIME, SEQ)
            .with_columns(_row_local(ref, self.keys).alias(ref.name) for ref in spec.row_local_refs)
            .with_columns(
                cond.expr.fill_null(False).alias(f"{_COND}{var}")
                for var, cond in spec.conditions.items()
                if cond.row_local
            )
        )
        found: list[tuple[dict[str, list[Any]], list[Found], int]] = []
        evicted: list[pl.DataFrame] = []
        marked: list[pl.DataFrame] = []
        parts = work.partition_by(self.keys, maintain_order=True)
        before: dict[tuple[Any, ...], int] = {}
        if counts is not None:
            known = counts(ready.unique())
            before = {row[:-1]: row[-1] for row in known.select(*self.keys, NUMBER).iter_rows()}
        numbered: list[tuple[Any, ...]] = []
        for part in parts:
            matches, cursor = self._match_partition(part, watermark)
            keep_from = max(cursor - spec.max_prev, 0)
            if keep_from:
                evicted.append(part.slice(0, keep_from).select(*self.keys, SEQ))
            newly_done = part.slice(keep_from, cursor - keep_from).filter(~pl.col(DONE))
            if newly_done.height:
                marked.append(newly_done)
            if matches:
                key = part.select(self.keys).row(0)
                first = before.get(key, 0)
                found.append((_columns(part), matches, first))
                numbered.append((*key, first + len(matches)))
        done = pl.concat(marked) if marked else None
        gone = pl.concat(evicted) if evicted else None
        totals = None
        if counts is not None and numbered:
            schema = {**{k: state.schema[k] for k in self.keys}, NUMBER: pl.Int64()}
            totals = pl.DataFrame(numbered, schema=schema, orient="row")
        return Decided(self._measures(found), done, gone, totals)

    def _match_partition(self, part: pl.DataFrame, watermark: int) -> tuple[list[Found], int]:
        """The matches decided in one partition (rows in event-time order), and the new cursor."""
        spec, within = self.spec, self.node.within_us
        times: list[int] = part.get_column(TIME).to_list()
        final = bisect.bisect_right(times, watermark)
        flushing = watermark == FLUSH_WATERMARK_US
        # next(col, n) of a row reads n rows after it: tried once they are final.
        available = final if flushing else max(final - spec.max_next, 0)
        held_back = available < final
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

            more = not flushing and (within is None or origin + within > watermark + 1 or held_back)
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

    def _measures(self, found: list[tuple[dict[str, list[Any]], list[Found], int]]) -> pl.DataFrame:
        spec, node = self.spec, self.node
        if not found:
            return pl.DataFrame(schema=spec.output_schema)
        refs = spec.measure_refs
        every = spec.rows_per_match == "all"
        read = list(spec.state_columns) if every else list(spec.measure_columns)
        names = [*self.keys, *(c for c in read if c not in self.keys)]
        columns: dict[str, list[Any]] = {
            c: [] for c in dict.fromkeys([*names, *(r.name for r in refs), TIME, SEQ, "__mr_i"])
        }
        for data, matches, first in found:
            for number, match in enumerate(matches, start=first + 1):
                # ONE ROW PER MATCH: the match's last row, final values; ALL ROWS: each
                # row, running values (the rows up to it)
                ends = range(match.start, match.end) if every else [match.end - 1]
                for at in ends:
                    labels = match.labels[: at - match.start + 1]
                    for c in names:
                        columns[c].append(data[c][at])
                    values = reference_values(refs, data, match.start, labels, self.index, number)
                    for ref, value in zip(refs, values, strict=True):
                        columns[ref.name].append(value)
                    columns[TIME].append(data[TIME][match.start])
                    columns[SEQ].append(data[SEQ][match.start])
                    columns["__mr_i"].append(at)
        schema = {**node.input_schema, **spec.reference_dtypes}
        schema.update({TIME: pl.Int64(), SEQ: pl.Int64(), "__mr_i": pl.Int64(), GROUP: pl.Int8()})
        frame = pl.DataFrame(columns, schema={c: schema[c] for c in columns})
        measures = [expr.alias(name) for name, expr in node.measures]
        if every:
            rest = [c for c in node.input_schema if c not in (*node.partition_by, node.order_by)]
            selected = [*node.partition_by, node.order_by, *measures, *rest]
        else:
            selected = [*node.partition_by, *measures]
        out = frame.sort(TIME, SEQ, "__mr_i").select(selected)
        return out.cast(dict(spec.output_schema))  # type: ignore[arg-type]


def match_static(node: MatchNode, frame: pl.DataFrame) -> pl.DataFrame:
    """Every match in ``frame`` at once: the batch result of the node over static rows.

    Rows with a null ``order_by`` cannot be ordered and are left out, as the stream
    drops them; rows with equal times keep the frame's order (the stream's arrival).
    """
    keys = list(node.partition_by) or [GROUP]
    rows = frame.with_columns(
        to_us(node.order_by).alias(TIME),
        pl.int_range(pl.len(), dtype=pl.Int64).alias(SEQ),
        pl.lit(False).alias(DONE),
    ).filter(pl.col(TIME).is_not_null())
    if not node.partition_by:
        rows = rows.with_columns(pl.lit(0, pl.Int8).alias(GROUP))
    finder = MatchFinder(node, keys)
    numbers = finder.spec.numbers_matches
    decided = finder.run(rows, FLUSH_WATERMARK_US, _no_counts(keys) if numbers else None)
    return decided.output


def _no_counts(keys: list[str]) -> Counts:
    def counts(ready: pl.DataFrame) -> pl.DataFrame:
        return ready.select(keys).with_columns(pl.lit(0, pl.Int64).alias(NUMBER)).clear()

    return counts


def _columns(part: pl.DataFrame) -> dict[str, list[Any]]:
    return {c: part.get_column(c).to_list() for c in part.columns}


def _row_local(ref: Reference, keys: list[str]) -> pl.Expr:
    assert ref.column is not None
    if ref.function == "last":
        return pl.col(ref.column)
    shift = -ref.offset if ref.function == "next" else ref.offset
    return pl.col(ref.column).shift(shift).over(keys)


class _MappingConditions:
    """DEFINE conditions that read the rows mapped so far, evaluated per candidate
    mapping over a one-row frame (results cached by row and reference values)."""

    def __init__(self, finder: MatchFinder, part: pl.DataFrame):
        self.spec = finder.spec
        self.index = finder.index
        self.data = _columns(part)
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
