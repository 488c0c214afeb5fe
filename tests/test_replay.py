"""Kappa-style replay: the same query from the start of its input into a new version.

The oracle: a query run live, batch after batch while data arrives, and the
same query replayed from scratch into a new table give the same rows; readers
see the new table only once the replay has finished; a failed replay leaves
them on the old one.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.cli.main import main
from microstream.runtime.progress_bar import _Rendered

if TYPE_CHECKING:
    from microstream.runtime.progress import QueryProgressEvent
    from microstream.testing.tansu import TansuBroker

deltalake = pytest.importorskip("deltalake")

SCHEMA = {"ts": pl.Datetime("us"), "user": pl.String, "amount": pl.Float64}
START = datetime(2024, 1, 1)


def events(first: int, count: int) -> pl.DataFrame:
    """Events ``first .. first+count-1``: 2 s apart, up to 4 s out of order (never late)."""
    ids = range(first, first + count)
    return pl.DataFrame(
        {
            "ts": [START + timedelta(seconds=2 * i - (i * 7) % 5) for i in ids],
            "user": [("a", "b", "c")[(i * 5 + i // 7) % 3] for i in ids],
            "amount": [float((i * 37) % 101) for i in ids],
        },
        schema=SCHEMA,
    )


def per_minute(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        frame.with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="user")
        .agg(n=pl.len(), total=pl.col("amount").sum())
    )


def read_sorted(table: str | Path) -> pl.DataFrame:
    return pl.read_delta(str(table)).sort("user", "ts")


class PointerWatch:
    """A listener that resolves the output's pointer after every batch of any query."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.versions: list[int] = []

    def on_query_progress(self, event: QueryProgressEvent) -> None:
        self.versions.append(ms.current_output(self.output).version)


