"""A local SparkSession shared by the differential tests against Spark Structured Streaming.

The session is started once per test session (the JVM takes 10-40 s to start
on a busy 2-core machine: the time is printed at the end of the run) with
settings that make Spark match the test's assumptions and run small
micro-batches fast:

- ``local[2]`` and ``spark.sql.shuffle.partitions=2``: two state partitions;
- ``spark.sql.session.timeZone=UTC``: naive parquet timestamps are UTC
  instants in both systems (see the test module);
- whole-stage code generation off: compiling Java for each tiny micro-batch
  plan costs more than it saves;
- no UI, no console progress bars, and a log4j configuration that only prints
  errors.

Tests that use the ``spark`` fixture are skipped, with a one-line reason, when
pyspark cannot be imported or no ``java`` is on the PATH (or in
``JAVA_HOME``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_TIMINGS: dict[str, float] = {}

_LOG4J = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
"""


def java_available() -> bool:
    """Whether a ``java`` executable can be found (JAVA_HOME first, as Spark does)."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return True
    return shutil.which("java") is not None


def spark_skip_reason() -> str | None:
    """Why Spark tests cannot run here, or None."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install 'microstream[spark]')"
    if not java_available():
        return "no java on PATH or in JAVA_HOME: pyspark needs a JVM (Java 17+)"
    return None


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    """A local SparkSession for the whole test session (skips if pyspark or java is missing)."""
    reason = spark_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from pyspark.sql import SparkSession

    root = tmp_path_factory.mktemp("spark")
    log4j = root / "log4j2.properties"
    log4j.write_text(_LOG4J)
    java_opts = f"-Dlog4j2.configurationFile=file:{log4j} -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
    conf: dict[str, Any] = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.driver.extraJavaOptions": java_opts,
        "spark.sql.warehouse.dir": str(root / "warehouse"),
        "spark.local.dir": str(root / "local"),
        "spark.sql.codegen.wholeStage": "false",
        "spark.sql.streaming.stateStore.maintenanceInterval": "600s",
        "spark.sql.streaming.numRecentProgressUpdates": "1000",
    }
    started = time.perf_counter()
    builder = SparkSession.builder.master("local[2]").appName("microstream-conformance")
    for key, value in conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    _TIMINGS["jvm_start_s"] = time.perf_counter() - started
    try:
        yield session
    finally:
        session.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "jvm_start_s" in _TIMINGS:
        terminalreporter.write_line(
            f"tests/spark: SparkSession (JVM) started in {_TIMINGS['jvm_start_s']:.1f}s"
        )
