"""``MATCH_RECOGNIZE`` in SQL: exact rows worked by hand, the same rows as the Python verb
and the brute-force oracle of ``test_match_recognize_oracle.py`` over random events,
splits, late rows and restarts (and over the same rows as a static table: the batch
result), ALL ROWS PER MATCH, CLASSIFIER(), MATCH_NUMBER() and NEXT, the failed-logins
rule in SQL, and its refusals.

(The refusals listed in ``REFUSED`` are tested in ``test_sql.py``; the others here.)
"""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microstream as ms
from microstream import pattern as mp
from tests.match_recognize_pipeline import SCHEMA as LOGIN_SCHEMA
from tests.test_match_recognize_logins import ALERTS, BATCHES, flat
from tests.test_match_recognize_logins import run as run_python_logins
from tests.test_match_recognize_oracle import SCHEMA as ORACLE_SCHEMA
from tests.test_match_recognize_oracle import (
    VARIABLES,
    _key,
    names,
    oracle,
    run_stream,
    scenarios,
    text,
)

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")

T0 = datetime(2024, 1, 1)
SCHEMA = pl.Schema({"k": pl.String, "ts": pl.Datetime("us"), "v": pl.Int64})


def ticks(*items: tuple[str, int, int | None]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "k": [k for k, _, _ in items],
            "ts": [T0 + timedelta(seconds=s) for _, s, _ in items],
            "v": [v for *_, v in items],
        },
        schema=SCHEMA,
    )


