"""The benchmark's peers give the Polars oracle's results on the quick data set.

Spark Structured Streaming (``nexmark.peers.spark``, checking mode: ``foreachBatch``
collects the output) for every query it supports, and Bytewax
(``nexmark.peers.python_peer``) for q1, q5, q7 and q11, each compared with the
query module's one-shot ``batch`` by ``nexmark.query.assert_same_result``.

One SparkSession serves the module (the JVM takes 10-40 s to start on a busy
2-core machine); a few representative Spark queries run in the suite (a
stateless one, a windowed stream-stream join, session windows flushed by the
end-of-input row), the others with ``--run-slow``. Bytewax is only in the
``bench`` extra: its tests are skipped without it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest
from nexmark.peers import python_peer
from nexmark.peers import spark as spark_peer
from nexmark.query import QUERIES, assert_same_result, load, run_batch

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SPARK_IN_SUITE = ("q1", "q8", "q11")
FILES_PER_TRIGGER = 4  # 12 quick files: 3 micro-batches (and the end-of-input one)


def oracle(name: str, root: Path) -> pl.DataFrame:
    _, expected = run_batch(load(name), root)
    assert expected.height > 0, f"{name}: the quick data set gives the oracle no rows"
    return expected


# -- Spark ---------------------------------------------------------------------------------------


def spark_skip_reason() -> str | None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install 'microstream[spark]')"
    home = os.environ.get("JAVA_HOME")
    if not (home and (Path(home) / "bin" / "java").exists()) and shutil.which("java") is None:
        return "no java on PATH or in JAVA_HOME: pyspark needs a JVM (Java 17+)"
    return None


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    """The peer's own session (``spark_peer.session()``), or the one already running."""
    reason = spark_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    session = active or spark_peer.session()
    try:
        yield session
    finally:
        if active is None:
            session.stop()


SPARK_QUERIES = [
    pytest.param(name, marks=() if name in SPARK_IN_SUITE else pytest.mark.slow)
    for name, refusal in spark_peer.SUPPORTED.items()
    if refusal is None
]


@pytest.mark.parametrize("name", SPARK_QUERIES)
def test_spark_equals_oracle(name: str, spark: SparkSession, nexmark_root: Path) -> None:
    seconds, result = spark_peer.run(spark, name, nexmark_root, FILES_PER_TRIGGER, check=True)
    assert seconds > 0
    assert result is not None
    assert_same_result(load(name), result, oracle(name, nexmark_root))


def test_spark_measured_mode_times_a_noop_sink(spark: SparkSession, nexmark_root: Path) -> None:
    seconds, result = spark_peer.run(spark, "q2", nexmark_root, 6, warm_up=False)
    assert seconds > 0
    assert result is None


def test_spark_covers_every_query() -> None:
    assert set(spark_peer.SUPPORTED) == set(QUERIES)
    supported = {name for name, refusal in spark_peer.SUPPORTED.items() if refusal is None}
    assert supported == set(spark_peer.QUERIES)
    assert set(spark_peer.REFUSED) == set(QUERIES) - supported == {"q4"}


def test_spark_refuses_q4_with_the_errors_it_reports(
    spark: SparkSession, nexmark_root: Path
) -> None:
    with pytest.raises(ValueError, match="Spark cannot run q4"):
        spark_peer.run(spark, "q4", nexmark_root, 1)
    errors = spark_peer.refusals(spark, "q4", nexmark_root)
    assert "STREAMING_OUTPUT_MODE.UNSUPPORTED_OPERATION" in errors["append"]
    assert "correctness" in errors["update"]
    assert "Complete output mode" in errors["complete"]


def test_spark_staging_orders_files_by_modification_time(nexmark_root: Path) -> None:
    staged = spark_peer.staged(nexmark_root, "bid", flush=True)
    files = sorted(staged.iterdir(), key=lambda p: p.stat().st_mtime)
    names = [p.name for p in files]
    assert names[:-1] == sorted(p.name for p in (nexmark_root / "bid").glob("*.parquet"))
    assert names[-1] == "zz-end-of-input.parquet"
    times = [p.stat().st_mtime for p in files]
    assert all(later - earlier >= 1 for earlier, later in pairwise(times))


# -- Bytewax -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", python_peer.QUERIES)
def test_python_peer_equals_oracle(name: str, nexmark_root: Path) -> None:
    pytest.importorskip("bytewax")
    seconds, result = python_peer.run(name, nexmark_root)
    assert seconds > 0
    assert python_peer.last_run["late"] == 0
    assert python_peer.last_run["processes"] == python_peer.PROCESSES[name]
    assert_same_result(load(name), result, oracle(name, nexmark_root))


@pytest.mark.parametrize("name", ["q5", "q11"])
def test_python_peer_on_two_processes(name: str, nexmark_root: Path) -> None:
    """The key-partitioned input across a 2-process cluster gives the same rows."""
    pytest.importorskip("bytewax")
    _, result = python_peer.run(name, nexmark_root, processes=2)
    assert python_peer.last_run["late"] == 0
    assert len(python_peer.last_run["workers"]) == 2
    assert_same_result(load(name), result, oracle(name, nexmark_root))


def test_python_peer_refuses_other_queries(nexmark_root: Path) -> None:
    with pytest.raises(ValueError, match="got 'q3'"):
        python_peer.run("q3", nexmark_root)
