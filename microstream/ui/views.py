"""What the dashboard shows, as JSON: the list of queries, one query, one state store.

A query on the dashboard is either *live* (a :class:`StreamingQuery` of this
process, from the session's registry, running or recently finished) or a
*checkpoint* named when the dashboard started (its progress log, plan record and
lock, read from storage on every request). Both answer the same three questions
(:class:`DashboardQuery`), so the server and the page never ask which one they
hold. Every view is computed from scratch per request from what the query or the
checkpoint holds; nothing here is cached or changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import polars as pl

from microstream.api.query import StreamingQuery
from microstream.api.session import Session
from microstream.checkpoint.log import Checkpoint, LockRecord
from microstream.exceptions import MicrostreamError
from microstream.runtime.progress import BatchDurations, QueryProgress
from microstream.state.read import list_stores, read_committed_state
from microstream.ui import charts

__all__ = [
    "HISTORY",
    "CheckpointQuery",
    "DashboardQuery",
    "LiveQuery",
    "dashboard_queries",
    "progress_view",
]

HISTORY = 100
"""Batches shown in the charts (a running query keeps this many in memory too)."""

PHASES = [name for name in BatchDurations.model_fields if name != "total"]


class DashboardQuery(Protocol):
    """One query as the dashboard sees it."""

    @property
    def key(self) -> str:
        """Its part of the page's URL: ``run-<run id>`` or ``checkpoint-<n>``."""
        ...

    def summary(self) -> dict[str, Any]:
        """One row of the query list."""
        ...

    def detail(self) -> dict[str, Any]:
        """Everything the query's page shows (numbers, charts, plan, error)."""
        ...

    def state(self, store: str, *, limit: int) -> pl.DataFrame:
        """The committed state of ``store`` (``op0/partials``), at most ``limit`` rows."""
        ...


class LiveQuery:
    """A query of this process: its in-memory progress, plan and exception."""

    def __init__(self, query: StreamingQuery):
        self.query = query
        self.key = f"run-{query.run_id}"

    def summary(self) -> dict[str, Any]:
        last = self.query.last_progress
        return {
            "key": self.key,
            "kind": "in this process",
            "name": self.query.name,
            "id": self.query.id,
            "state": self.query.status.state,
            "checkpoint": self.query.checkpoint,
            "batch_id": None if last is None else last.batch_id,
            "processed_rows_per_second": None if last is None else last.processed_rows_per_second,
        }

    def detail(self) -> dict[str, Any]:
        exc = self.query.exception()
        view = self.summary()
        view.update(
            run_id=self.query.run_id,
            status=self.query.status.message,
            plan=self.query.explain_text(),
            error=None if exc is None else f"{type(exc).__name__}: {exc}",
            stores=_store_names(self.query.list_state()),
        )
        view.update(progress_view(self.query.recent_progress[-HISTORY:]))
        return view

    def state(self, store: str, *, limit: int) -> pl.DataFrame:
        return self.query.state(store).head(limit)


class CheckpointQuery:
    """A checkpoint named on the command line: what its files record, read on every request."""

    def __init__(self, url: str, index: int):
        self.url = url
        self.key = f"checkpoint-{index}"

    def summary(self) -> dict[str, Any]:
        cp = Checkpoint(self.url)
        view: dict[str, Any] = {
            "key": self.key,
            "kind": "checkpoint",
            "name": None,
            "id": None,
            "state": "unreadable",
            "checkpoint": self.url,
            "batch_id": None,
            "processed_rows_per_second": None,
        }
        try:
            meta = cp.read_metadata()
            progress = cp.recent_progress(1)
            view.update(name=meta.name, id=meta.id, state=_lock_state(cp))
        except MicrostreamError as exc:  # one bad checkpoint must not take the page down
            view["error"] = str(exc)
            return view
        if progress:
            view.update(
                batch_id=progress[-1].batch_id,
                processed_rows_per_second=progress[-1].processed_rows_per_second,
            )
        return view

    def detail(self) -> dict[str, Any]:
        view = self.summary()
        if "error" in view:
            view.update(plan="", status="", stores=[], **progress_view([]))
            return view
        cp = Checkpoint(self.url)
        history = cp.recent_progress(HISTORY)
        view.update(
            run_id=history[-1].run_id if history else None,
            status=view["state"],
            plan=_recorded_plan(cp),
            # A checkpoint records batches, not failures: the error is the running process's.
            error=None,
            stores=_store_names(list_stores(cp)),
        )
        view.update(progress_view(history))
        return view

    def state(self, store: str, *, limit: int) -> pl.DataFrame:
        operator, _, name = store.partition("/")
        cp = Checkpoint(self.url)
        return read_committed_state(cp, operator=operator, store=name or None).head(limit)


def dashboard_queries(session: Session, checkpoints: Sequence[str]) -> list[DashboardQuery]:
    """The queries the dashboard lists: the session's running and finished ones, then the
    checkpoints, in the order given.

    Examples
    --------
    >>> [q.key for q in dashboard_queries(Session(), ["memory://a", "memory://b"])]
    ['checkpoint-0', 'checkpoint-1']
    """
    live = [*session.active, *reversed(session.finished)]
    listed: list[DashboardQuery] = [LiveQuery(q) for q in live]
    listed.extend(CheckpointQuery(url, i) for i, url in enumerate(checkpoints))
    return listed