def run_batches(
    frame: ms.StreamFrame, source: ms.MemoryStream, batches: list[pl.DataFrame]
) -> dict[int, list[tuple[Any, ...]]]:
    """Each batch one micro-batch, then a flush: every row final, every match decided
    (the 10 s watermark delay of the callers makes no row late)."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    checkpoint = f"memory://sqlmr_{uuid.uuid4().hex[:8]}"

    def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
        return frame.foreach_batch(
            lambda df, b: out.__setitem__(b, df.rows()), trigger=trigger, checkpoint=checkpoint
        )

    query = start(None)
    for batch in batches:
        source.add_data(batch)
        query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None
    flush = start(ms.Trigger.available_now(flush=True))
    flush.await_termination(timeout=60)
    assert flush.exception() is None
    return out


def sql_rows(query: str, batches: list[pl.DataFrame]) -> list[tuple[Any, ...]]:
    source = ms.MemoryStream(SCHEMA)
    frame = ms.SQLContext(t=source.lazy().with_watermark("ts", "10s")).execute(query)
    assert isinstance(frame, ms.StreamFrame)
    return sorted(r for rows in run_batches(frame, source, batches).values() for r in rows)


# -- exact rows, worked by hand ---------------------------------------------------------------

# x: v = 1, 2, 3, 1 at 0..3 s; y: v = 5, 6 at 0, 1 s.
RISE = [ticks(("x", 0, 1), ("y", 0, 5), ("x", 1, 2)), ticks(("x", 2, 3), ("y", 1, 6), ("x", 3, 1))]
RISE_QUERY = (
    "SELECT * FROM t MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts "
    "MEASURES FIRST(A.v) AS a, LAST(B.v) AS b, COUNT(B.*) AS nb {after} "
    "PATTERN (A B+) {within} DEFINE B AS B.v > PREV(B.v)) AS m"
)


@pytest.mark.parametrize(
    ("after", "within", "expected"),
    [
        # from x's row 0: A=1, B=2,3 (greedy; 1 > 3 fails); y: A=5, B=6.
        ("AFTER MATCH SKIP PAST LAST ROW", "", [("x", 1, 3, 2), ("y", 5, 6, 1)]),
        # no AFTER MATCH: Flink's default, SKIP TO NEXT ROW: x's row 1 starts A=2, B=3 too.
        ("", "", [("x", 1, 3, 2), ("x", 2, 3, 1), ("y", 5, 6, 1)]),
        ("AFTER MATCH SKIP TO NEXT ROW", "", [("x", 1, 3, 2), ("x", 2, 3, 1), ("y", 5, 6, 1)]),
        # next from the first B (row 1): A=2, B=3; then from row 2, no B rises.
        ("AFTER MATCH SKIP TO FIRST B", "", [("x", 1, 3, 2), ("x", 2, 3, 1), ("y", 5, 6, 1)]),
        # next from the last B (row 2): A=3, then 1 does not rise.
        ("AFTER MATCH SKIP TO LAST B", "", [("x", 1, 3, 2), ("y", 5, 6, 1)]),
        ("AFTER MATCH SKIP TO B", "", [("x", 1, 3, 2), ("y", 5, 6, 1)]),
        # within 2 s of the first row: row 2 (at 2 s) is out, so A=1, B=2; then A=3 fails.
        (
            "AFTER MATCH SKIP PAST LAST ROW",
            "WITHIN INTERVAL '2' SECOND",
            [("x", 1, 2, 1), ("y", 5, 6, 1)],
        ),
    ],
)
def test_skip_strategies_and_within_exact_rows(after: str, within: str, expected: list) -> None:
    query = RISE_QUERY.format(after=after, within=within)
    assert sql_rows(query, RISE) == expected
    # the same text over the rows as a static table: the batch result
    static = ms.SQLContext(t=pl.concat(RISE)).execute(query)
    assert isinstance(static, pl.LazyFrame)
    assert sorted(static.collect().rows()) == expected


def test_all_rows_per_match_classifier_match_number_exact_rows() -> None:
    query = (
        "SELECT * FROM t MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts "
        "MEASURES CLASSIFIER() AS cls, MATCH_NUMBER() AS num, COUNT(B.*) AS nb, B.v AS lb "
        "ALL ROWS PER MATCH AFTER MATCH SKIP TO NEXT ROW "
        "PATTERN (A B+) DEFINE B AS B.v > PREV(B.v)) AS m"
    )
    at = lambda s: T0 + timedelta(seconds=s)  # noqa: E731
    # x: 1, 2, 3, 1: matches from row 0 (A B B) and row 1 (A B); y: 5, 6 (A B). Running
    # measures: each row sees the match's rows up to it.
    expected = [
        ("x", at(0), "A", 1, 0, None, 1),
        ("x", at(1), "B", 1, 1, 2, 2),
        ("x", at(1), "A", 2, 0, None, 2),
        ("x", at(2), "B", 1, 2, 3, 3),
        ("x", at(2), "B", 2, 1, 3, 3),
        ("y", at(0), "A", 1, 0, None, 5),
        ("y", at(1), "B", 1, 1, 6, 6),
    ]
    assert sql_rows(query, RISE) == sorted(expected)
    static = ms.SQLContext(t=pl.concat(RISE)).execute(query)
    assert isinstance(static, pl.LazyFrame)
    assert static.collect_schema().names() == ["k", "ts", "cls", "num", "nb", "lb", "v"]
    assert sorted(static.collect().rows()) == sorted(expected)
    one = sql_rows(query.replace("ALL ROWS PER MATCH", "ONE ROW PER MATCH"), RISE)
    assert one == [("x", "B", 1, 2, 3), ("x", "B", 2, 1, 3), ("y", "B", 1, 1, 6)]


def test_next_in_define_exact_rows() -> None:
    # a dip: a row below both its neighbours (PREV and NEXT)
    query = (
        "SELECT * FROM t MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts "
        "MEASURES D.v AS low, D.ts AS at_ts AFTER MATCH SKIP PAST LAST ROW "
        "PATTERN (D) DEFINE D AS D.v < PREV(D.v) AND D.v < NEXT(D.v)) AS m"
    )
    batches = [ticks(("x", 0, 5), ("x", 1, 2), ("x", 2, 4)), ticks(("x", 3, 1), ("x", 4, 3))]
    at = lambda s: T0 + timedelta(seconds=s)  # noqa: E731
    assert sql_rows(query, batches) == [("x", 1, at(3)), ("x", 2, at(1))]
    static = ms.SQLContext(t=pl.concat(batches)).execute(query)
    assert isinstance(static, pl.LazyFrame)
    assert sorted(static.collect().rows()) == [("x", 1, at(3)), ("x", 2, at(1))]


def test_the_full_clause_exact_rows() -> None:
    """Every clause at once: MEASURES with FIRST/LAST/COUNT of a column (nulls not
    counted), a reluctant and a counted quantifier, SKIP TO LAST, WITHIN."""
    query = """
        SELECT m.k, m.start_ts, m.last_price, m.n, m.total
        FROM t MATCH_RECOGNIZE (
            PARTITION BY k
            ORDER BY ts
            MEASURES FIRST(A.ts) AS start_ts, LAST(B.v) AS last_price, COUNT(B.v) AS n,
                     SUM(v) AS total
            ONE ROW PER MATCH
            AFTER MATCH SKIP TO LAST C
            PATTERN (A B+? C{2,3})
            WITHIN INTERVAL '1' MINUTE
            DEFINE A AS A.v > 10, B AS B.v IS NULL OR B.v < 10, C AS C.v >= 10
        ) AS m
        WHERE m.n >= 0
    """
    batches = [
        # x: A=11, B=null, B=3 (reluctant: B stops as soon as C C can follow), C=12, C=13,
        # C=14 (C{2,3} is greedy); SKIP TO LAST C restarts at 14: A=14, B=1, C=10, C=20.
        ticks(("x", 0, 11), ("x", 1, None), ("x", 2, 3), ("x", 3, 12)),
        ticks(("x", 4, 13), ("x", 5, 14), ("x", 6, 1), ("x", 7, 10), ("x", 8, 20)),
        # y: its C C comes 60 s after A: not within a minute; no match.
        ticks(("y", 0, 50), ("y", 1, 2), ("y", 59, 10), ("y", 60, 10)),
    ]
    at = lambda s: T0 + timedelta(seconds=s)  # noqa: E731
    assert sql_rows(query, batches) == [
        ("x", at(0), 3, 1, 11 + 3 + 12 + 13 + 14),
        ("x", at(5), 1, 1, 14 + 1 + 10 + 20),
    ]


# -- the same rows as the Python verb and the oracle, over random events -----------------------

SQL_CONDITIONS = {
    "v < 2": "{q}v < 2",
    "v >= 2": "{q}v >= 2",
    "v > prev(v)": "{q}v > PREV({q}v)",
    "v >= first(A.v)": "{q}v >= FIRST(A.v)",
    "count(B) <= 2": "COUNT(B.*) <= 2",
    "sum(v) <= 6": "SUM(v) <= 6",
    "e == p": "{q}e = 'p'",
    "v < next(v)": "{q}v < NEXT({q}v)",
    "always": "TRUE",
}


def sql_of(scenario: dict[str, Any], qualified: bool, last_b_plain: bool) -> str:
    """The scenario's query in SQL; DEFINE reads the current row as ``v`` or as ``A.v``
    (the same row), and MEASURES read ``LAST(B.v)`` or ``B.v`` (the same value)."""
    present = names(scenario["tree"])
    measures = [
        "FIRST(id) AS first_id",
        "LAST(id) AS last_id",
        "COUNT(*) AS n",
        "SUM(v) AS sum_v",
        "MAX(v) AS max_v",
        "PREV(v) AS prev_v",
        "v AS cur_v",
    ]
    measures += [f"COUNT({var}.*) AS n_{var}" for var in VARIABLES if var in present]
    if "A" in present:
        measures.append("FIRST(A.v) AS first_a")
    if "B" in present:
        measures.append(("B.v" if last_b_plain else "LAST(B.v)") + " AS last_b")
    measures += ["CLASSIFIER() AS cls", "MATCH_NUMBER() AS num"]
    rows = "ALL ROWS PER MATCH" if scenario["rows"] == "all" else "ONE ROW PER MATCH"
    define = ", ".join(
        f"{var} AS " + SQL_CONDITIONS[c[0]].format(q=f"{var}." if qualified else "")
        for var, c in scenario["define"].items()
    )
    how, _, var = scenario["after_match"].partition(":")
    after = {
        "skip_past_last_row": "SKIP PAST LAST ROW",
        "skip_to_next_row": "SKIP TO NEXT ROW",
        "skip_to_first": f"SKIP TO FIRST {var}",
        "skip_to_last": f"SKIP TO LAST {var}",
    }[how]
    within = scenario["within"]
    return (
        "SELECT * FROM ev MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts "
        f"MEASURES {', '.join(measures)} {rows} AFTER MATCH {after} "
        f"PATTERN ({text(scenario['tree'])}) "
        + (f"WITHIN INTERVAL '{within}' SECOND " if within is not None else "")
        + (f"DEFINE {define}" if define else "")
        + ") AS m"
    )


def run_sql(scenario: dict[str, Any], query: str) -> tuple[list[tuple[Any, ...]], pl.DataFrame]:
    """As the oracle module's ``run_stream`` (batches, restarts, late rows, flush), in SQL."""
    events: pl.DataFrame = scenario["events"]
    source = ms.MemoryStream(ORACLE_SCHEMA)
    late: list[pl.DataFrame] = []
    ev = source.lazy().with_watermark(
        "ts", f"{scenario['delay']}s", on_late=lambda df, _: late.append(df)
    )
    frame = ms.SQLContext(ev=ev).execute(query)
    assert isinstance(frame, ms.StreamFrame)
    checkpoint = f"memory://sqlmr_{uuid.uuid4().hex[:8]}"
    emitted: list[pl.DataFrame] = []

    def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
        return frame.foreach_batch(
            lambda df, _: emitted.append(df), trigger=trigger, checkpoint=checkpoint
        )

    def finish(query: ms.StreamingQuery) -> None:
        query.stop()
        if query.exception() is not None:
            raise query.exception()  # type: ignore[misc]

    query_ = start(None)
    for lo, hi in itertools.pairwise([0, *scenario["cuts"], events.height]):
        source.add_data(events.slice(lo, hi - lo))
        query_.process_all_available(timeout=30)
        if hi in scenario["restarts"]:
            finish(query_)
            query_ = start(None)
    finish(query_)
    flush = start(ms.Trigger.available_now(flush=True))
    flush.await_termination(timeout=60)
    finish(flush)
    rows = [row for df in emitted for row in df.rows()]
    return rows, pl.concat(late) if late else pl.DataFrame(schema=ORACLE_SCHEMA)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), qualified=st.booleans(), last_b_plain=st.booleans())
