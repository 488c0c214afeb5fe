"""Exactly-once across SIGKILL: PostgreSQL CDC -> PostgreSQL (append, upsert) and -> Delta.

A server of this module's own (``PostgresServer``: many slots, autovacuum off so
nothing else writes to the source's WAL) holds a source database ``src`` and a
sink database ``dst`` (slots decode only their own database, so the sink's
writes never enter the source's stream). Before any run, a *template* slot is
created, then a fixed, seeded list of transactions of inserts, updates and deletes
is committed to ``src.events``. Every scenario copies the template slot
(``pg_copy_logical_replication_slot``: the same position) for each of its three
queries, so every scenario reads exactly the same changes, and writes its own
output tables.

``tests/crash/postgres_pipeline.py`` runs the three queries (CDC -> ``sink_postgres``
append; CDC -> ``group_by(k)`` -> ``sink_postgres`` upsert in update mode; CDC ->
``sink_delta``) under
``Trigger.available_now()`` with ``max_changes_per_trigger``, so each reads its
changes in several batches. A scenario kills it by SIGKILL (at a fault point
``MICROSTREAM_FAULTS="<point>@<visit>"``, or after a seeded random fraction of a
clean run's time), once or twice, then restarts it without faults; the restart
must exit 0 and leave the three tables exactly as a clean, never-killed run left
them (the Delta table's rows as a multiset, each of its commits carrying one
batch's transaction), and the progress rows at the same batch ids. The clean run itself is
checked against an oracle computed in Python from the transactions made: every
change once, in commit order, and the per-key counts and sums.

The bounded set (CI) kills at five points and once at random (about 40 s); the
full set (``test_postgres_crash_full``, marked ``slow``: ``--run-slow``) kills at
every point at visits 1, 2 and 5, twice in a row, and eight times at random (40
scenarios, about 5 minutes).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from microstream.runtime.faults import FAULT_POINTS

from .test_stateful_crash import Dirs, run_pipeline

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("deltalake")

pytestmark = pytest.mark.integration

PIPELINE = Path(__file__).with_name("postgres_pipeline.py")
TRANSACTIONS = 16
REACHED_POINTS = [p for p in FAULT_POINTS if p != "source.after_log"]
"""The CDC source keeps no log of its own per batch: ``source.after_log`` is never reached."""


@dataclass(frozen=True)
class Env:
    server: Any
    source_dsn: str
    sink_dsn: str
    appended: list[tuple[Any, ...]]
    """The oracle of the append query: ``(id, k, v, op)`` of every change, in commit order."""
    counted: list[tuple[Any, ...]]
    """The oracle of the update query: ``(k, n, v_sum)`` sorted by k (nulls first)."""


def make_changes(dsn: str, seed: int = 7) -> list[tuple[Any, ...]]:
    """Commit ``TRANSACTIONS`` seeded transactions to ``events``; the changes, in commit order."""
    rng = random.Random(seed)
    live: dict[int, tuple[str, int]] = {}
    changes: list[tuple[Any, ...]] = []
    next_id = 0
    with psycopg.connect(dsn) as conn:
        for _ in range(TRANSACTIONS):
            with conn.transaction():
                for _ in range(rng.randint(1, 4)):
                    op = rng.choice(["insert", "insert", "update", "delete"]) if live else "insert"
                    if op == "insert":
                        k, v = rng.choice("abc"), rng.randint(-5, 20)
                        conn.execute("INSERT INTO events VALUES (%s, %s, %s)", (next_id, k, v))
                        live[next_id] = (k, v)
                        changes.append((next_id, k, v, "insert"))
                        next_id += 1
                    elif op == "update":
                        i = rng.choice(sorted(live))
                        v = rng.randint(-5, 20)
                        conn.execute("UPDATE events SET v = %s WHERE id = %s", (v, i))
                        live[i] = (live[i][0], v)
                        changes.append((i, live[i][0], v, "update"))
                    else:
                        i = rng.choice(sorted(live))
                        conn.execute("DELETE FROM events WHERE id = %s", (i,))
                        del live[i]
                        changes.append((i, None, None, "delete"))  # the key only
    return changes


def oracle_counts(changes: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    groups: dict[str | None, list[int]] = {}
    for _, k, v, _ in changes:
        groups.setdefault(k, [0, 0])
        groups[k][0] += 1
        groups[k][1] += v or 0
    return sorted(
        ((k, n, s) for k, (n, s) in groups.items()), key=lambda r: (r[0] is not None, r[0] or "")
    )


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    from microstream.testing.postgres import PostgresServer, find_postgres_bin

    if find_postgres_bin() is None:
        pytest.skip("PostgreSQL's server binaries (initdb, postgres) are not installed")
    settings = {"max_replication_slots": "200", "autovacuum": "off"}
    with PostgresServer(settings=settings) as server:
        if not server.has_plugin("wal2json"):
            pytest.skip(
                "the wal2json output plugin is not installed (apt-get install postgresql-15-wal2json)"
            )
        source_dsn = server.create_database("src")
        sink_dsn = server.create_database("dst")
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE events (id int PRIMARY KEY, k text, v int)")
            conn.execute("SELECT pg_create_logical_replication_slot('template', 'wal2json')")
        changes = make_changes(source_dsn)
        yield Env(server, source_dsn, sink_dsn, changes, oracle_counts(changes))


@dataclass(frozen=True)
class Outcome:
    appended: list[tuple[Any, ...]]
    counted: list[tuple[Any, ...]]
    delta: list[tuple[Any, ...]]
    """The Delta table's rows, sorted (a multiset: Delta keeps no insertion order)."""
    delta_versions: int
    progress: list[tuple[Any, ...]]
    seconds: float


