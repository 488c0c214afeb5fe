"""Crash recovery, for real: SIGKILL a pipeline process, restart it, compare outputs.

``tests/crash/pipeline.py`` streams parquet files through a stateless transform
and a stream-static join into a Delta table and a parquet file sink (two
queries, one process, ``Trigger.available_now()``). Every scenario starts from
fresh output and checkpoint directories and runs the pipeline in a subprocess
one or more times so that it dies by SIGKILL:

- *fault points*: ``MICROSTREAM_FAULTS="<point>@<visit>"`` makes the process
  kill itself at a named step of the write-ahead-log protocol
  (``microstream.faults.FAULT_POINTS``);
- *random kills*: the test sends SIGKILL itself after a seeded random delay.

A scenario with two killed runs is a double crash (the second run often dies
while it is re-running the batch the first one left uncommitted). After every
kill the committed output must be a duplicate-free union of whole input files
(no torn batch), in input order (no hole), and every row must equal the
expected one. Then the pipeline is restarted without faults and must exit 0,
and both outputs must equal the expected rows exactly: what plain Polars
computes with the same transform over all input at once. The checkpoints must
hold exactly batches ``0..n-1``, the file sink's manifest the same ids for the
same query, and the Delta table's transaction version for the query's app id
(its checkpoint's query id) must be the last batch id.

The bounded set runs in CI. More scenarios (every point at visits 1..5, double
crashes across points, 50 random kills) run with ``--crash-full``
(``pytest tests/crash --crash-full``; the option is defined in
``tests/crash/conftest.py``, so it is only known when ``tests/crash`` is on the
command line) or with ``MICROSTREAM_CRASH_FULL=1`` in the environment, which
works however pytest is started.
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from microstream.runtime.faults import FAULT_POINTS

pytestmark = pytest.mark.integration

PIPELINE = Path(__file__).with_name("pipeline.py")

FAST_FILES, FAST_ROWS = 12, 50
"""Input of the fault-point scenarios: 6 batches of 2 files per query."""
FAST_BATCHES = FAST_FILES // 2

SLOW_FILES, SLOW_ROWS = 48, 20
"""Input of the random-kill scenarios (``--slow``: 1 file per batch, so a run lasts ~1-2 s)."""
SLOW_BATCHES = SLOW_FILES

RANDOM_DELAY_S = (0.05, 1.5)
"""Random kills land this long after the pipeline printed ``ready`` (imports done)."""

RUN_TIMEOUT_S = 120.0
"""A pipeline run that takes longer than this is hung: killed and reported."""

WORKERS = 2
"""Scenarios run concurrently (each subprocess spends ~1 s importing polars and deltalake)."""

MIN_KILLS_BOUNDED = 30


def _load_pipeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_pipeline", PIPELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pipeline = _load_pipeline()


# -- input and the expected output -------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """A directory of input files and what the pipeline must make of it."""

    directory: Path
    expected: pl.DataFrame
    """The transform over all input at once, sorted by id, with the input file's index."""
    batches: int
    slow: bool

    @property
    def columns(self) -> list[str]:
        return [c for c in self.expected.columns if c != "_file"]