class FailOnce:
    """A map_batches function that fails on its ``at``-th non-empty batch, once."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.failed = False

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        if df.height:
            self.seen += 1
            if self.seen == self.at and not self.failed:
                self.failed = True
                msg = "boom: a bug in the new query version"
                raise RuntimeError(msg)
        return df


# -- Kafka -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_replay_kafka_topic_equals_live_output(
    kafka_broker: TansuBroker, kafka_topic: str, tmp_path: Path
) -> None:
    fail_once = FailOnce(at=3)

    def query(*, replay: bool = False) -> ms.StreamFrame:
        # The live job starts at the end of the topic; a replay at its start.
        source = ms.scan_kafka(
            kafka_broker.bootstrap_servers,
            topic=kafka_topic,
            schema=SCHEMA,
            starting_offsets="earliest" if replay else "latest",
            max_offsets_per_trigger=25,
        )
        return per_minute(source.map_batches(fail_once))

    output = tmp_path / "per_minute"
    live_table, live_checkpoint = tmp_path / "live", tmp_path / "live-cp"
    adopted = ms.switch_output(output, table=live_table, checkpoint=live_checkpoint)
    assert (adopted.version, adopted.table) == (1, str(live_table))

    # Live: events arrive in four bursts while the query runs, in batches of 25.
    fail_once.failed = True  # the live run never fails
    live = query().sink_delta(adopted.table, checkpoint=adopted.checkpoint)
    for burst in range(4):
        frame = events(burst * 60, 60)
        kafka_broker.produce(
            kafka_topic, frame.with_columns(pl.col("ts").dt.to_string()).to_dicts()
        )
        live.process_all_available(timeout=60)
    live.stop()
    assert live.exception() is None
    live_rows = read_sorted(live_table)
    assert live_rows.height >= 10
    assert live_rows["n"].sum() < 240  # the windows still open are not in append output

    # A replay whose query fails mid-way: the pointer stays on version 1.
    fail_once.failed, fail_once.seen = False, 0
    watch = PointerWatch(output)
    ms.add_listener(watch)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ms.replay(query, output, progress=False)
        assert ms.current_output(output).version == 1
        assert ms.current_output(output).table == str(live_table)
        assert (output / "v2" / "_delta_log").exists()  # partly written, never read
        assert watch.versions and set(watch.versions) == {1}

        # Running it again resumes version 2 from its checkpoint, then switches.
        watch.versions.clear()
        result = ms.replay(query, output, progress=False)
    finally:
        ms.remove_listener(watch)
    assert set(watch.versions) == {1}, "readers were switched before the replay finished"
    assert result.switched and result.version == 2
    assert result.num_batches >= 2
    pointer = ms.current_output(output)
    assert pointer.version == 2
    assert pointer.table == str(output / "v2") == result.table
    assert pointer.checkpoint == str(output / "_checkpoints" / "v2") == result.checkpoint
    assert pointer.previous is not None and pointer.previous.table == str(live_table)
    assert pointer.query is not None and pointer.query.endswith("query")

    # Same rows as live, exactly; the old table still reads as before.
    assert_frame_equal(read_sorted(pointer.table), live_rows)
    assert_frame_equal(ms.read_output(output).sort("user", "ts"), live_rows)
    assert_frame_equal(read_sorted(live_table), live_rows)

    # The progress the bar is drawn from: units read and the lag left, in offsets.
    # (A recovered batch re-runs before the source looked up the topic's end: no lag yet.)
    batches = [p for p in result.query.recent_progress if p.num_input_rows and not p.recovered]
    sources = [p.sources[0] for p in batches]
    assert all(s.num_input_units == 25 for s in sources[:-1])
    assert sources[-1].lag == 0


# -- Delta as the source -----------------------------------------------------------------------


def test_replay_delta_table_equals_live_output(tmp_path: Path) -> None:
    source = str(tmp_path / "events")
    deltalake.write_deltalake(source, events(0, 50).to_arrow())

    def query(replay: bool = False) -> ms.StreamFrame:
        return per_minute(ms.scan_delta(source, max_files_per_trigger=1))

    output = tmp_path / "per_minute"
    live_table = tmp_path / "live"
    ms.switch_output(output, table=live_table, checkpoint=tmp_path / "live-cp")
    pointer = ms.current_output(output)
    live = query().sink_delta(pointer.table, checkpoint=pointer.checkpoint, output_mode="update")
    live.process_all_available(timeout=60)
    for version in range(1, 5):  # four more table versions, each read by the running query
        deltalake.write_deltalake(source, events(version * 50, 50).to_arrow(), mode="append")
        live.process_all_available(timeout=60)
    live.stop()
    assert live.exception() is None
    assert sum(p.num_input_rows for p in live.recent_progress) == 250
    live_rows = read_sorted(live_table)

    watch = PointerWatch(output)
    ms.add_listener(watch)
    try:
        result = ms.replay(query, output, output_mode="update", progress=False)
    finally:
        ms.remove_listener(watch)
    assert watch.versions and set(watch.versions) == {1}
    assert (result.version, result.num_input_rows) == (2, 250)
    assert result.num_batches >= 5  # the table's five files, one per batch
    assert_frame_equal(ms.read_output(output).sort("user", "ts"), live_rows)
    assert live_rows["n"].sum() == 250  # update mode: every window, the open ones too


def test_flushed_replay_equals_the_batch_result(tmp_path: Path) -> None:
    source = str(tmp_path / "events")
    for part in range(3):
        deltalake.write_deltalake(source, events(part * 40, 40).to_arrow(), mode="append")

    def query() -> ms.StreamFrame:  # no replay parameter: called as query()
        return per_minute(ms.scan_delta(source, max_files_per_trigger=1))

    result = ms.replay(query, tmp_path / "out", flush=True, progress=False)
    assert result.pointer is not None and result.pointer.flushed
    expected = (
        events(0, 120)
        .sort("ts")
        .group_by_dynamic("ts", every="1m", group_by="user")
        .agg(n=pl.len().cast(pl.Int32), total=pl.col("amount").sum())  # Delta has no UInt32
        .sort("user", "ts")
    )
    assert_frame_equal(ms.read_output(tmp_path / "out").sort("user", "ts"), expected)


def test_failed_replay_leaves_the_pointer_on_the_old_table(tmp_path: Path) -> None:
    source = str(tmp_path / "events")
    for part in range(4):
        deltalake.write_deltalake(source, events(part * 10, 10).to_arrow(), mode="append")
    output = tmp_path / "out"

    def good() -> ms.StreamFrame:
        return ms.scan_delta(source, max_files_per_trigger=1).select("user", "amount")

    first = ms.replay(good, output, progress=False)
    assert first.version == 1 and first.previous is None

    fail_once = FailOnce(at=2)

    def bad() -> ms.StreamFrame:
        return good().map_batches(fail_once)

    with pytest.raises(RuntimeError, match="boom"):
        ms.replay(bad, output, progress=False)
    pointer = ms.current_output(output)
    assert pointer.version == 1 and pointer.table == str(output / "v1")
    assert ms.read_output(output).height == 40
    # The half-written version 2 is resumed (not restarted) by the next run.
    second = ms.replay(bad, output, progress=False)
    assert second.version == 2 and second.num_input_rows == 30  # batch 0 was committed
    assert ms.read_output(output).height == 40


def test_replay_without_data_does_not_switch(tmp_path: Path) -> None:
    source = str(tmp_path / "events")
    deltalake.write_deltalake(source, events(0, 5).to_arrow())
    output = tmp_path / "out"
    ms.replay(lambda: ms.scan_delta(source), output, progress=False)

    def nothing_yet(replay: bool = False) -> ms.StreamFrame:
        return ms.scan_delta(source, starting_version="latest")

    with pytest.raises(ms.ReplayError, match="ran no batch"):
        ms.replay(nothing_yet, output, progress=False)
    assert ms.current_output(output).version == 1


def test_replay_checks_what_it_is_given(tmp_path: Path) -> None:
    source = str(tmp_path / "events")
    deltalake.write_deltalake(source, events(0, 5).to_arrow())
    output = tmp_path / "out"
    with pytest.raises(ms.ReplayError, match="must return the query as a StreamFrame"):
        ms.replay(lambda: pl.DataFrame({"x": [1]}), output, progress=False)
    with pytest.raises(ms.ReplayError, match="started a query"):
        ms.replay(
            lambda: ms.scan_delta(source).sink_memory("replay_started"), output, progress=False
        )
    assert not ms.active()
    with pytest.raises(ms.ReplayError, match=r"FILE\.py:FUNCTION"):
        ms.replay("job.py", output, progress=False)
    (output / "v1" / "_delta_log").mkdir(parents=True)  # a table left without its checkpoint
    with pytest.raises(ms.ReplayError, match="exists but its checkpoint"):
        ms.replay(lambda: ms.scan_delta(source), output, progress=False)
    with pytest.raises(ms.OutputError, match="has no pointer"):
        ms.current_output(output)
    result = ms.replay(lambda: ms.scan_delta(source), output, version=3, progress=False)
    assert (
        result.version == 3 and ms.current_output(output).version == 1
    )  # pointer versions count switches
    with pytest.raises(ms.ReplayError, match="above the output's current version 1"):
        ms.replay(lambda: ms.scan_delta(source), output, version=1, progress=False)


def test_replay_without_switch_then_switch_by_hand(tmp_path: Path) -> None:
    source = str(tmp_path / "events")
    deltalake.write_deltalake(source, events(0, 5).to_arrow())
    output = tmp_path / "out"
    result = ms.replay(lambda: ms.scan_delta(source), output, switch=False, progress=False)
    assert not result.switched and result.pointer is None
    with pytest.raises(ms.OutputError):
        ms.read_output(output)
    ms.switch_output(output, table=result.table, checkpoint=result.checkpoint, expected_version=0)
    assert ms.read_output(output).height == 5


# -- the pointer -------------------------------------------------------------------------------


def test_a_reader_never_sees_a_half_written_pointer(tmp_path: Path) -> None:
    output = tmp_path / "out"
    ms.switch_output(output, table=output / "v1")
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(ms.current_output(output).version)
            except BaseException as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(2, 202):
            ms.switch_output(output, table=output / f"v{version}", expected_version=version - 1)
    finally:
        done.set()
        reader.join()
    assert not errors
    assert seen == sorted(seen) and seen[-1] <= 201
    assert ms.current_output(output).version == 201
    assert not [p.name for p in output.iterdir() if p.name.endswith(".tmp")]


def test_pointer_paths_are_relative_inside_the_output(tmp_path: Path) -> None:
    output = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    ms.switch_output(output, table=output / "v1", checkpoint=elsewhere)
    stored = (output / "current.json").read_text()
    assert '"table": "v1"' in stored and str(elsewhere) in stored
    moved = tmp_path / "moved"
    output.rename(moved)
    assert ms.current_output(moved).table == str(moved / "v1")
    (moved / "current.json").write_text("{")
    with pytest.raises(ms.OutputError, match="is corrupt"):
        ms.current_output(moved)


# -- the progress bar --------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal(tmp_path: Path) -> None:
    files = tmp_path / "in"
    files.mkdir()
    for i in range(6):
        pl.DataFrame({"x": [i] * 10}).write_parquet(files / f"{i}.parquet")
    query = ms.scan_files(files, max_files_per_trigger=2).sink_memory(
        "replay_bar", trigger=ms.Trigger.available_now()
    )
    terminal = Terminal()
    with ms.ProgressBar(query, label="files", file=terminal, notebook=False) as bar:
        query.await_termination()
    text = terminal.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    final = text.rsplit("\r", 1)[-1]
    assert final.startswith("files [########################] 100.0% done · 3 batches")
    assert "60 rows in" in final and "lag 0" in final
    assert bar.fraction == 1.0


def test_progress_bar_counts_a_backlog_in_the_sources_units() -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    query = stream.lazy().sink_memory("replay_bar_units")
    bar = ms.ProgressBar(query, file=io.StringIO(), notebook=False)
    assert bar.fraction is None and "?%" in bar.text()  # no batch yet: nothing known
    for i in range(4):
        stream.add_data({"x": [i]})
    query.process_all_available()
    assert bar.fraction == 1.0  # the memory stream's units: batches added
    assert "running" in bar.text()
    query.stop()
    assert " done · " in bar.text()


def test_progress_bar_html() -> None:
    html = _Rendered("replay [##--] 50.0%", 0.5)._repr_html_()
    assert '<progress max="1" value="0.5000"' in html and "replay [##--] 50.0%" in html
    assert 'value="' not in _Rendered("x", None)._repr_html_()
    assert repr(_Rendered("a line", 0.1)) == "a line"


# -- the command line --------------------------------------------------------------------------


JOB = """
import polars as pl
import microstream as ms

