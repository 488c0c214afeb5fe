"""Stateful crash recovery: SIGKILL a pipeline of stateful queries, restart, compare to a clean run.

``tests/crash/stateful_pipeline.py`` runs three queries in one process over
the same directory of parquet files (out-of-order event times, late rows,
duplicate keys; one file per batch; ``Trigger.available_now(flush=True)``):
tumbling windows in append mode into a Delta table, session windows in
update mode through ``foreach_batch`` into one parquet file per batch id, and
``unique(subset=["k", "ts"])`` into the parquet file sink. Each query keeps
its state under ``<checkpoint>/<query>/state/``.

The expected output is what a clean, never-killed run of the same pipeline
wrote (run twice, and the two must agree: the pipeline is deterministic), not
what Polars computes: the point is that a crash changes nothing, including
*when* each row was emitted. So every output is read together with the batch
id that wrote it:

- windows: from the Delta log, each commit's ``txn`` version (the batch id,
  for the query's app id) and the files it added;
- sessions: the batch id is the file name;
- dedup: the file sink's manifest entry ``_microstream_log/<batch id>.json``.

Every scenario starts from fresh output and checkpoint directories and runs
the pipeline until it dies by SIGKILL, one or more times (a second kill often
lands while the run recovers the batch the first one left uncommitted):

- *fault points*: ``MICROSTREAM_FAULTS="<point>@<visit>"`` with the points of
  ``microstream.faults.FAULT_POINTS``;
- *random kills*: SIGKILL from the test at a seeded random fraction of a clean
  run's progress (its count of ``commits/`` files, plus a share of the time
  between two of them), so load on the machine cannot make every kill miss.

After every kill, what each query's output holds must be exactly the clean
run's output of batches ``0..m`` for some ``m`` (no torn, lost, doubled or
re-timed batch), and ``offsets/``/``commits/`` must be prefixes. Then a
restart without faults must exit 0 and leave, per query, rows equal to the
clean run's (sorted, exact values) with the same batch id for every row, the
same batches in ``offsets/`` and ``commits/``, the same state versions on
disk, and the same state content at the versions compared.

The bounded set (CI; 8 input files, 10 batches per query) kills every point at
visits 3, 1 (while recovering: a double crash) and 2 in turn, plus random
kills: 27 fault kills and a few random ones, about 40-60 s on 2 cores. The
full set (14 files, 16 batches: state snapshots at versions 0 and 10) kills
every point at every visit once, then again while recovering, at two
different points, and 50 times at random, comparing every state version; it
is ``test_crash_recovery_full``, marked ``slow`` and asked for like the
stateless harness's, with ``--crash-full`` or ``MICROSTREAM_CRASH_FULL=1``:
``tests/crash/conftest.py`` lifts the ``--run-slow`` skip of tests of that name.

The checks are shown to fail: on doctored outputs (a row re-timed, changed,
doubled or lost, a batch missing, a state row lost), on a state delta file
deleted after a kill (the restart must refuse loudly, naming the file), and on
a state delta file rewritten with other values (the engine cannot tell; the
comparison with the clean run does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl
import pytest

from microstream.runtime.faults import FAULT_POINTS

pytestmark = pytest.mark.integration

PIPELINE = Path(__file__).with_name("stateful_pipeline.py")

FILES = 8
"""Input files of the bounded set: 8 batches with data (one file each), a no-data
batch and the flush batch, so state versions 0-9 (a snapshot at 0, deltas after)."""
FILES_FULL = 14
"""Input files of the full set: 16 batches, so also a snapshot at version 10 and deltas on it."""
SPACING_S = 20
"""Event time between the files."""
KEYS = ("a", "b", "c", "d", "e")

RANDOM_KILL_AT = (0.02, 1.1)
"""Random kills land at this fraction of a clean run's progress: ``u`` times the number of
``commits/`` files a clean run wrote (all queries together), i.e. once ``floor(u * total)``
of them exist, plus ``frac(u * total)`` of the average time between two commits of a clean
run. Progress, not wall time, so a machine slower or faster than during the clean run
still lands the kills inside the run (``u`` >= 1 lets a run finish)."""

RUN_TIMEOUT_S = 120.0
"""A pipeline run that takes longer than this is hung: killed and reported."""

WORKERS = 2
"""Scenarios run concurrently."""

MIN_KILLS_BOUNDED = 20

BOUNDED_STATES_AT = (3, 7, 9)
"""State versions compared with the clean run's in the bounded set (the full set: all).

