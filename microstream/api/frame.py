"""``StreamFrame``: a stream as an unbounded LazyFrame.

Every verb returns a new frame (nothing mutates) and checks, when it is
called, that the query can run on a stream: an unknown column, a verb with no
meaning on an unbounded stream, or an expression whose value depends on how
the stream is cut into batches raises :class:`~microstream.PlanError` there,
not in the middle of a running query.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from microstream.api.groupby import (
    StreamDynamicGroupBy,
    StreamGroupBy,
    StreamSessionGroupBy,
    check_alignment,
    emit_policy,
)
from microstream.api.match_recognize import PatternVerbs
from microstream.api.sinks import SinkVerbs
from microstream.exceptions import PlanError
from microstream.operators.dedup import DedupNode
from microstream.operators.stateful_fn import state_ttl_ms
from microstream.plan.nodes import (
    MapBatchesNode,
    PlanNode,
    ScanNode,
    StatelessNode,
    StaticJoinNode,
    WatermarkNode,
    check_row_wise,
)
from microstream.plan.physical import explain_lines
from microstream.plan.processing_time import processing_time_node
from microstream.plan.unsupported import NOT_YET_VERBS, UNSUPPORTED_VERBS
from microstream.protocols import StaticSide
from microstream.registry import static_table_adapters
from microstream.time.duration import parse_duration
from microstream.time.windows import time_dtype_check

if TYPE_CHECKING:
    from microstream._typing import StaticJoinStrategy
    from microstream.protocols import SourceSpec

__all__ = ["StreamFrame"]

logger = logging.getLogger("microstream")


class StreamFrame(SinkVerbs, PatternVerbs):
    """A query over a stream, written with Polars' LazyFrame verbs.

    Build one with a source (``ms.scan_files``, ``ms.scan_rate``,
    ``ms.MemoryStream(...).lazy()``), chain verbs, and start it with a
    ``sink_*`` verb, which returns a running :class:`~microstream.StreamingQuery`.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"user": pl.Int64, "amount": pl.Float64})
    >>> big = stream.lazy().filter(pl.col("amount") > 10).select("user")
    >>> big.collect_schema()
    Schema([('user', Int64)])
    >>> stream.lazy().sort("user")
    Traceback (most recent call last):
    ...
    microstream.exceptions.PlanError: sort() cannot run on a stream: a stream has no end to sort up to; sort inside foreach_batch, or sort the sink's output when you read it
    """

    def __init__(self, plan: PlanNode):
        self._plan = plan
        self._schema = plan.schema()

    def _from_plan(self, plan: PlanNode) -> StreamFrame:
        return StreamFrame(plan)

    @classmethod
    def from_source(cls, source: SourceSpec) -> StreamFrame:
        """A frame that reads ``source`` (what ``scan_*`` functions return)."""
        return cls(ScanNode(source=source))

    # -- schema and plan --------------------------------------------------------------

    @property
    def plan(self) -> PlanNode:
        """The frame's logical plan (frozen data)."""
        return self._plan

    def collect_schema(self) -> pl.Schema:
        """The schema of the rows the query produces."""
        return self._schema

    @property
    def schema(self) -> pl.Schema:
        return self._schema

    @property
    def columns(self) -> list[str]:
        return list(self._schema.names())

    def explain(self) -> None:
        """Print the plan, one node a line, the source last; then the physical plan:
        the stages each batch runs, with an exchange before every stateful operator
        (the keys its input is partitioned by).

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"k": pl.String, "x": pl.Int64}, name="xs")
        >>> stream.lazy().filter(pl.col("x") > 1).group_by("k").agg(pl.len()).explain()
        group_by(['k']).agg(len())
          · state kept forever (no watermark on a time key)
          · len: incremental partials [len]
          filter([(col("x")) > (dyn int: 1)])
            Scan MemoryStream[xs]
        <BLANKLINE>
        Physical plan:
          [0] Scan MemoryStream[xs] -> filter([(col("x")) > (dyn int: 1)])
          [1] Exchange(hash ['k']) <- [0]
          [2] op0 group_by(['k']).agg(len()) <- [1]
          [3] Sink <- [2]
        """
        print("\n".join(explain_lines(self._plan)))

    def __getattr__(self, name: str) -> Any:
        if name in UNSUPPORTED_VERBS:
            msg = f"{name}() cannot run on a stream: {UNSUPPORTED_VERBS[name]}"
            raise PlanError(msg)
        if name in NOT_YET_VERBS:
            msg = (
                f"{name}() on a stream is not available in this version of microstream; "
                "use group_by_dynamic(...) windows, or per-batch logic with "
                "foreach_batch(fn) or map_batches(fn) meanwhile"
            )
            raise PlanError(msg)
        msg = f"'StreamFrame' object has no attribute {name!r}"
        raise AttributeError(msg)

    def __repr__(self) -> str:
        return f"<StreamFrame {dict(self._schema)}>\n" + "\n".join(self._plan.explain_lines())

    def _then(self, verb: str, *args: Any, **kwargs: Any) -> StreamFrame:
        return StreamFrame(StatelessNode(self._plan, verb, args, kwargs))

    # -- stateless verbs ----------------------------------------------------------------

    def filter(self, *predicates: Any, **constraints: Any) -> StreamFrame:
        """Keep the rows that match, as :meth:`polars.LazyFrame.filter`."""
        predicates = _reusable(predicates)
        check_row_wise("filter", [*_flatten(predicates)])
        return self._then("filter", *predicates, **constraints)

    def select(self, *exprs: Any, **named_exprs: Any) -> StreamFrame:
        """Select or compute columns, as :meth:`polars.LazyFrame.select` (row-wise only)."""
        exprs = _reusable(exprs)
        check_row_wise("select", [*_flatten(exprs), *named_exprs.values()])
        return self._then("select", *exprs, **named_exprs)

    def with_columns(self, *exprs: Any, **named_exprs: Any) -> StreamFrame:
        """Add or replace columns, as :meth:`polars.LazyFrame.with_columns` (row-wise only).

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> frame = ms.MemoryStream({"x": pl.Int64}).lazy()
        >>> frame.with_columns(y=pl.col("x") + 1).columns
        ['x', 'y']
        """
        exprs = _reusable(exprs)
        check_row_wise("with_columns", [*_flatten(exprs), *named_exprs.values()])
        return self._then("with_columns", *exprs, **named_exprs)

    def drop(self, *columns: Any, strict: bool = True) -> StreamFrame:
        """Remove columns, as :meth:`polars.LazyFrame.drop`."""
        return self._then("drop", *columns, strict=strict)

    def rename(
        self, mapping: Mapping[str, str] | Callable[[str], str], *, strict: bool = True
    ) -> StreamFrame:
        """Rename columns, as :meth:`polars.LazyFrame.rename`."""
        return self._then("rename", mapping, strict=strict)

    def cast(self, dtypes: Any, *, strict: bool = True) -> StreamFrame:
        """Cast columns, as :meth:`polars.LazyFrame.cast`."""
        return self._then("cast", dtypes, strict=strict)

    def explode(self, columns: Any, *more_columns: Any, **kwargs: Any) -> StreamFrame:
        """One row per list element, as :meth:`polars.LazyFrame.explode`."""
        return self._then("explode", columns, *more_columns, **kwargs)

    def unnest(self, columns: Any, *more_columns: Any, **kwargs: Any) -> StreamFrame:
        """Struct fields as columns, as :meth:`polars.LazyFrame.unnest`."""
        return self._then("unnest", columns, *more_columns, **kwargs)

    def drop_nulls(self, subset: Any = None) -> StreamFrame:
        """Drop rows with nulls, as :meth:`polars.LazyFrame.drop_nulls`."""
        return self._then("drop_nulls", subset)

    def fill_null(self, value: Any = None, **kwargs: Any) -> StreamFrame:
        """Replace nulls with a value; ``strategy=`` needs neighbouring rows and is refused."""
        if kwargs.get("strategy") is not None:
            msg = (
                "fill_null(strategy=...) cannot run on a stream: forward/backward fill needs "
                "the neighbouring rows of the whole stream; fill with a value instead"
            )
            raise PlanError(msg)
        check_row_wise("fill_null", [value])
        return self._then("fill_null", value, **kwargs)

    def fill_nan(self, value: Any) -> StreamFrame:
        """Replace NaN with a value, as :meth:`polars.LazyFrame.fill_nan`."""
        check_row_wise("fill_nan", [value])
        return self._then("fill_nan", value)

    def unpivot(self, on: Any = None, *, index: Any = None, **kwargs: Any) -> StreamFrame:
        """Wide to long, as :meth:`polars.LazyFrame.unpivot` (row-wise, so stream-safe)."""
        return self._then("unpivot", on, index=index, **kwargs)

    def pipe(self, function: Callable[..., StreamFrame], *args: Any, **kwargs: Any) -> StreamFrame:
        """``function(self, *args, **kwargs)``: share one query function with static frames."""
        return function(self, *args, **kwargs)

    def map_batches(
        self,
        function: Callable[[pl.DataFrame], pl.DataFrame],
        *,
        schema: Mapping[str, Any] | pl.Schema | None = None,
    ) -> StreamFrame:
        """Apply ``function`` to every micro-batch's DataFrame.

        The function sees one batch at a time, so it must treat rows
        independently for the stream to mean what the same code means on a
        static frame. Without ``schema`` the output schema is found by calling
        ``function`` on an empty frame.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> frame = ms.MemoryStream({"x": pl.Int64}).lazy()
        >>> frame.map_batches(lambda df: df.with_columns(y=pl.col("x") * 10)).columns
        ['x', 'y']
        """
        if schema is None:
            try:
                out = function(pl.DataFrame(schema=self._schema))
            except Exception as exc:
                msg = (
                    f"map_batches could not find the output schema of {function!r} by calling "
                    f"it on an empty frame ({exc}); pass schema= explicitly"
                )
                raise PlanError(msg) from exc
            if not isinstance(out, pl.DataFrame):
                msg = f"map_batches function must return a polars DataFrame; got {type(out)!r}"
                raise PlanError(msg)
            output_schema = out.schema
        else:
            output_schema = pl.Schema(schema)
        return StreamFrame(MapBatchesNode(self._plan, function, output_schema))

    def join(
        self,
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
    ) -> StreamFrame:
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
        if isinstance(other, StreamFrame):
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
        return StreamFrame(StaticJoinNode(self._plan, side, kwargs))

    def join_asof(
        self,
        other: StreamFrame,
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
    ) -> StreamFrame:
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
        from microstream.operators.stream_join import (
            StreamAsofJoinNode,
            _signed_us,
            stream_join_keys,
        )

        if not isinstance(other, StreamFrame):
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
            tolerance_us=None if tolerance is None else _signed_us(tolerance, "tolerance"),
            suffix=suffix,
            allow_exact_matches=allow_exact_matches,
            left_schema=left_schema,
            right_schema=right_schema,
        )
        node.output_schema()
        return StreamFrame(node)

    def join_where(
        self, other: StreamFrame, *predicates: pl.Expr, suffix: str = "_right"
    ) -> StreamFrame:
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

        if not isinstance(other, StreamFrame):
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
        return StreamFrame(node)

    def _stream_join(
        self,
        other: StreamFrame,
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
    ) -> StreamFrame:
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
        return StreamFrame(node)

    # -- event time and state ------------------------------------------------------------

    def with_processing_time(self, name: str = "processing_time") -> StreamFrame:
        """Add column ``name``: the time the row's micro-batch is processed.

        The value is the batch's timestamp, logged in the write-ahead log before
        the batch runs (``query.last_progress.batch_timestamp_ms``): every row of
        a batch has the same one, and a batch re-run after a crash or restart
        has the value of its first run, so results stay exactly-once. The column
        is a ``Datetime("ms")``, UTC without a time zone. Flink's ``PROCTIME()``;
        window on it with ``with_watermark(name, "0s")`` and
        ``group_by_dynamic(name, ...)`` for processing-time windows.

        Parameters
        ----------
        name
            The new column's name; one the stream already has is a ``PlanError``.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"x": pl.Int64})
        >>> query = stream.lazy().with_processing_time("seen_at").sink_memory("doc_proctime")
        >>> _ = stream.add_data({"x": [1, 2]})
        >>> query.process_all_available()
        >>> out = ms.table("doc_proctime")
        >>> out.schema
        Schema([('x', Int64), ('seen_at', Datetime(time_unit='ms', time_zone=None))])
        >>> stamp = query.last_progress.batch_timestamp_ms
        >>> out["seen_at"].dt.epoch("ms").to_list() == [stamp, stamp]
        True
        >>> query.stop()
        """
        return StreamFrame(processing_time_node(self._plan, self._schema, name))

    def with_watermark(
        self,
        column: str,
        delay: str | timedelta,
        *,
        idle_timeout: str | timedelta | None = None,
        on_late: str | Callable[[pl.DataFrame, int], object] | None = None,
    ) -> StreamFrame:
        """Declare ``column`` the event time, and how late rows may arrive.

        The watermark of batch N is the largest event time seen before N minus
        ``delay``; it never goes back. Windows close when the watermark passes
        their end, and rows that arrive behind the previous batch's watermark
        are late: stateful operators drop them (counted in progress), or hand
        them to ``on_late``. Before the first event there is no watermark: no
        row of the first batch is late, whatever its time (1960 included).
        Rows whose event time is null belong to no window, session or join
        bound: they are dropped, counted (``num_rows_dropped_null_time``) and
        handed to ``on_late`` too.

        Parameters
        ----------
        column
            A Datetime or Date column.
        delay
            How far behind the largest event time rows may still arrive (``"10s"``).
        idle_timeout
            When this input has sent nothing for this long (processing time), it
            stops holding the global watermark back (with several inputs).
        on_late
            A memory table name (read with ``ms.table(name)``) or a function
            ``fn(df, batch_id)`` receiving the late rows of each batch, with
            ``batch_id``, ``operator``, ``late_watermark`` (the watermark missed),
            ``reason`` (``"late"`` or ``"null event time: ..."``) and, for
            windows, ``window_start``/``window_end``.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> events = ms.MemoryStream({"ts": pl.Datetime("us"), "n": pl.Int64}).lazy()
        >>> events.with_watermark("ts", "10s").collect_schema()
        Schema([('ts', Datetime(time_unit='us', time_zone=None)), ('n', Int64)])
        """
        time_dtype_check(self._schema, column, "with_watermark")
        delay_us = parse_duration(delay, name="delay") // timedelta(microseconds=1)
        idle = (
            None
            if idle_timeout is None
            else parse_duration(idle_timeout, name="idle_timeout") // timedelta(microseconds=1)
        )
        if on_late is not None and not (isinstance(on_late, str) or callable(on_late)):
            msg = f"on_late must be a memory table name or a function; got {on_late!r}"
            raise PlanError(msg)
        return StreamFrame(
            WatermarkNode(self._plan, column, delay_us, idle_timeout_us=idle, on_late=on_late)
        )

    def group_by(
        self,
        *by: Any,
        maintain_order: bool = False,
        early_every: str | timedelta | None = None,
        every_n_rows: int | None = None,
        emit_on_change: dict[str, float] | None = None,
        state_ttl: str | timedelta | None = None,
    ) -> StreamGroupBy[StreamFrame]:
        """Group the stream by keys; ``.agg(...)`` keeps one result per key.

        How long a group lives depends on its keys:

        - an **event-time key** closes its groups with the watermark: the
          ``with_watermark`` column, or a non-decreasing function of it
          computed after ``with_watermark`` (``dt.truncate``, ``dt.round``,
          ``dt.offset_by``, ``dt.date``, plus or minus a constant duration,
          aliases and renames, and chains of these). A group is closed once no
          row on time can reach it: for ``pl.col("ts").dt.truncate("1h")``,
          once the watermark reaches the hour's last microsecond. Output mode
          ``"append"`` emits each group once, when it closes; ``"update"``
          emits the groups each batch changed and then forgets closed ones; a
          row for a group already closed is late (counted, or sent to
          ``on_late``), like a window's;
        - without one (a global aggregation) every group is kept forever, and
          the query warns when it starts (:class:`ms.UnboundedStateWarning`),
          unless ``state_ttl`` bounds the state. Output modes ``"update"`` and
          ``"complete"``.

        Parameters
        ----------
        *by
            Column names or expressions (expressions are computed first).
        maintain_order
            Accepted for Polars compatibility; emitted rows are sorted by key.
        early_every, every_n_rows, emit_on_change
            Emit triggers for ``output_mode="update"``, as in
            :meth:`group_by_dynamic`.
        state_ttl
            Forget a group not updated for this long, in **processing time**:
            the batches' logged timestamps, so a re-run batch forgets the same
            groups. Checked at the start of every batch; as Flink's state TTL,
            the group goes silently: ``"update"`` emits nothing for it,
            ``"complete"`` leaves it out of the next tables, and a row for it
            later starts a new group from nothing. Not with ``"append"``
            (which would lose the group unemitted).

        Returns
        -------
        StreamGroupBy
            Call ``.agg(...)`` on it.

        Examples
        --------
        Counts per hour and user, emitted once per hour when the watermark
        passes the hour; the state keeps only the open hours:

        >>> from datetime import datetime
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"ts": pl.Datetime("us"), "user": pl.String})
        >>> hourly = (
        ...     stream.lazy()
        ...     .with_watermark("ts", "10m")
        ...     .with_columns(hour=pl.col("ts").dt.truncate("1h"))
        ...     .group_by("hour", "user")
        ...     .agg(n=pl.len())
        ... )
        >>> query = hourly.sink_memory("doc_hourly")
        >>> t = datetime(2024, 1, 1)
        >>> _ = stream.add_data({"ts": [t.replace(minute=5), t.replace(minute=50),
        ...                             t.replace(hour=1, minute=30)], "user": ["a", "a", "b"]})
        >>> query.process_all_available()
        >>> ms.table("doc_hourly").rows()  # watermark 01:20: hour 00:00 is closed
        [(datetime.datetime(2024, 1, 1, 0, 0), 'a', 2)]
        >>> query.last_progress.state_operators[0].num_rows_total  # hour 01:00 only
        1
        >>> query.stop()
        """
        flat = [k for item in by for k in (item if isinstance(item, (list, tuple)) else [item])]
        emit = emit_policy(
            early_every=early_every, every_n_rows=every_n_rows, emit_on_change=emit_on_change
        )
        return StreamGroupBy(self, flat, emit, state_ttl_ms(state_ttl, "group_by"))

    def group_by_dynamic(
        self,
        index_column: str,
        *,
        every: str | timedelta,
        period: str | timedelta | None = None,
        offset: str | timedelta | None = None,
        include_boundaries: bool = False,
        closed: str = "left",
        label: str = "left",
        group_by: Any = None,
        start_by: str = "window",
        early_every: str | timedelta | None = None,
        every_n_rows: int | None = None,
        emit_on_change: dict[str, float] | None = None,
        allowed_lateness: str | timedelta | None = None,
        cumulative: bool = False,
    ) -> StreamDynamicGroupBy[StreamFrame]:
        """Event-time windows, as :meth:`polars.LazyFrame.group_by_dynamic`.

        Every row goes to each window ``[k*every + offset, k*every + offset + period)`` that
        contains it (``period`` defaults to ``every``: tumbling windows). The output has Polars'
        columns: the ``group_by`` keys, ``_lower_boundary``/``_upper_boundary`` with
        ``include_boundaries``, the index column holding the window start, then the aggregates.
        Only ``closed="left"``, ``label="left"`` and ``start_by="window"`` have a meaning on a
        stream.

        Sliding windows differ from Polars by design: a stream has no first row, so every window
        containing a row gets it, while Polars' batch ``group_by_dynamic`` starts at the first
        row's window and leaves out the earlier windows that also contain the first rows. To get
        the stream's result from Polars, pass ``offset=offset - (ceil(period / every) - 1) *
        every`` (``every="1m", period="3m"``: ``offset="-2m"``). Tumbling windows (``period ==
        every``) agree as they are.

        ``cumulative=True`` gives Flink's cumulative windows (beyond Polars): windows grow by
        ``every`` up to ``period`` (a multiple of it), ``[k*period + offset, k*period + offset +
        j*every)`` for ``j = 1 .. period/every``, each emitted when the watermark passes its own
        end (a daily running total, hourly: ``every="1h", period="1d"``); they share their start,
        so the output always has ``_lower_boundary``/``_upper_boundary``.

        Emit triggers (``output_mode="update"``, beyond Spark, after Flink): by default every group
        a batch changed is emitted. ``early_every="10s"`` emits a changed window at most that often
        (processing time of the batch), ``every_n_rows=1000`` once that many rows arrived since its
        last emission, ``emit_on_change={"total": 5.0}`` when the aggregate moved by more than the
        threshold; a window is always emitted when the watermark passes its end.
        ``allowed_lateness="5m"`` keeps a window's state that long after its end and emits a
        correction for each late change.

        Examples
        --------
        >>> from datetime import datetime
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"ts": pl.Datetime("us"), "n": pl.Int64})
        >>> per_minute = (
        ...     stream.lazy()
        ...     .with_watermark("ts", "30s")
        ...     .group_by_dynamic("ts", every="1m")
        ...     .agg(pl.col("n").sum())
        ... )
        >>> query = per_minute.sink_memory("doc_minutes")
        >>> _ = stream.add_data({"ts": [datetime(2024, 1, 1, 0, 0, 10), datetime(2024, 1, 1, 0, 2)],
        ...                      "n": [1, 2]})
        >>> query.process_all_available()
        >>> ms.table("doc_minutes").rows()  # the 00:00 window closed: watermark 00:01:30
        [(datetime.datetime(2024, 1, 1, 0, 0), 1)]
        >>> query.stop()
        """
        check_alignment(closed=closed, label=label, start_by=start_by)
        return StreamDynamicGroupBy(
            self,
            index_column,
            every=every,
            period=period,
            offset=offset,
            include_boundaries=include_boundaries,
            group_by=group_by,
            emit=emit_policy(
                early_every=early_every,
                every_n_rows=every_n_rows,
                emit_on_change=emit_on_change,
                allowed_lateness=allowed_lateness,
            ),
            cumulative=cumulative,
        )

    def group_by_session(
        self,
        index_column: str,
        *,
        gap: str | timedelta,
        group_by: Any = None,
    ) -> StreamSessionGroupBy[StreamFrame]:
        """Session windows: runs of events per key at most ``gap`` apart.

        A session spans ``[first event, last event + gap)``; sessions that touch
        merge, and an event that bridges two sessions merges them. The output
        has the keys, ``session_start``, ``session_end`` and the aggregates.
        Output modes ``append`` (each session once, when the watermark passes
        its end; needs ``with_watermark`` on ``index_column``) and ``update``.

        Examples
        --------
        >>> from datetime import datetime
        >>> import polars as pl
        >>> import microstream as ms
        >>> clicks = ms.MemoryStream({"ts": pl.Datetime("us"), "user": pl.String})
        >>> sessions = (
        ...     clicks.lazy()
        ...     .with_watermark("ts", "0s")
        ...     .group_by_session("ts", gap="30s", group_by="user")
        ...     .agg(clicks=pl.len())
        ... )
        >>> query = sessions.sink_memory("doc_sessions")
        >>> t = datetime(2024, 1, 1)
        >>> _ = clicks.add_data({"ts": [t, t.replace(second=20), t.replace(minute=5)],
        ...                      "user": ["a", "a", "a"]})
        >>> query.process_all_available()
        >>> ms.table("doc_sessions").select("user", "clicks").rows()
        [('a', 2)]
        >>> query.stop()
        """
        return StreamSessionGroupBy(self, index_column, gap, group_by)

    def unique(
        self,
        subset: str | Sequence[str] | None = None,
        *,
        keep: Literal["first", "any"] = "first",
        maintain_order: bool = True,
        within: str | timedelta | None = None,
    ) -> StreamFrame:
        """Drop duplicate rows: emit the first row of each key once, as it arrives.

        With the watermarked event-time column in ``subset`` a key is forgotten
        once the watermark passes its event time; with ``within=`` (Spark's
        ``dropDuplicatesWithinWatermark``) once the watermark passes its first
        event time plus ``within``. Otherwise seen keys are kept forever.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"id": pl.Int64, "v": pl.String})
        >>> query = stream.lazy().unique(subset="id").sink_memory("doc_unique")
        >>> _ = stream.add_data({"id": [1, 1, 2], "v": ["a", "b", "c"]})
        >>> query.process_all_available()
        >>> _ = stream.add_data({"id": [2, 3], "v": ["d", "e"]})
        >>> query.process_all_available()
        >>> ms.table("doc_unique").rows()
        [(1, 'a'), (2, 'c'), (3, 'e')]
        >>> query.stop()
        """
        if keep not in ("first", "any"):
            msg = (
                f"unique(keep={keep!r}) cannot run on a stream: it would need rows that have "
                "not arrived yet; use keep='first'"
            )
            raise PlanError(msg)
        columns = [subset] if isinstance(subset, str) else list(subset or self.columns)
        missing = [c for c in columns if c not in self._schema]
        if missing:
            msg = f"unique: no column(s) {missing}; columns are {self.columns}"
            raise PlanError(msg)
        marks = self._plan.watermark_nodes()
        watermark = marks[0] if marks else None
        within_us = None
        if within is not None:
            if watermark is None:
                msg = "unique(within=...) needs with_watermark(...) upstream, like Spark's dropDuplicatesWithinWatermark"
                raise PlanError(msg)
            within_us = parse_duration(within, name="within") // timedelta(microseconds=1)
        return StreamFrame(
            DedupNode(
                input=self._plan,
                subset=tuple(columns),
                watermark=watermark,
                within_us=within_us,
                input_schema=self._schema,
            )
        )


def _join_time(frame: StreamFrame, given: str | None, side: str) -> str | None:
    """A join side's event-time column: ``given``, else its ``with_watermark`` column."""
    marks = frame._plan.watermark_nodes()
    if given is None:
        return marks[0].column if len(marks) == 1 else None
    time_dtype_check(frame.collect_schema(), given, f"join({side}_time=)")
    return given


def _reusable(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """``items`` with one-shot iterators (generators) made lists.

    Polars takes an iterable of expressions wherever it takes one; a plan node
    applies its arguments again for every batch (and once for its schema), so a
    generator would be empty from the second time on.
    """
    return tuple(list(item) if isinstance(item, Iterator) else item for item in items)


def _flatten(items: Iterable[Any]) -> Iterable[Any]:
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from item
        else:
            yield item


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
