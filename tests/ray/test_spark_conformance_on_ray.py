"""The Spark-conformance set (tests/spark) on RayRuntime: the same queries over the same
files, checked against Spark Structured Streaming batch by batch exactly as on
LocalRuntime (rows, watermarks, late rows, one file per batch), with the stateful
operators in two Ray actors.

The CI set (:data:`RAY_CI_SET`) covers every stateful operator kind and output mode
once: a keyed tumbling window in update mode, a session window in append mode, a global
aggregation in complete mode, deduplication on the event time (keyless windows and
stateless queries on Ray: test_ray_runtime.py). The whole matrix (every query on every
input, and the targeted probes) runs under ``slow``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import microstream as ms

pytest.importorskip("pyspark")

from spark import conftest as spark_conftest
from spark.test_spark_conformance import (
    CI_DATA,
    FULL,
    PROBES,
    QUERIES,
    Data,
    compare,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

spark = spark_conftest.spark
"""tests/spark's session-scoped SparkSession fixture (one JVM for the session)."""

RAY_CI_SET = ["tumbling_update", "session_append", "global_complete", "dedup_event_time"]
"""Every stateful operator kind and output mode once, on the CI input; three of the four
are tests/spark's CI set, whose Spark runs the two modules share (``SPARK_RUNS``)."""


def test_the_ci_set_covers_every_operator_kind_and_output_mode() -> None:
    queries = [QUERIES[name] for name in RAY_CI_SET]
    assert {q.output_mode for q in queries} == {"append", "update", "complete"}
    assert {q.late for q in queries} == {"window", "session", "event_time", "none"}
    assert len({q.name.split("_")[0] for q in queries}) == len(queries)  # four kinds


@pytest.mark.parametrize("name", RAY_CI_SET)
def test_bounded_on_ray(ray_cluster: Any, spark: SparkSession, tmp_path: Path, name: str) -> None:
    compare(spark, QUERIES[name], CI_DATA, tmp_path, ms.RayRuntime(num_workers=2))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "data"), [*FULL, *PROBES])
def test_full_on_ray(
    ray_cluster: Any, spark: SparkSession, tmp_path: Path, name: str, data: Data
) -> None:
    """Every query on the edge cases, the random inputs and the probes, on Ray."""
    compare(spark, QUERIES[name], data, tmp_path, ms.RayRuntime(num_workers=2))
