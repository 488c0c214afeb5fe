"""``StreamFrame.match_recognize``: the verb (a mixin of :class:`~microstream.api.frame.StreamFrame`).

The operator and its semantics are in :mod:`microstream.operators.match_recognize`;
the helpers DEFINE and MEASURES use are :mod:`microstream.api.pattern`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.match_finder import match_static
from microstream.operators.match_recognize import MatchRecognizeNode
from microstream.operators.match_spec import MatchSpec
from microstream.plan.nodes import PlanNode
from microstream.time.duration import parse_duration

__all__ = ["PatternVerbs", "match_recognize_static"]

Frame = TypeVar("Frame", bound="PatternVerbs")


class PatternVerbs:
    """The ``match_recognize`` verb (a mixin: the frame keeps its plan in ``_plan`` and
    its schema in ``_schema``)."""

    _plan: PlanNode
    _schema: pl.Schema

    def _from_plan(self: Frame, plan: PlanNode) -> Frame:
        return type(self)(plan)  # type: ignore[call-arg]

    def match_recognize(
        self: Frame,
        *,
        partition_by: str | Sequence[str] | None = None,
        order_by: str,
        pattern: str,
        define: Mapping[str, pl.Expr] | None = None,
        measures: Mapping[str, pl.Expr],
        after_match: str = "skip_past_last_row",
        within: str | timedelta | None = None,
        rows_per_match: str = "one",
    ) -> Frame:
        """Find row patterns: SQL's ``MATCH_RECOGNIZE``.

        Rows of each ``partition_by`` key are taken in ``order_by`` (event-time) order
        once the watermark passes them; a match is a run of consecutive rows that
        ``pattern`` maps to variables whose ``define`` conditions hold; each match
        emits one row (the partition columns and the ``measures``), or with
        ``rows_per_match="all"`` one row per row of the match.

        Parameters
        ----------
        partition_by
            Columns whose rows are matched apart (none: the whole stream is one partition).
        order_by
            The event-time column; ``with_watermark`` must be set on it upstream.
        pattern
            Variables with quantifiers ``*``, ``+``, ``?``, ``{n}``, ``{n,}``, ``{n,m}``
            (greedy; reluctant with a trailing ``?``), alternation ``|`` and groups
            ``( )``, e.g. ``"A B+? (C | D)"``. A pattern that can match no rows is refused.
        define
            Per variable, a boolean Polars expression a row must satisfy to be mapped to
            it (null is false); a variable without one accepts any row. Plain columns are
            the current row; ``ms.pattern.first/last/prev/count/sum/avg/min/max`` read
            the rows mapped so far (``ms.pattern.first("A.price")``), and
            ``ms.pattern.next("price", n)`` the row ``n`` after the current one (the
            row is tried once that row is final; null at the end of the input).
        measures
            Output column name to Polars expression, evaluated once per match: plain
            columns are the match's last row; the ``ms.pattern`` helpers see all its rows;
            ``ms.pattern.classifier()`` is the variable of the (last) row and
            ``ms.pattern.match_number()`` the match's number in its partition, from 1.
        after_match
            Where the next match may start: ``"skip_past_last_row"`` (after the match,
            the default), ``"skip_to_next_row"`` (the row after the match's first),
            ``"skip_to_first:B"`` / ``"skip_to_last:B"`` (the first / last row mapped to
            ``B``; when that is the match's first row, or ``B`` has no row, the row
            after the match's first).
        within
            A bound on a match: its last row is less than ``within`` after its first
            (Flink's ``WITHIN``). It also bounds the state: a partial match older than
            the watermark by ``within`` is dropped.
        rows_per_match
            ``"one"`` (SQL's ONE ROW PER MATCH, the default) or ``"all"`` (ALL ROWS PER
            MATCH): one row per row of the match, with the partition columns, the
            ``order_by`` column, the measures evaluated over the match's rows up to that
            row (*running*: a plain column is that row), then the other input columns.

        Returns
        -------
        StreamFrame
            The partition columns and the measures, one row per match (or per matched
            row), emitted once the match is decided (append mode only).

        Examples
        --------
        Three failed logins within a minute, then a success:

        >>> from datetime import datetime, timedelta
        >>> import polars as pl
        >>> import microstream as ms
        >>> logins = ms.MemoryStream({"ts": pl.Datetime("us"), "user": pl.String, "ok": pl.Boolean})
        >>> suspicious = (
        ...     logins.lazy()
        ...     .with_watermark("ts", "10s")
        ...     .match_recognize(
        ...         partition_by="user",
        ...         order_by="ts",
        ...         pattern="F{3,} S",
        ...         define={"F": ~pl.col("ok"), "S": pl.col("ok")},
        ...         measures={
        ...             "first_fail": ms.pattern.first("F.ts"),
        ...             "fails": ms.pattern.count("F"),
        ...             "success": ms.pattern.last("S.ts"),
        ...         },
        ...         within="1m",
        ...     )
        ... )
        >>> query = suspicious.sink_memory("doc_suspicious")
        >>> t0 = datetime(2024, 1, 1)
        >>> _ = logins.add_data({
        ...     "ts": [t0 + timedelta(seconds=s) for s in (0, 5, 9, 12, 20, 90)],
        ...     "user": ["ann", "ann", "ann", "ann", "bob", "ann"],
        ...     "ok": [False, False, False, True, True, True],
        ... })
        >>> query.process_all_available()
        >>> ms.table("doc_suspicious").rows()
        [('ann', datetime.datetime(2024, 1, 1, 0, 0), 3, datetime.datetime(2024, 1, 1, 0, 0, 12))]
        >>> query.stop()
        """
        columns = [partition_by] if isinstance(partition_by, str) else list(partition_by or [])
        missing = [c for c in [*columns, order_by] if c not in self._schema]
        if missing:
            msg = f"match_recognize: no column(s) {missing}; columns are {list(self._schema)}"
            raise PlanError(msg)
        if not any(n.column == order_by for n in self._plan.watermark_nodes()):
            msg = (
                f"match_recognize(order_by={order_by!r}) needs with_watermark({order_by!r}, "
                "delay) upstream: rows are matched in event-time order once the watermark "
                "passes them"
            )
            raise PlanError(msg)
        node = MatchRecognizeNode(
            input=self._plan,
            partition_by=tuple(columns),
            order_by=order_by,
            pattern=pattern,
            define=tuple((define or {}).items()),
            measures=tuple(measures.items()),
            after_match=after_match,
            within_us=_within_us(within),
            input_schema=self._schema,
            rows_per_match=rows_per_match,
        )
        _ = node.spec  # checks the call now, not when the query starts
        return self._from_plan(node)


def _within_us(within: str | timedelta | None) -> int | None:
    if within is None:
        return None
    within_us = parse_duration(within, name="within") // timedelta(microseconds=1)
    if within_us <= 0:
        msg = f"match_recognize(within={within!r}) must be a positive duration"
        raise PlanError(msg)
    return within_us


@dataclass(frozen=True)
class _StaticMatch:
    """A ``match_recognize`` call over static rows (what the matcher reads of a node)."""

    spec: MatchSpec
    partition_by: tuple[str, ...]
    order_by: str
    measures: tuple[tuple[str, pl.Expr], ...]
    within_us: int | None
    input_schema: pl.Schema


def match_recognize_static(
    frame: pl.LazyFrame,
    *,
    partition_by: str | Sequence[str] | None = None,
    order_by: str,
    pattern: str,
    define: Mapping[str, pl.Expr] | None = None,
    measures: Mapping[str, pl.Expr],
    after_match: str = "skip_past_last_row",
    within: str | timedelta | None = None,
    rows_per_match: str = "one",
) -> pl.LazyFrame:
    """``match_recognize`` over a static frame: every match of all its rows at once.

    The batch result of :meth:`StreamFrame.match_recognize` with the same arguments:
    the stream's output once every row is final equals this over its rows (minus the
    rows the stream dropped as late). Rows are ordered by ``order_by`` (ties in the
    frame's order); rows with a null ``order_by`` are left out, as the stream drops
    them.

    Examples
    --------
    >>> import polars as pl
    >>> from microstream import pattern as mp
    >>> rows = pl.LazyFrame({"t": [1, 2, 3, 4], "v": [5, 1, 2, 0]}).with_columns(
    ...     pl.from_epoch("t")
    ... )
    >>> out = match_recognize_static(
    ...     rows,
    ...     order_by="t",
    ...     pattern="A B+",
    ...     define={"B": pl.col("v") < mp.prev("v")},
    ...     measures={"top": mp.first("A.v"), "n": mp.count("B")},
    ... )
    >>> out.collect().rows()
    [(5, 1), (2, 1)]
    """
    schema = frame.collect_schema()
    columns = [partition_by] if isinstance(partition_by, str) else list(partition_by or [])
    missing = [c for c in [*columns, order_by] if c not in schema]
    if missing:
        msg = f"match_recognize: no column(s) {missing}; columns are {list(schema)}"
        raise PlanError(msg)
    spec = MatchSpec.build(
        schema=schema,
        partition_by=columns,
        order_by=order_by,
        pattern=pattern,
        define=dict(define or {}),
        measures=dict(measures),
        after_match=after_match,
        rows_per_match=rows_per_match,
    )
    call = _StaticMatch(
        spec=spec,
        partition_by=tuple(columns),
        order_by=order_by,
        measures=tuple(measures.items()),
        within_us=_within_us(within),
        input_schema=schema,
    )
    return frame.map_batches(lambda df: match_static(call, df), schema=spec.output_schema)