SOURCE = {source!r}


def totals(replay: bool = False) -> ms.StreamFrame:
    return ms.scan_delta(SOURCE).group_by("user").agg(n=pl.len())


def broken(replay: bool = False) -> ms.StreamFrame:
    return ms.scan_delta(SOURCE + "-missing")


if __name__ == "__main__":  # the live job; a replay must not run it
    raise SystemExit("the live job ran")
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microstream.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.mark.integration
def test_cli_replay_and_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tmp_path / "events")
    deltalake.write_deltalake(source, events(0, 30).to_arrow())
    (tmp_path / "job.py").write_text(JOB.format(source=source))

    # The real command, in its own process.
    done = cli(
        "replay", "job.py:totals", "--output", "out", "--output-mode", "complete", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "replayed job.py:totals into version 1" in done.stdout
    assert "30 rows in" in done.stdout and "readers now use" in done.stdout
    expected = events(0, 30).group_by("user").agg(n=pl.len().cast(pl.Int32)).sort("user")
    assert_frame_equal(ms.read_output(tmp_path / "out").sort("user"), expected)

    # The rest in this process (quicker).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # replay puts the job's directory on it
    assert main(["output", "out", "--json"]) == 0
    shown = capsys.readouterr().out
    assert '"version": 1' in shown and '"table": "' + str(tmp_path / "out" / "v1") in shown

    again = ["replay", "job.py:totals", "--output", "out", "--output-mode", "complete"]
    assert main([*again, "--no-switch"]) == 0
    assert "not switched: readers still use version 1" in capsys.readouterr().out
    assert ms.current_output("out").version == 1

    assert main(["output", "out", "--switch", "out/v2", "--checkpoint", "out/_checkpoints/v2"]) == 0
    assert "version      2" in capsys.readouterr().out
    assert ms.current_output("out").table == str(tmp_path / "out" / "v2")
    assert main(["output", "out", "--rollback"]) == 0
    assert ms.current_output("out").table == str(tmp_path / "out" / "v1")


def test_cli_replay_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # replay puts the job's directory on it
    (tmp_path / "job.py").write_text(JOB.format(source=str(tmp_path / "events")))
    assert main(["replay", "job.py:nope", "--output", "out"]) == 1
    assert "has no function 'nope'" in capsys.readouterr().err
    assert main(["replay", "job.py:broken", "--output", "out"]) == 1
    err = capsys.readouterr().err
    assert "the replay failed; readers were not switched: PlanError: there is no Delta" in err
    assert main(["output", "out"]) == 1
    assert "has no pointer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["replay", "job.py:totals"])  # --output missing
    assert usage.value.code == 2


def test_cli_help_lists_replay(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "replay" in text and "output" in text
    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    replay_help = capsys.readouterr().out
    for option in ("--output", "--checkpoint", "--flush", "--no-switch", "--version"):
        assert option in replay_help
