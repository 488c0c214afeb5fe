"""The window aggregation's floor of the stored windows' ends after an eviction: a bound
from the watermark, no pass over the whole state, the same rows emitted."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.operators import aggregation
from microstream.state.store import StateStore

T0 = datetime(2026, 1, 1)
SCHEMA = {"ts": pl.Datetime("us"), "k": pl.Int64, "v": pl.Float64}


def rows(seconds: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=s) for s in seconds],
            "k": [s % 3 for s in seconds],
            "v": [float(s) for s in seconds],
        },
        schema=SCHEMA,
    )


@pytest.mark.parametrize(("mode", "lateness"), [("append", None), ("update", "20s")])
def test_windows_closing_batch_after_batch_build_no_whole_state_frame(
    name: str, mode: str, lateness: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each batch closes the previous minute's windows: the floor the eviction leaves says
    # the next batch may close some, so no batch after one that evicted needs the whole
    # state's frame (before: one such batch, to find the exact floor). The emitted rows are
    # the batch query's.
    built: list[str] = []
    whole = StateStore.frame

    def spy(self: StateStore) -> pl.DataFrame:
        built.append(self.operator)
        return whole.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(StateStore, "frame", property(spy))
    # (a state of any size takes the bound: the benchmark's has 30k rows)
    monkeypatch.setattr(aggregation, "_FLOOR_PASS_ROWS", 0)
    batches = [rows([m * 60 + s for s in range(0, 60, 7)]) for m in range(6)]
    source = ms.MemoryStream(SCHEMA)
    out: list[pl.DataFrame] = []
    grouped = (
        source.lazy()
        .with_watermark("ts", "5s")
        .group_by_dynamic(
            "ts", every="1m", group_by="k", **({"allowed_lateness": lateness} if lateness else {})
        )
        .agg(pl.len().alias("n"), pl.col("v").sum().alias("sum"))
    )
    query = grouped.foreach_batch(
        lambda df, _: out.append(df), output_mode=mode, checkpoint=f"memory://{name}/cp"
    )
    after: list[int] = []  # (frames built by the end of each batch)
    for batch in batches:
        source.add_data(batch)
        query.process_all_available(timeout=30)
        after.append(len(built))
    query.stop()
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]
    # (the first batch finds the exact floor of what it stored; the third on closes windows)
    assert after[1] <= 2
    assert after[-1] == after[1]
    got = pl.concat(out).unique(["k", "ts"], keep="last", maintain_order=True)
    every = pl.concat(batches)
    expected = (
        every.sort("ts")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.len().alias("n"), pl.col("v").sum().alias("sum"))
        .with_columns(pl.col("n").cast(got.schema["n"]))
    )
    if mode == "append":  # (the last minute is still open)
        expected = expected.filter(pl.col("ts") < T0 + timedelta(minutes=5))
        got = got.filter(pl.col("ts") < T0 + timedelta(minutes=5))
    key = ["k", "ts"]
    assert_frame_equal(got.sort(key), expected.select(got.columns).sort(key), check_exact=True)


def test_a_small_state_finds_the_exact_floor_after_an_eviction(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Up to _FLOOR_PASS_ROWS stored rows the floor is found exactly after an eviction (a
    # frame of a few rows), so a watermark moving by a little skips the eviction's pass.
    passes: list[int] = []
    remove = StateStore.filter_out

    def spy(self: StateStore, predicate: pl.Expr) -> pl.DataFrame:
        passes.append(1)
        return remove(self, predicate)

    monkeypatch.setattr(StateStore, "filter_out", spy)
    source = ms.MemoryStream(SCHEMA)
    query = (
        source.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.len().alias("n"))
        .foreach_batch(lambda df, _: None, output_mode="append", checkpoint=f"memory://{name}/cp")
    )
    # a window closes at the 2nd batch; the 6 after it move the watermark within a minute
    for second in [0, 61, 62, 63, 64, 65, 66, 67]:
        source.add_data(rows([second]))
        query.process_all_available(timeout=30)
    query.stop()
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]
    assert len(passes) == 1