Reading every version of every store costs ~1-2 s a scenario; these are the
state mid-stream, after the last data batch, and after the flush (empty)."""


def load_pipeline(path: Path, name: str) -> ModuleType:
    """The pipeline script at ``path`` as a module named ``name`` (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pipeline = load_pipeline(PIPELINE, "stateful_crash_pipeline")
QUERIES: tuple[str, ...] = pipeline.QUERIES


def require(condition: bool, message: str) -> None:
    """``assert`` without pytest's introspection of the operands: the message says it all."""
    if not condition:
        raise AssertionError(message)


# -- input --------------------------------------------------------------------------------


def make_input(directory: Path, *, files: int, seed: int) -> Path:
    """``files`` parquet files, one per ``SPACING_S`` of event time, oldest first.

    Per file, each key is present with probability 0.55 (so sessions, gap 20 s,
    open and close) with 1-6 rows up to 8 s either side of the file's time
    (out of order, within the watermark delay of 10 s); plus 1-3 rows 15-90 s
    behind it (late for windows and sessions that closed meanwhile, or not)
    and 1-3 rows repeating the ``(k, ts)`` of an earlier row with another value
    (duplicates for ``unique``, or late ones).
    """
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    t0 = datetime(2024, 3, 1, 12, 0, 0)
    mtime = time.time() - 10 * files
    seen: list[tuple[str, datetime]] = []
    for i in range(files):
        base = t0 + timedelta(seconds=SPACING_S * i)
        rows: list[tuple[str, datetime, int]] = []
        for k in KEYS:
            if rng.random() < 0.45:
                continue
            for _ in range(rng.randint(1, 6)):
                rows.append((k, base + timedelta(milliseconds=rng.randint(-8000, 8000)), 0))
        for _ in range(rng.randint(1, 3)):
            behind = timedelta(milliseconds=rng.randint(15_000, 90_000))
            rows.append((rng.choice(KEYS), base - behind, 0))
        for _ in range(rng.randint(1, 3) if seen else 0):
            rows.append((*rng.choice(seen[-40:]), 0))
        rows = [(k, ts, rng.randint(0, 100)) for k, ts, _ in rows]
        rng.shuffle(rows)
        seen += [(k, ts) for k, ts, _ in rows]
        path = directory / f"part-{i:03d}.parquet"
        pl.DataFrame(rows, schema=pipeline.SCHEMA, orient="row").write_parquet(path)
        # Strictly increasing modification times: the source takes the oldest first.
        os.utime(path, (mtime + 10 * i, mtime + 10 * i))
    return directory


# -- running the pipeline -------------------------------------------------------------------


@dataclass(frozen=True)
class Dirs:
    root: Path

    @property
    def output(self) -> Path:
        return self.root / "out"

    @property
    def checkpoint(self) -> Path:
        return self.root / "cp"

    def query_checkpoint(self, query: str) -> Path:
        return self.checkpoint / query


@dataclass(frozen=True)
class Run:
    returncode: int
    stderr: str
    seconds: float
    """From ``ready`` (or the start, if it never came) to the exit."""


def run_pipeline(
    dirs: Dirs,
    source: Path,
    *,
    fault: str | None = None,
    kill_after_s: float | None = None,
    kill_when: Path | None = None,
    kill_after_commits: int | None = None,
    kill_delay_s: float = 0.0,
    log_name: str = "run",
    script: Path = PIPELINE,
) -> Run:
    """Run the pipeline ``script`` once in a subprocess.

    SIGKILL it ``kill_after_s`` after ``ready``, or as soon as ``kill_when`` exists, or
    ``kill_delay_s`` after ``kill_after_commits`` ``commits/`` files (all queries) exist.
    ``script`` takes ``--input source --output DIR --checkpoint DIR``, prints
    ``ready`` once its imports are done and exits 0 when every query finished.
    """
    env = {k: v for k, v in os.environ.items() if k != "MICROSTREAM_FAULTS"}
    if fault is not None:
        env["MICROSTREAM_FAULTS"] = fault
    cmd = [
        sys.executable,
        str(script),
        "--input",
        str(source),
        "--output",
        str(dirs.output),
        "--checkpoint",
        str(dirs.checkpoint),
    ]
    dirs.root.mkdir(parents=True, exist_ok=True)
    stderr_path = dirs.root / f"{log_name}.stderr"
    started = time.perf_counter()
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=dirs.root,  # nothing may land in the repository's checkpoints/
        )
        hung = threading.Event()

        def watchdog() -> None:
            hung.set()
            proc.kill()

        timer = threading.Timer(RUN_TIMEOUT_S, watchdog)
        timer.start()
        try:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() == "ready":
                started = time.perf_counter()
                if kill_after_s is not None:
                    time.sleep(kill_after_s)
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                elif kill_when is not None:
                    while proc.poll() is None and not kill_when.exists():
                        time.sleep(0.005)
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                elif kill_after_commits is not None:
                    while proc.poll() is None and count_commits(dirs) < kill_after_commits:
                        time.sleep(0.005)
                    time.sleep(kill_delay_s)
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
            proc.stdout.read()
            returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - started
    text = stderr_path.read_text()
    if hung.is_set():
        msg = f"pipeline run {log_name} hung for {RUN_TIMEOUT_S}s and was killed:\n{text[-3000:]}"
        raise AssertionError(msg)
    return Run(returncode, text, seconds)


def count_commits(dirs: Dirs) -> int:
    """How many ``commits/N.json`` files the queries under ``dirs`` have written so far."""
    return sum(1 for _ in dirs.checkpoint.glob("*/commits/*.json"))


# -- reading what a run left ------------------------------------------------------------------


def numbered(directory: Path, suffix: str = ".json") -> list[int]:
    if not directory.exists():
        return []
    return sorted(
        int(p.name[: -len(suffix)])
        for p in directory.iterdir()
        if p.name.endswith(suffix) and p.name[: -len(suffix)].isdigit()
    )


def query_id(dirs: Dirs, query: str) -> str:
    return json.loads((dirs.query_checkpoint(query) / "metadata.json").read_text())["id"]