def as_multiset(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``(id, k, v, op, commit lsn)`` rows in one canonical order, the LSN as an int."""
    canonical = [(i, k, v, op, int(lsn)) for i, k, v, op, lsn in rows]
    return sorted(canonical, key=lambda r: (r[4], r[0], r[3], -(10**9) if r[2] is None else r[2]))


def run_scenario(env: Env, root: Path, label: str, kills: list[dict[str, Any]]) -> Outcome:
    """Copy the template slot, run the pipeline until each kill, then to its end."""
    slots = {q: f"{label}_{q}" for q in ("append", "update", "delta")}
    tables = {q: f"{label}_{q}" for q in ("append", "update")}
    with psycopg.connect(env.source_dsn, autocommit=True) as conn:
        for slot in slots.values():
            conn.execute("SELECT pg_copy_logical_replication_slot('template', %s)", (slot,))
    dirs = Dirs(root / label)
    dirs.root.mkdir(parents=True)
    config = dirs.root / "source.json"
    config.write_text(
        json.dumps(
            {
                "source_dsn": env.source_dsn,
                "sink_dsn": env.sink_dsn,
                "slots": slots,
                "tables": tables,
            }
        )
    )
    for n, kill in enumerate(kills):
        run = run_pipeline(dirs, config, log_name=f"kill{n}", script=PIPELINE, **kill)
        assert run.returncode in (-9, 0), (
            f"{label} kill {n}: exit {run.returncode}\n{run.stderr[-3000:]}"
        )
        if "fault" in kill:
            assert run.returncode == -9, f"{label}: fault point {kill['fault']} was not reached"
    final = run_pipeline(dirs, config, log_name="final", script=PIPELINE)
    assert final.returncode == 0, (
        f"{label} restart: exit {final.returncode}\n{final.stderr[-3000:]}"
    )
    with psycopg.connect(env.sink_dsn, autocommit=True) as conn:
        appended = conn.execute(
            # In the order the rows were inserted (the table is only ever appended to).
            f'SELECT id, k, v, _op, _commit_lsn FROM "{tables["append"]}" ORDER BY ctid'
        ).fetchall()
        counted = conn.execute(
            f'SELECT k, n, v_sum FROM "{tables["update"]}" ORDER BY k NULLS FIRST'
        ).fetchall()
        progress = conn.execute(
            "SELECT table_name, batch_id FROM microstream_progress WHERE table_name IN (%s, %s) "
            "ORDER BY table_name",
            (f"public.{tables['append']}", f"public.{tables['update']}"),
        ).fetchall()
    with psycopg.connect(env.source_dsn, autocommit=True) as conn:
        for slot in slots.values():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    progress = [(name.rsplit("_", 1)[1], batch) for name, batch in progress]
    from deltalake import DeltaTable

    table = DeltaTable(str(dirs.output / "delta"))
    delta = as_multiset(pl.read_delta(str(dirs.output / "delta")).rows())
    return Outcome(appended, counted, delta, table.version() + 1, progress, final.seconds)


@pytest.fixture(scope="module")
def clean(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    root = tmp_path_factory.mktemp("pg-crash")
    outcome = run_scenario(env, root, "clean", [])
    # The clean run is right: every change once, in commit order, and the right aggregates.
    assert [r[:4] for r in outcome.appended] == env.appended
    lsns = [r[4] for r in outcome.appended]
    assert lsns == sorted(lsns) and len(set(lsns)) == TRANSACTIONS
    assert outcome.counted == env.counted
    assert outcome.delta == as_multiset(outcome.appended)
    assert all(batch >= 3 for _, batch in outcome.progress), outcome.progress  # several batches
    return outcome


def check(outcome: Outcome, clean: Outcome, label: str) -> None:
    assert outcome.appended == clean.appended, f"{label}: the appended changes differ"
    assert outcome.counted == clean.counted, f"{label}: the upserted counts differ"
    assert outcome.progress == clean.progress, f"{label}: the progress rows differ"
    assert outcome.delta == clean.delta, f"{label}: the Delta table's rows differ"
    # One Delta commit per batch, none doubled: as many versions as the clean run.
    assert outcome.delta_versions == clean.delta_versions, f"{label}: Delta versions differ"


BOUNDED = [
    ("wal", [{"fault": "batch.after_wal@3"}]),
    ("read", [{"fault": "batch.after_read@4"}]),
    ("data", [{"fault": "sink.after_data@2"}, {"fault": "sink.after_data@1"}]),
    ("sink", [{"fault": "batch.after_sink@5"}]),
    ("commit", [{"fault": "batch.after_commit@3"}]),
]


@pytest.mark.parametrize(("label", "kills"), BOUNDED, ids=[b[0] for b in BOUNDED])
def test_postgres_crash(
    env: Env, clean: Outcome, tmp_path: Path, label: str, kills: list[dict[str, Any]]
) -> None:
    check(run_scenario(env, tmp_path, label, kills), clean, label)


def test_postgres_crash_at_random(env: Env, clean: Outcome, tmp_path: Path) -> None:
    rng = random.Random(19)
    kills = [{"kill_after_s": rng.uniform(0.1, 0.9) * clean.seconds}]
    check(run_scenario(env, tmp_path, "random", kills), clean, "random")


@pytest.mark.slow
def test_postgres_crash_full(env: Env, clean: Outcome, tmp_path: Path) -> None:
    rng = random.Random(2026)
    scenarios: list[tuple[str, list[dict[str, Any]]]] = []
    for point in REACHED_POINTS:
        slug = point.replace(".", "_")
        for visit in (1, 2, 5):
            scenarios.append((f"{slug}_{visit}", [{"fault": f"{point}@{visit}"}]))
        other = rng.choice(REACHED_POINTS)
        scenarios.append((f"{slug}_twice", [{"fault": f"{point}@2"}, {"fault": f"{other}@1"}]))
    for n in range(8):
        kills = [{"kill_after_s": rng.uniform(0.05, 0.95) * clean.seconds} for _ in range(2)]
        scenarios.append((f"random_{n}", kills))
    for label, kills in scenarios:
        check(run_scenario(env, tmp_path, label, kills), clean, label)
