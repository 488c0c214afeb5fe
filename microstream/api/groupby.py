"""``group_by`` and ``group_by_dynamic`` on a stream: the objects whose ``agg`` starts state.

Polars' names and arguments: ``frame.group_by("user").agg(pl.len())``,
``frame.group_by_dynamic("ts", every="1m", period="5m", group_by="user").agg(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import polars as pl
from pydantic import BaseModel

from microstream.exceptions import PlanError
from microstream.operators.aggregation import AggregateNode, EmitPolicy
from microstream.operators.session_window import SessionNode
from microstream.operators.stateful_fn import GroupState, StateContext, stateful_function_node
from microstream.operators.top_n import TopNNode
from microstream.plan.event_time import trace_event_time
from microstream.plan.nodes import PlanNode, StatelessNode, WatermarkNode
from microstream.time.cumulate import CumulativeWindow
from microstream.time.duration import parse_duration
from microstream.time.windows import SessionSpec, Window, WindowSpec, time_dtype_check

if TYPE_CHECKING:
    from microstream._typing import GroupStateTimeout

__all__ = [
    "GroupedFrame",
    "StreamDynamicGroupBy",
    "StreamGroupBy",
    "StreamSessionGroupBy",
    "find_watermark",
    "key_names",
]

FrameT = TypeVar("FrameT", bound="GroupedFrame")


class GroupedFrame(Protocol):
    """What a group-by object needs of the frame it groups (a ``StreamFrame``): its plan,
    and a frame of the same kind over a new plan for ``agg`` to return."""

    @property
    def plan(self) -> PlanNode: ...

    def _from_plan(self: FrameT, plan: PlanNode) -> FrameT: ...


def _unused(name: str, taken: set[str]) -> str:
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def key_names(plan: PlanNode, by: Iterable[Any], verb: str) -> tuple[PlanNode, tuple[str, ...]]:
    """Group keys as column names; expression keys are computed first with ``with_columns``."""
    names: list[str] = []
    computed: list[pl.Expr] = []
    for key in by:
        if isinstance(key, str):
            names.append(key)
        elif isinstance(key, pl.Expr):
            if key.meta.is_column():
                names.append(key.meta.output_name())
            else:
                computed.append(key)
                names.append(key.meta.output_name())
        else:
            msg = f"{verb}: keys must be column names or expressions; got {key!r}"
            raise PlanError(msg)
    if computed:
        plan = StatelessNode(plan, "with_columns", tuple(computed), {})
    return plan, tuple(names)


def find_watermark(plan: PlanNode, column: str | None) -> WatermarkNode | None:
    """The ``with_watermark`` upstream of ``plan`` for ``column`` (or the only one)."""
    marks = plan.watermark_nodes()
    for mark in marks:
        if mark.column == column:
            return mark
    return marks[0] if len(marks) == 1 and column is None else None


def emit_policy(
    *,
    early_every: str | timedelta | None = None,
    every_n_rows: int | None = None,
    emit_on_change: dict[str, float] | None = None,
    allowed_lateness: str | timedelta | None = None,
) -> EmitPolicy:
    """Validate the emit-trigger options of the group-by verbs."""
    if every_n_rows is not None and (not isinstance(every_n_rows, int) or every_n_rows < 1):
        msg = f"every_n_rows must be a positive int; got {every_n_rows!r}"
        raise PlanError(msg)
    changes = tuple((emit_on_change or {}).items())
    for column, threshold in changes:
        if not isinstance(threshold, (int, float)) or threshold < 0:
            msg = f"emit_on_change[{column!r}] must be a threshold >= 0; got {threshold!r}"
            raise PlanError(msg)
    return EmitPolicy(
        early_every_ms=(
            None if early_every is None
            else parse_duration(early_every, name="early_every") // timedelta(milliseconds=1)
        ),
        every_n_rows=every_n_rows,
        on_change=tuple((c, float(t)) for c, t in changes),
        allowed_lateness_us=(
            0 if allowed_lateness is None
            else _us(parse_duration(allowed_lateness, name="allowed_lateness"))
        ),
    )  # fmt: skip


def _aggs(aggs: Sequence[Any], named: dict[str, Any], verb: str) -> tuple[pl.Expr, ...]:
    exprs: list[pl.Expr] = []
    for agg in aggs:
        items = agg if isinstance(agg, (list, tuple, Iterator)) else [agg]
        for item in items:
            exprs.append(pl.col(item) if isinstance(item, str) else item)
    exprs += [(pl.col(v) if isinstance(v, str) else v).alias(k) for k, v in named.items()]
    if not exprs:
        msg = f"{verb}.agg() needs at least one aggregation, e.g. pl.len()"
        raise PlanError(msg)
    for expr in exprs:
        if not isinstance(expr, pl.Expr):
            msg = f"{verb}.agg(): aggregations must be Polars expressions; got {expr!r}"
            raise PlanError(msg)
    return tuple(exprs)


class StreamGroupBy(Generic[FrameT]):
    """``frame.group_by(keys)``: one group per key forever (a global window).

    Supports ``output_mode="update"`` and ``"complete"``; ``"append"`` only when a
    key is an event-time key: the watermarked column or a non-decreasing function
    of it (see :meth:`StreamFrame.group_by` and :mod:`microstream.plan.event_time`),
    whose groups close when the watermark passes them.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"user": pl.String, "amount": pl.Float64})
    >>> totals = stream.lazy().group_by("user").agg(pl.col("amount").sum(), n=pl.len())
    >>> query = totals.sink_memory("doc_totals", output_mode="complete")
    >>> _ = stream.add_data({"user": ["a", "b", "a"], "amount": [1.0, 2.0, 3.0]})
    >>> query.process_all_available()
    >>> ms.table("doc_totals").sort("user").rows()
    [('a', 4.0, 2), ('b', 2.0, 1)]
    >>> query.stop()
    """

    def __init__(
        self,
        frame: FrameT,
        by: Sequence[Any],
        emit: EmitPolicy | None = None,
        state_ttl_ms: int | None = None,
    ):
        self._frame = frame
        self._by = by
        self._emit = emit or EmitPolicy()
        self._state_ttl_ms = state_ttl_ms

    def agg(self, *aggs: Any, **named_aggs: Any) -> FrameT:

        plan, keys = key_names(self._frame.plan, self._by, "group_by")
        if not keys:
            msg = "group_by() on a stream needs at least one key"
            raise PlanError(msg)
        input_schema = plan.schema()
        _check_columns(input_schema, keys, "group_by")
        # The first key that is a non-decreasing function of the event time closes groups.
        event_key = next(
            (found for key in keys if (found := trace_event_time(plan, key)) is not None), None
        )
        node = AggregateNode(
            input=plan,
            keys=keys,
            aggs=_aggs(aggs, named_aggs, "group_by"),
            window=None,
            watermark=None if event_key is None else event_key.watermark,
            input_schema=input_schema,
            emit=self._emit,
            event_key=event_key,
            state_ttl_ms=self._state_ttl_ms,
        )
        return self._frame._from_plan(node)

    def top_k(
        self,
        k: int,
        *,
        by: str | Sequence[str],
        reverse: bool | Sequence[bool] = False,
        rank: str | None = None,
    ) -> FrameT:
        """The ``k`` rows of each group with the largest ``by``, once the group closes.

        Window Top-N (Flink's ``ROW_NUMBER() OVER (PARTITION BY window_start,
        window_end ORDER BY price DESC) <= k``): group by a window column, an
        event-time key (the window start a window aggregation emitted, or
        ``pl.col("ts").dt.truncate("10s")``), and each group's top rows are emitted
        once, in append mode, when the watermark closes it. Like Polars'
        ``top_k``, ``reverse=True`` keeps the smallest; several ``by`` columns break
        ties in order (a tie on all of them keeps the rows that came first). The
        output is the keys, then the other columns of the rows, best first within
        a group, and ``rank`` (1 for the top row: ``ROW_NUMBER()``) when named.
        The group's rows are state until it closes.

        With no event-time key and ``rank`` named, it is a running Top-N (Flink's
        Top-N over an unbounded key, Nexmark q19): the groups never close, so it runs
        in ``output_mode="update"``, keyed by the keys and ``rank``: each batch emits
        the positions whose row changed, and the last row per position is the top
        ``k`` over every row so far. Its state is ``k`` rows per key, kept forever.

        Raises
        ------
        PlanError
            When no key is an event-time key and ``rank`` is not named (the groups
            would never close, so no top row would ever be final), or ``k`` is not
            positive.

        Examples
        --------
        >>> from datetime import datetime
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"ts": pl.Datetime("us"), "item": pl.String, "price": pl.Int64})
        >>> top = (
        ...     stream.lazy()
        ...     .with_watermark("ts", "0s")
        ...     .with_columns(window=pl.col("ts").dt.truncate("10s"))
        ...     .group_by("window")
        ...     .top_k(2, by="price", rank="rn")
        ...     .select("window", "item", "price", "rn")
        ... )
        >>> query = top.sink_memory("doc_top_k")
        >>> t = [datetime(2024, 1, 1, 0, 0, s) for s in (1, 2, 3, 12)]
        >>> _ = stream.add_data({"ts": t, "item": ["a", "b", "c", "d"], "price": [5, 9, 7, 1]})
        >>> query.process_all_available()
        >>> ms.table("doc_top_k").rows()
        [(datetime.datetime(2024, 1, 1, 0, 0), 'b', 9, 1), (datetime.datetime(2024, 1, 1, 0, 0), 'c', 7, 2)]
        >>> query.stop()
        """
        if k < 1:
            msg = f"top_k: k must be a positive number of rows; got {k!r}"
            raise PlanError(msg)
        plan, keys = key_names(self._frame.plan, self._by, "group_by")
        schema = plan.schema()
        order = [by] if isinstance(by, str) else list(by)
        _check_columns(schema, order, "top_k(by=)")
        if not any(trace_event_time(plan, key) is not None for key in keys):
            if rank is not None:
                return self._frame._from_plan(_running_top_n(plan, keys, order, reverse, k, rank))
            msg = (
                f"group_by({', '.join(keys)}).top_k() needs an event-time key (a window "
                "column: the watermark column or a non-decreasing function of it, such as "
                "a window aggregation's window start or pl.col(ts).dt.truncate(...)), so "
                "that each group closes and its top rows are final; or name rank= for a "
                "running Top-N in output_mode='update', keyed by the group and the rank"
            )
            raise PlanError(msg)
        rows = [c for c in schema.names() if c not in keys]
        taken = set(schema.names()) | ({rank} if rank else set())
        top, position = _unused("__top", taken), _unused("__rank", taken)
        descending = [not r for r in reverse] if isinstance(reverse, Sequence) else not reverse
        best = pl.struct(rows).sort_by(order, descending=descending, nulls_last=True).head(k)
        ranks = (pl.int_range(pl.len(), dtype=pl.Int64) + 1).head(k)
        grouped = StreamGroupBy(
            self._frame._from_plan(plan), keys, self._emit, self._state_ttl_ms
        ).agg(**{top: best, position: ranks})
        aggregate = grouped.plan
        assert isinstance(aggregate, AggregateNode)
        aggregate = replace(aggregate, rows_of="top_k")
        node: PlanNode = StatelessNode(aggregate, "explode", (top, position))
        node = StatelessNode(node, "unnest", (top,))
        if rank is None:
            node = StatelessNode(node, "drop", (position,))
        else:
            node = StatelessNode(node, "rename", ({position: rank},))
        return self._frame._from_plan(node)

    def map_groups_with_state(
        self,
        function: Callable[[tuple[Any, ...], pl.DataFrame, GroupState[Any]], pl.DataFrame | None],
        *,
        state_schema: type[BaseModel] | pl.Schema | Mapping[str, Any],
        output_schema: pl.Schema | Mapping[str, Any],
        timeout: GroupStateTimeout | None = None,
        state_ttl: str | timedelta | None = None,
    ) -> FrameT:
        """Arbitrary stateful processing: ``function(key, rows, state)`` per key and batch.

        Spark's ``flatMapGroupsWithState`` / ``applyInPandasWithState``, Flink's
        ``KeyedProcessFunction``: for what the built-in operators cannot say
        (state machines, sessionisation rules, event patterns). Every batch the
        function is called once for each key with new rows, with ``key`` (a
        tuple of the key values), ``rows`` (the key's new rows, sorted by event
        time when the input is watermarked; late rows dropped) and ``state``, a
        :class:`~microstream.stateful_fn.GroupState` handle (``get``,
        ``exists``, ``update``, ``remove``, timers, ``watermark``,
        ``batch_time``). It returns the rows to emit (a DataFrame with the
        columns of ``output_schema``, cast strictly) or None. Then it is called
        for each key whose timer is due, with no rows and
        ``state.has_timed_out``. See :mod:`microstream.operators.stateful_fn` for the
        exact order within a batch.

        Parameters
        ----------
        function
            ``fn(key, rows, state) -> DataFrame | None``.
        state_schema
            A pydantic model class (``state.get()`` returns instances; fields
            are stored as columns — nested models as structs, lists as lists —
            never pickled) or a Polars schema (``state.get()`` returns a dict).
        output_schema
            The columns and dtypes of the emitted rows.
        timeout
            Which timers the function may set: ``"event_time"`` (fire when the
            watermark reaches them; needs ``with_watermark``),
            ``"processing_time"`` (fire at the first batch whose logged
            timestamp is at or after them), or None.
        state_ttl
            Remove a key whose state and timer were not changed for this long,
            in processing time (batch timestamps; as Flink's state TTL): the
            function is not called for it.

        Returns
        -------
        StreamFrame
            The function's rows. Output modes ``"append"`` and ``"update"``
            (the function decides what to emit; ``"complete"`` is refused).

        See Also
        --------
        map_batches_with_state : the vectorised variant, one call per batch.

        Examples
        --------
        Count events per user, emitting the running count every 2nd event:

        >>> import polars as pl
        >>> import microstream as ms
        >>> from pydantic import BaseModel
        >>> class Seen(BaseModel):
        ...     n: int = 0
        >>> def count(key, rows, state):
        ...     seen = state.get() or Seen()
        ...     out = []
        ...     for _ in range(rows.height):
        ...         seen.n += 1
        ...         if seen.n % 2 == 0:
        ...             out.append({"user": key[0], "n": seen.n})
        ...     state.update(seen)
        ...     return pl.DataFrame(out, schema={"user": pl.String, "n": pl.Int64})
        >>> stream = ms.MemoryStream({"user": pl.String})
        >>> counts = stream.lazy().group_by("user").map_groups_with_state(
        ...     count, state_schema=Seen, output_schema={"user": pl.String, "n": pl.Int64}
        ... )
        >>> query = counts.sink_memory("doc_counts")
        >>> _ = stream.add_data({"user": ["a", "b", "a"]})
        >>> query.process_all_available()
        >>> _ = stream.add_data({"user": ["b", "a"]})
        >>> query.process_all_available()
        >>> ms.table("doc_counts").rows()
        [('a', 2), ('b', 2)]
        >>> query.state().sort("user").rows()  # committed state: one row per user
        [('a', 3, True, None, ...), ('b', 2, True, None, ...)]
        >>> query.stop()
        """
        return self._stateful_function(
            function, False, state_schema, output_schema, timeout, state_ttl
        )

    def map_batches_with_state(
        self,
        function: Callable[
            [pl.DataFrame, pl.DataFrame, StateContext],
            tuple[pl.DataFrame | None, pl.DataFrame | None],
        ],
        *,
        state_schema: type[BaseModel] | pl.Schema | Mapping[str, Any],
        output_schema: pl.Schema | Mapping[str, Any],
        timeout: GroupStateTimeout | None = None,
        state_ttl: str | timedelta | None = None,
    ) -> FrameT:
        """The vectorised :meth:`map_groups_with_state`: ``function(rows, state, ctx)`` per batch.

        The same semantics, state layout, timers and TTL, without a Python
        call per key: the function works on frames. Per batch it is called at
        most twice: once with the keys that have new rows, then once with the
        keys whose timer is due (``ctx.timed_out``, ``rows`` empty).

        The contract:

        - ``rows``: the new rows of every key called (late rows dropped),
          sorted by event time when the input is watermarked.
        - ``state``: one row per key called: the key columns, the state
          columns (null when the key has none), ``_exists`` (Boolean: the key
          has a state) and ``_timer`` (the pending timer, null if none; in a
          timer call the timer that fired, which is gone unless ``new_state``
          sets ``_timer`` again). Timers are Datetimes: in the event-time
          column's dtype, or UTC for processing time.
        - ``ctx``: a :class:`~microstream.stateful_fn.StateContext`
          (``batch_id``, ``batch_time``, ``watermark``, ``timed_out``).
        - returns ``(output, new_state)``, each a DataFrame or None. ``output``
          has the columns of ``output_schema``. ``new_state`` has one row per
          key to change, among the keys called: the key columns, the state
          columns (the whole new state), optionally ``_remove`` (Boolean: true
          removes the key's state; the state columns may then be left out) and
          optionally ``_timer`` (the key's timer from now on, null for none;
          without the column timers stay as they are). Keys left out of
          ``new_state`` keep their state and timer.

        Examples
        --------
        A running sum per key, emitted every batch:

        >>> import polars as pl
        >>> import microstream as ms
        >>> def running_sum(rows, state, ctx):
        ...     totals = (
        ...         rows.group_by("k").agg(pl.col("v").sum())
        ...         .join(state.select("k", "total"), on="k", how="left")
        ...         .select("k", total=pl.col("v") + pl.col("total").fill_null(0))
        ...     )
        ...     return totals.sort("k"), totals
        >>> stream = ms.MemoryStream({"k": pl.String, "v": pl.Int64})
        >>> sums = stream.lazy().group_by("k").map_batches_with_state(
        ...     running_sum,
        ...     state_schema={"total": pl.Int64},
        ...     output_schema={"k": pl.String, "total": pl.Int64},
        ... )
        >>> query = sums.sink_memory("doc_sums", output_mode="update")
        >>> _ = stream.add_data({"k": ["a", "b", "a"], "v": [1, 2, 3]})
        >>> query.process_all_available()
        >>> _ = stream.add_data({"k": ["a"], "v": [10]})
        >>> query.process_all_available()
        >>> ms.table("doc_sums").rows()
        [('a', 4), ('b', 2), ('a', 14)]
        >>> query.stop()
        """
        return self._stateful_function(
            function, True, state_schema, output_schema, timeout, state_ttl
        )

    def _stateful_function(
        self,
        function: Callable[..., Any],
        vectorised: bool,
        state_schema: Any,
        output_schema: Any,
        timeout: GroupStateTimeout | None,
        state_ttl: str | timedelta | None,
    ) -> FrameT:

        verb = "map_batches_with_state" if vectorised else "map_groups_with_state"
        if self._emit.throttled or self._emit.allowed_lateness_us:
            msg = (
                f"group_by(...).{verb}: emit triggers ({self._emit.describe()}) belong to "
                "agg(); the function decides what to emit"
            )
            raise PlanError(msg)
        if self._state_ttl_ms is not None:
            msg = (
                f"group_by(state_ttl=...) applies to agg(); give {verb} its own "
                f"state_ttl: group_by(...).{verb}(fn, ..., state_ttl=...)"
            )
            raise PlanError(msg)
        plan, keys = key_names(self._frame.plan, self._by, "group_by")
        node = stateful_function_node(
            plan,
            keys,
            function,
            vectorised=vectorised,
            state_schema=state_schema,
            output_schema=output_schema,
            timeout=timeout,
            state_ttl=state_ttl,
            input_schema=plan.schema(),
        )
        return self._frame._from_plan(node)


class StreamDynamicGroupBy(Generic[FrameT]):
    """``frame.group_by_dynamic(...)``: tumbling, sliding or cumulative event-time windows."""

    def __init__(
        self,
        frame: FrameT,
        index_column: str,
        *,
        every: str | timedelta,
        period: str | timedelta | None,
        offset: str | timedelta | None,
        include_boundaries: bool,
        group_by: Any,
        emit: EmitPolicy | None = None,
        cumulative: bool = False,
    ):
        self._frame = frame
        self._emit = emit or EmitPolicy()
        self._index = index_column
        self._every = parse_duration(every, name="every")
        self._period = parse_duration(period, name="period") if period is not None else None
        self._offset = parse_duration(offset, name="offset") if offset is not None else None
        if group_by is None:
            self._by: list[Any] = []
        elif isinstance(group_by, (str, pl.Expr)):
            self._by = [group_by]
        else:
            self._by = list(group_by)
        if self._every <= timedelta(0):
            msg = f"group_by_dynamic: every must be positive; got {every!r}"
            raise PlanError(msg)
        if self._period is not None and self._period < self._every:
            msg = (
                f"group_by_dynamic: period ({period!r}) shorter than every ({every!r}) leaves "
                "gaps between windows, and rows in the gaps would be lost; use period >= every"
            )
            raise PlanError(msg)
        every_us = _us(self._every)
        period_us = _us(self._period) if self._period is not None else every_us
        offset_us = _us(self._offset) if self._offset is not None else 0
        self._window: Window = (
            CumulativeWindow(index_column, every_us, period_us, offset_us)
            if cumulative
            else WindowSpec(index_column, every_us, period_us, offset_us, include_boundaries)
        )

    def agg(self, *aggs: Any, **named_aggs: Any) -> FrameT:

        plan, keys = key_names(self._frame.plan, self._by, "group_by_dynamic")
        input_schema = plan.schema()
        time_dtype_check(input_schema, self._index, "group_by_dynamic")
        _check_columns(input_schema, keys, "group_by_dynamic")
        node = AggregateNode(
            input=plan,
            keys=keys,
            aggs=_aggs(aggs, named_aggs, "group_by_dynamic"),
            window=self._window,
            watermark=find_watermark(plan, self._index),
            input_schema=input_schema,
            emit=self._emit,
        )
        return self._frame._from_plan(node)


class StreamSessionGroupBy(Generic[FrameT]):
    """``frame.group_by_session(col, gap=...)``: session windows per key."""

    def __init__(self, frame: FrameT, column: str, gap: str | timedelta, group_by: Any):
        self._frame = frame
        self._column = column
        self._gap = parse_duration(gap, name="gap")
        if self._gap <= timedelta(0):
            msg = f"group_by_session: gap must be positive; got {gap!r}"
            raise PlanError(msg)
        if group_by is None:
            self._by: list[Any] = []
        elif isinstance(group_by, (str, pl.Expr)):
            self._by = [group_by]
        else:
            self._by = list(group_by)

    def agg(self, *aggs: Any, **named_aggs: Any) -> FrameT:

        plan, keys = key_names(self._frame.plan, self._by, "group_by_session")
        input_schema = plan.schema()
        time_dtype_check(input_schema, self._column, "group_by_session")
        _check_columns(input_schema, keys, "group_by_session")
        node = SessionNode(
            input=plan,
            keys=keys,
            aggs=_aggs(aggs, named_aggs, "group_by_session"),
            session=SessionSpec(column=self._column, gap_us=_us(self._gap)),
            watermark=find_watermark(plan, self._column),
            input_schema=input_schema,
        )
        return self._frame._from_plan(node)


def _us(value: timedelta) -> int:
    return value // timedelta(microseconds=1)


def _check_columns(schema: pl.Schema, keys: Iterable[str], verb: str) -> None:
    missing = [k for k in keys if k not in schema]
    if missing:
        msg = f"{verb}: no column(s) {missing}; columns are {list(schema.names())}"
        raise PlanError(msg)


def check_alignment(*, closed: str, label: str, start_by: str) -> None:
    """Refuse ``group_by_dynamic``'s batch-only options: a stream's windows are fixed.

    Raises
    ------
    PlanError
        ``closed``, ``label`` or ``start_by`` asks for windows other than ``[start, end)``
        aligned to the epoch plus offset and labelled by their start.

    Examples
    --------
    >>> check_alignment(closed="left", label="left", start_by="window")
    """
    for arg, value in (("closed", closed), ("label", label), ("start_by", start_by)):
        expected = "window" if arg == "start_by" else "left"
        if value != expected:
            msg = (
                f"group_by_dynamic({arg}={value!r}) has no meaning on a stream: windows are "
                f"aligned to the epoch plus offset and are [start, end); use {arg}={expected!r}"
            )
            raise PlanError(msg)


def _running_top_n(
    plan: PlanNode,
    keys: Sequence[str],
    order: list[str],
    reverse: bool | Sequence[bool],
    k: int,
    rank: str,
) -> TopNNode:
    """``top_k`` over keys with no event time: a running Top-N in update mode."""
    schema = plan.schema()
    if not keys:
        msg = "top_k() over the whole stream has no key to rank within: group_by a key"
        raise PlanError(msg)
    if rank in schema:
        msg = f"top_k(rank={rank!r}): the frame already has a column {rank!r}; name another"
        raise PlanError(msg)
    flags = list(reverse) if isinstance(reverse, Sequence) else [reverse] * len(order)
    if len(flags) != len(order):
        msg = f"top_k: reverse= has {len(flags)} flags for {len(order)} by= columns"
        raise PlanError(msg)
    return TopNNode(
        input=plan,
        keys=tuple(keys),
        by=tuple(order),
        descending=tuple(not r for r in flags),
        n=k,
        rank=rank,
        input_schema=schema,
    )