def delta_commits(table: Path, app_id: str, query: str) -> list[tuple[int, list[dict[str, Any]]]]:
    """The commits of the Delta table ``table``, oldest first: each one's batch id (its
    ``txn`` version) and its actions.

    Every commit must carry exactly one ``txn``, of the query's app id, and the
    batch ids must rise in commit order from 0 (the batch that created the table):
    a batch committed twice (a re-run batch that the sink's transaction check did
    not skip) shows here. Every commit after the first adds files: a batch without
    rows makes no commit (append mode), so the rows, compared per batch id with
    the clean run, show a lost batch.
    """
    log = table / "_delta_log"
    commits = []
    for version in numbered(log):
        actions = [
            json.loads(line)
            for line in (log / f"{version:020d}.json").read_text().split("\n")
            if line
        ]
        txns = [a["txn"] for a in actions if "txn" in a]
        require(
            len(txns) == 1 and txns[0]["appId"] == app_id,
            f"{query}: Delta commit {version} has transactions {txns}, expected one of app {app_id}",
        )
        commits.append((txns[0]["version"], actions))
    batch_ids = [batch_id for batch_id, _ in commits]
    require(
        batch_ids == sorted(set(batch_ids)) and batch_ids[:1] in ([], [0]),
        f"{query}: the Delta commits hold batches {batch_ids} in this order",
    )
    empty = [b for b, actions in commits[1:] if not any("add" in a for a in actions)]
    require(not empty, f"{query}: Delta commits of batches {empty} add no rows")
    return commits


def shown_batches(dirs: Dirs, query: str) -> list[int]:
    """The batches the Delta table ``<output>/<query>`` has shown, those without rows too.

    The Delta sink commits only the batches with rows (``read_windows`` checks their
    txn versions rise), so the query has shown every batch up to its last ``commits/N``
    or its last Delta txn, whichever is later (the txn one past ``commits/``: written,
    not yet committed).
    """
    log = dirs.output / query / "_delta_log"
    txns = [
        json.loads(line)["txn"]["version"]
        for version in numbered(log)
        for line in (log / f"{version:020d}.json").read_text().split("\n")
        if '"txn"' in line
    ]
    shown = max(txns + numbered(dirs.query_checkpoint(query) / "commits"), default=-1)
    return list(range(shown + 1))


def read_windows(dirs: Dirs, query: str = "windows") -> pl.DataFrame | None:
    """The Delta table's rows with the batch id (``txn`` version) of the commit that added them.

    Every commit must carry exactly one ``txn`` of the query and remove nothing
    (append mode); the table read by ``deltalake`` must hold the same rows.
    """
    table = dirs.output / query
    if not numbered(table / "_delta_log"):
        return None
    frames = []
    for batch_id, actions in delta_commits(table, query_id(dirs, query), query):
        removed = [a["remove"]["path"] for a in actions if "remove" in a]
        require(not removed, f"{query}: Delta commit {batch_id} removes files {removed}")
        for action in actions:
            if "add" in action:
                frames.append(
                    pl.read_parquet(table / action["add"]["path"]).with_columns(
                        batch_id=pl.lit(batch_id, pl.Int64)
                    )
                )
    whole = pl.read_delta(str(table))
    empty = whole.clear().with_columns(batch_id=pl.lit(None, pl.Int64))
    rows = pl.concat(frames, how="vertical") if frames else empty
    require(
        sort_all(whole).equals(sort_all(rows.drop("batch_id"))),
        f"{query}: the Delta table's rows differ from the rows its commits added",
    )
    return rows


def read_sessions(dirs: Dirs) -> pl.DataFrame | None:
    """The ``foreach_batch`` files, ``<batch id>.parquet``, with their batch id."""
    directory = dirs.output / "sessions"
    ids = numbered(directory, ".parquet")
    if not ids:
        return None
    return pl.concat(
        [
            pl.read_parquet(pipeline.session_file(directory, i)).with_columns(
                batch_id=pl.lit(i, pl.Int64)
            )
            for i in ids
        ],
        how="vertical",
    )


def read_dedup(dirs: Dirs) -> pl.DataFrame | None:
    """The file sink's rows, with the batch id of the manifest entry listing their file."""
    directory = dirs.output / "dedup"
    manifest = directory / "_microstream_log"
    ids = numbered(manifest)
    if not ids:
        return None
    app_id = query_id(dirs, "dedup")
    frames = []
    for i in ids:
        entry = json.loads((manifest / f"{i}.json").read_text())
        require(
            entry["query_id"] == app_id and entry["batch_id"] == i,
            f"dedup: manifest entry {i}.json is batch {entry['batch_id']} of {entry['query_id']}",
        )
        frames += [
            pl.read_parquet(directory / f["name"]).with_columns(batch_id=pl.lit(i, pl.Int64))
            for f in entry["files"]
        ]
        if not entry["files"]:
            frames.append(pl.DataFrame(schema={**pipeline.SCHEMA, "batch_id": pl.Int64}))
    return pl.concat(frames, how="vertical")


def sort_all(df: pl.DataFrame) -> pl.DataFrame:
    return df.sort(df.columns, nulls_last=True)