def make_input(directory: Path, files: int, rows: int, *, seed: int, slow: bool) -> Input:
    """``files`` parquet files of ``rows`` rows with unique (shuffled) ids, oldest first."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    ids = list(range(1, files * rows + 1))
    rng.shuffle(ids)
    base = time.time() - 10 * files
    frames = []
    for k in range(files):
        df = pl.DataFrame(
            {
                "id": ids[k * rows : (k + 1) * rows],
                "user": [rng.randrange(12) for _ in range(rows)],
                "amount": [round(rng.uniform(-20.0, 100.0), 2) for _ in range(rows)],
            },
            schema=pipeline.SCHEMA,
        )
        path = directory / f"part-{k:03d}.parquet"
        df.write_parquet(path)
        # Strictly increasing modification times: the source takes the oldest first.
        os.utime(path, (base + 10 * k, base + 10 * k))
        frames.append(df.with_columns(_file=pl.lit(k, pl.Int64)))
    everything = pl.concat(frames)
    expected = pipeline.transform(everything.lazy()).collect().sort("id")
    assert expected.height > 0.3 * files * rows, "the transform keeps too few rows to test"
    assert expected.height < files * rows, "the filter and the join must drop rows"
    assert expected["_file"].n_unique() == files, "every file must contribute rows"
    return Input(directory, expected, batches=files if slow else files // 2, slow=slow)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Input]:
    base = tmp_path_factory.mktemp("crash-input")
    return {
        "fast": make_input(base / "fast", FAST_FILES, FAST_ROWS, seed=7, slow=False),
        "slow": make_input(base / "slow", SLOW_FILES, SLOW_ROWS, seed=8, slow=True),
    }


# -- running the pipeline --------------------------------------------------------------------


@dataclass(frozen=True)
class Dirs:
    root: Path

    @property
    def delta(self) -> Path:
        return self.root / "out-delta"

    @property
    def files(self) -> Path:
        return self.root / "out-files"

    @property
    def checkpoint_delta(self) -> Path:
        return self.root / "cp-delta"

    @property
    def checkpoint_files(self) -> Path:
        return self.root / "cp-files"


@dataclass(frozen=True)
class Step:
    """One pipeline run meant to die: at a fault point, or killed after a delay."""

    fault: str | None = None
    """``MICROSTREAM_FAULTS`` for the run, e.g. ``"batch.after_wal@2"``."""
    kill_after_s: float | None = None
    """SIGKILL the process this long after it printed ``ready``."""
    must_kill: bool = False
    """The point is certainly reached, so exiting 0 is a failure."""

    def describe(self) -> str:
        if self.fault is not None:
            return f"fault {self.fault}"
        return f"kill after {self.kill_after_s:.2f}s"


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    slow: bool = False


@dataclass
class Outcome:
    scenario: Scenario
    kills: int = 0
    unkilled: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Run:
    returncode: int
    stderr: str
    killed_by_test: bool = False


def run_pipeline(
    dirs: Dirs,
    source: Input,
    *,
    fault: str | None = None,
    kill_after_s: float | None = None,
    log_name: str = "run",
) -> Run:
    """Run the pipeline once in a subprocess; SIGKILL it after ``kill_after_s`` if given."""
    env = {k: v for k, v in os.environ.items() if k != "MICROSTREAM_FAULTS"}
    if fault is not None:
        env["MICROSTREAM_FAULTS"] = fault
    cmd = [
        sys.executable,
        str(PIPELINE),
        "--input",
        str(source.directory),
        "--delta",
        str(dirs.delta),
        "--files",
        str(dirs.files),
        "--checkpoint-delta",
        str(dirs.checkpoint_delta),
        "--checkpoint-files",
        str(dirs.checkpoint_files),
    ]
    if source.slow:
        cmd.append("--slow")
    dirs.root.mkdir(parents=True, exist_ok=True)
    stderr_path = dirs.root / f"{log_name}.stderr"
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
        killed_by_test = False
        try:
            assert proc.stdout is not None
            if kill_after_s is not None and proc.stdout.readline().strip() == "ready":
                time.sleep(kill_after_s)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed_by_test = True
            proc.stdout.read()
            returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = stderr_path.read_text()
    if hung.is_set():
        msg = f"pipeline run {log_name} hung for {RUN_TIMEOUT_S}s and was killed:\n{text[-3000:]}"
        raise AssertionError(msg)
    return Run(returncode, text, killed_by_test and returncode == -signal.SIGKILL)


# -- checking the outputs -----------------------------------------------------------------


def read_delta(dirs: Dirs, *, must_exist: bool) -> pl.DataFrame | None:
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(str(dirs.delta)):
        assert not must_exist, f"no Delta table at {dirs.delta}"
        return None
    return pl.read_delta(str(dirs.delta))


def read_files(dirs: Dirs, *, must_exist: bool) -> pl.DataFrame | None:
    import microstream as ms

    if not (dirs.files / "_microstream_log").exists():
        assert not must_exist, f"no file sink manifest in {dirs.files}"
        return None
    df = ms.read_file_sink(dirs.files)
    return None if df.width == 0 and not must_exist else df


def require(condition: bool, message: str) -> None:
    """``assert`` without pytest's introspection of the operands: the message says it all."""
    if not condition:
        raise AssertionError(message)


