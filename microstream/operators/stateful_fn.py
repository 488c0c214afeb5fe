"""``group_by(keys).map_groups_with_state(fn, ...)``: arbitrary stateful processing per key.

What the built-in operators cannot say — per-device state machines,
sessionisation rules, fraud patterns — a user function says, with a typed state
per key and timers, as Spark's ``flatMapGroupsWithState`` /
``applyInPandasWithState`` and Flink's ``KeyedProcessFunction`` do. Two
variants share one runtime:

- ``map_groups_with_state(fn, ...)``: ``fn(key, rows, state)`` is called once
  per key, with the key's new rows and a :class:`GroupState` handle;
- ``map_batches_with_state(fn, ...)``: ``fn(rows, state, ctx)`` is called with
  the rows of every key and their state rows at once, and returns the output
  and the state changes as frames (vectorised: no Python per key).

One batch N, in this order:

1. State TTL (``state_ttl``, processing time): a key whose state and timer were
   last changed ``state_ttl`` or longer before the batch's logged timestamp is
   removed, timer included, without a call.
2. Late rows (event time ``<= wm[N-1]``, when the input is watermarked) are
   dropped, counted and routed to ``on_late`` like other operators' late rows.
3. Data calls: every key with new rows, in key order, with its rows sorted by
   event time (arrival order without a watermark, and among equal times).
4. Timer calls: every key whose timer is due — an event-time timer when
   ``timer <= wm[N]`` (the watermark that closes windows in this batch), a
   processing-time timer when ``timer <=`` the batch's logged timestamp — in
   timer order, with no rows and ``state.has_timed_out``. A timer set or left
   due by a data call fires in the same batch. A timer that fired is gone
   unless the call sets a new one, which fires in a later batch at the earliest.
5. The state and timers are committed with the batch.

The watermark and the batch timestamp come from the write-ahead log, so a
re-run batch makes exactly the same calls. When no rows arrive, a batch still
runs as soon as a timer is due or a state expires (the trigger loop asks
:meth:`StatefulFunctionOperator.timers_due`).

State layout: one store, ``state/op<i>/state``, keyed by the group keys, one
row per key: the state columns (a pydantic model's fields, see
:mod:`microstream.state.schema`), ``__has_state`` (false: only a timer is
kept), ``__timer_us`` (the pending timer, microseconds since the epoch, or
null) and ``__updated_ms`` (the batch timestamp of the last change, for TTL).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import polars as pl

from microstream.exceptions import PlanError, SchemaMismatchError
from microstream.operators.base import StoreBackedOperator
from microstream.plan.nodes import (
    OperatorContext,
    PartitionKeys,
    PlanNode,
    StatefulNode,
    WatermarkNode,
)
from microstream.state.schema import StateSchema
from microstream.state.store import StateStore
from microstream.time.duration import format_duration, parse_duration
from microstream.time.windows import T, from_us, to_us

if TYPE_CHECKING:
    from microstream._typing import GroupStateTimeout
    from microstream.checkpoint.storage import Storage

__all__ = [
    "EXISTS_COLUMN",
    "REMOVE_COLUMN",
    "TIMER_COLUMN",
    "GroupState",
    "StateContext",
    "StatefulFunctionNode",
    "StatefulFunctionOperator",
    "state_ttl_ms",
    "stateful_function_node",
]

S = TypeVar("S")

# Columns of the store (internal).
HAS_STATE, TIMER, UPDATED = "__has_state", "__timer_us", "__updated_ms"
# Columns of the vectorised contract (public).
EXISTS_COLUMN = "_exists"
"""In the ``state`` frame given to a ``map_batches_with_state`` function: the key has a state."""
TIMER_COLUMN = "_timer"
"""The key's pending timer (null: none), in a timer call the one that fired. In
``new_state``: the timer to keep (null: none); without this column, pending timers are
left as they are and fired ones are gone."""
REMOVE_COLUMN = "_remove"
"""In ``new_state``: true removes the key's state (and its timer, unless ``_timer`` sets one)."""
_GID = "__gid"
_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=timezone.utc)
_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class StateContext:
    """What a stateful function knows about the batch it is called in.

    Attributes
    ----------
    batch_id
        The batch id (the same when a batch is re-run after a crash).
    batch_time
        The batch's logged processing time (UTC): processing-time timers and
        ``state_ttl`` are judged against it.
    watermark
        ``wm[N]``, the watermark event-time timers fire at, in the event-time
        column's flavour (naive or with its time zone); None without a watermark.
    timed_out
        True in the call for the keys whose timer fired (no rows).
    operator_id
        The operator's name in the checkpoint (``"op0"``, ...).
    """

    batch_id: int
    batch_time: datetime
    watermark: datetime | None
    timed_out: bool
    operator_id: str