def test_sql_equals_the_python_verb_and_the_oracle(
    scenario: dict[str, Any], qualified: bool, last_b_plain: bool
) -> None:
    query = sql_of(scenario, qualified, last_b_plain)
    got, dropped = run_sql(scenario, query)
    python, python_dropped = run_stream(scenario)
    kept = scenario["events"].join(dropped.select("id"), on="id", how="anti")
    expected = oracle(
        kept,
        scenario["tree"],
        {var: c[2] for var, c in scenario["define"].items()},
        scenario["after_match"],
        scenario["within"],
        scenario["rows"],
    )
    assert sorted(dropped["id"].to_list()) == sorted(python_dropped["id"].to_list())
    assert sorted(got, key=_key) == sorted(python, key=_key) == sorted(expected, key=_key), query
    # The same text over the kept rows as a static table: the batch result.
    static = ms.SQLContext(ev=kept.sort("id")).execute(query)
    assert isinstance(static, pl.LazyFrame)
    assert sorted(static.collect().rows(), key=_key) == sorted(expected, key=_key), query


# -- three failed logins, then a success, in SQL ------------------------------------------------

LOGINS_SQL = """
    SELECT * FROM logins MATCH_RECOGNIZE (
        PARTITION BY user
        ORDER BY ts
        MEASURES FIRST(F.ts) AS first_failure, LAST(S.ts) AS success_at
        AFTER MATCH SKIP PAST LAST ROW
        PATTERN (F{3} S)
        DEFINE F AS NOT F.ok,
               S AS S.ok AND S.ts - FIRST(F.ts) <= INTERVAL '1' MINUTE
    ) AS alerts
"""