@dataclass
class Outputs:
    """What a run left: each query's rows (with ``batch_id``), batches and state."""

    rows: dict[str, pl.DataFrame | None]
    batches: dict[str, list[int]]
    """Batch ids of written output (Delta commits, session files, manifest entries)."""
    offsets: dict[str, list[int]]
    commits: dict[str, list[int]]
    state_versions: dict[str, list[int]] = field(default_factory=dict)
    """``<query>/<store>`` -> versions on disk."""
    states: dict[tuple[str, int], pl.DataFrame] = field(default_factory=dict)
    """``(<query>/<store>, version)`` -> the state's rows, sorted (read on request)."""


READERS: dict[str, Callable[[Dirs], pl.DataFrame | None]] = {
    "windows": read_windows,
    "sessions": read_sessions,
    "dedup": read_dedup,
}


def state_stores(dirs: Dirs, queries: Sequence[str] = QUERIES) -> dict[str, Path]:
    stores = {}
    for query in queries:
        state = dirs.query_checkpoint(query) / "state"
        for meta in sorted(state.glob("*/*/_metadata.json")):
            stores[f"{query}/{meta.parent.parent.name}/{meta.parent.name}"] = meta.parent
    return stores


def collect_outputs(
    dirs: Dirs,
    rows: dict[str, pl.DataFrame | None],
    batches: dict[str, list[int]],
    *,
    states_at: Sequence[int] | None = (),
) -> Outputs:
    """The :class:`Outputs` of the queries of ``rows`` (their outputs read by the caller):
    their ``offsets/``, ``commits/`` and state versions, the state's rows at ``states_at``
    (None: all)."""
    from microstream.checkpoint.storage import Storage
    from microstream.state.read import read_store as read_state

    outputs = Outputs(
        rows=rows,
        batches=batches,
        offsets={q: numbered(dirs.query_checkpoint(q) / "offsets") for q in rows},
        commits={q: numbered(dirs.query_checkpoint(q) / "commits") for q in rows},
    )
    for name, path in state_stores(dirs, list(rows)).items():
        versions = numbered(path / "versions")
        outputs.state_versions[name] = versions
        for v in versions if states_at is None else [v for v in states_at if v in versions]:
            outputs.states[(name, v)] = sort_all(read_state(Storage(str(path)), version=v))
    return outputs


def read_outputs(dirs: Dirs, *, states_at: Sequence[int] | None = ()) -> Outputs:
    """Read what ``dirs`` holds; the state's rows at the versions ``states_at`` (None: all)."""
    # Every batch shows, those that wrote no row too: a file, a manifest entry each; the
    # Delta table's as shown_batches says.
    batches = {
        "windows": shown_batches(dirs, "windows"),
        "sessions": numbered(dirs.output / "sessions", ".parquet"),
        "dedup": numbered(dirs.output / "dedup" / "_microstream_log"),
    }
    rows = {q: READERS[q](dirs) for q in QUERIES}
    return collect_outputs(dirs, rows, batches, states_at=states_at)


# -- comparing with the clean run ---------------------------------------------------------------


def check_query_rows(
    query: str, got: pl.DataFrame | None, expected: pl.DataFrame, batches: list[int]
) -> None:
    """``got`` holds exactly the rows ``expected`` holds for ``batches``, same batch ids."""
    want = sort_all(expected.filter(pl.col("batch_id").is_in(batches)))
    if got is None:
        got = expected.clear()
    require(
        got.schema == expected.schema,
        f"{query}: schema {dict(got.schema)}, the clean run wrote {dict(expected.schema)}",
    )
    got = sort_all(got)
    if got.equals(want):
        return
    extra = got.join(want, on=got.columns, how="anti", nulls_equal=True)
    missing = want.join(got, on=got.columns, how="anti", nulls_equal=True)
    values = [c for c in got.columns if c != "batch_id"]
    retimed = extra.drop("batch_id").join(missing.drop("batch_id"), on=values, how="semi")
    dup = got.filter(pl.struct(got.columns).is_duplicated())
    details = []
    if retimed.height:
        details.append(
            f"{retimed.height} rows emitted at another batch than in the clean run "
            f"(got {extra.join(retimed, on=retimed.columns, how='semi').head(5).rows()}, "
            f"clean {missing.join(retimed, on=retimed.columns, how='semi').head(5).rows()})"
        )
    if dup.height:
        details.append(f"{dup.height} rows written more than once: {dup.head(5).rows()}")
    if extra.height:
        details.append(f"{extra.height} rows the clean run did not write: {extra.head(5).rows()}")
    if missing.height:
        details.append(f"{missing.height} rows of the clean run missing: {missing.head(5).rows()}")
    if not details:  # same sets, different multiplicities or values
        details.append("rows differ")
    shown = f"batches {batches[0]}-{batches[-1]}" if batches else "no batch"
    msg = f"{query} output of {shown} differs from the clean run: " + "; ".join(details)
    raise AssertionError(msg)