class GroupState(Generic[S]):
    """The state of one key, handed to a ``map_groups_with_state`` function.

    Changes take effect when the function returns and are committed with the
    batch: ``update`` replaces the state, ``remove`` forgets the key (its timer
    too, unless one is set after the removal), ``set_event_time_timer`` /
    ``set_processing_time_timer`` replace the key's one timer (``None`` clears
    it). A timer is kept until it fires or is replaced; when it fires the
    function is called with no rows and :attr:`has_timed_out` true.

    See Also
    --------
    microstream.api.groupby.StreamGroupBy.map_groups_with_state : examples.
    """

    def __init__(
        self,
        spec: _Spec,
        context: StateContext,
        key: tuple[Any, ...],
        value: S | None,
        timer_us: int | None,
    ):
        self._spec = spec
        self._context = context
        self._key = key
        self._value = value
        self._exists = value is not None
        self._timer_us = timer_us
        self._timer_set = False
        self._row: dict[str, Any] | None = None
        self._changed = False
        self._removed = False

    # -- reading ------------------------------------------------------------------------

    @property
    def key(self) -> tuple[Any, ...]:
        """The group key, one value per key column."""
        return self._key

    @property
    def exists(self) -> bool:
        """Whether the key has a state."""
        return self._exists

    def get(self) -> S | None:
        """The state: a model instance (pydantic ``state_schema``), a dict of the columns
        (Polars schema), or None when the key has none.

        Changing the returned value changes nothing until it is passed to :meth:`update`.
        """
        return self._value

    @property
    def has_timed_out(self) -> bool:
        """True when the function is called because the key's timer fired (no rows)."""
        return self._context.timed_out

    @property
    def timer(self) -> datetime | None:
        """The key's timer: the pending one, or in a timer call the one that fired.

        A timer that fired is gone after the call unless the function sets a
        timer again. Event-time timers are in the event-time column's flavour
        (naive, or in its time zone); processing-time timers are in UTC.
        """
        return self._spec.timer_datetime(self._timer_us)

    def _final_timer(self) -> int | None:
        """The timer to keep after the call: a fired one only if set again."""
        if self._context.timed_out and not self._timer_set:
            return None
        return self._timer_us

    @property
    def watermark(self) -> datetime | None:
        """The watermark event-time timers fire at in this batch (``wm[N]``).

        ``datetime.min`` before the query saw its first event (no watermark yet:
        every time is ahead of it); None when the query has no ``with_watermark``.
        """
        return self._context.watermark

    @property
    def batch_time(self) -> datetime:
        """The batch's logged processing time (UTC)."""
        return self._context.batch_time

    # -- changing -----------------------------------------------------------------------

    def update(self, value: S | Mapping[str, Any] | pl.DataFrame) -> None:
        """Replace the key's state.

        Parameters
        ----------
        value
            An instance of the ``state_schema`` model (or a dict of its fields),
            or, for a Polars ``state_schema``, a dict of the columns or a
            one-row DataFrame.

        Raises
        ------
        SchemaMismatchError
            The value does not match ``state_schema``; the message names the
            operator, the key and the field.
        """
        try:
            self._row, self._value = self._spec.state.validate(value)
        except ValueError as exc:
            msg = f"{self._spec.where(self._key)}: state.update() {exc}"
            raise SchemaMismatchError(msg) from None
        self._exists = True
        self._removed = False
        self._changed = True

    def remove(self) -> None:
        """Forget the key's state and its timer (a timer set afterwards is kept)."""
        self._value = None
        self._row = None
        self._exists = False
        self._removed = True
        self._timer_us = None
        self._timer_set = True
        self._changed = True

    def set_event_time_timer(self, timestamp: datetime | date | int | None) -> None:
        """Call the function for this key once the watermark reaches ``timestamp``.

        Parameters
        ----------
        timestamp
            A datetime (naive: read as UTC, as a naive event-time column is), a
            date, or microseconds since the epoch; None clears the timer. The
            timer fires in the first batch N with ``timestamp <= wm[N]``; one
            at or behind the watermark fires at once: in this batch when set
            by a data call, in the next (which runs without waiting for data)
            when set by a timer call.
        """
        self._spec.check_timeout("event_time", "set_event_time_timer")
        self._timer_us = None if timestamp is None else _epoch_us(timestamp, "timestamp")
        self._timer_set = self._changed = True

    def set_processing_time_timer(self, delay: int | str | timedelta | None) -> None:
        """Call the function for this key once the batch time is ``delay`` past this batch's.

        Parameters
        ----------
        delay
            Milliseconds (an int, as Spark's ``setTimeoutDuration``), a
            duration string (``"5m"``) or a timedelta, counted from
            :attr:`batch_time`; None clears the timer. The timer fires in the
            first batch whose logged timestamp is at or after it.
        """
        self._spec.check_timeout("processing_time", "set_processing_time_timer")
        if delay is None:
            self._timer_us = None
        else:
            if isinstance(delay, int) and not isinstance(delay, bool):
                if delay < 0:
                    msg = f"set_processing_time_timer: delay must not be negative; got {delay!r}"
                    raise ValueError(msg)
                delay_us = delay * 1000
            else:
                delay_us = parse_duration(delay, name="delay") // timedelta(microseconds=1)
            self._timer_us = (self._context.batch_time - _EPOCH_UTC) // _US + delay_us
        self._timer_set = self._changed = True

    def __repr__(self) -> str:
        return (
            f"GroupState(key={self._key!r}, exists={self._exists}, value={self._value!r}, "
            f"timer={self.timer!r}, has_timed_out={self.has_timed_out})"
        )