def check_rows(what: str, got: pl.DataFrame | None, source: Input, *, complete: bool) -> None:
    """``got`` is exactly the expected rows (``complete``) or a committed prefix of them.

    A prefix: no duplicate id, no id that should not be there, every row equal
    to its expected row, and the rows of each input file all present or all
    absent, the present files being the oldest ones (batches are whole files,
    taken oldest first).
    """
    expected = source.expected
    if got is None:
        got = pl.DataFrame(schema={c: expected.schema[c] for c in source.columns})
    require(
        sorted(got.columns) == sorted(source.columns),
        f"{what}: columns {got.columns}, expected {source.columns}",
    )
    dup = got.filter(pl.col("id").is_duplicated())["id"].unique().sort()
    require(
        dup.len() == 0,
        f"{what}: {dup.len()} ids written more than once (a batch applied twice?): "
        f"{dup.head(10).to_list()}; {got.height} rows, expected {expected.height}",
    )
    unknown = got.join(expected, on="id", how="anti")["id"].sort()
    require(unknown.len() == 0, f"{what}: ids that must not be there: {unknown.head(10).to_list()}")
    if complete:
        missing = expected.join(got, on="id", how="anti")
        require(
            missing.height == 0,
            f"{what}: {missing.height} of {expected.height} expected rows are missing "
            f"(from input files {missing['_file'].unique().sort().to_list()}): "
            f"ids {missing['id'].head(10).to_list()}",
        )
    present = expected.join(got.select("id"), on="id", how="semi").sort("id")
    try:
        assert_frame_equal(
            got.select(source.columns).sort("id"), present.select(source.columns), check_dtypes=True
        )
    except AssertionError as exc:
        raise AssertionError(f"{what}: rows differ from the expected ones: {exc}") from None
    per_file = (
        expected.group_by("_file")
        .agg(total=pl.len(), written=pl.col("id").is_in(got["id"].implode()).sum())
        .sort("_file")
    )
    torn = per_file.filter((pl.col("written") > 0) & (pl.col("written") < pl.col("total")))
    require(torn.height == 0, f"{what}: input files only partly written (torn batch): {torn}")
    written = per_file.filter(pl.col("written") > 0)["_file"].to_list()
    require(
        written == list(range(len(written))),
        f"{what}: the written input files {written} are not the oldest ones (a batch lost?)",
    )


def check_outputs(dirs: Dirs, source: Input, *, complete: bool) -> None:
    check_rows("Delta table", read_delta(dirs, must_exist=complete), source, complete=complete)
    check_rows("file sink", read_files(dirs, must_exist=complete), source, complete=complete)


def numbered(directory: Path) -> list[int]:
    if not directory.exists():
        return []
    return sorted(int(p.stem) for p in directory.glob("*.json") if p.stem.isdigit())


def check_checkpoints(dirs: Dirs, source: Input) -> None:
    """Both checkpoints hold batches 0..n-1; the sinks' own records agree with them."""
    from deltalake import DeltaTable

    every = list(range(source.batches))
    for cp in (dirs.checkpoint_delta, dirs.checkpoint_files):
        for log in ("offsets", "commits"):
            found = numbered(cp / log)
            require(found == every, f"{cp}/{log} holds batches {found}, expected {every}")
    delta_query = json.loads((dirs.checkpoint_delta / "metadata.json").read_text())["id"]
    version = DeltaTable(str(dirs.delta)).transaction_version(delta_query)
    require(
        version == source.batches - 1,
        f"Delta transaction version of app id {delta_query} is {version}; "
        f"the last batch is {source.batches - 1}",
    )
    files_query = json.loads((dirs.checkpoint_files / "metadata.json").read_text())["id"]
    manifest = dirs.files / "_microstream_log"
    found = numbered(manifest)
    require(found == every, f"file sink manifest holds batches {found}, expected {every}")
    owners = {json.loads((manifest / f"{i}.json").read_text())["query_id"] for i in every}
    require(owners == {files_query}, f"file sink manifest by {owners}, not {files_query}")


# -- scenarios --------------------------------------------------------------------------------