def check_prefix(got: Outputs, clean: Outputs) -> None:
    """After a kill: per query, the output of batches ``0..m`` of the clean run, nothing else.

    The sink may hold one batch more than ``commits/`` (written, not yet
    committed: the restart skips or rewrites it identically), never less.
    Compares the queries of the clean run's outputs.
    """
    for query in clean.rows:
        batches, commits = got.batches[query], got.commits[query]
        offsets = got.offsets[query]
        require(
            batches == list(range(len(batches))),
            f"{query}: output holds batches {batches}: not a prefix 0..m (a batch lost?)",
        )
        for what, ids in (("commits", commits), ("offsets", offsets)):
            require(ids == list(range(len(ids))), f"{query}: {what}/ holds {ids}: not 0..m")
        require(
            len(commits) <= len(offsets) <= len(commits) + 1,
            f"{query}: offsets/ holds {offsets} but commits/ {commits}",
        )
        require(
            len(commits) <= len(batches) <= len(commits) + 1,
            f"{query}: output of batches {batches} but commits/ holds {commits}",
        )
        require(
            len(batches) <= len(clean.batches[query]),
            f"{query}: {len(batches)} batches written, the clean run wrote {len(clean.batches[query])}",
        )
        expected = clean.rows[query]
        assert expected is not None
        check_query_rows(query, got.rows[query], expected, batches)


def check_complete(got: Outputs, clean: Outputs) -> None:
    """After the final restart: everything equals the clean run, state included."""
    for query in clean.rows:
        for what in ("batches", "offsets", "commits"):
            mine, theirs = getattr(got, what)[query], getattr(clean, what)[query]
            require(mine == theirs, f"{query}: {what} {mine}, the clean run has {theirs}")
        expected = clean.rows[query]
        assert expected is not None
        check_query_rows(query, got.rows[query], expected, clean.batches[query])
    require(
        got.state_versions == clean.state_versions,
        f"state versions on disk {got.state_versions}, the clean run has {clean.state_versions}",
    )
    for key, mine in got.states.items():
        state = clean.states[key]
        require(
            mine.equals(state),
            f"state {key[0]} at version {key[1]} differs from the clean run's: "
            f"{mine.height} rows vs {state.height}; "
            f"extra {mine.join(state, on=state.columns, how='anti', nulls_equal=True).head(3).rows()}, "
            f"missing {state.join(mine, on=state.columns, how='anti', nulls_equal=True).head(3).rows()}",
        )


# -- scenarios -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One pipeline run meant to die: at a fault point, or killed after a delay."""

    fault: str | None = None
    kill_at: float | None = None
    """Kill at this fraction of a clean run's progress (see ``RANDOM_KILL_AT``)."""
    must_kill: bool = False
    """The point is certainly reached, so exiting 0 is a failure."""

    def describe(self) -> str:
        if self.fault is not None:
            return f"fault {self.fault}"
        return f"kill at {self.kill_at:.0%} of a clean run's commits"


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    random: bool = False


@dataclass
class Outcome:
    scenario: Scenario
    kills: int = 0
    unkilled: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def fault_scenarios(chains: Sequence[Sequence[tuple[str, int]]], files: int) -> list[Scenario]:
    """One scenario per chain of ``(point, visit)`` faults, one killed run each.

    Each query reaches every point at most once per batch, and a run killed at
    visit ``v`` has moved each query on by at most ``v`` batches (plus the one
    it re-ran); while the visits so far leave at least ``v`` of the ``files``
    batches with data, the run reaches its point for certain and must die.
    """
    scenarios = []
    for chain in chains:
        steps = []
        used = 0
        for point, visit in chain:
            steps.append(Step(fault=f"{point}@{visit}", must_kill=used + visit <= files))
            used += visit + 1
        name = "+".join(f"{p}@{v}" for p, v in chain)
        scenarios.append(Scenario(name, tuple(steps)))
    return scenarios


def random_scenarios(count: int, kills_each: int, *, seed: int) -> list[Scenario]:
    rng = random.Random(seed)
    return [
        Scenario(
            f"random-{i}",
            tuple(Step(kill_at=rng.uniform(*RANDOM_KILL_AT)) for _ in range(kills_each)),
            random=True,
        )
        for i in range(count)
    ]


def bounded_scenarios() -> list[Scenario]:
    """Per point, three kills: mid-stream at visit 3, then at visit 1 of the restart (while
    it re-runs the batch left uncommitted: a double crash), then at visit 2; plus random kills."""
    chains = [[(point, 3), (point, 1), (point, 2)] for point in FAULT_POINTS]
    return fault_scenarios(chains, FILES) + random_scenarios(2, 2, seed=20240611)


def full_scenarios(files: int) -> list[Scenario]:
    chains: list[list[tuple[str, int]]] = []
    for point in FAULT_POINTS:
        for visit in range(1, files + 3):  # + the no-data batch and the flush batch
            chains.append([(point, visit)])
        for visit in (1, 2, 3, 5, 8, 11):
            chains.append([(point, visit), (point, 1)])  # again while recovering
    for i, point in enumerate(FAULT_POINTS):  # double crashes at two different points
        other = FAULT_POINTS[(i + 1) % len(FAULT_POINTS)]
        chains.append([(point, 2), (other, 1)])
        chains.append([(other, 4), (point, 1), (point, 3)])
    return fault_scenarios(chains, files) + random_scenarios(25, 2, seed=20240612)