def test_failed_logins_in_sql_give_the_python_alerts_per_batch() -> None:
    source = ms.MemoryStream(LOGIN_SCHEMA)
    alerts = ms.SQLContext(logins=source.lazy().with_watermark("ts", "2m")).execute(LOGINS_SQL)
    assert isinstance(alerts, ms.StreamFrame)
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = alerts.foreach_batch(
        lambda df, b: out.__setitem__(b, df.rows()),
        checkpoint=f"memory://sqllogins_{uuid.uuid4().hex[:8]}",
    )
    for batch in BATCHES:
        source.add_data(batch)
        query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None
    assert flat(out) == ALERTS
    assert out == run_python_logins(BATCHES)


# -- refusals and errors beyond REFUSED's --------------------------------------------------------


def _base(clauses: str, *, source: str = "t") -> str:
    return f"SELECT * FROM {source} MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts {clauses}"


ERRORS = {
    # case: (query, message with {at} for "(line 1, column N)", the text at column N)
    "PARTITION BY an expression": (
        "SELECT * FROM t MATCH_RECOGNIZE (PARTITION BY UPPER(k) ORDER BY ts MEASURES A.v AS a "
        "PATTERN (A) DEFINE A AS A.v > 1)",
        "MATCH_RECOGNIZE PARTITION BY an expression is not supported on a stream {at}",
        "UPPER(k)",
    ),
    "ORDER BY two columns": (
        "SELECT * FROM t MATCH_RECOGNIZE (ORDER BY ts, v MEASURES A.v AS a PATTERN (A))",
        "MATCH_RECOGNIZE ORDER BY more than one column is not supported on a stream {at}",
        "v MEASURES",
    ),
    "ORDER BY DESC": (
        "SELECT * FROM t MATCH_RECOGNIZE (ORDER BY ts DESC MEASURES A.v AS a PATTERN (A))",
        "MATCH_RECOGNIZE ORDER BY ... DESC is not supported on a stream {at}",
        "ts DESC",
    ),
    "aggregate of an expression": (
        _base("MEASURES SUM(A.v * 2) AS s PATTERN (A+) DEFINE A AS A.v > 1)"),
        "SUM(A.v * 2) over an expression is not supported on a stream {at}",
        "SUM(",
    ),
    "COUNT(DISTINCT)": (
        _base("MEASURES COUNT(DISTINCT A.v) AS s PATTERN (A+) DEFINE A AS A.v > 1)"),
        "COUNT(DISTINCT A.v) is not supported on a stream {at}: aggregate without DISTINCT",
        "COUNT(",
    ),
    "MATCH_PROCTIME()": (
        _base("MEASURES MATCH_PROCTIME() AS p PATTERN (A) DEFINE A AS A.v > 1)"),
        "MATCH_PROCTIME() is not supported on a stream {at}",
        "MATCH_PROCTIME",
    ),
    "FIRST with a logical offset": (
        _base("MEASURES FIRST(A.v, 1) AS f PATTERN (A+) DEFINE A AS A.v > 1)"),
        "logical offset is not supported on a stream {at}",
        "FIRST(",
    ),
    "a join in the FROM": (
        "SELECT * FROM t JOIN t2 ON t.k = t2.k MATCH_RECOGNIZE (ORDER BY ts MEASURES A.v AS a "
        "PATTERN (A))",
        "MATCH_RECOGNIZE in a FROM with a join is not supported on a stream {at}",
        "MATCH_RECOGNIZE",
    ),
    "a pattern outside the grammar": (
        _base("MEASURES A.v AS a PATTERN (A B ^) DEFINE A AS A.v > 1)"),
        "MATCH_RECOGNIZE PATTERN {at}: pattern 'A B ^': anchors ^ and $ are not supported",
        "A B ^",
    ),
    "DEFINE of a variable the pattern lacks": (
        _base("MEASURES A.v AS a PATTERN (A B) DEFINE C AS C.v > 1)"),
        "SQL: DEFINE C {at} names no variable of PATTERN (A B); its variables are ['A', 'B']",
        "C AS",
    ),
    "a column the input lacks": (
        _base("MEASURES A.price AS a PATTERN (A) DEFINE A AS A.v > 1)"),
        "SQL: A.price {at} reads column 'price' of the rows of pattern variable A; the "
        "input's columns are ['k', 'ts', 'v']",
        "A.price",
    ),
    "a measure named as a partition column": (
        _base("MEASURES A.v AS k PATTERN (A) DEFINE A AS A.v > 1)"),
        "MATCH_RECOGNIZE {at}: measures ['k'] have the names of partition_by columns; rename them",
        "MATCH_RECOGNIZE",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_the_construct_and_position(case: str) -> None:
    query, message, anchor = ERRORS[case]
    message = message.format(at=f"(line 1, column {query.index(anchor) + 1})")
    stream = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s")
    ctx = ms.SQLContext(t=stream, t2=ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s"))
    with pytest.raises(ms.PlanError) as info:
        ctx.execute(query)
    assert str(info.value).startswith(message), str(info.value)


def test_a_measure_reads_the_verbs_helpers() -> None:
    """The SQL lowers to the ms.pattern helpers' columns (what explain shows)."""
    stream = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s")
    frame = ms.SQLContext(t=stream).execute(
        _base(
            "MEASURES FIRST(A.v) AS f, PREV(B.v, 2) AS p, AVG(B.v) AS a, COUNT(B.v) AS c "
            "PATTERN (A B+) DEFINE A AS A.v > 1, B AS B.v < PREV(B.v))"
        )
    )
    assert isinstance(frame, ms.StreamFrame)
    twin = stream.match_recognize(
        partition_by="k",
        order_by="ts",
        pattern="A B+",
        define={"A": pl.col("v") > 1, "B": pl.col("v") < mp.prev("v")},
        measures={
            "f": mp.first("A.v"),
            "p": mp.prev("B.v", 2),
            "a": mp.avg("B.v"),
            "c": mp.count("B.v"),
        },
        after_match="skip_to_next_row",
    )

    def node(frame: ms.StreamFrame) -> Any:
        stack = [frame.plan]
        while stack:
            found = stack.pop()
            if type(found).__name__ == "MatchRecognizeNode":
                return found
            stack.extend(found.children())
        raise AssertionError("no match_recognize in the plan")

    sql, python = node(frame).fingerprint(), node(twin).fingerprint()
    assert sql["define"]["B"] == python["define"]["B"] == '[(col("v")) < (col("prev(v, 1)"))]'
    sql["define"].pop("A"), python["define"].pop("A")  # literals print apart: 1 vs dyn int: 1
    assert sql == python
    assert frame.collect_schema() == twin.collect_schema()
