"""The ``microstream`` command: run and status, in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import microstream as ms

pytestmark = pytest.mark.integration


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microstream.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


JOB = """
import polars as pl
import microstream as ms

query = (
    ms.scan_files("in", format="parquet", max_files_per_trigger=1)
    .with_columns(y=pl.col("x") * 10)
    .sink_parquet("out", checkpoint="cp", trigger=ms.Trigger.every("1h"), name="job")
)
"""


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    for i in range(3):
        pl.DataFrame({"x": [i]}).write_parquet(tmp_path / "in" / f"{i}.parquet")
    (tmp_path / "job.py").write_text(JOB)
    return tmp_path


def test_help() -> None:
    for args in ([], ["run"], ["status"]):
        result = cli(*args, "--help", cwd=Path.cwd())
        assert result.returncode == 0
        assert "usage: microstream" in result.stdout
    assert "--available-now" in cli("run", "--help", cwd=Path.cwd()).stdout


def test_run_available_now_processes_and_exits(job_dir: Path) -> None:
    result = cli("run", "job.py", "--available-now", cwd=job_dir)
    assert result.returncode == 0, result.stderr
    out = ms.read_file_sink(job_dir / "out")
    assert sorted(out["y"].to_list()) == [0, 10, 20]
    # A second scheduled run processes only what is new.
    pl.DataFrame({"x": [7]}).write_parquet(job_dir / "in" / "7.parquet")
    assert cli("run", "job.py", "--available-now", cwd=job_dir).returncode == 0
    assert sorted(ms.read_file_sink(job_dir / "out")["y"].to_list()) == [0, 10, 20, 70]


def test_run_reports_a_failed_query(job_dir: Path) -> None:
    (job_dir / "in" / "9.parquet").write_bytes(b"garbage")
    result = cli("run", "job.py", "--available-now", cwd=job_dir)
    assert result.returncode == 1
    assert "query job failed" in result.stderr
    assert "9.parquet" in result.stderr


def test_run_usage_error(tmp_path: Path) -> None:
    assert cli("run", cwd=tmp_path).returncode == 2


def test_status(job_dir: Path) -> None:
    assert cli("run", "job.py", "--available-now", cwd=job_dir).returncode == 0
    result = cli("status", "cp", cwd=job_dir)
    assert result.returncode == 0, result.stderr
    assert "query        job" in result.stdout
    assert "last batch   2 (committed: 2)" in result.stdout
    assert "{'log_index': 1} -> {'log_index': 2}" in result.stdout
    assert "rows/s over the last 3 batches (3 rows)" in result.stdout
    report = json.loads(cli("status", "cp", "--json", cwd=job_dir).stdout)
    assert report["last_batch"] == 2 and report["pending_batch"] is None
    assert report["lag"] == [0]
    assert report["running"] is False

    (job_dir / "cp" / "commits" / "2.json").unlink()
    report = json.loads(cli("status", "cp", "--json", cwd=job_dir).stdout)
    assert report["pending_batch"] == 2
    assert "batch 2 is logged but not committed" in cli("status", "cp", cwd=job_dir).stdout


def test_status_of_a_non_checkpoint(tmp_path: Path) -> None:
    result = cli("status", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "is not a microstream checkpoint" in result.stderr


STATEFUL_JOB = """
import polars as pl
import microstream as ms

totals = (
    ms.scan_files("in", format="parquet", max_files_per_trigger=1)
    .group_by("k")
    .agg(pl.col("x").sum())
)
query = totals.foreach_batch(lambda df, b: None, output_mode="update", checkpoint="cp")
"""


def test_state_shows_operator_state(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pl.DataFrame({"k": ["a", "b"], "x": [1, 2]}).write_parquet(tmp_path / "in" / "0.parquet")
    pl.DataFrame({"k": ["a"], "x": [5]}).write_parquet(tmp_path / "in" / "1.parquet")
    (tmp_path / "job.py").write_text(STATEFUL_JOB)
    assert cli("run", "job.py", "--available-now", cwd=tmp_path).returncode == 0
    result = cli("state", "cp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "op0/partials: 2 rows" in result.stdout
    csv = cli("state", "cp", "--csv", cwd=tmp_path).stdout.splitlines()
    assert csv[0] == "k,agg0" and sorted(csv[1:]) == ["a,6", "b,2"]
    first = cli("state", "cp", "--csv", "--version", "0", cwd=tmp_path).stdout.splitlines()
    assert sorted(first[1:]) == ["a,1", "b,2"]
    assert cli("state", "--help", cwd=tmp_path).returncode == 0
    assert cli("state", str(tmp_path / "in"), cwd=tmp_path).returncode == 1