def run_scenario(
    scenario: Scenario, clean: Clean, base: Path, states_at: Sequence[int] | None
) -> Outcome:
    outcome = Outcome(scenario)
    started = time.perf_counter()
    dirs = Dirs(base / scenario.name.replace("@", "-").replace("+", "_"))
    try:
        for i, step in enumerate(scenario.steps):
            commits, delay_s = (None, 0.0) if step.kill_at is None else clean.progress(step.kill_at)
            run = run_pipeline(
                dirs,
                clean.source,
                fault=step.fault,
                kill_after_commits=commits,
                kill_delay_s=delay_s,
                log_name=f"step{i}",
                script=clean.script,
            )
            if run.returncode == -signal.SIGKILL:
                outcome.kills += 1
                check_prefix(clean.reader(dirs), clean.outputs)
            elif run.returncode == 0:
                require(
                    not step.must_kill,
                    f"run {i} ({step.describe()}) exited 0: the point was never reached",
                )
                outcome.unkilled.append(step.describe())
            else:
                msg = f"run {i} ({step.describe()}) exited {run.returncode}:\n{run.stderr[-3000:]}"
                raise AssertionError(msg)
        run = run_pipeline(dirs, clean.source, log_name="final", script=clean.script)
        require(
            run.returncode == 0,
            f"the restart without faults exited {run.returncode}:\n{run.stderr[-3000:]}",
        )
        check_complete(clean.reader(dirs, states_at=states_at), clean.outputs)
    except AssertionError as exc:
        outcome.error = str(exc)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    else:
        shutil.rmtree(dirs.root, ignore_errors=True)  # keep a failed scenario's dirs to look at
    outcome.seconds = time.perf_counter() - started
    return outcome


def run_all(
    scenarios: list[Scenario],
    clean: Clean,
    base: Path,
    *,
    states_at: Sequence[int] | None = None,
) -> list[Outcome]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        outcomes = list(pool.map(lambda s: run_scenario(s, clean, base, states_at), scenarios))
    kills = sum(o.kills for o in outcomes)
    unkilled = sum(len(o.unkilled) for o in outcomes)
    print(
        f"\n{len(scenarios)} scenarios, {kills} SIGKILLs "
        f"({sum(o.kills for o in outcomes if o.scenario.random)} random), {unkilled} runs that "
        f"finished before their kill point, {sum(1 for o in outcomes if o.error)} failures, "
        f"{time.perf_counter() - started:.1f}s"
    )
    failures = [
        f"[{o.scenario.name}] {' -> '.join(s.describe() for s in o.scenario.steps)}: "
        f"{o.error} (dirs kept under {base})"
        for o in outcomes
        if o.error is not None
    ]
    require(not failures, f"{len(failures)} scenarios failed:\n\n" + "\n\n".join(failures))
    return outcomes


# -- fixtures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clean:
    """The input and the reference: what a never-killed run made of it."""

    source: Path
    files: int
    outputs: Outputs
    dirs: Dirs
    seconds: float
    """How long the clean runs took from ``ready`` to their exit (the longer of two)."""
    script: Path = PIPELINE
    """The pipeline the scenarios run (see :func:`run_pipeline`)."""
    reader: Callable[..., Outputs] = read_outputs
    """Reads what a run of ``script`` left: ``reader(dirs, states_at=...)``."""

    def progress(self, fraction: float) -> tuple[int, float]:
        """Where a random kill at ``fraction`` of a clean run lands: after how many
        ``commits/`` files, and how long after the last of them (see ``RANDOM_KILL_AT``)."""
        total = sum(len(commits) for commits in self.outputs.commits.values())
        position = fraction * total
        return int(position), (position - int(position)) * self.seconds / max(total, 1)


def make_clean(base: Path, files: int) -> Clean:
    """Two never-killed runs (concurrently); they must agree, and the first is the reference."""
    return clean_reference(base, make_input(base / "input", files=files, seed=7), files)


