"""The ``join`` verbs of :class:`~microstream.api.frame.StreamFrame` (a mixin): with a
static table (``join``) and of two streams (``join``, ``join_asof``, ``join_where``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import polars as pl

from microstream.exceptions import PlanError
from microstream.plan.nodes import PlanNode, StaticJoinNode
from microstream.protocols import StaticSide
from microstream.registry import static_table_adapters
from microstream.time.windows import time_dtype_check

if TYPE_CHECKING:
    from microstream._typing import StaticJoinStrategy

__all__ = ["JoinVerbs"]

Frame = TypeVar("Frame", bound="JoinVerbs")


class JoinVerbs:
    """The join verbs (a mixin: the frame keeps its plan in ``_plan`` and its schema in
    ``_schema``)."""

    _plan: PlanNode
    _schema: pl.Schema

    def _from_plan(self: Frame, plan: PlanNode) -> Frame:
        return type(self)(plan)  # type: ignore[call-arg]

    def collect_schema(self) -> pl.Schema:
        """The schema of the rows the query produces."""
        return self._schema

    def join(
        self: Frame,
        other: pl.DataFrame | pl.LazyFrame | Any,
        on: Any = None,
        how: StaticJoinStrategy = "inner",
        *,
        left_on: Any = None,
        right_on: Any = None,
        suffix: str = "_right",
        validate: str = "m:m",
        nulls_equal: bool = False,
        coalesce: bool | None = None,
        maintain_order: Literal["none", "left", "right", "left_right", "right_left"] = "left",
        within: str | timedelta | tuple[str | timedelta, str | timedelta] | None = None,
        left_time: str | None = None,
        right_time: str | None = None,
    ) -> Frame:
        """Join the stream with a static table or with another stream, as :meth:`polars.LazyFrame.join`.

        **Stream with stream.** ``other`` a StreamFrame: both sides buffer
        their rows in state until the watermark guarantees no more matches (see
        :mod:`microstream.operators.stream_join`). ``how`` is any of ``"inner"``, ``"left"``,
        ``"right"``, ``"full"``, ``"semi"``, ``"anti"``; ``within`` bounds
        ``right_time - left_time``: a duration ``d`` means ``[-d, d]``, a pair
        ``(lower, upper)`` that interval (``"-5m"`` is minus five minutes). The
        time columns default to each side's ``with_watermark`` column. Without
        ``within`` the state grows forever: refused for every ``how`` but
        ``"inner"``, which warns. Outer joins emit a row with nulls for the other
        side once the watermark passes its bound without a match; ``semi`` emits a
        left row at its first match, ``anti`` when it expires unmatched. Output
        mode append only (as in Spark).

        **Stream with a static table.**
        ``other`` may be a DataFrame, a LazyFrame (joined lazily every batch;
        note that Polars' ``scan_*`` fixes its file list when created), or a
        ``deltalake.DeltaTable``, which is re-read whenever its version changes:
        the way to join a stream with a table that changes.
        ``how`` is ``"inner"``, ``"left"``, ``"semi"``, ``"anti"`` or ``"cross"``:
        the stream side drives the join, so ``"right"`` and ``"full"`` (which
        emit static rows that no stream row matched *yet*) are refused. Unlike
        Polars' default, ``maintain_order="left"`` keeps the stream's arrival
        order, so output is deterministic.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> users = pl.DataFrame({"user": [1, 2], "country": ["NL", "FR"]})
        >>> clicks = ms.MemoryStream({"user": pl.Int64, "url": pl.String}).lazy()
        >>> clicks.join(users, on="user", how="left").columns
        ['user', 'url', 'country']

        Two streams, each click with its impression of the 5 minutes before:

        >>> imps = ms.MemoryStream({"ad": pl.Int64, "imp_time": pl.Datetime("us")})
        >>> clicks = ms.MemoryStream({"ad": pl.Int64, "click_time": pl.Datetime("us")})
        >>> joined = (
        ...     imps.lazy()
        ...     .with_watermark("imp_time", "1m")
        ...     .join(
        ...         clicks.lazy().with_watermark("click_time", "1m"),
        ...         on="ad",
        ...         how="left",
        ...         within=("0s", "5m"),
        ...     )
        ... )
        >>> joined.columns
        ['ad', 'imp_time', 'click_time']
        """
        if isinstance(other, JoinVerbs):
            return self._stream_join(
                other,
                on=on,
                how=how,
                left_on=left_on,
                right_on=right_on,
                suffix=suffix,
                nulls_equal=nulls_equal,
                within=within,
                left_time=left_time,
                right_time=right_time,
            )
        if within is not None or left_time is not None or right_time is not None:
            msg = "within=, left_time= and right_time= bound joins of two streams; other is static"
            raise PlanError(msg)
        if how not in ("inner", "left", "semi", "anti", "cross"):
            msg = (
                f"join(how={how!r}) with a static table cannot run on a stream: it would emit "
                "static rows that no stream row has matched *yet*, and retract them later. "
                "Use how='inner', 'left', 'semi', 'anti' or 'cross'"
            )
            raise PlanError(msg)
        side: pl.LazyFrame | StaticSide
        if isinstance(other, pl.DataFrame):
            side = other.lazy()
        elif isinstance(other, (pl.LazyFrame, StaticSide)):
            side = other
        else:
            side = _adapted_static_side(other)
        kwargs: dict[str, Any] = {"how": how, "suffix": suffix}
        if how != "cross" and maintain_order != "none":
            kwargs["maintain_order"] = maintain_order
        if on is not None:
            kwargs["on"] = on
        if left_on is not None:
            kwargs["left_on"] = left_on
        if right_on is not None:
            kwargs["right_on"] = right_on
        if validate != "m:m":
            kwargs["validate"] = validate
        if nulls_equal:
            kwargs["nulls_equal"] = nulls_equal
        if coalesce is not None:
            kwargs["coalesce"] = coalesce
        return self._from_plan(StaticJoinNode(self._plan, side, kwargs))

    def join_asof(
        self: Frame,
        other: Frame,
        *,
        left_on: str | None = None,
        right_on: str | None = None,
        on: str | None = None,
        by_left: str | Sequence[str] | None = None,
        by_right: str | Sequence[str] | None = None,
        by: str | Sequence[str] | None = None,
        strategy: str = "backward",
        suffix: str = "_right",
        tolerance: str | timedelta | None = None,
        allow_exact_matches: bool = True,
    ) -> Frame:
        """Each left row with the latest right row at or before it, as :meth:`polars.LazyFrame.join_asof`.

        Both sides are streams with ``with_watermark`` on their time columns
        (``left_on``/``right_on``, default those columns). A left row is emitted
        once the watermark passes its time, so no right row before it can still
        arrive; late rows of either side are dropped and counted. ``by`` (or
        ``by_left``/``by_right``) is required: it keys the state. Only
        ``strategy="backward"``.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> trades = ms.MemoryStream({"sym": pl.String, "t": pl.Datetime("us"), "qty": pl.Int64})
        >>> quotes = ms.MemoryStream({"sym": pl.String, "qt": pl.Datetime("us"), "px": pl.Float64})
        >>> joined = (
        ...     trades.lazy()
        ...     .with_watermark("t", "1s")
        ...     .join_asof(quotes.lazy().with_watermark("qt", "1s"), left_on="t", right_on="qt", by="sym")
        ... )
        >>> joined.columns
        ['sym', 't', 'qty', 'qt', 'px']
        """
        from microstream.operators.join_bounds import signed_us, stream_join_keys
        from microstream.operators.stream_join import StreamAsofJoinNode

        if not isinstance(other, JoinVerbs):
            msg = "join_asof needs a stream on both sides; this version has no static join_asof"
            raise PlanError(msg)
        if strategy != "backward":
            msg = (
                f"join_asof(strategy={strategy!r}) of two streams is not supported: only "
                "'backward' (the latest right row at or before each left row)"
            )
            raise PlanError(msg)
        left_time = _join_time(self, left_on or on, "left")
        right_time = _join_time(other, right_on or on, "right")
        if left_time is None or right_time is None:
            msg = "join_asof of two streams needs with_watermark on both sides (or left_on=/right_on=)"
            raise PlanError(msg)

        def names(value: str | Sequence[str] | None) -> tuple[str, ...]:
            return (value,) if isinstance(value, str) else tuple(value or ())

        keys_left, keys_right = names(by_left or by), names(by_right or by)
        if not keys_left or len(keys_left) != len(keys_right):
            msg = (
                "join_asof of two streams needs by= (or by_left= and by_right=, as many): the "
                "keys its state is kept by"
            )
            raise PlanError(msg)
        left_schema, right_schema = self.collect_schema(), other.collect_schema()
        stream_join_keys(left_schema, right_schema, None, keys_left, keys_right)
        node = StreamAsofJoinNode(
            input=self._plan,
            right=other._plan,
            left_time=left_time,
            right_time=right_time,
            by_left=keys_left,
            by_right=keys_right,
            tolerance_us=None if tolerance is None else signed_us(tolerance, "tolerance"),
            suffix=suffix,
            allow_exact_matches=allow_exact_matches,
            left_schema=left_schema,
            right_schema=right_schema,
        )
        node.output_schema()
        return self._from_plan(node)

    def join_where(
        self: Frame, other: Frame, *predicates: pl.Expr, suffix: str = "_right"
    ) -> Frame:
        """Inner join of two streams on predicates, as :meth:`polars.LazyFrame.join_where`.

        The predicates must say how state can go: equality between a left and a
        right column (the keys), and ``<``/``<=``/``>``/``>=`` between the two
        sides' ``with_watermark`` columns, plus or minus a constant
        ``pl.duration(...)``, giving a lower and an upper bound of ``right_time -
        left_time``. Right columns whose name the left has are named with
        ``suffix``, in the predicates too, as in Polars; the output keeps every
        column of both sides. Runs as :meth:`join` with ``within=`` those bounds.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> imps = ms.MemoryStream({"ad_id": pl.Int64, "imp_time": pl.Datetime("us")})
        >>> clicks = ms.MemoryStream({"click_ad_id": pl.Int64, "click_time": pl.Datetime("us")})
        >>> joined = (
        ...     imps.lazy()
        ...     .with_watermark("imp_time", "1m")
        ...     .join_where(
        ...         clicks.lazy().with_watermark("click_time", "1m"),
        ...         pl.col("ad_id") == pl.col("click_ad_id"),
        ...         pl.col("click_time") >= pl.col("imp_time"),
        ...         pl.col("click_time") <= pl.col("imp_time") + pl.duration(minutes=1),
        ...     )
        ... )
        >>> joined.columns
        ['ad_id', 'imp_time', 'click_ad_id', 'click_time']
        """
        from microstream.operators.stream_join import StreamJoinNode, parse_join_where

        if not isinstance(other, JoinVerbs):
            msg = (
                "join_where needs a stream on both sides; join a stream with a static table "
                "with join(...) and filter the result"
            )
            raise PlanError(msg)
        left_schema, right_schema = self.collect_schema(), other.collect_schema()
        where = parse_join_where(left_schema, right_schema, predicates, suffix)
        for frame, column, side in (
            (self, where.left_time, "left"),
            (other, where.right_time, "right"),
        ):
            marks = [m.column for m in frame._plan.watermark_nodes()]
            if column not in marks:
                msg = (
                    f"join_where bounds the {side} stream by {column!r}, which is not its "
                    f"with_watermark column ({marks or 'none'}): the watermark could not tell "
                    "when its rows can go"
                )
                raise PlanError(msg)
        from microstream.operators.stream_join import stream_join_keys

        stream_join_keys(left_schema, right_schema, None, where.left_on, where.right_on)
        node = StreamJoinNode(
            input=self._plan,
            right=other._plan,
            left_on=where.left_on,
            right_on=where.right_on,
            how="inner",
            suffix=suffix,
            left_time=where.left_time,
            right_time=where.right_time,
            lower_us=where.lower_us,
            upper_us=where.upper_us,
            left_schema=left_schema,
            right_schema=right_schema,
            coalesce=False,
        )
        node.output_schema()
        return self._from_plan(node)

    def _stream_join(
        self: Frame,
        other: JoinVerbs,
        *,
        on: Any,
        how: str,
        left_on: Any,
        right_on: Any,
        suffix: str,
        nulls_equal: bool,
        within: str | timedelta | tuple[str | timedelta, str | timedelta] | None,
        left_time: str | None,
        right_time: str | None,
    ) -> Frame:
        from microstream.operators.stream_join import (
            StreamJoinNode,
            stream_join_keys,
            stream_join_window,
        )

        if how not in ("inner", "left", "right", "full", "semi", "anti"):
            msg = (
                f"join(how={how!r}) of two streams is not supported; use 'inner', 'left', "
                "'right', 'full', 'semi' or 'anti'"
            )
            raise PlanError(msg)
        left_schema, right_schema = self.collect_schema(), other.collect_schema()
        keys_left, keys_right = stream_join_keys(left_schema, right_schema, on, left_on, right_on)
        times = [
            _join_time(frame, given, side)
            for frame, given, side in ((self, left_time, "left"), (other, right_time, "right"))
        ]
        lower, upper = stream_join_window(within, how, times[0], times[1])
        node = StreamJoinNode(
            input=self._plan,
            right=other._plan,
            left_on=keys_left,
            right_on=keys_right,
            how=how,
            suffix=suffix,
            left_time=times[0],
            right_time=times[1],
            lower_us=lower,
            upper_us=upper,
            left_schema=left_schema,
            right_schema=right_schema,
            nulls_equal=nulls_equal,
        )
        node.output_schema()  # Polars' own refusals (e.g. duplicate columns) at plan time
        return self._from_plan(node)


def _join_time(frame: JoinVerbs, given: str | None, side: str) -> str | None:
    """A join side's event-time column: ``given``, else its ``with_watermark`` column."""
    marks = frame._plan.watermark_nodes()
    if given is None:
        return marks[0].column if len(marks) == 1 else None
    time_dtype_check(frame.collect_schema(), given, f"join({side}_time=)")
    return given


def _adapted_static_side(table: object) -> StaticSide:
    """The static side a connector makes of its own table object (``deltalake.DeltaTable``)."""
    for adapter in static_table_adapters():
        if adapter.claims(table):
            return adapter.from_table(table)
    msg = (
        "join's other side must be a polars DataFrame or LazyFrame, a StaticSide, or a "
        "table a connector adapts (a deltalake.DeltaTable with the Delta connector); "
        f"got {type(table).__name__} instead"
    )
    raise PlanError(msg)