def fault_scenarios(chains: Sequence[Sequence[tuple[str, int]]]) -> list[Scenario]:
    """One scenario per chain of ``(point, visit)`` faults, one killed run each.

    A run killed at visit ``v`` of a point committed at most ``v`` batches per
    query, so a chain whose visits add up to at most the batch count reaches
    every one of its points: those runs must die.
    """
    scenarios = []
    for chain in chains:
        steps = []
        total = 0
        for point, visit in chain:
            total += visit
            steps.append(Step(fault=f"{point}@{visit}", must_kill=total <= FAST_BATCHES))
        name = "+".join(f"{p}@{v}" for p, v in chain)
        scenarios.append(Scenario(name, tuple(steps)))
    return scenarios


def random_scenarios(count: int, kills_each: int, *, seed: int) -> list[Scenario]:
    rng = random.Random(seed)
    return [
        Scenario(
            f"random-{i}",
            tuple(Step(kill_after_s=rng.uniform(*RANDOM_DELAY_S)) for _ in range(kills_each)),
            slow=True,
        )
        for i in range(count)
    ]


def bounded_scenarios() -> list[Scenario]:
    chains = []
    for point in FAULT_POINTS:
        chains.append([(point, 1), (point, 2)])  # first batch; again during/after its re-run
        chains.append([(point, 3), (point, 1)])  # third batch; again while re-running it
    return fault_scenarios(chains) + random_scenarios(6, 2, seed=20240611)


def full_scenarios() -> list[Scenario]:
    chains: list[list[tuple[str, int]]] = []
    for point in FAULT_POINTS:
        for visit in range(1, 6):
            chains.append([(point, visit)])
            chains.append([(point, visit), (point, 1)])
    for i, point in enumerate(FAULT_POINTS):  # double crashes at two different points
        other = FAULT_POINTS[(i + 1) % len(FAULT_POINTS)]
        chains.append([(point, 2), (other, 1)])
        chains.append([(other, 2), (point, 2)])
    return fault_scenarios(chains) + random_scenarios(25, 2, seed=20240612)


def run_scenario(scenario: Scenario, inputs: dict[str, Input], base: Path) -> Outcome:
    outcome = Outcome(scenario)
    started = time.perf_counter()
    source = inputs["slow" if scenario.slow else "fast"]
    dirs = Dirs(base / scenario.name.replace("@", "-").replace("+", "_"))
    try:
        for i, step in enumerate(scenario.steps):
            run = run_pipeline(
                dirs,
                source,
                fault=step.fault,
                kill_after_s=step.kill_after_s,
                log_name=f"step{i}",
            )
            if run.returncode == -signal.SIGKILL:
                outcome.kills += 1
                check_outputs(dirs, source, complete=False)
            elif run.returncode == 0:
                require(
                    not step.must_kill,
                    f"run {i} ({step.describe()}) exited 0: the point was never reached",
                )
                outcome.unkilled.append(step.describe())
            else:
                msg = f"run {i} ({step.describe()}) exited {run.returncode}:\n{run.stderr[-3000:]}"
                raise AssertionError(msg)
        run = run_pipeline(dirs, source, log_name="final")
        require(
            run.returncode == 0,
            f"the restart without faults exited {run.returncode}:\n{run.stderr[-3000:]}",
        )
        check_outputs(dirs, source, complete=True)
        check_checkpoints(dirs, source)
    except AssertionError as exc:
        outcome.error = str(exc)
    except Exception as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    else:
        shutil.rmtree(dirs.root, ignore_errors=True)  # keep a failed scenario's dirs to look at
    outcome.seconds = time.perf_counter() - started
    return outcome


def run_all(scenarios: list[Scenario], inputs: dict[str, Input], base: Path) -> list[Outcome]:
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        outcomes = list(pool.map(lambda s: run_scenario(s, inputs, base), scenarios))
    kills = sum(o.kills for o in outcomes)
    unkilled = sum(len(o.unkilled) for o in outcomes)
    print(
        f"\n{len(scenarios)} scenarios, {kills} SIGKILLs, {unkilled} runs that finished "
        f"before their kill point, {sum(1 for o in outcomes if o.error)} failures"
    )
    failures = [
        f"[{o.scenario.name}] {' -> '.join(s.describe() for s in o.scenario.steps)}: "
        f"{o.error} (dirs kept under {base})"
        for o in outcomes
        if o.error is not None
    ]
    require(not failures, f"{len(failures)} scenarios failed:\n\n" + "\n\n".join(failures))
    return outcomes


