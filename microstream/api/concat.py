"""``ms.concat``: the union of several streams, as :func:`polars.concat` for frames."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from microstream.api.frame import StreamFrame
from microstream.exceptions import PlanError
from microstream.plan.nodes import ConcatNode

__all__ = ["concat"]


def concat(
    frames: Sequence[StreamFrame],
    *,
    how: Literal["vertical", "vertical_relaxed", "diagonal", "diagonal_relaxed"] = "vertical",
    watermark_policy: Literal["min", "max"] = "min",
) -> StreamFrame:
    """The union of several streams, as :func:`polars.concat` for frames.

    Each input keeps its own source offsets (and its own watermark, if it has
    one). With several watermarked inputs the query's watermark is the minimum
    of theirs (``watermark_policy="max"``: the maximum, which drops more rows of
    the slower inputs as late); an input idle for longer than its
    ``idle_timeout`` stops holding it back.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> a = ms.MemoryStream({"x": pl.Int64})
    >>> b = ms.MemoryStream({"x": pl.Int64})
    >>> query = ms.concat([a.lazy(), b.lazy()]).sink_memory("doc_concat")
    >>> _ = a.add_data({"x": [1]}); _ = b.add_data({"x": [2]})
    >>> query.process_all_available()
    >>> sorted(ms.table("doc_concat")["x"].to_list())
    [1, 2]
    >>> query.stop()
    """
    if len(frames) < 2:
        msg = f"concat needs at least two streams; got {len(frames)}"
        raise PlanError(msg)
    for frame in frames:
        if not isinstance(frame, StreamFrame):
            msg = (
                "concat combines streams; got a "
                f"{type(frame).__name__}: join a static frame with join() instead"
            )
            raise PlanError(msg)
    if watermark_policy not in ("min", "max"):
        msg = f"watermark_policy must be 'min' or 'max'; got {watermark_policy!r}"
        raise PlanError(msg)
    return StreamFrame(
        ConcatNode(tuple(f.plan for f in frames), how=how, watermark_policy=watermark_policy)
    )