def clean_reference(
    base: Path,
    source: Path,
    files: int,
    *,
    script: Path = PIPELINE,
    reader: Callable[..., Outputs] = read_outputs,
) -> Clean:
    """Two never-killed runs of ``script`` on ``source`` (concurrently, under ``base``); they
    must agree, and the first is the reference. ``files``: how many batches hold data."""
    dirs = [Dirs(base / "clean-1"), Dirs(base / "clean-2")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(
            pool.map(lambda d: run_pipeline(d, source, log_name="clean", script=script), dirs)
        )
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    first, second = (reader(d, states_at=None) for d in dirs)
    check_complete(second, first)  # the pipeline itself is deterministic
    return Clean(source, files, first, dirs[0], max(run.seconds for run in runs), script, reader)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Clean:
    return make_clean(tmp_path_factory.mktemp("stateful-crash"), FILES)


# -- the tests ------------------------------------------------------------------------------------


def test_clean_run_exercises_state(clean: Clean) -> None:
    """The reference run has what the crash tests need to mean something."""
    out = clean.outputs
    data_batches = list(range(FILES))
    every = list(range(FILES + 2))  # the data batches, one no-data batch, the flush batch
    for query in QUERIES:
        assert out.commits[query] == every, (query, out.commits[query])
        assert out.batches[query] == every, (query, out.batches[query])
    inputs = pl.read_parquet(clean.source / "*.parquet")

    windows = out.rows["windows"]
    assert windows is not None
    emitted_at = windows["batch_id"].unique().sort().to_list()
    # Windows close along the stream, not only at the flush.
    assert len([b for b in emitted_at if b in data_batches]) >= 3, emitted_at
    assert FILES + 1 in emitted_at, "the flush batch emits the windows still open"
    assert windows.select(pl.struct("k", "ts").is_unique().all()).item(), "a window twice"
    assert windows["n"].sum() < inputs.height, "no late row was dropped"
    assert (windows["n"] > 1).any() and (windows["v_median"] != windows["v_sum"]).any()

    sessions = out.rows["sessions"]
    assert sessions is not None
    per_batch = sessions.group_by("batch_id").len()
    assert per_batch.height >= FILES // 2, "update mode emits in most batches"
    # A session updated in one batch and again, grown, in a later one.
    grown = sessions.group_by("k", "session_start").agg(pl.col("batch_id").n_unique())
    assert (grown["batch_id"] > 1).any()
    assert sessions.filter(pl.col("batch_id") == FILES + 1).height == 0, "flush: nothing updated"

    dedup = out.rows["dedup"]
    assert dedup is not None
    assert dedup.select(pl.struct("k", "ts").is_unique().all()).item()
    assert dedup.height < inputs.unique(["k", "ts"]).height, "some rows must be late"
    assert inputs.height - inputs.unique(["k", "ts"]).height > 0, "the input has duplicates"

    # The state lives in deltas between snapshots (every 10 versions), and is empty at the end.
    stores = state_stores(clean.dirs)
    assert len(stores) == 5, sorted(stores)  # windows: partials+rows; sessions: 2; dedup: 1
    for name, path in stores.items():
        assert out.state_versions[name] == every, name
        deltas = list(path.glob("deltas/*.arrow"))  # one file per version
        assert len(deltas) >= 5, (name, len(deltas))
        assert out.states[(name, every[-1])].height == 0, f"{name}: state left after the flush"
        assert max(out.states[(name, v)].height for v in every) > 0, name


def test_stateful_crash_bounded(clean: Clean, tmp_path: Path) -> None:
    """>= 20 SIGKILLs at every fault point (visits 1-3, double crashes) and at random times."""
    scenarios = bounded_scenarios()
    outcomes = run_all(scenarios, clean, tmp_path, states_at=BOUNDED_STATES_AT)
    kills = sum(o.kills for o in outcomes)
    assert kills >= MIN_KILLS_BOUNDED, f"only {kills} runs were killed"
    fault_kills = sum(o.kills for o in outcomes if not o.scenario.random)
    assert fault_kills == 3 * len(FAULT_POINTS), "every fault-point run must die"
    random_kills = sum(o.kills for o in outcomes if o.scenario.random)
    assert random_kills >= 2, f"only {random_kills} random kills hit a running pipeline"


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_crash_recovery_full(tmp_path: Path, crash_full: bool) -> None:
    """Every point at every visit, single and double crashes, 50 random kills.

    Over ``FILES_FULL`` files, so recovery also rebuilds state from the snapshot
    of version 10, and every state version is compared with the clean run's.

    Named like the stateless harness's full test so that ``tests/crash/conftest.py``
    lifts the ``--run-slow`` skip for it with ``--crash-full`` or ``MICROSTREAM_CRASH_FULL=1``.
    """
    if not crash_full:
        pytest.skip("the full crash matrix runs with --crash-full or MICROSTREAM_CRASH_FULL=1")
    clean = make_clean(tmp_path / "clean", FILES_FULL)
    outcomes = run_all(full_scenarios(FILES_FULL), clean, tmp_path / "scenarios")
    kills = sum(o.kills for o in outcomes)
    assert kills >= 200, f"only {kills} runs were killed"


# -- the checks can fail ----------------------------------------------------------------------------


def _doctor(
    outputs: Outputs, query: str, change: Callable[[pl.DataFrame], pl.DataFrame]
) -> Outputs:
    rows = dict(outputs.rows)
    df = rows[query]
    assert df is not None
    rows[query] = change(df)
    return replace(outputs, rows=rows)


def test_checks_detect_doctored_outputs(clean: Clean) -> None:
    """Each comparison fails on the difference it is there for."""
    out = clean.outputs
    check_complete(out, out)
    check_prefix(out, out)
    windows = out.rows["windows"]
    assert windows is not None
    first = windows.row(0, named=True)
    one = (pl.col("k") == first["k"]) & (pl.col("ts") == first["ts"])

    # A window emitted one batch later than in the clean run (same values).
    later = _doctor(out, "windows", lambda df: df.with_columns(
        batch_id=pl.when(one).then(pl.col("batch_id") + 1).otherwise(pl.col("batch_id"))
    ))  # fmt: skip
    with pytest.raises(AssertionError, match="emitted at another batch"):
        check_complete(later, out)
    # A window with another median (a buffered row lost from the state).
    median = _doctor(out, "windows", lambda df: df.with_columns(
        v_median=pl.when(one).then(pl.col("v_median") + 0.5).otherwise(pl.col("v_median"))
    ))  # fmt: skip
    with pytest.raises(AssertionError, match="rows the clean run did not write"):
        check_complete(median, out)
    # A session update written twice, a dedup row lost.
    sessions = out.rows["sessions"]
    assert sessions is not None
    twice = _doctor(out, "sessions", lambda df: pl.concat([df, df.head(1)]))
    with pytest.raises(AssertionError, match="written more than once"):
        check_complete(twice, out)
    lost = _doctor(out, "dedup", lambda df: df.slice(1))
    with pytest.raises(AssertionError, match="rows of the clean run missing"):
        check_complete(lost, out)
    with pytest.raises(AssertionError, match="rows of the clean run missing"):
        check_prefix(lost, out)
    # A batch missing from an output, or committed but not written.
    hole = replace(out, batches={**out.batches, "sessions": [0, 1, 3]})
    with pytest.raises(AssertionError, match="not a prefix"):
        check_prefix(hole, out)
    unwritten = replace(out, batches={**out.batches, "dedup": out.batches["dedup"][:-2]})
    with pytest.raises(AssertionError, match="but commits/ holds"):
        check_prefix(unwritten, out)
    # Other state on disk.
    states = dict(out.states)
    key = next(k for k, v in states.items() if v.height > 1)
    states[key] = states[key].slice(1)
    with pytest.raises(AssertionError, match=f"state {key[0]} at version {key[1]} differs"):
        check_complete(replace(out, states=states), out)


def _kill_mid_stream(dirs: Dirs, source: Path) -> None:
    """SIGKILL the pipeline once the windows query committed batch 3 (of 0-9)."""
    done = dirs.query_checkpoint("windows") / "commits" / "3.json"
    run = run_pipeline(dirs, source, kill_when=done, log_name="killed")
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]