# -- the tests --------------------------------------------------------------------------------


def test_crash_recovery_bounded(inputs: dict[str, Input], tmp_path: Path) -> None:
    """>= 30 SIGKILLs at every fault point and at random times; outputs exactly once."""
    scenarios = bounded_scenarios()
    outcomes = run_all(scenarios, inputs, tmp_path)
    kills = sum(o.kills for o in outcomes)
    assert kills >= MIN_KILLS_BOUNDED, f"only {kills} runs were killed"
    fault_kills = sum(o.kills for o in outcomes if not o.scenario.slow)
    assert fault_kills == 2 * len(FAULT_POINTS) * 2, "every fault-point run must die"
    random_kills = sum(o.kills for o in outcomes if o.scenario.slow)
    assert random_kills >= 4, f"only {random_kills} random kills hit a running pipeline"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_crash_recovery_full(inputs: dict[str, Input], tmp_path: Path, crash_full: bool) -> None:
    """Every point at visits 1..5, single and double crashes, 50 random kills."""
    if not crash_full:
        pytest.skip("the full crash matrix runs with --crash-full or MICROSTREAM_CRASH_FULL=1")
    outcomes = run_all(full_scenarios(), inputs, tmp_path)
    kills = sum(o.kills for o in outcomes)
    assert kills >= 180, f"only {kills} runs were killed"


def test_harness_detects_loss_and_duplicates(inputs: dict[str, Input], tmp_path: Path) -> None:
    """The checks fail on lost and on duplicated batches, so their passing means something."""
    source = inputs["fast"]
    dirs = Dirs(tmp_path / "detect")

    # Loss: a process killed after committing 3 batches holds a valid prefix, not everything.
    run = run_pipeline(dirs, source, fault="batch.after_commit@3", log_name="killed")
    assert run.returncode == -signal.SIGKILL, run.stderr
    check_outputs(dirs, source, complete=False)
    # (the fault counts both queries' commits in the process: under load the files query
    # can reach it before the Delta query created its table, which is missing output too)
    with pytest.raises(AssertionError, match=r"expected rows are missing|no Delta table"):
        check_outputs(dirs, source, complete=True)
    run = run_pipeline(dirs, source, log_name="recovered")
    assert run.returncode == 0, run.stderr
    check_outputs(dirs, source, complete=True)
    check_checkpoints(dirs, source)

    # A batch applied twice in the file sink (its manifest entry copied to a new id).
    manifest = dirs.files / "_microstream_log"
    copy = manifest / f"{source.batches}.json"
    entry = json.loads((manifest / "2.json").read_text())
    copy.write_text(json.dumps({**entry, "batch_id": source.batches}))
    with pytest.raises(AssertionError, match="written more than once"):
        check_outputs(dirs, source, complete=True)
    copy.unlink()
    # A batch lost from the file sink (its manifest entry removed).
    hidden = manifest / "1.json"
    saved = hidden.read_bytes()
    hidden.unlink()
    with pytest.raises(AssertionError, match="expected rows are missing"):
        check_outputs(dirs, source, complete=True)
    hidden.write_bytes(saved)
    check_outputs(dirs, source, complete=True)

    # The checkpoint is what prevents duplicates. With a fresh checkpoint the
    # Delta query is a new query (new id, so a new Delta app id): it writes
    # everything again, and the check sees every row twice.
    shutil.rmtree(dirs.checkpoint_delta)
    run = run_pipeline(dirs, source, log_name="fresh-delta-checkpoint")
    assert run.returncode == 0, run.stderr
    delta = read_delta(dirs, must_exist=True)
    assert delta is not None
    assert delta.height == 2 * source.expected.height
    with pytest.raises(AssertionError, match="written more than once"):
        check_rows("Delta table", delta, source, complete=True)
    # The file sink's manifest records its query: a fresh checkpoint is refused.
    shutil.rmtree(dirs.checkpoint_files)
    run = run_pipeline(dirs, source, log_name="fresh-files-checkpoint")
    assert run.returncode not in (0, -signal.SIGKILL), run.stderr
    assert "already holds the output of query" in run.stderr, run.stderr[-3000:]
    check_rows("file sink", read_files(dirs, must_exist=True), source, complete=True)
