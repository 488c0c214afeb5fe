"""What a Nexmark query module defines, and how it is run (stream, one-shot batch, compare).

Every module ``nexmark.queries.qN`` defines:

- ``NAME`` (``"q5"``), ``TITLE`` (one line), ``KIND`` (``"stateless"``, ``"join"``,
  ``"windowed"``), ``INPUTS`` (the streams it reads, e.g. ``("bid",)``);
- ``stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame``: the query in
  microstream over raw ``scan_files`` streams (the module adds its own
  ``with_watermark`` where it needs one);
- ``batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame``: the same query as one
  Polars query over all the files, the reference and the correctness oracle;
- ``OUTPUT_MODE`` (``"append"`` unless said otherwise): with
  ``Trigger.available_now(flush=True)`` the concatenated append output equals the
  batch result. For ``"update"`` the module also defines ``KEYS``: the last row per
  key is compared.
- optionally ``compare(stream: pl.DataFrame, batch: pl.DataFrame) -> None`` when the
  equality is not row for row (q12: processing-time windows), raising
  ``AssertionError`` with what differs.
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

import microstream as ms

from .schema import SCHEMAS

QUERIES = (
    "q0", "q1", "q2", "q3", "q4", "q5", "q7", "q8",
    "q11", "q12", "q13", "q14", "q17", "q21", "q22",
)  # fmt: skip


def load(name: str) -> ModuleType:
    """The module of query ``name`` (``"q5"``)."""
    return importlib.import_module(f"nexmark.queries.{name}")


def stream_inputs(root: Path, names: tuple[str, ...], max_files_per_trigger: int | None) -> dict:
    return {
        name: ms.scan_files(
            str(root / name),
            format="parquet",
            schema=SCHEMAS[name],
            max_files_per_trigger=max_files_per_trigger,
        )
        for name in names
    }


def batch_inputs(root: Path, names: tuple[str, ...]) -> dict[str, pl.LazyFrame]:
    return {
        name: pl.scan_parquet(str(root / name / "*.parquet"), schema=SCHEMAS[name])
        for name in names
    }


@dataclass
class StreamRun:
    seconds: float
    result: pl.DataFrame
    batches: int
    input_rows: int
    dropped_late: int
    max_state_rows: int
    phase_totals_ms: dict[str, float] = field(default_factory=dict)


def run_batch(module: ModuleType, root: Path) -> tuple[float, pl.DataFrame]:
    """Seconds and result of the one-shot Polars query over every file."""
    t0 = time.perf_counter()
    result = module.batch(batch_inputs(root, module.INPUTS)).collect()
    return time.perf_counter() - t0, result


def run_stream(
    module: ModuleType,
    root: Path,
    *,
    max_files_per_trigger: int | None = 1,
    checkpoint_root: str | None = None,
    runtime: ms.Runtime | None = None,
) -> StreamRun:
    """Run the query over every file with ``available_now(flush=True)``, collecting its output
    (on ``runtime``; default: this process)."""
    frames: list[pl.DataFrame] = []
    checkpoint = tempfile.mkdtemp(prefix=f"nexmark-{module.NAME}-", dir=checkpoint_root)
    try:
        t0 = time.perf_counter()
        frame = module.stream(stream_inputs(root, module.INPUTS, max_files_per_trigger))
        query = frame.foreach_batch(
            lambda df, _batch_id: frames.append(df),
            trigger=ms.Trigger.available_now(flush=True),
            checkpoint=checkpoint,
            output_mode=getattr(module, "OUTPUT_MODE", "append"),
            runtime=runtime,
        )
        query.await_termination()
        seconds = time.perf_counter() - t0
        progress = query.recent_progress
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    phases = ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")
    return StreamRun(
        seconds=seconds,
        result=pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame(),
        batches=len(progress),
        input_rows=sum(p.num_input_rows for p in progress),
        dropped_late=sum(op.num_rows_dropped_late for p in progress for op in p.state_operators),
        max_state_rows=max(
            (op.num_rows_total for p in progress for op in p.state_operators), default=0
        ),
        phase_totals_ms={
            phase: round(sum(getattr(p.durations_ms, phase) for p in progress), 1)
            for phase in phases
        },
    )


def canonical(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows in one order, so two results compare as multisets of rows."""
    if frame.width == 0:
        return frame
    return frame.sort(frame.columns, nulls_last=True, maintain_order=True)


def assert_same_result(module: ModuleType, stream: pl.DataFrame, batch: pl.DataFrame) -> None:
    """The stream's output equals the one-shot batch's (floats to 1e-9, row order free)."""
    custom: Any = getattr(module, "compare", None)
    if custom is not None:
        custom(stream, batch)
        return
    if getattr(module, "OUTPUT_MODE", "append") == "update":
        keys = list(module.KEYS)
        stream = stream.unique(subset=keys, keep="last", maintain_order=True)
    stream = stream.select(batch.columns) if set(stream.columns) == set(batch.columns) else stream
    assert_frame_equal(
        canonical(stream), canonical(batch), check_dtypes=False, rel_tol=1e-9, abs_tol=1e-9
    )


def median(values: list[float]) -> float:
    return statistics.median(values)