def _chain_deltas(dirs: Dirs, query: str, store: str) -> tuple[int, list[Path]]:
    """The last committed batch, and the delta files a restart replays to load it (newest first)."""
    committed = numbered(dirs.query_checkpoint(query) / "commits")[-1]
    state = dirs.query_checkpoint(query) / "state" / "op0" / store
    deltas = []
    version = committed
    while True:
        entry = json.loads((state / "versions" / f"{version}.json").read_text())
        if entry["snapshot"]:
            break
        deltas += [state / f["name"] for f in entry["files"]]
        if entry["parent"] is None:
            break
        version = entry["parent"]
    assert deltas, f"{query}/{store}: the state of batch {committed} is a snapshot, no delta"
    return committed, deltas


def test_missing_state_delta_fails_loudly(clean: Clean, tmp_path: Path) -> None:
    """A delta file lost from the state: the restart refuses, naming the file; nothing is written."""
    dirs = Dirs(tmp_path / "missing")
    _kill_mid_stream(dirs, clean.source)
    before = read_outputs(dirs)
    check_prefix(before, clean.outputs)
    committed, deltas = _chain_deltas(dirs, "windows", "rows")
    assert 1 <= committed < 10, committed  # between snapshots 0 and 10
    lost = deltas[0]
    lost.unlink()
    run = run_pipeline(dirs, clean.source, log_name="restart")
    assert run.returncode not in (0, -signal.SIGKILL), run.stderr[-3000:]
    assert "CheckpointCorruptError" in run.stderr, run.stderr[-3000:]
    assert str(lost.relative_to(dirs.root)) in run.stderr, (str(lost), run.stderr[-3000:])
    assert "is missing" in run.stderr, run.stderr[-3000:]
    after = read_outputs(dirs)
    check_prefix(after, clean.outputs)
    assert after.batches["windows"] == before.batches["windows"], "the windows query ran a batch"
    assert after.commits["windows"] == before.commits["windows"]


def test_tampered_state_delta_changes_output(clean: Clean, tmp_path: Path) -> None:
    """A delta file that still reads but holds other values: the engine refuses it by its
    checksum, naming the file, and emits nothing wrong (before checksums it went unnoticed
    and only the comparison with the clean run showed the changed output)."""
    dirs = Dirs(tmp_path / "tampered")
    _kill_mid_stream(dirs, clean.source)
    check_prefix(read_outputs(dirs), clean.outputs)
    _, deltas = _chain_deltas(dirs, "windows", "partials")
    meta = json.loads((deltas[0].parent.parent / "_metadata.json").read_text())
    newer = None  # keys changed by a newer delta: changing their older rows would not show
    for delta in deltas:
        frame = pl.read_ipc(delta.read_bytes())
        live = ~pl.col("__deleted")
        if newer is not None:
            live = live & ~pl.struct(meta["key_columns"]).is_in(newer.implode())
        if frame.filter(live).height:
            break
        keys = frame.select(pl.struct(meta["key_columns"])).to_series()
        newer = keys if newer is None else newer.append(keys)
    else:
        pytest.fail(f"no delta of {deltas} holds a row of the state to change")
    aggregates = [
        c for c in frame.columns if c.startswith("__agg") and frame.schema[c].is_integer()
    ]
    assert aggregates, frame.schema
    frame.with_columns(
        pl.when(live).then(pl.col(c) + 1000).otherwise(pl.col(c)).alias(c) for c in aggregates
    ).write_ipc(delta)
    run = run_pipeline(dirs, clean.source, log_name="restart")
    assert run.returncode != 0
    assert f"{delta.parent.name}/{delta.name}" in run.stderr and "CRC-32" in run.stderr
    check_prefix(read_outputs(dirs), clean.outputs)