def progress_view(history: Sequence[QueryProgress]) -> dict[str, Any]:
    """The numbers and charts of a query's page, from its recent progress (oldest first).

    ``last`` is the newest record as ``QueryProgress.model_dump(mode="json")``,
    so the page shows exactly what ``last_progress`` holds.

    Examples
    --------
    >>> view = progress_view([])
    >>> view["last"], view["batch_id"], sorted(view["charts"])
    (None, None, ['durations', 'late', 'rates', 'source_lag', 'state', 'watermark'])
    """
    now = datetime.now(timezone.utc)
    last = history[-1] if history else None
    lag_s = None
    if last is not None and last.watermark is not None and last.watermark.year < 9999:
        lag_s = (now - last.watermark).total_seconds()
    return {
        "now": now.isoformat(),
        "now_ms": int(now.timestamp() * 1000),
        "batch_id": None if last is None else last.batch_id,
        "last": None if last is None else json.loads(last.model_dump_json()),
        "watermark_lag_s": lag_s,
        "late_rows": None if last is None else last.flat()["rows_dropped_late"],
        # A batch that only moves the watermark has no input, so none late: the recent total
        # says whether late rows are being dropped at all.
        "late_rows_recent": sum(p.flat()["rows_dropped_late"] for p in history),
        "charts": _charts(history),
    }


def _charts(history: Sequence[QueryProgress]) -> dict[str, str]:
    xs = [p.batch_id for p in history]
    operators = sorted({op.operator_id for p in history for op in p.state_operators})
    sources = [s.description for s in history[-1].sources] if history else []

    def per_operator(op_id: str) -> list[float | None]:
        return [
            next((op.num_rows_total for op in p.state_operators if op.operator_id == op_id), None)
            for p in history
        ]

    def per_source(i: int) -> list[float | None]:
        return [
            None if i >= len(p.sources) or p.sources[i].lag is None else p.sources[i].lag
            for p in history
        ]

    def watermark(p: QueryProgress) -> float | None:
        mark = p.watermark
        return None if mark is None or mark.year == 9999 else mark.timestamp()

    return {
        "rates": charts.line_chart(
            xs,
            [
                ("input rows/s", [p.input_rows_per_second for p in history]),
                ("processed rows/s", [p.processed_rows_per_second for p in history]),
            ],
            title="Rows per second",
        ),
        "durations": charts.stacked_bar_chart(
            xs,
            [(phase, [getattr(p.durations_ms, phase) for p in history]) for phase in PHASES],
            title="Batch duration (ms)",
        ),
        "watermark": charts.line_chart(
            xs,
            [
                ("wall clock", [p.batch_timestamp_ms / 1000 for p in history]),
                ("watermark", [watermark(p) for p in history]),
            ],
            title="Watermark (UTC)",
            y_format=charts.clock_label,
        ),
        "state": charts.line_chart(
            xs, [(op_id, per_operator(op_id)) for op_id in operators], title="State rows"
        ),
        "late": charts.line_chart(
            xs,
            [("late rows", [p.flat()["rows_dropped_late"] for p in history])],
            title="Late rows per batch",
        ),
        "source_lag": charts.line_chart(
            xs,
            [(f"source {i}", per_source(i)) for i in range(len(sources))],
            title="Source lag",
        ),
    }


def state_view(frame: pl.DataFrame, *, store: str, limit: int) -> dict[str, Any]:
    """A state frame as the page's table: columns, dtypes and rows of JSON values.

    Examples
    --------
    >>> state_view(pl.DataFrame({"user": ["a"], "n": [2]}), store="op0/partials", limit=20)
    {'store': 'op0/partials', 'columns': ['user', 'n'], 'dtypes': ['String', 'Int64'], 'rows': [['a', 2]], 'limit': 20}
    """
    rows = [[_json_value(v) for v in row] for row in frame.head(limit).rows()]
    return {
        "store": store,
        "columns": frame.columns,
        "dtypes": [str(t) for t in frame.dtypes],
        "rows": rows,
        "limit": limit,
    }


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # datetimes, decimals, lists, structs: as Polars prints them


def _store_names(listing: dict[str, list[str]]) -> list[str]:
    return [f"{op}/{store}" for op, stores in listing.items() for store in stores]


def _lock_state(cp: Checkpoint) -> str:
    """``running (pid … on host)`` while a fresh heartbeat holds the lock, as ``status`` says."""
    if not cp.storage.exists("lock.json"):
        return "stopped"
    lock = cp.storage.read_model("lock.json", LockRecord, checksum=False)
    if time.time() - lock.heartbeat_at < lock.timeout_s:
        return f"running (pid {lock.pid} on {lock.host})"
    return "stopped"


def _recorded_plan(cp: Checkpoint) -> str:
    """The plan record of ``metadata.json``: what the checkpoint knows of its query."""
    plan = cp.read_metadata().plan
    lines = [
        "recorded in metadata.json when the checkpoint was created (stateless steps and",
        "the sink may have changed since):",
        f"sink: {plan.sink} ({plan.output_mode})",
    ]
    for title, steps in (
        ("stateless", plan.stateless),
        ("stateful", plan.stateful),
        ("sources", plan.sources),
    ):
        lines.append(f"{title}:" + ("" if steps else " none"))
        lines += [f"  {_step(step)}" for step in steps]
    return "\n".join(lines)


def _step(step: str | dict[str, Any]) -> str:
    if isinstance(step, str):
        return step
    fields = " ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in step.items() if k != "kind"
    )
    return f"{step.get('kind', '?')} {fields}".rstrip()