def _epoch_us(value: datetime | date | int, name: str) -> int:
    if isinstance(value, bool):
        msg = f"{name} must be a datetime, date or microseconds since the epoch; got {value!r}"
        raise TypeError(msg)
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return (value - _EPOCH) // _US
        return (value - _EPOCH_UTC) // _US
    if isinstance(value, date):
        return (datetime(value.year, value.month, value.day) - _EPOCH) // _US
    msg = f"{name} must be a datetime, date or microseconds since the epoch; got {value!r}"
    raise TypeError(msg)


@dataclass(frozen=True)
class _Spec:
    """What every GroupState handle of one operator shares."""

    operator_id: str
    verb: str
    state: StateSchema
    timeout: str | None
    timer_dtype: pl.DataType | None

    def where(self, key: tuple[Any, ...] | None = None) -> str:
        at = f" for key {key!r}" if key is not None else ""
        return f"{self.verb} (operator {self.operator_id}){at}"

    def check_timeout(self, kind: str, method: str) -> None:
        if self.timeout != kind:
            msg = (
                f"{self.where()}: state.{method}() needs timeout={kind!r}; this operator "
                f"has timeout={self.timeout!r}"
            )
            raise PlanError(msg)

    def timer_datetime(self, us: int | None) -> datetime | None:
        if us is None or self.timer_dtype is None:
            return None
        return _datetime_of(us, self.timer_dtype)


def _datetime_of(us: int, dtype: pl.DataType) -> datetime:
    """Microseconds since the epoch as a datetime in the flavour of ``dtype``."""
    try:
        naive = _EPOCH + timedelta(microseconds=us)
    except OverflowError:  # no watermark yet (below year 1), or the flush one (past 9999)
        naive = datetime.min if us < 0 else datetime.max
    zone = getattr(dtype, "time_zone", None)
    if zone is None:
        return naive
    from zoneinfo import ZoneInfo

    return naive.replace(tzinfo=timezone.utc).astimezone(ZoneInfo(zone))


GroupFunction = Callable[[tuple[Any, ...], pl.DataFrame, GroupState[Any]], "pl.DataFrame | None"]
BatchFunction = Callable[
    [pl.DataFrame, pl.DataFrame, StateContext], "tuple[pl.DataFrame | None, pl.DataFrame | None]"
]


