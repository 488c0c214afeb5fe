"""A worker lost while the query idles is found by a timer check and replaced then; the
next batch counts it in its progress (``worker_restarts``, ``replaced_workers``) and so in
``microstream_worker_restarts_total``; that batch runs once and is no recovery (it re-ran
nothing), and the output is the clean one."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from stateful_fn_pipeline import SCHEMA, login_alerts, oracle

import microstream as ms
from microstream.metrics.definitions import WORKER_RESTARTS, ProgressMetrics
from microstream.runtime.progress import QueryProgressEvent

T0 = datetime(2026, 1, 1)


def _logins(i: int) -> pl.DataFrame:
    """File ``i``: per user three failures then a success, 10 s apart, a minute per file."""
    rows = []
    for user in ("ann", "bob", "cy"):
        at = T0 + timedelta(minutes=i)
        rows += [(at + timedelta(seconds=10 * k), user, k == 3) for k in range(4)]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def _write(directory: Path, i: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"part-{i:04d}.parquet"
    tmp = directory / f".part-{i:04d}.tmp"
    _logins(i).write_parquet(tmp)
    os.utime(tmp, (1000 + i, 1000 + i))
    tmp.rename(path)


def _wait(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _wait_idle(query: Any, quiet: float = 1.5) -> None:
    """Until no batch has run for ``quiet`` seconds."""
    seen, since = len(query.recent_progress), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        now = len(query.recent_progress)
        if now != seen:
            seen, since = now, time.monotonic()


def test_a_worker_lost_between_batches_is_counted_in_the_next_batch(
    ray_cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="microstream")
    data = tmp_path / "in"
    _write(data, 0)
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = login_alerts(
        ms.scan_files(data, format="parquet", schema=SCHEMA, max_files_per_trigger=1),
        delay="10s",
    ).foreach_batch(
        lambda df, batch_id: out.__setitem__(batch_id, df.rows()),
        checkpoint=tmp_path / "cp",
        runtime=ms.RayRuntime(num_workers=2),
    )
    try:
        execution = query._execution  # type: ignore[attr-defined]
        executor = execution.executor
        _wait(lambda: len(query.recent_progress) >= 1, "the first batch")
        _wait_idle(query)  # (a batch without rows may follow the first, for its timers)
        idle = len(query.recent_progress)
        victim = executor.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        # Idle: the timer checks (every TIMER_CHECK_MS) find the loss and replace it.
        _wait(lambda: executor.restarts == 1, "the timer check to replace the worker")
        assert executor.replaced == [1]
        before = len(query.recent_progress)
        assert before == idle  # no batch ran: a timer check found the loss
        _write(data, 1)
        _wait(lambda: len(query.recent_progress) > before, "the batch of the second file")
        _wait(
            lambda: sum(map(len, out.values())) >= 3, "file 0's alerts (file 1 moved the watermark)"
        )
    finally:
        query.stop()
    assert query.exception() is None, query.exception()
    progress = query.recent_progress
    counted = {p.batch_id: (p.worker_restarts, p.replaced_workers) for p in progress}
    after = progress[idle].batch_id  # the first batch after the loss: file 1's
    assert progress[idle].num_input_rows == len(_logins(1))
    assert counted[after] == (1, [1])
    # Reported to the progress directly: the batch ran once, it re-ran nothing.
    assert not progress[idle].recovered
    assert not [r for r in caplog.records if "re-running it" in r.getMessage()]
    assert sum("replacing Ray worker 1" in r.getMessage() for r in caplog.records) == 1
    assert all(w == (0, []) for b, w in counted.items() if b != after)
    assert executor.restarts == 1  # replaced once, not again by the batch that counts it
    metrics = ProgressMetrics()
    for each in progress:
        metrics.on_query_progress(QueryProgressEvent(progress=each))
    assert [s.value for s in metrics.samples() if s.metric is WORKER_RESTARTS] == [1.0]
    events = pl.concat([_logins(0), _logins(1)])
    alerts = sorted(row for rows in out.values() for row in rows)
    # Alerts the watermark has released so far: every one of file 0 (file 1 moved it).
    assert alerts == [a for a in oracle(events) if a[2] < T0 + timedelta(minutes=1)]
    assert len(alerts) == 3
