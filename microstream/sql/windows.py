"""Windows in SQL: the window TVFs and the legacy group windows, onto the window verbs.

Flink writes a window two ways, and both land on the same operators:

- ``FROM TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), size))`` (``HOP(..., slide, size)``,
  ``SESSION(TABLE t PARTITION BY k, DESCRIPTOR(ts), gap)``) adds ``window_start``,
  ``window_end`` and ``window_time``; ``GROUP BY window_start, window_end, k``
  aggregates per window;
- ``GROUP BY TUMBLE(ts, size), k`` (``HOP(ts, slide, size)``, ``SESSION(ts, gap)``)
  with ``TUMBLE_START(ts, size)``, ``TUMBLE_END``, ``TUMBLE_ROWTIME`` (and ``HOP_``,
  ``SESSION_``) in the SELECT list.

On a stream, tumbling and hopping windows are ``group_by_dynamic(ts, every=slide,
period=size, group_by=k)`` and sessions ``group_by_session(ts, gap=gap, group_by=k)``;
over static frames (the batch oracle) the same windows are assigned row by row and
grouped with Polars. ``window_time`` is ``window_end`` minus one unit of the time
column (Flink's ``TIMESTAMP(3)``: one millisecond).

``CUMULATE(TABLE t, DESCRIPTOR(ts), step, size)`` (windows ``[s, s + step)``,
``[s, s + 2 step)``, ... ``[s, s + size)`` for every ``s`` a multiple of ``size``) is
``group_by_dynamic(ts, every=step, period=size, cumulative=True, group_by=k)`` on a
stream: each window is emitted when the watermark passes its own end, as in Flink;
``window_start`` is the time column (the start) and ``window_end`` ``_upper_boundary``. Over
static frames each row is repeated for the windows that hold it and grouped by
``window_start`` and ``window_end``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import polars as pl
from sqlglot import exp

from microstream.api.frame import StreamFrame
from microstream.plan.event_time import trace_event_time
from microstream.plan.nodes import PlanNode
from microstream.plan.processing_time import ProcessingTimeNode
from microstream.sql.dialect import Descriptor, TableArgument
from microstream.sql.expressions import interval_of, sql_text
from microstream.sql.refusals import refuse

__all__ = [
    "LEGACY_PARTS",
    "Window",
    "calendar_window",
    "legacy_window",
    "tvf_window",
    "window_aggregate",
]

Frame = StreamFrame | pl.LazyFrame

WINDOW_COLUMNS = ("window_start", "window_end", "window_time")

LEGACY_PARTS = {
    f"{kind}_{part}": (kind, part)
    for kind in ("TUMBLE", "HOP", "SESSION")
    for part in ("START", "END", "ROWTIME")
}
"""``TUMBLE_START`` -> (``"TUMBLE"``, ``"START"``), and so on."""


@dataclass(frozen=True)
class Window:
    """A window of a query: its kind, event-time column and sizes."""

    kind: Literal["TUMBLE", "HOP", "SESSION", "CUMULATE"]
    column: str
    size: timedelta | None = None  # TUMBLE, HOP; CUMULATE's max size
    slide: timedelta | None = None  # HOP (TUMBLE: = size); CUMULATE's step
    gap: timedelta | None = None  # SESSION
    partition_by: tuple[str, ...] = ()  # SESSION's PARTITION BY (frame columns)


def _check_hop(node: exp.Expr, slide: timedelta, size: timedelta) -> None:
    if slide <= timedelta(0) or size % slide != timedelta(0):
        raise refuse(
            node,
            f"HOP with slide {slide} and size {size}",
            reason="the size must be a whole multiple of the slide (as Flink requires)",
        )


def tvf_window(call: exp.Anonymous, column_of: dict[str, str]) -> tuple[str, Window]:
    """The table a window TVF call reads and its window (``column_of``: name -> frame column)."""
    kind = call.name.upper()
    args = call.expressions
    if not args or not isinstance(args[0], TableArgument):
        raise refuse(call, f"{kind}(...) without TABLE t as its first argument")
    table_arg = args[0]
    if len(args) < 3 or not isinstance(args[1], Descriptor) or len(args[1].expressions) != 1:
        raise refuse(call, f"{kind}(...) without DESCRIPTOR(time_column) as its second argument")
    time_name = args[1].expressions[0].name

    def column(name: str, node: exp.Expr) -> str:
        for key, value in column_of.items():
            if key.lower() == name.lower():
                return value
        raise refuse(node, f"{kind} on column {name}", reason="the table has no such column")

    time_column = column(time_name, args[1])
    partition = tuple(
        column(c.name, c) for c in (table_arg.args.get("partition_by") or []) if c is not None
    )
    if partition and kind != "SESSION":
        raise refuse(
            table_arg, f"{kind}(TABLE t PARTITION BY ...)", alternative="GROUP BY the keys"
        )
    table = table_arg.this.name
    if kind == "TUMBLE" and len(args) == 3:
        size = interval_of(args[2])
        return table, Window("TUMBLE", time_column, size=size, slide=size)
    if kind == "HOP" and len(args) == 4:
        slide, size = interval_of(args[2]), interval_of(args[3])
        _check_hop(call, slide, size)
        return table, Window("HOP", time_column, size=size, slide=slide)
    if kind == "SESSION" and len(args) == 3:
        return table, Window(
            "SESSION", time_column, gap=interval_of(args[2]), partition_by=partition
        )
    if kind == "CUMULATE" and len(args) == 4:
        step, size = interval_of(args[2]), interval_of(args[3])
        if step <= timedelta(0) or size % step != timedelta(0):
            raise refuse(
                call,
                f"CUMULATE with step {step} and max size {size}",
                reason="the max size must be a whole multiple of the step (as Flink requires)",
            )
        return table, Window("CUMULATE", time_column, size=size, slide=step)
    raise refuse(call, f"{sql_text(call)}", reason=f"{kind} takes other arguments")


def legacy_window(call: exp.Anonymous, time_column: str) -> Window:
    """The window of ``GROUP BY TUMBLE(ts, size)`` / ``HOP(ts, slide, size)`` / ``SESSION(ts, gap)``."""
    kind = call.name.upper()
    args = call.expressions
    if kind == "TUMBLE" and len(args) == 2:
        size = interval_of(args[1])
        return Window("TUMBLE", time_column, size=size, slide=size)
    if kind == "HOP" and len(args) == 3:
        slide, size = interval_of(args[1]), interval_of(args[2])
        _check_hop(call, slide, size)
        return Window("HOP", time_column, size=size, slide=slide)
    if kind == "SESSION" and len(args) == 2:
        return Window("SESSION", time_column, gap=interval_of(args[1]))
    if kind == "CUMULATE":
        raise refuse(
            call,
            "GROUP BY CUMULATE(...)",
            reason="Flink has no CUMULATE group window",
            alternative="FROM TABLE(CUMULATE(TABLE t, DESCRIPTOR(ts), step, max_size))",
        )
    raise refuse(call, f"{sql_text(call)}", reason=f"{kind} takes other arguments")


_CALENDAR_FIELDS = ("yyyy", "MM", "dd", "HH", "mm", "ss")
_CALENDAR_UNITS = {
    3: timedelta(days=1),
    4: timedelta(hours=1),
    5: timedelta(minutes=1),
    6: timedelta(seconds=1),
}


def calendar_window(
    node: exp.Expr, column_of: Callable[[exp.Column], str], frame: Frame
) -> Window | None:
    """``GROUP BY DATE_FORMAT(ts, 'yyyy-MM-dd')`` on a stream watermarked on ``ts``: a
    tumbling window of one day (of an hour for ``'yyyy-MM-dd HH'``, down to seconds).

    Flink runs Nexmark q17's ``GROUP BY auction, DATE_FORMAT(dateTime, 'yyyy-MM-dd')``
    as an unbounded aggregation that updates its rows; a pattern that shows the year,
    month, day (and hour, minute, second, each finer field only with the coarser ones)
    names exactly one epoch-aligned window of its finest unit, so the group is that
    window: it closes when the watermark passes its end, is emitted once, final, and its
    state dropped (append mode, as the Python q17). None for anything else (a month
    pattern, no watermark on ``ts``), which stays a key of an update-mode aggregation.
    """
    if not (
        isinstance(node, exp.Anonymous)
        and node.name.upper() == "DATE_FORMAT"
        and len(node.expressions) == 2
        and isinstance(node.expressions[0], exp.Column)
        and isinstance(node.expressions[1], exp.Literal)
        and node.expressions[1].is_string
    ):
        return None
    if not isinstance(frame, StreamFrame):
        return None  # over static frames the formatted time is the key, as written
    column = column_of(node.expressions[0])
    if trace_event_time(frame.plan, column) is None:
        return None
    runs, pattern, i = [], node.expressions[1].this, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "'":  # quoted literal text
            end = pattern.find("'", i + 1)
            i = len(pattern) if end < 0 else end + 1
            continue
        run = len(pattern[i:]) - len(pattern[i:].lstrip(ch)) if ch.isalpha() else 1
        if ch.isalpha():
            runs.append(pattern[i : i + run])
        i += run
    if len(runs) < 3 or runs != list(_CALENDAR_FIELDS[: len(runs)]):
        return None
    unit = _CALENDAR_UNITS[len(runs)]
    return Window("TUMBLE", column, size=unit, slide=unit)


def _unit(dtype: pl.DataType) -> timedelta:
    unit = getattr(dtype, "time_unit", None) or "us"
    return {"ms": timedelta(milliseconds=1), "us": timedelta(microseconds=1)}.get(
        unit, timedelta(microseconds=1)
    )


def window_aggregate(
    frame: StreamFrame | pl.LazyFrame,
    window: Window,
    keys: list[str],
    aggs: dict[str, pl.Expr],
) -> StreamFrame | pl.LazyFrame:
    """Aggregate ``frame`` per window and keys: columns keys, aggs, window_start/end/time."""
    by = [*window.partition_by, *(k for k in keys if k not in window.partition_by)]
    if isinstance(frame, StreamFrame):
        frame = _processing_time_watermark(frame, window.column)
    time = frame.collect_schema()[window.column]
    unit = pl.lit(_unit(time))
    if window.kind == "SESSION":
        assert window.gap is not None
        out: StreamFrame | pl.LazyFrame
        if isinstance(frame, StreamFrame):
            out = frame.group_by_session(window.column, gap=window.gap, group_by=by or None).agg(
                **aggs
            )
        else:
            out = _batch_sessions(frame, window.column, window.gap, by, aggs)
        start, end = pl.col("session_start"), pl.col("session_end")
        return out.with_columns(window_start=start, window_end=end, window_time=end - unit).drop(
            "session_start", "session_end"
        )
    assert window.size is not None and window.slide is not None
    if window.kind == "CUMULATE":
        return _cumulate(frame, window, by, aggs, unit)
    if isinstance(frame, StreamFrame):
        out = frame.group_by_dynamic(
            window.column, every=window.slide, period=window.size, group_by=by or None
        ).agg(**aggs)
        start = pl.col(window.column)
    else:
        count = window.size // window.slide
        last = pl.col(window.column).dt.truncate(window.slide)
        assigned = (
            frame.with_columns(__back=pl.int_ranges(0, count))
            .explode("__back")
            .with_columns(__start=last - pl.col("__back") * pl.lit(window.slide))
        )
        out = assigned.group_by([*by, "__start"], maintain_order=True).agg(**aggs)
        start = pl.col("__start")
    end = start + pl.lit(window.size)
    out = out.with_columns(window_start=start, window_end=end, window_time=end - unit)
    return out.drop(window.column if isinstance(frame, StreamFrame) else "__start")


def _processing_time_watermark(frame: StreamFrame, column: str) -> StreamFrame:
    """A window over a ``PROCTIME()`` column closes under a watermark of 0 s on it (as
    Python's q12 writes ``with_watermark(pt, "0s")``): a batch's timestamp is at or after
    the previous batch's, so no row is late and a window is final once a batch runs past
    its end. Any other column keeps the watermark it has (or the verb's own error)."""
    if trace_event_time(frame.plan, column) is not None:
        return frame
    stack: list[PlanNode] = [frame.plan]
    while stack:
        node = stack.pop()
        if isinstance(node, ProcessingTimeNode) and node.name == column:
            return frame.with_watermark(column, "0s")
        stack.extend(node.children())
    return frame


def _batch_sessions(
    frame: pl.LazyFrame, column: str, gap: timedelta, by: list[str], aggs: dict[str, pl.Expr]
) -> pl.LazyFrame:
    """Sessions over a static frame: a new session where a key's events are more than ``gap`` apart."""
    ordered = frame.sort([*by, column], maintain_order=True)
    previous = pl.col(column).shift(1)
    if by:
        previous = previous.over(by)
    new = (pl.col(column) - previous > pl.lit(gap)).fill_null(True)
    session = new.cum_sum()
    ordered = ordered.with_columns(__session=session.over(by) if by else session)
    return (
        ordered.group_by([*by, "__session"], maintain_order=True)
        .agg(
            session_start=pl.col(column).min(),
            session_end=pl.col(column).max() + pl.lit(gap),
            **aggs,
        )
        .drop("__session")
    )


def _cumulate(
    frame: StreamFrame | pl.LazyFrame,
    window: Window,
    by: list[str],
    aggs: dict[str, pl.Expr],
    unit: pl.Expr,
) -> StreamFrame | pl.LazyFrame:
    """CUMULATE windows: each row in every window ``[start, start + k * step)`` of its
    max-size window that holds it; on a stream each window closes at its own end."""
    assert window.size is not None and window.slide is not None
    out: StreamFrame | pl.LazyFrame
    if isinstance(frame, StreamFrame):
        out = (
            frame.group_by_dynamic(
                window.column,
                every=window.slide,
                period=window.size,
                cumulative=True,
                group_by=by or None,
            )
            .agg(**aggs)
            # The time column (not _lower_boundary) stays the watermarked event-time
            # column, so an outer GROUP BY window_start still closes its groups.
            .with_columns(window_start=pl.col(window.column), window_end=pl.col("_upper_boundary"))
            .drop("_lower_boundary", "_upper_boundary", window.column)
        )
    else:
        step_us = window.slide // timedelta(microseconds=1)
        steps = window.size // window.slide
        start = pl.col(window.column).dt.truncate(window.size)
        into = (pl.col(window.column) - pl.col("window_start")).dt.total_microseconds()
        first = into // step_us + 1  # the first window (in steps) whose end is after the row
        rows = (
            frame.with_columns(window_start=start)
            .with_columns(__steps=pl.int_ranges(first, steps + 1))
            .explode("__steps")
            .with_columns(
                window_end=pl.col("window_start") + pl.col("__steps") * pl.lit(window.slide)
            )
        )
        out = rows.group_by([*by, "window_start", "window_end"], maintain_order=True).agg(**aggs)
    return out.with_columns(window_time=pl.col("window_end") - unit)