@dataclass(frozen=True, eq=False)
class StatefulFunctionNode(StatefulNode):
    """``map_groups_with_state`` / ``map_batches_with_state``: a user function over keyed state."""

    input: PlanNode
    keys: tuple[str, ...]
    function: Callable[..., Any]
    vectorised: bool
    state: StateSchema
    output: pl.Schema
    timeout: str | None
    ttl_ms: int | None
    watermark: WatermarkNode | None
    event_column: str | None
    """The watermarked event-time column, when it is in the input (late rows, sorting)."""
    input_schema: pl.Schema

    @property
    def verb(self) -> str:
        return "map_batches_with_state" if self.vectorised else "map_groups_with_state"

    def output_schema(self) -> pl.Schema:
        return self.output

    def describe(self) -> str:
        name = getattr(self.function, "__qualname__", repr(self.function))
        parts = [name, f"keys={list(self.keys)}", f"state_schema={self.state.describe()}"]
        if self.timeout is not None:
            parts.append(f"timeout={self.timeout!r}")
        if self.ttl_ms is not None:
            parts.append(f"state_ttl={format_duration(self.ttl_ms * 1000)}")
        return f"{self.verb}({', '.join(parts)})"

    def explain_lines(self, depth: int = 0) -> list[str]:
        pad = "  " * depth
        lines = [pad + self.describe()]
        calls = "once per batch with every key's rows" if self.vectorised else "once per key"
        lines.append(f"{pad}  · the function is called {calls}; state: one row per key")
        if self.timeout == "event_time":
            lines.append(f"{pad}  · event-time timers fire when timer <= watermark")
        elif self.timeout == "processing_time":
            lines.append(f"{pad}  · processing-time timers fire when timer <= batch timestamp")
        if self.ttl_ms is not None:
            lines.append(
                f"{pad}  · a key unchanged for {format_duration(self.ttl_ms * 1000)} of "
                "processing time is removed"
            )
        if self.event_column is not None:
            lines.append(f"{pad}  · rows with {self.event_column} <= previous watermark are late")
        return lines + self.input.explain_lines(depth + 1)

    def partition_keys(self) -> tuple[PartitionKeys, ...]:
        return (self.keys,)  # never empty: the verb requires group keys

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "map_groups_with_state",
            "keys": list(self.keys),
            "state_schema": self.state.fingerprint(),
            "timeout": self.timeout,
        }

    def check_output_mode(self, output_mode: str) -> None:
        if output_mode == "complete":
            msg = (
                f"{self.verb} supports output_mode='append' and 'update' (the function decides "
                "what to emit); it has no result table to re-emit in 'complete' mode"
            )
            raise PlanError(msg)

    def build_operator(self, operator_id: str, storage: Storage) -> StatefulFunctionOperator:
        return StatefulFunctionOperator(self, operator_id, storage)


