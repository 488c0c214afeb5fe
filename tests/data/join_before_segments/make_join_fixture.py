"""Write the fixture: a full stream-stream join's two buffers, versions 0-12, by the code
of the checkout on PYTHONPATH, and what that code emits when it continues (13-18).

``state/`` (``left/`` and ``right/``) and ``expected.arrow`` were written by main at
``b7bdfda``, whose join kept its buffers in keyed state stores (deltas with deletion
markers, a full snapshot every 10 versions); ``tests/test_join_segments.py`` loads them
with the segment buffers and continues: the same rows must come out.
Run from the repository root:
``PYTHONPATH=$PWD python tests/data/join_before_segments/make_join_fixture.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.plan.nodes import OperatorContext

HERE = Path(__file__).parent
T0 = datetime(2024, 1, 1)
IMPS = {"ad": pl.Int64, "imp_time": pl.Datetime("us"), "imp": pl.String, "x": pl.Float64}
CLICKS = {"ad": pl.Int64, "click_time": pl.Datetime("us"), "click": pl.String, "x": pl.Float64}
WRITTEN = range(13)
"""Versions the fixture holds (a snapshot at 0 and 10, deltas between)."""
CONTINUED = range(13, 19)


def node() -> Any:
    """The join: full, keys ``ad``, ``click_time - imp_time`` in [-2m, 3m]."""
    left = ms.MemoryStream(IMPS).lazy().with_watermark("imp_time", "1m")
    right = ms.MemoryStream(CLICKS).lazy().with_watermark("click_time", "1m")
    return left.join(right, on="ad", how="full", within=("-2m", "3m"))._plan


def minutes(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


def us(m: float) -> int:
    return int((minutes(m) - datetime(1970, 1, 1)).total_seconds() * 1_000_000)


def batch(b: int) -> tuple[pl.DataFrame, pl.DataFrame, OperatorContext]:
    """Batch ``b``: 12 impressions and 9 clicks over ~1 minute, keys repeating, a null."""
    imps = [
        (None if i == 5 else (b * 3 + i) % 7, minutes(b + i / 12), f"i{b}-{i}", float(i))
        for i in range(12)
    ]
    clicks = [((b * 5 + i) % 9, minutes(b - 0.5 + i / 9), f"c{b}-{i}", i / 4) for i in range(9)]
    context = OperatorContext(
        batch_id=b, late_watermark_us=us(b - 2), watermark_us=us(b - 1), output_mode="append"
    )
    return (
        pl.DataFrame(imps, schema=IMPS, orient="row"),
        pl.DataFrame(clicks, schema=CLICKS, orient="row"),
        context,
    )


def run(op: Any, versions: range) -> list[pl.DataFrame]:
    """Process and commit ``versions``; each batch's output with a ``batch`` column."""
    out = []
    for b in versions:
        left, right, context = batch(b)
        rows = op.process((left, right), context).rows
        op.commit(b)
        out.append(rows.with_columns(pl.lit(b, pl.Int64).alias("batch")))
    return out


def main() -> None:
    state = HERE / "state"
    shutil.rmtree(state, ignore_errors=True)
    run(node().build_operator("op0", Storage(state)), WRITTEN)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(state, Path(tmp) / "state")
        op = node().build_operator("op0", Storage(Path(tmp) / "state"))
        op.load(WRITTEN[-1])
        emitted = pl.concat(run(op, CONTINUED), how="vertical")
    emitted.write_ipc(HERE / "expected.arrow")


if __name__ == "__main__":
    main()
