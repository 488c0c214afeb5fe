"""The latency harness (``nexmark.latency``): correctness only, never speed.

The machine is shared, so nothing here asserts a time: only that every row
the producer made visible reached the sink exactly once, and that each row's
latency is the sink's clock minus that row's own ``emitted_at``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from nexmark import latency

# Files kept (clean_source="off") so the test can read back what the producer wrote.
SETTINGS = latency.Settings(trigger_ms=100, file_interval_ms=20, warm_up_s=0.5, clean_source="off")


def test_every_row_reaches_the_sink_once_with_its_own_latency(tmp_path: Path) -> None:
    m = latency.measure(
        2_000, 2.0, settings=SETTINGS, work_dir=tmp_path, keep_rows=True, keep_files=True
    )
    assert m.landing is not None and m.rows is not None
    # What the producer put on disk, read back independently of the harness.
    written = pl.read_parquet(m.landing / "*.parquet")
    assert written.height == 4_000  # 2 s at 2,000 rows/s, 100 files of 40 rows
    assert written["id"].sort().to_list() == list(range(4_000))
    assert not list(m.landing.glob(".*"))  # no temporary file left in the landing dir
    expected = latency.q1(written.lazy()).collect()
    assert 0 < expected.height < written.height  # the filter dropped some rows, not all

    rows = m.rows
    assert rows["id"].is_unique().all()
    assert rows["id"].sort().to_list() == expected["id"].sort().to_list()
    assert m.figures["rows_written"] == written.height
    assert m.figures["rows_received"] == expected.height

    # Each row's latency is its batch's sink time minus its own emitted_at, in µs.
    joined = rows.join(expected.select("id", "emitted_at"), on="id", how="inner")
    assert joined.height == rows.height
    emitted_us = joined["emitted_at"].dt.epoch("us")
    assert (joined["latency_us"] == joined["sink_us"] - emitted_us).all()
    assert (joined["latency_us"] > 0).all()  # a row reaches the sink after it was emitted
    # Rows of one file share emitted_at; rows of one batch share the sink time.
    assert joined.group_by("batch_id").agg(pl.col("sink_us").n_unique())["sink_us"].max() == 1

    # The warm-up (rows emitted in the first 0.5 s) is left out of the figures.
    t0 = written["emitted_at"].min()
    after_warm_up = expected.filter(
        pl.col("emitted_at") >= t0 + pl.duration(seconds=SETTINGS.warm_up_s)
    )
    assert m.figures["rows_measured"] == after_warm_up.height
    counted = joined.filter(pl.col("id").is_in(after_warm_up["id"].implode()))
    assert m.figures["latency_ms"]["max"] == round(counted["latency_us"].max() / 1000, 1)
    assert m.figures["batches"] >= 1


def test_exactly_once_check_names_missing_and_duplicated_rows(tmp_path: Path) -> None:
    landing, staging = tmp_path / "landing", tmp_path / "staging"
    landing.mkdir()
    staging.mkdir()
    producer = latency.Producer(
        landing, staging, latency.bid_pool(100), rate=400, seconds=0.1, file_interval_s=0.05
    )
    producer.renamed_us = [0, 0]  # both files "made visible" (nothing runs here)
    outputs = [latency.q1(producer.frame(f).lazy()).collect() for f in producer.files]
    assert sum(o.height for o in outputs) > 1

    sink = latency.LatencySink()
    for batch_id, out in enumerate(outputs):
        sink(out, batch_id)
    latency.check_exactly_once(producer, sink)  # passes

    sink(outputs[0].head(1), len(outputs))  # one row delivered twice
    with pytest.raises(AssertionError, match="0 missing, 1 duplicated, 0 unexpected"):
        latency.check_exactly_once(producer, sink)

    short = latency.LatencySink()
    short(outputs[0], 0)
    with pytest.raises(AssertionError, match=f"{outputs[1].height} missing"):
        latency.check_exactly_once(producer, short)


def test_run_reports_every_load_and_the_tiny_batches(tmp_path: Path) -> None:
    result = latency.run(
        1.0,
        max_rate=4_000,
        loads=(0.5,),
        overhead_seconds=1.0,
        # the benchmark's default: files deleted once committed (checked exactly once too)
        settings=latency.Settings(warm_up_s=0.5),
        work_dir=tmp_path,
        log=False,
    )
    json.dumps(result)  # the CLI writes it as JSON
    assert result["max_rate"] == {"max_rate_rows_per_s": 4_000, "given": True}
    [load] = result["loads"]
    assert load["load"] == 0.5 and load["rate_rows_per_s"] == 2_000
    assert load["rows_written"] == 2_000
    overhead = result["per_batch_overhead"]
    assert overhead["rows_written"] == 20  # 1 s of one-row files every 50 ms
    assert set(overhead["phase_ms_median"]) == set(latency.PHASES)
    assert result["target"]["measured_p95_ms"] == load["latency_ms"]["p95"]
    assert result["machine"]["polars"] == pl.__version__
    assert np.isfinite(overhead["polars_read_one_file_and_query_ms"])
    text = latency.table(result)
    assert "50% load" in text and "tiny batches" in text


def test_profile_summary_buckets_the_query_and_reader_threads(tmp_path: Path) -> None:
    trigger = "thread (0x1);_run (microstream/runtime/driver.py:1);_trigger_once (x:2)"
    trigger = trigger.replace("_trigger_once", "StreamExecution._trigger_once")
    raw = tmp_path / "stacks.txt"
    raw.write_text(
        "\n".join(
            [
                f"{trigger};FileSource.latest_offset (c:1);_list_files (c:2) 30",
                f"{trigger};_run_batch (e:1);FileSource.read (c:3);Condition.wait (t:1) 50",
                f"{trigger};_run_batch (e:1);add_batch (f:1) 20",
                "thread (0x2);_worker (t:1);FileSource._read_file (c:4);read_parquet (p:1) 9",
                "thread (0x2);_worker (t:1);FileSource._read_file (c:4);_conform (c:5) 1",
                "thread (0x3);_wait_for_trigger (e:9) 1000",  # idle between triggers: left out
            ]
        )
        + "\n"
    )
    summary = latency.summarize_profile(raw)
    assert summary["samples"] == {"query_thread": 100, "readers": 10}
    assert summary["query_thread_pct"] == {
        "read: wait for the reader threads (parquet decoding)": 50.0,
        "source: list the directory (latest_offset)": 30.0,
        "sink (the benchmark's foreach_batch function)": 20.0,
    }
    assert summary["reader_threads_pct"] == {
        "read_parquet (decoding)": 90.0,
        "_conform (select/cast even when the schema matches)": 10.0,
    }


def test_as_fast_as_possible_trigger_measures_target_4(tmp_path: Path) -> None:
    settings = latency.Settings(trigger_ms=0, warm_up_s=0.5)
    result = latency.run(
        1.0,
        max_rate=4_000,
        loads=(0.5,),
        overhead_seconds=0.5,
        settings=settings,
        work_dir=tmp_path,
        log=False,
    )
    [load] = result["loads"]
    assert result["settings"]["trigger"] == "as fast as possible"
    assert result["settings"]["pace_ms"] == 100.0  # the bound a sustainable rate keeps to
    target = result["target"]
    assert (target["load"], target["p99_ms"]) == (0.5, 50.0)
    assert target["measured_p99_ms"] == load["latency_ms"]["p99"]
    assert target["met"] == (load["latency_ms"]["p99"] <= 50.0)
    assert load["rows_written"] == 2_000  # and run() checked each reached the sink once
    # No 100 ms interval: a batch starts once a file (one every 20 ms) is there, so the
    # 0.5 s after the warm-up holds more batches than five intervals could.
    assert load["batches"] > 5
    assert "target p99 <= 50 ms at 50% load" in latency.table(result)
