"""The dashboard's server: its JSON against the query, read-only, bound to loopback.

The page itself, in a real browser, is tested in ``test_ui_browser.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream.ui import Dashboard

SCHEMA = {"ts": pl.Datetime("us"), "user": pl.String, "amount": pl.Int64}
T0 = datetime(2026, 1, 1, 12, 0)


def events(*items: tuple[int, str, int]) -> pl.DataFrame:
    """Rows (seconds after T0, user, amount)."""
    return pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=s) for s, _, _ in items],
            "user": [u for _, u, _ in items],
            "amount": [a for *_, a in items],
        },
        schema=SCHEMA,
    )


def windowed(stream: ms.MemoryStream, name: str, checkpoint: Path, session: ms.Session) -> Any:
    return (
        stream.lazy()
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="user")
        .agg(pl.col("amount").sum())
        .sink_memory(name, checkpoint=str(checkpoint), session=session)
    )


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def running(
    tmp_path: Path, name: str, session: ms.Session
) -> Iterator[tuple[ms.StreamingQuery, ms.MemoryStream, Dashboard]]:
    stream = ms.MemoryStream(SCHEMA)
    query = windowed(stream, name, tmp_path / "cp", session)
    stream.add_data(events((0, "a", 1), (30, "b", 2), (70, "a", 3)))
    query.process_all_available()
    stream.add_data(events((130, "a", 4), (5, "b", 100)))  # 5s: behind the 60s watermark, late
    query.process_all_available()
    with ms.start_ui(port=0, session=session) as ui:
        yield query, stream, ui
    query.stop()


def test_query_view_is_last_progress_exactly(
    running: tuple[ms.StreamingQuery, ms.MemoryStream, Dashboard],
) -> None:
    query, _, ui = running
    status, listing = get(ui.url + "api/queries")
    assert status == 200
    last = query.last_progress
    assert last is not None
    # batches 0 and 2 read rows, 1 and 3 only moved the watermark (to 12:01, then 12:02)
    assert [(p.num_input_rows, p.watermark) for p in query.recent_progress] == [
        (3, None),
        (0, datetime(2026, 1, 1, 12, 1, tzinfo=timezone.utc)),
        (2, datetime(2026, 1, 1, 12, 1, tzinfo=timezone.utc)),
        (0, datetime(2026, 1, 1, 12, 2, tzinfo=timezone.utc)),
    ]
    assert [(q["key"], q["name"], q["state"], q["batch_id"]) for q in listing] == [
        (f"run-{query.run_id}", query.name, "active", 3)
    ]
    status, view = get(f"{ui.url}api/query/run-{query.run_id}")
    assert status == 200
    assert view["last"] == json.loads(last.model_dump_json())
    assert view["batch_id"] == 3
    assert view["late_rows"] == 0 == last.state_operators[0].num_rows_dropped_late
    assert view["late_rows_recent"] == 1  # the row at 12:00:05 in batch 2
    assert view["plan"] == query.explain_text()
    assert view["plan"].startswith("group_by_dynamic(")
    assert view["error"] is None
    assert view["stores"] == ["op0/partials"]
    now = datetime.fromisoformat(view["now"])
    assert view["watermark_lag_s"] == (now - last.watermark).total_seconds()  # type: ignore[operator]
    # the charts: one polyline per series with two batches, labelled, as SVG markup
    assert view["charts"]["rates"].count("<polyline") == 2
    assert "processed rows/s" in view["charts"]["rates"]
    assert view["charts"]["watermark"].count("<polyline") == 2
    assert view["charts"]["durations"].startswith("<svg")


def test_state_view_is_read_state(
    running: tuple[ms.StreamingQuery, ms.MemoryStream, Dashboard], tmp_path: Path
) -> None:
    query, _, ui = running
    status, state = get(f"{ui.url}api/query/run-{query.run_id}/state?store=op0/partials")
    assert status == 200
    expected = ms.read_state(tmp_path / "cp", operator="op0")
    assert state["columns"] == expected.columns
    assert state["dtypes"] == [str(t) for t in expected.dtypes]
    assert sorted(map(tuple, state["rows"])) == sorted(expected.rows())
    assert len(state["rows"]) == 1  # the window at 12:02 of user a; the watermark closed the rest


def test_unknown_query_or_store_is_named(
    running: tuple[ms.StreamingQuery, ms.MemoryStream, Dashboard],
) -> None:
    query, _, ui = running
    status, body = get(ui.url + "api/query/run-nope")
    assert (status, body["error"]) == (
        404,
        "no query 'run-nope' on the dashboard (it may have been dropped from the session)",
    )
    status, body = get(f"{ui.url}api/query/run-{query.run_id}/state?store=op3")
    assert status == 400
    assert body["error"] == (
        "no stateful operator 'op3' in this query; its operators and stores: op0/partials"
    )
    assert get(ui.url + "nothing-here")[0] == 404


def test_the_dashboard_is_read_only(
    running: tuple[ms.StreamingQuery, ms.MemoryStream, Dashboard], tmp_path: Path
) -> None:
    query, stream, ui = running
    commits = sorted(p.name for p in (tmp_path / "cp" / "commits").iterdir())
    paths = ["/", f"/query/run-{query.run_id}", f"/api/query/run-{query.run_id}", "/api/queries"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in paths:
            conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)
            conn.request(method, path, body=b'{"action": "stop"}')
            response = conn.getresponse()
            assert response.status == 405, (method, path)
            assert response.getheader("Allow") == "GET, HEAD"
            assert json.loads(response.read())["error"] == (
                "the dashboard is read-only: only GET and HEAD are served"
            )
            conn.close()
    assert query.is_active
    assert sorted(p.name for p in (tmp_path / "cp" / "commits").iterdir()) == commits
    stream.add_data(events((200, "c", 5)))  # and it still runs
    query.process_all_available()
    assert query.last_progress is not None and query.last_progress.batch_id > 3


def test_pages_load_nothing_from_elsewhere(
    running: tuple[ms.StreamingQuery, ms.MemoryStream, Dashboard],
) -> None:
    query, _, ui = running
    for path in ["", f"query/run-{query.run_id}", "dashboard.js", "dashboard.css"]:
        with urllib.request.urlopen(ui.url + path, timeout=10) as response:
            body = response.read().decode()
            csp = response.headers["Content-Security-Policy"]
        assert "http" not in body.replace("http://www.w3.org/2000/svg", "")
        assert "default-src 'none'" in csp and "script-src 'self'" in csp


def test_a_foreign_host_header_is_refused(
    running: tuple[ms.StreamingQuery, ms.MemoryStream, Dashboard],
) -> None:
    _, _, ui = running
    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)
    conn.request("GET", "/api/queries", headers={"Host": f"attacker.example:{ui.port}"})
    response = conn.getresponse()
    assert response.status == 421
    assert json.loads(response.read()) == {
        "error": f"unexpected Host header 'attacker.example:{ui.port}'"
    }
    conn.close()
    assert get(f"http://localhost:{ui.port}/api/queries")[0] == 200


def test_binding_beyond_loopback_needs_allow_remote(session: ms.Session) -> None:
    with pytest.raises(ms.MicrostreamError, match=r"host='0\.0\.0\.0'.*allow_remote=True"):
        ms.start_ui(port=0, host="0.0.0.0", session=session)
    with ms.start_ui(port=0, host="0.0.0.0", allow_remote=True, session=session) as ui:
        assert ui.url == f"http://0.0.0.0:{ui.port}/"
        conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=10)
        conn.request("GET", "/api/queries", headers={"Host": f"dashboard.example:{ui.port}"})
        assert conn.getresponse().status == 200  # allowed remote: any Host name
        conn.close()


def test_a_taken_port_is_named(session: ms.Session) -> None:
    with ms.start_ui(port=0, session=session) as ui:
        taken = (
            rf"cannot listen on 127\.0\.0\.1:{ui.port}: .*; pick another port \(0: any free one\)"
        )
        with pytest.raises(ms.MicrostreamError, match=taken):
            ms.start_ui(port=ui.port, session=session)
    # stop() closed the socket: the port can be bound again
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", ui.port))


def test_a_failed_query_shows_its_error(session: ms.Session, name: str) -> None:
    def explode(df: pl.DataFrame) -> pl.DataFrame:
        if df.height:
            raise ValueError("amount out of range")
        return df

    stream = ms.MemoryStream(SCHEMA)
    query = stream.lazy().map_batches(explode).sink_memory(name, session=session)
    stream.add_data(events((0, "a", 1)))
    with pytest.raises(ValueError, match="amount out of range"):
        query.process_all_available()
    query.await_termination_quietly(10)
    with ms.start_ui(port=0, session=session) as ui:
        _, listing = get(ui.url + "api/queries")
        assert [(q["key"], q["state"]) for q in listing] == [(f"run-{query.run_id}", "failed")]
        status, view = get(f"{ui.url}api/query/run-{query.run_id}")
    assert status == 200
    assert view["error"] == "ValueError: amount out of range"
    assert view["last"] is None and view["stores"] == []


def stopped_checkpoint(tmp_path: Path, name: str) -> tuple[Path, ms.QueryProgress]:
    session = ms.Session()
    stream = ms.MemoryStream(SCHEMA)
    query = windowed(stream, name, tmp_path / "cp", session)
    stream.add_data(events((0, "a", 1), (70, "b", 2)))
    query.process_all_available()
    stream.add_data(events((90, "a", 3)))
    query.process_all_available()
    last = query.last_progress
    query.stop()
    assert last is not None
    return tmp_path / "cp", last


def test_a_checkpoint_is_shown_from_its_files(tmp_path: Path, name: str) -> None:
    cp, last = stopped_checkpoint(tmp_path, name)
    (tmp_path / "empty").mkdir()
    with ms.start_ui(port=0, session=ms.Session(), checkpoints=[str(cp), str(tmp_path / "empty")]) as ui:  # fmt: skip
        answers = [
            get(ui.url + path)
            for path in [
                "api/queries",
                "api/query/checkpoint-0",
                "api/query/checkpoint-0/state?store=op0/partials",
                "api/query/checkpoint-1",
            ]
        ]
    assert [status for status, _ in answers] == [200, 200, 200, 200]
    listing, view, state, bad = (body for _, body in answers)
    assert [(q["key"], q["name"], q["state"], q["batch_id"]) for q in listing] == [
        ("checkpoint-0", name, "stopped", last.batch_id),
        ("checkpoint-1", None, "unreadable", None),
    ]
    assert listing[1]["error"] == f"{tmp_path / 'empty'} is not a microstream checkpoint (no metadata.json)"  # fmt: skip
    assert view["last"] == json.loads(last.model_dump_json())
    assert view["run_id"] == last.run_id and view["error"] is None
    assert view["plan"].splitlines()[2:7] == [
        "sink: memory (append)",
        "stateless: none",
        "stateful:",
        "  watermark column=ts delay_us=10000000",
        "  aggregate keys=[\"user\"] window=tumbling window on 'ts' every=1m period=1m "
        'offset=0s aggs=["col(\\"amount\\").sum()"] emit=',
    ]
    assert view["stores"] == ["op0/partials"]
    expected = ms.read_state(cp, operator="op0")
    assert sorted(map(tuple, state["rows"])) == sorted(expected.rows())
    assert bad["state"] == "unreadable" and bad["last"] is None


def test_cli_ui_serves_checkpoints_until_stopped(tmp_path: Path, name: str) -> None:
    cp, last = stopped_checkpoint(tmp_path, name)
    process = subprocess.Popen(
        [sys.executable, "-m", "microstream.cli", "ui", "--port", "0", str(cp)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("microstream dashboard on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split(" ")[0]
        status, view = get(url + "api/query/checkpoint-0")
        assert status == 200 and view["last"] == json.loads(last.model_dump_json())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_ui_refuses_what_is_not_a_checkpoint_or_a_remote_host(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "microstream.cli", "ui", "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = cli(str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == (
        f"microstream: error: {tmp_path} is not a microstream checkpoint (no metadata.json)\n"
    )
    result = cli("--host", "0.0.0.0")
    assert result.returncode == 1
    assert "--allow-remote" in result.stderr and "unauthenticated" in result.stderr


def test_checkpoint_progress_is_read_from_the_end_across_runs(tmp_path: Path, name: str) -> None:
    cp, _ = stopped_checkpoint(tmp_path, name)
    [first_file] = (cp / "progress").iterdir()
    first_run = [
        ms.QueryProgress.model_validate_json(x) for x in first_file.read_text().splitlines()
    ]
    # A later run of the same query: its own file, batch ids after the first run's.
    n = len(first_run)
    later = [
        first_run[i % n].model_copy(update={"run_id": "later-run", "batch_id": n + i})
        for i in range(300)
    ]
    second_file = cp / "progress" / "later-run.jsonl"
    second_file.write_text("".join(p.model_dump_json() + "\n" for p in later))
    mtime = first_file.stat().st_mtime + 60
    os.utime(second_file, (mtime, mtime))
    assert second_file.stat().st_size > 64 * 1024  # more than one read from the end

    checkpoint = ms.Checkpoint(str(cp))
    everything = checkpoint.recent_progress(10_000)
    assert everything == [*first_run, *later]
    assert checkpoint.recent_progress(3) == later[-3:]
    assert checkpoint.recent_progress(299) == later[-299:]
    assert checkpoint.recent_progress(302) == [*first_run[-2:], *later]
