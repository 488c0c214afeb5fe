"""The session-window operator's merge as two lazy plans (not one Polars call per verb)
and its late filter only when a row can be late: the sessions it emits and the rows it
drops are exactly those of the eager passes. The operator is driven batch by batch with
the watermarks given, so each test names the watermark a row is judged against."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.operators.session_window import SessionOperator
from microstream.plan.nodes import OperatorContext, OperatorOutput

T0 = datetime(2024, 1, 1)
SCHEMA = {"user": pl.String, "ts": pl.Datetime("us"), "v": pl.Int64}
GAP = timedelta(seconds=10)
NO_WATERMARK = -(2**62)


def s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def us(seconds: float) -> int:
    return int((s(seconds) - datetime(1970, 1, 1)).total_seconds() * 1_000_000)


class Sessions:
    """A session operator (gap 10 s, count and sum per user) fed batch by batch."""

    def __init__(self, tmp_path: Path, mode: str = "append") -> None:
        node = (
            ms.MemoryStream(SCHEMA, name="sessions")
            .lazy()
            .with_watermark("ts", "0s")
            .group_by_session("ts", gap="10s", group_by="user")
            .agg(n=pl.len(), total=pl.col("v").sum())
        ).plan
        operator = node.build_operator("op0", Storage(tmp_path))  # type: ignore[attr-defined]
        assert isinstance(operator, SessionOperator)
        operator.use_key_groups(8)
        operator.load(None)
        self.operator, self.mode, self.batch_id = operator, mode, 0

    def batch(
        self, rows: list[tuple[str | None, datetime | None, int]], late_wm: float | None, wm: float
    ) -> OperatorOutput:
        """One batch; watermarks in seconds after ``T0`` (None: none yet)."""
        df = pl.DataFrame(rows, schema=SCHEMA, orient="row")
        ctx = OperatorContext(
            batch_id=self.batch_id,
            late_watermark_us=NO_WATERMARK if late_wm is None else us(late_wm),
            watermark_us=us(wm),
            output_mode=self.mode,  # type: ignore[arg-type]
        )
        self.batch_id += 1
        return self.operator.process((df,), ctx)


def emitted(out: OperatorOutput) -> list[tuple[object, ...]]:
    return out.rows.select("user", "session_start", "session_end", "n", "total").rows()


def late(out: OperatorOutput) -> list[tuple[object, ...]]:
    if not out.late_rows:
        return []
    return pl.concat(out.late_rows).select("user", "ts", "v").sort("ts").rows()


def test_a_row_whose_session_ends_at_the_late_watermark_is_late(tmp_path: Path) -> None:
    ops = Sessions(tmp_path)
    assert emitted(ops.batch([("a", s(0), 1)], None, wm=0)) == []
    # Late watermark 25 s: a row at 15 s ends its session at 25 s: late (<=); 15.000001 s not.
    out = ops.batch([("a", s(15), 2), ("b", s(15.000001), 3), ("a", s(40), 4)], late_wm=25, wm=30)
    assert late(out) == [("a", s(15), 2)]
    assert ops.operator.progress().num_rows_dropped_late == 1
    # a's first session [0, 10) and b's [15.000001, 25.000001) closed by 30 s
    assert emitted(out) == [
        ("a", s(0), s(10), 1, 1),
        ("b", s(15.000001), s(25.000001), 1, 3),
    ]


def test_no_row_is_dropped_when_the_earliest_ends_after_the_late_watermark(
    tmp_path: Path,
) -> None:
    ops = Sessions(tmp_path)
    ops.batch([("a", s(0), 1)], None, wm=0)
    # the earliest row (15.000001 s) ends its session just after the late watermark (25 s)
    out = ops.batch([("b", s(20), 2), ("b", s(15.000001), 3)], late_wm=25, wm=26)
    assert late(out) == []
    assert emitted(out) == [("a", s(0), s(10), 1, 1)]
    out = ops.batch([], late_wm=26, wm=100)
    assert emitted(out) == [("b", s(15.000001), s(30), 2, 5)]


@pytest.mark.parametrize("mode", ["append", "update"])
def test_sessions_merge_across_batches_exactly(tmp_path: Path, mode: str) -> None:
    """Touching sessions merge (start == previous end), a row bridges two stored sessions,
    a null key is a key of its own, and rows at one time share one session."""
    ops = Sessions(tmp_path, mode)
    first = ops.batch(
        [("a", s(0), 1), ("a", s(30), 2), ("b", s(0), 3), (None, s(1), 4), (None, s(1), 5)],
        None,
        wm=0,
    )
    second = ops.batch(
        [
            ("a", s(10), 10),  # touches [0, 10): a's sessions [0, 20) and [30, 40)
            ("a", s(20), 20),  # touches [10, 20) and [30, 40)... starts at 20: [20, 30)
            ("b", s(25), 30),  # b: a session of its own
            (None, s(5), 40),  # the null key's session grows to [1, 15)
        ],
        late_wm=0,
        wm=0,
    )
    last = ops.batch([], late_wm=0, wm=1000)
    if mode == "append":  # every session once, when the watermark closes it
        assert emitted(first) == emitted(second) == []
        assert sorted(emitted(last), key=str) == sorted(
            [
                ("a", s(0), s(40), 4, 33),  # [0,10) + [10,20) + [20,30) + [30,40)
                ("b", s(0), s(10), 1, 3),
                ("b", s(25), s(35), 1, 30),
                (None, s(1), s(15), 3, 49),
            ],
            key=str,
        )
    else:
        # every changed session of a batch, as it stands after the batch
        assert sorted(emitted(first), key=str) == sorted(
            [
                ("a", s(0), s(10), 1, 1),
                ("a", s(30), s(40), 1, 2),
                ("b", s(0), s(10), 1, 3),
                (None, s(1), s(11), 2, 9),
            ],
            key=str,
        )
        assert sorted(emitted(second), key=str) == sorted(
            [
                ("a", s(0), s(40), 4, 33),
                ("b", s(25), s(35), 1, 30),
                (None, s(1), s(15), 3, 49),
            ],
            key=str,
        )
        assert emitted(last) == []  # (closed sessions leave silently in update mode)