def state_ttl_ms(state_ttl: str | timedelta | None, verb: str) -> int | None:
    """``state_ttl`` in milliseconds (the unit of batch timestamps), None if not given."""
    if state_ttl is None:
        return None
    ttl = parse_duration(state_ttl, name="state_ttl")
    if ttl <= timedelta(0):
        msg = f"{verb}: state_ttl must be positive; got {state_ttl!r}"
        raise PlanError(msg)
    return max(1, ttl // timedelta(milliseconds=1))


def stateful_function_node(
    plan: PlanNode,
    keys: tuple[str, ...],
    function: Callable[..., Any],
    *,
    vectorised: bool,
    state_schema: Any,
    output_schema: Any,
    timeout: GroupStateTimeout | None,
    state_ttl: str | timedelta | None,
    input_schema: pl.Schema,
) -> StatefulFunctionNode:
    """Check the arguments of the two verbs and build their node."""
    verb = "map_batches_with_state" if vectorised else "map_groups_with_state"
    if not callable(function):
        msg = f"{verb}: the function must be callable; got {function!r}"
        raise PlanError(msg)
    if not keys:
        msg = f"{verb} needs at least one group key, e.g. group_by('user')"
        raise PlanError(msg)
    missing = [k for k in keys if k not in input_schema]
    if missing:
        msg = f"{verb}: no column(s) {missing}; columns are {input_schema.names()}"
        raise PlanError(msg)
    state = StateSchema(state_schema)
    reserved = [c for c in state.names if c in keys or c.startswith("_")]
    if reserved:
        msg = (
            f"{verb}: state_schema columns {reserved} clash with the group keys {list(keys)} "
            "or use a reserved leading underscore; rename them"
        )
        raise PlanError(msg)
    try:
        output = pl.Schema(output_schema)
    except (TypeError, ValueError) as exc:
        msg = f"{verb}: output_schema must map column names to Polars dtypes; got {output_schema!r} ({exc})"
        raise PlanError(msg) from None
    if timeout not in (None, "event_time", "processing_time"):
        msg = f"{verb}: timeout must be None, 'event_time' or 'processing_time'; got {timeout!r}"
        raise PlanError(msg)
    columns = {m.column for m in plan.watermark_nodes()}
    marks = plan.watermark_nodes()
    if len(columns) > 1:
        msg = (
            f"{verb}: the input has watermarks on several columns {sorted(columns)}; event time "
            "must be one column"
        )
        raise PlanError(msg)
    watermark = marks[-1] if marks else None
    if timeout == "event_time" and watermark is None:
        msg = (
            f"{verb}(timeout='event_time') needs with_watermark(...) on the input: event-time "
            "timers fire when the watermark passes them"
        )
        raise PlanError(msg)
    ttl_ms = state_ttl_ms(state_ttl, verb)
    event_column = None
    if watermark is not None and watermark.column in input_schema:
        event_column = watermark.column
    return StatefulFunctionNode(
        input=plan,
        keys=keys,
        function=function,
        vectorised=vectorised,
        state=state,
        output=output,
        timeout=timeout,
        ttl_ms=ttl_ms,
        watermark=watermark,
        event_column=event_column,
        input_schema=input_schema,
    )


class StatefulFunctionOperator(StoreBackedOperator):
    """Runtime of :class:`StatefulFunctionNode`: one store of per-key state and timers."""

    def __init__(self, node: StatefulFunctionNode, operator_id: str, storage: Storage):
        super().__init__(operator_id)
        self.node = node
        self.kind = "stateful function"
        self.keys = list(node.keys)
        self.state_names = node.state.names
        self.store = StateStore(
            storage.sub("state"),
            operator=f"{operator_id}/state",
            key_columns=self.keys,
            schema=pl.Schema(
                {
                    **{k: node.input_schema[k] for k in self.keys},
                    **node.state.schema,
                    HAS_STATE: pl.Boolean(),
                    TIMER: pl.Int64(),
                    UPDATED: pl.Int64(),
                }
            ),
        )
        if node.timeout == "event_time":
            timer_dtype: pl.DataType | None = (
                node.input_schema[node.event_column]
                if node.event_column is not None
                else pl.Datetime("us")
            )
        elif node.timeout == "processing_time":
            timer_dtype = pl.Datetime("us", "UTC")
        else:
            timer_dtype = None
        self.spec = _Spec(operator_id, node.verb, node.state, node.timeout, timer_dtype)
        self.time_dtype = (
            node.input_schema[node.event_column] if node.event_column is not None else None
        )
        self._next_timer_us: int | None = None
        self._oldest_update_ms: int | None = None

    def _stores(self) -> list[StateStore]:
        return [self.store]

    def load(self, version: int | None, *, key_groups: range | None = None) -> None:
        super().load(version, key_groups=key_groups)
        self._refresh_due()

    # -- what the trigger loop asks between batches -----------------------------------------

    def timers_due(self, watermark_us: int | None, now_ms: int) -> bool:
        """Whether a batch is needed, even without rows: a timer is due or a state expired."""
        node, timer = self.node, self._next_timer_us
        if timer is not None:
            if node.timeout == "event_time" and watermark_us is not None and timer <= watermark_us:
                return True
            if node.timeout == "processing_time" and timer <= now_ms * 1000:
                return True
        oldest = self._oldest_update_ms
        return node.ttl_ms is not None and oldest is not None and oldest + node.ttl_ms <= now_ms

    def _refresh_due(self) -> None:
        if self.node.timeout is None and self.node.ttl_ms is None:
            return
        found = self.store.frame.select(pl.col(TIMER).min(), pl.col(UPDATED).min()).row(0)
        self._next_timer_us, self._oldest_update_ms = found

    # -- one batch ----------------------------------------------------------------------

    def _process(self, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext) -> pl.DataFrame:
        (batch,) = inputs
        node = self.node
        self._dropped_late = self._updated = self._removed = 0
        batch_ms = ctx.batch_timestamp_ms
        if node.ttl_ms is not None:
            self._removed += self.store.filter_out(pl.col(UPDATED) + node.ttl_ms <= batch_ms).height
        df = batch
        if node.event_column is not None:
            df = df.with_columns(to_us(node.event_column).alias(T))
            late = (pl.col(T) <= ctx.late_watermark_us).fill_null(False)
            df = self._drop_late(df, late, ctx, batch.columns, self.time_dtype)
            df = df.sort(T, nulls_last=True, maintain_order=True).drop(T)
        outputs: list[pl.DataFrame] = []
        if df.height:
            called = df.select(self.keys).unique().sort(self.keys, nulls_last=True)
            found = self.store.lookup(called)
            called = called.join(found, on=self.keys, how="left", nulls_equal=True)
            called = called.with_columns(pl.col(HAS_STATE).fill_null(False))
            outputs.append(self._run(df, called, self._context(ctx, timed_out=False), batch_ms))
        due = self._due_limit(ctx)
        if due is not None and self._next_timer_due(due):
            fired = self.store.filter_out(pl.col(TIMER) <= due)
            if fired.height:
                fired = fired.sort([TIMER, *self.keys], nulls_last=True)
                context = self._context(ctx, timed_out=True)
                outputs.append(self._run(df.clear(), fired, context, batch_ms))
        self._refresh_due()
        if not outputs:
            return pl.DataFrame(schema=node.output)
        return pl.concat(outputs, how="vertical")

    def _due_limit(self, ctx: OperatorContext) -> int | None:
        if self.node.timeout == "event_time":
            return ctx.watermark_us
        if self.node.timeout == "processing_time":
            return ctx.batch_timestamp_ms * 1000
        return None

    def _next_timer_due(self, limit: int) -> bool:
        # The cached minimum is at or below the true one (calls only lowered it, see _apply).
        return self._next_timer_us is not None and self._next_timer_us <= limit

    def _context(self, ctx: OperatorContext, *, timed_out: bool) -> StateContext:
        node = self.node
        watermark = None
        if node.watermark is not None:
            dtype = self.time_dtype if self.time_dtype is not None else pl.Datetime("us")
            watermark = _datetime_of(ctx.watermark_us, dtype)
        return StateContext(
            batch_id=ctx.batch_id,
            batch_time=_EPOCH_UTC + timedelta(milliseconds=ctx.batch_timestamp_ms),
            watermark=watermark,
            timed_out=timed_out,
            operator_id=self.operator_id,
        )

    def _run(
        self, rows: pl.DataFrame, called: pl.DataFrame, context: StateContext, batch_ms: int
    ) -> pl.DataFrame:
        """Call the function for the keys of ``called`` (store rows); apply what it changed."""
        if self.node.vectorised:
            output, changes = self._call_vectorised(rows, called, context)
        else:
            output, changes = self._call_per_key(rows, called, context)
        self._apply(called, changes, context.timed_out, batch_ms)
        return output

    # -- the two calling conventions --------------------------------------------------------

    def _call_per_key(
        self, rows: pl.DataFrame, called: pl.DataFrame, context: StateContext
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """``fn(key, rows, state)`` per key; returns the output and the changes (store form)."""
        spec, keys = self.spec, self.keys
        groups: dict[Any, pl.DataFrame] = {}
        if rows.height:
            index = called.select(keys).with_row_index(_GID)
            tagged = rows.join(index, on=keys, how="left", nulls_equal=True, maintain_order="left")
            groups = {
                gid[0]: part
                for gid, part in tagged.partition_by(
                    _GID, as_dict=True, include_key=False, maintain_order=True
                ).items()
            }
        empty = rows.clear()
        key_tuples = called.select(keys).rows()
        stored = called.select(self.state_names).to_dicts()
        exists = called.get_column(HAS_STATE).to_list()
        timers = called.get_column(TIMER).to_list()
        outputs: list[pl.DataFrame] = []
        changed: list[int] = []
        new_rows: list[dict[str, Any] | None] = []
        removed: list[bool] = []
        new_timers: list[int | None] = []
        function: GroupFunction = self.node.function
        for i, key in enumerate(key_tuples):
            value = None
            if exists[i]:
                try:
                    value = spec.state.value_of(stored[i])
                except ValueError as exc:
                    msg = f"{spec.where(key)}: {exc}"
                    raise SchemaMismatchError(msg) from None
            handle: GroupState[Any] = GroupState(spec, context, key, value, timers[i])
            result = function(key, groups.get(i, empty), handle)
            if result is not None:
                out = self._conform_output(result, key)
                if out.height:
                    outputs.append(out)
            if handle._changed:
                changed.append(i)
                if handle._exists:  # updated, or only its timer changed: the stored row
                    new_rows.append(handle._row if handle._row is not None else stored[i])
                else:
                    new_rows.append(None)
                removed.append(not handle._exists)
                new_timers.append(handle._final_timer())
        if changed:
            changes = pl.concat(
                [
                    called.select(keys)[changed],
                    self.node.state.frame(new_rows),
                    pl.DataFrame(
                        {REMOVE_COLUMN: removed, TIMER: new_timers},
                        schema={REMOVE_COLUMN: pl.Boolean, TIMER: pl.Int64},
                    ),
                ],
                how="horizontal",
            )
        else:
            changes = self._no_changes()
        output = (
            pl.concat(outputs, how="vertical") if outputs else pl.DataFrame(schema=self.node.output)
        )
        return output, changes

    def _call_vectorised(
        self, rows: pl.DataFrame, called: pl.DataFrame, context: StateContext
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """``fn(rows, state, ctx)`` once; returns the output and the changes (store form)."""
        spec = self.spec
        timer_dtype = spec.timer_dtype or pl.Datetime("us")
        state = called.select(
            *self.keys,
            *self.state_names,
            pl.col(HAS_STATE).alias(EXISTS_COLUMN),
            from_us(pl.col(TIMER), timer_dtype).alias(TIMER_COLUMN),
        )
        function: BatchFunction = self.node.function
        result = function(rows, state, context)
        if not isinstance(result, tuple) or len(result) != 2:
            msg = (
                f"{spec.where()}: the function must return (output, new_state), two DataFrames "
                f"(or None); got {type(result).__name__}"
            )
            raise SchemaMismatchError(msg)
        output, new_state = result
        out = (
            pl.DataFrame(schema=self.node.output)
            if output is None
            else self._conform_output(output, None)
        )
        return out, self._conform_new_state(new_state, called, timed_out=context.timed_out)

    # -- checks -------------------------------------------------------------------------

    def _conform_output(self, result: Any, key: tuple[Any, ...] | None) -> pl.DataFrame:
        """The function's output rows as exactly ``output_schema`` (a strict cast)."""
        schema = self.node.output
        where = self.spec.where(key)
        if not isinstance(result, pl.DataFrame):
            msg = f"{where}: the function must return a polars DataFrame or None; got {type(result).__name__}"
            raise SchemaMismatchError(msg)
        if result.schema == schema:
            return result
        missing = [c for c in schema if c not in result.schema]
        extra = [c for c in result.schema if c not in schema]
        if missing or extra:
            msg = (
                f"{where}: the function returned columns {result.columns}; output_schema has "
                f"{schema.names()} (missing {missing}, unexpected {extra})"
            )
            raise SchemaMismatchError(msg)
        try:
            return result.select(schema.names()).cast(schema, strict=True)
        except pl.exceptions.PolarsError as exc:
            wrong = {c: str(result.schema[c]) for c in schema if result.schema[c] != schema[c]}
            msg = (
                f"{where}: the function returned dtypes {wrong} that do not cast to "
                f"output_schema {dict(schema)}: {exc}"
            )
            raise SchemaMismatchError(msg) from None

    def _conform_new_state(
        self, new_state: Any, called: pl.DataFrame, *, timed_out: bool
    ) -> pl.DataFrame:
        """A vectorised function's ``new_state`` as changes in store form, checked."""
        where, keys = self.spec.where(), self.keys
        if new_state is None:
            return self._no_changes()
        if not isinstance(new_state, pl.DataFrame):
            msg = f"{where}: new_state must be a polars DataFrame or None; got {type(new_state).__name__}"
            raise SchemaMismatchError(msg)
        allowed = {*keys, *self.state_names, REMOVE_COLUMN, TIMER_COLUMN}
        extra = [c for c in new_state.columns if c not in allowed]
        missing_keys = [k for k in keys if k not in new_state.columns]
        if extra or missing_keys:
            msg = (
                f"{where}: new_state has unexpected columns {extra} or lacks key columns "
                f"{missing_keys}; it holds the keys, the state columns {self.state_names}, "
                f"and optionally {REMOVE_COLUMN!r} and {TIMER_COLUMN!r}"
            )
            raise SchemaMismatchError(msg)
        frame = new_state
        if REMOVE_COLUMN in frame.columns:
            frame = frame.with_columns(pl.col(REMOVE_COLUMN).cast(pl.Boolean).fill_null(False))
        else:
            frame = frame.with_columns(pl.lit(False).alias(REMOVE_COLUMN))
        absent = [c for c in self.state_names if c not in frame.columns]
        if absent:
            if not frame.get_column(REMOVE_COLUMN).all():
                msg = (
                    f"{where}: new_state lacks the state columns {absent}; only rows that "
                    f"remove a key ({REMOVE_COLUMN}=true) may leave them out"
                )
                raise SchemaMismatchError(msg)
            frame = frame.with_columns(
                pl.lit(None, self.node.state.schema[c]).alias(c) for c in absent
            )
        if frame.select(keys).is_duplicated().any():
            dupes = frame.filter(frame.select(keys).is_duplicated()).select(keys).unique().rows()
            msg = f"{where}: new_state has several rows for the keys {dupes[:5]}"
            raise SchemaMismatchError(msg)
        strangers = frame.join(called.select(keys), on=keys, how="anti", nulls_equal=True)
        if strangers.height:
            msg = (
                f"{where}: new_state has keys the function was not called for: "
                f"{strangers.select(keys).rows()[:5]}; a call may change only its own keys"
            )
            raise SchemaMismatchError(msg)
        target = {**{k: self.store.schema[k] for k in keys}, **self.node.state.schema}
        try:
            frame = frame.with_columns(pl.col(c).cast(t, strict=True) for c, t in target.items())
        except pl.exceptions.PolarsError as exc:
            wrong = {c: str(frame.schema[c]) for c, t in target.items() if frame.schema[c] != t}
            msg = f"{where}: new_state columns {wrong} do not cast to the state's {target}: {exc}"
            raise SchemaMismatchError(msg) from None
        if TIMER_COLUMN in frame.columns:
            dtype = frame.schema[TIMER_COLUMN]
            if dtype == pl.Null:
                timer = pl.lit(None, pl.Int64)
            elif isinstance(dtype, (pl.Datetime, pl.Date)):
                timer = to_us(TIMER_COLUMN)
            else:
                msg = f"{where}: new_state column {TIMER_COLUMN!r} must be a Datetime or Date; got {dtype}"
                raise SchemaMismatchError(msg)
            if self.node.timeout is None:
                msg = f"{where}: new_state sets {TIMER_COLUMN!r} but the operator has timeout=None"
                raise PlanError(msg)
            frame = frame.with_columns(timer.alias(TIMER))
        else:
            kept = called.select(*keys, TIMER)
            if timed_out:  # the timers that fired are gone
                kept = kept.with_columns(pl.lit(None, pl.Int64).alias(TIMER))
            frame = frame.join(kept, on=keys, how="left", nulls_equal=True)
        return frame.select(*keys, *self.state_names, REMOVE_COLUMN, TIMER)

    def _no_changes(self) -> pl.DataFrame:
        schema = {**{k: self.store.schema[k] for k in self.keys}, **self.node.state.schema}
        return pl.DataFrame(schema={**schema, REMOVE_COLUMN: pl.Boolean(), TIMER: pl.Int64()})

    # -- writing back ---------------------------------------------------------------------

    def _apply(
        self, called: pl.DataFrame, changes: pl.DataFrame, timed_out: bool, batch_ms: int
    ) -> None:
        """Write the changes of one call to the store (one ``apply``).

        ``changes`` (keys, state columns, ``_remove``, timer in µs) replace the
        state and timer of their keys; a removed key without a timer is
        deleted. In a timer call the keys were taken out of the store before
        the call, so the keys the function left alone go back without the
        timer that fired (their TTL clock kept).
        """
        keys, columns = self.keys, self.store.schema.names()
        remove = pl.col(REMOVE_COLUMN)
        written = changes.filter(~remove | pl.col(TIMER).is_not_null()).select(
            *keys,
            *[
                pl.when(remove).then(pl.lit(None, dtype)).otherwise(pl.col(c)).alias(c)
                for c, dtype in self.node.state.schema.items()
            ],
            (~remove).alias(HAS_STATE),
            pl.col(TIMER),
            pl.lit(batch_ms, pl.Int64).alias(UPDATED),
        )
        parts = [written]
        if timed_out:
            untouched = called.join(changes.select(keys), on=keys, how="anti", nulls_equal=True)
            parts.append(
                untouched.filter(pl.col(HAS_STATE))
                .with_columns(pl.lit(None, pl.Int64).alias(TIMER))
                .select(columns)
            )
        upserts = pl.concat(parts, how="vertical") if len(parts) > 1 else written
        deletes = changes.filter(remove & pl.col(TIMER).is_null()).select(keys)
        self.store.apply(upserts=upserts, deletes=deletes)
        lowest: int | None = written.select(pl.col(TIMER).min()).item()
        if lowest is not None and (self._next_timer_us is None or lowest < self._next_timer_us):
            self._next_timer_us = lowest
        self._updated += int(changes.height - changes.get_column(REMOVE_COLUMN).sum())
        self._removed += int(
            changes.join(
                called.filter(pl.col(HAS_STATE)).select(keys),
                on=keys,
                how="semi",
                nulls_equal=True,
            )
            .get_column(REMOVE_COLUMN)
            .sum()
        )
