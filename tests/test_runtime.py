"""The Runtime seam: a query runs on the runtime given as ``runtime=`` (LocalRuntime by
default), and ``microstream run --runtime`` chooses one for every query of a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl

import microstream as ms
from microstream.runtime.base import QueryRun
from microstream.runtime.driver import ExecutionConfig


class RecordingRuntime:
    """A third party's runtime: runs locally, and records what it was asked to run."""

    def __init__(self) -> None:
        self.prepared: list[ExecutionConfig] = []

    def prepare(self, config: ExecutionConfig) -> QueryRun:
        self.prepared.append(config)
        return ms.LocalRuntime().prepare(config)


def test_a_query_runs_on_the_runtime_it_is_given(tmp_path: Path) -> None:
    runtime = RecordingRuntime()
    stream = ms.MemoryStream({"x": pl.Int64})
    frame = stream.lazy().with_columns(y=pl.col("x") * 2)
    query = frame.sink_memory("runtime_given", runtime=runtime)
    try:
        stream.add_data({"x": [1, 2]})
        query.process_all_available(timeout=30)
    finally:
        query.stop()
    assert ms.table("runtime_given").rows() == [(1, 2), (2, 4)]
    [config] = runtime.prepared
    assert config.plan is frame.plan and config.output_mode == "append"
    assert config.sink.describe() == "MemorySink[runtime_given]"
    # every sink verb takes it
    got: list[int] = []
    query = frame.foreach_batch(
        lambda df, _: got.append(df.height), checkpoint=str(tmp_path / "cp"), runtime=runtime
    )
    query.process_all_available(timeout=30)
    query.stop()
    assert len(runtime.prepared) == 2 and got == [2]


def test_the_session_override_wins(tmp_path: Path) -> None:
    chosen, ignored = RecordingRuntime(), RecordingRuntime()
    session = ms.Session()
    session.runtime_override = chosen
    stream = ms.MemoryStream({"x": pl.Int64})
    query = stream.lazy().sink_memory("runtime_override", session=session, runtime=ignored)
    query.stop()
    assert len(chosen.prepared) == 1 and ignored.prepared == []


def test_microstream_run_takes_a_runtime(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pl.DataFrame({"x": [1, 2, 3]}).write_parquet(tmp_path / "in" / "a.parquet")
    (tmp_path / "job.py").write_text(
        "import microstream as ms\n"
        "ms.scan_files('in', format='parquet').sink_parquet('out', checkpoint='cp')\n"
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "microstream.cli", "run", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            check=False,
        )

    done = run("job.py", "--available-now", "--runtime", "local")
    assert done.returncode == 0, done.stderr
    assert sorted(ms.read_file_sink(str(tmp_path / "out"))["x"].to_list()) == [1, 2, 3]
    refused = run("job.py", "--runtime", "spark")
    assert refused.returncode == 2
    assert "invalid choice: 'spark'" in refused.stderr
