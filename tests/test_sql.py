"""Streaming SQL: each form with exact rows, SQL against its Python twin and the batch
result over random inputs and splits, and a refusal per construct the docs list."""

from __future__ import annotations

import itertools
import re
import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microstream as ms
from microstream.cli.main import main

T0 = datetime(2024, 1, 1)
SCHEMA = {"k": pl.String, "ts": pl.Datetime("us"), "x": pl.Int64}


def events(seconds: list[int], keys: list[str], xs: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {"k": keys, "ts": [T0 + timedelta(seconds=s) for s in seconds], "x": xs}, schema=SCHEMA
    )


DATA = events([1, 3, 12, 14, 25], ["a", "b", "a", "a", "b"], [1, 2, 3, 4, 5])


def run(frame: ms.StreamFrame, stream, batches: list[pl.DataFrame], tmp: Path) -> pl.DataFrame:
    out: list[pl.DataFrame] = []
    for batch in batches:  # one micro-batch each: available_now takes what is there at start
        stream.add_data(batch)
    query = frame.foreach_batch(
        lambda df, _b: out.append(df),
        trigger=ms.Trigger.available_now(flush=True),
        checkpoint=tempfile.mkdtemp(dir=tmp),
    )
    query.await_termination()
    return pl.concat(out) if out else pl.DataFrame(schema=frame.collect_schema())


def stream_rows(sql: str, tmp: Path, batches: list[pl.DataFrame] | None = None, **extra) -> list:
    stream = ms.MemoryStream(SCHEMA)
    ctx = ms.SQLContext(ev=stream.lazy().with_watermark("ts", "0s"), **extra)
    frame = ctx.execute(sql)
    assert isinstance(frame, ms.StreamFrame)
    got = run(frame, stream, batches or [DATA], tmp)
    return sorted(got.rows())


def static_rows(sql: str, **extra) -> list:
    frame = ms.SQLContext(ev=DATA, **extra).execute(sql)
    assert isinstance(frame, pl.LazyFrame)
    return sorted(frame.collect().rows())


W = [T0 + timedelta(seconds=s) for s in range(-10, 40, 5)]

FORMS = {
    "projection, CASE, CAST, strings": (
        "SELECT UPPER(k) || '-' || CAST(x AS STRING) AS label, "
        "CASE WHEN x > 2 THEN 'big' ELSE 'small' END AS size, CAST(x AS DOUBLE) / 2 AS half, "
        "-7 / x AS q, MOD(-7, x) AS r, CHAR_LENGTH(k) AS n FROM ev WHERE k = 'a' AND x <> 3",
        [("A-1", "small", 0.5, -7, 0, 1), ("A-4", "big", 2.0, -1, -3, 1)],
    ),
    "date functions, BETWEEN, IN, LIKE": (
        "SELECT DATE_FORMAT(ts, 'HH:mm:ss') AS t, EXTRACT(SECOND FROM ts) AS s FROM ev "
        "WHERE x BETWEEN 2 AND 4 AND k IN ('a', 'b') AND k LIKE '_'",
        [("00:00:03", 3), ("00:00:12", 12), ("00:00:14", 14)],
    ),
    "REGEXP_EXTRACT, SPLIT_INDEX": (
        "SELECT REGEXP_EXTRACT(k || '=' || CAST(x AS STRING), '([a-z])=([0-9]+)', 2) AS n, "
        "REGEXP_EXTRACT(k, 'z') AS none, SPLIT_INDEX(k || '/' || k || 'x', '/', 1) AS second, "
        "SPLIT_INDEX(k, '/', 1) AS missing FROM ev WHERE x < 3",
        [("1", None, "ax", None), ("2", None, "bx", None)],
    ),
    "subquery and alias": (
        "SELECT s.k AS key, s.y FROM (SELECT k, x * 10 AS y FROM ev) AS s WHERE s.y >= 40",
        [("a", 40), ("b", 50)],
    ),
    "UNION ALL": (
        "SELECT k, x FROM ev WHERE x = 1 UNION ALL SELECT k, x + 100 FROM ev WHERE x = 5",
        [("a", 1), ("b", 105)],
    ),
    "TUMBLE TVF": (
        "SELECT k, window_start, window_end, COUNT(*) AS n, SUM(x) AS total "
        "FROM TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), INTERVAL '10' SECOND)) "
        "GROUP BY window_start, window_end, k",
        [
            ("a", W[2], W[4], 1, 1),
            ("a", W[4], W[6], 2, 7),
            ("b", W[2], W[4], 1, 2),
            ("b", W[6], W[8], 1, 5),
        ],
    ),
    "HOP TVF": (
        "SELECT window_start, COUNT(*) AS n FROM TABLE(HOP(TABLE ev, DESCRIPTOR(ts), "
        "INTERVAL '5' SECOND, INTERVAL '10' SECOND)) GROUP BY window_start, window_end",
        [(W[1], 2), (W[2], 2), (W[3], 2), (W[4], 2), (W[6], 1), (W[7], 1)],
    ),
    "SESSION TVF": (
        "SELECT k, window_start, window_end, MAX(x) AS m FROM TABLE(SESSION(TABLE ev "
        "PARTITION BY k, DESCRIPTOR(ts), INTERVAL '5' SECOND)) GROUP BY window_start, window_end, k",
        [
            ("a", T0 + timedelta(seconds=1), T0 + timedelta(seconds=6), 1),
            ("a", T0 + timedelta(seconds=12), T0 + timedelta(seconds=19), 4),
            ("b", T0 + timedelta(seconds=3), T0 + timedelta(seconds=8), 2),
            ("b", T0 + timedelta(seconds=25), T0 + timedelta(seconds=30), 5),
        ],
    ),
    "CUMULATE TVF": (
        "SELECT window_start, window_end, COUNT(*) AS n, SUM(x) AS total FROM TABLE(CUMULATE("
        "TABLE ev, DESCRIPTOR(ts), INTERVAL '5' SECOND, INTERVAL '15' SECOND)) "
        "GROUP BY window_start, window_end",
        [(W[2], W[3], 2, 3), (W[2], W[4], 2, 3), (W[2], W[5], 4, 10), (W[5], W[8], 1, 5)],
    ),
    "legacy group window": (
        "SELECT k, TUMBLE_START(ts, INTERVAL '10' SECOND) AS ws, TUMBLE_END(ts, INTERVAL '10' "
        "SECOND) AS we, COUNT(*) AS n FROM ev GROUP BY TUMBLE(ts, INTERVAL '10' SECOND), k "
        "HAVING COUNT(*) > 1",
        [("a", W[4], W[6], 2)],
    ),
    # Flink's window join of two window aggregations (Nexmark q5, q8), with a condition
    # on both sides' aggregates applied after it.
    "window join of window aggregates": (
        "SELECT a.k, a.window_start, a.n, b.m FROM (SELECT k, window_start, window_end, "
        "COUNT(*) AS n FROM TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), INTERVAL '10' SECOND)) "
        "GROUP BY window_start, window_end, k) AS a JOIN (SELECT window_start, window_end, "
        "MAX(x) AS m FROM TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), INTERVAL '10' SECOND)) "
        "GROUP BY window_start, window_end) AS b ON a.window_start = b.window_start "
        "AND a.window_end = b.window_end AND a.n >= b.m - 2",
        [("a", W[2], 1, 2), ("b", W[2], 1, 2), ("a", W[4], 2, 4)],
    ),
    # An aggregate of a window aggregate's rows per window (Nexmark q5's MaxBids).
    "aggregate per window of a window aggregate": (
        "SELECT starttime, MAX(n) AS most FROM (SELECT k, COUNT(*) AS n, window_start AS "
        "starttime, window_end AS endtime FROM TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), "
        "INTERVAL '10' SECOND)) GROUP BY k, window_start, window_end) GROUP BY starttime, endtime",
        [(W[2], 1), (W[4], 2), (W[6], 1)],
    ),
    # The rows at their window's maximum, by an interval on the window end (Nexmark q7).
    "window aggregate joined back by its window end": (
        "SELECT e.k, e.x FROM ev AS e JOIN (SELECT MAX(x) AS m, window_end AS we FROM "
        "TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), INTERVAL '10' SECOND)) GROUP BY window_start, "
        "window_end) AS w ON e.x = w.m WHERE e.ts >= w.we - INTERVAL '10' SECOND AND e.ts < w.we",
        [("b", 2), ("a", 4), ("b", 5)],
    ),
    # Window Top-N over a window TVF's rows, and over a window aggregation.
    "window Top-N of TVF rows": (
        "SELECT * FROM (SELECT k, x, window_start, window_end, ROW_NUMBER() OVER (PARTITION BY "
        "window_start, window_end ORDER BY x DESC) AS rn FROM TABLE(TUMBLE(TABLE ev, "
        "DESCRIPTOR(ts), INTERVAL '10' SECOND))) WHERE rn <= 2",
        [
            ("b", 2, W[2], W[4], 1),
            ("a", 1, W[2], W[4], 2),
            ("a", 4, W[4], W[6], 1),
            ("a", 3, W[4], W[6], 2),
            ("b", 5, W[6], W[8], 1),
        ],
    ),
    "window Top-N of a window aggregation": (
        "SELECT window_start, k, n, rn FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY "
        "window_start, window_end ORDER BY n DESC, k) AS rn FROM (SELECT window_start, "
        "window_end, k, COUNT(*) AS n FROM TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), INTERVAL "
        "'10' SECOND)) GROUP BY window_start, window_end, k)) WHERE rn = 1",
        [(W[2], "a", 1, 1), (W[4], "a", 2, 1), (W[6], "b", 1, 1)],
    ),
    # Aggregates over the rows a FILTER keeps; SUM over none of them is NULL, as in SQL.
    "aggregate FILTER (WHERE ...)": (
        "SELECT k, window_start, COUNT(*) FILTER (WHERE x > 1) AS big, SUM(x) FILTER (WHERE "
        "x < 5) AS small, MAX(x) FILTER (WHERE x > 3) AS top, COUNT(*) AS n FROM TABLE(TUMBLE("
        "TABLE ev, DESCRIPTOR(ts), INTERVAL '10' SECOND)) GROUP BY window_start, window_end, k",
        [
            ("a", W[2], 0, 1, None, 1),
            ("a", W[4], 2, 7, 4, 2),
            ("b", W[2], 1, 2, None, 1),
            ("b", W[6], 1, None, 5, 1),
        ],
    ),
    # SUM over a group whose values are all NULL is NULL, as in SQL (Polars' sum gives 0).
    "SUM of only NULL values": (
        "SELECT k, window_start, SUM(CASE WHEN x > 3 THEN x END) AS s, SUM(x) AS total FROM "
        "TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), INTERVAL '10' SECOND)) GROUP BY window_start, "
        "window_end, k",
        [("a", W[2], None, 1), ("a", W[4], 4, 7), ("b", W[2], None, 2), ("b", W[6], 5, 5)],
    ),
    "backtick-quoted identifiers": (
        "SELECT `k` AS `day`, `e`.`x` AS `timestamp` FROM ev AS `e` WHERE `x` > 3",
        [("a", 4), ("b", 5)],
    ),
    "HOUR, MINUTE, SECOND": (
        "SELECT HOUR(ts) AS h, MINUTE(ts) AS m, SECOND(ts) AS s FROM ev WHERE x = 3",
        [(0, 0, 12)],
    ),
    "stream-static join": (
        "SELECT e.k, e.x, d.label FROM ev AS e JOIN dim AS d ON e.k = d.k WHERE d.label <> 'none'",
        [("a", 1, "alpha"), ("a", 3, "alpha"), ("a", 4, "alpha")],
    ),
    "stream-static left join": (
        "SELECT e.x, d.label FROM ev AS e LEFT JOIN dim AS d ON e.k = d.k AND d.label = 'alpha'",
        [(1, "alpha"), (2, None), (3, "alpha"), (4, "alpha"), (5, None)],
    ),
}

DIM = pl.DataFrame({"k": ["a", "b"], "label": ["alpha", "none"]})


@pytest.mark.parametrize("form", sorted(FORMS))
def test_form_exact_rows(form: str, tmp_path: Path) -> None:
    sql, expected = FORMS[form]
    assert stream_rows(sql, tmp_path, dim=DIM) == sorted(expected)
    assert static_rows(sql, dim=DIM) == sorted(expected)


def test_view_ddl_insert_into_and_explain(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    DATA.write_parquet(source / "0.parquet")
    ctx = ms.SQLContext()
    results = ctx.execute_script(
        f"""
        CREATE TABLE ev (k STRING, ts TIMESTAMP(6), x BIGINT, x2 AS x * 2,
          WATERMARK FOR ts AS ts - INTERVAL '4' SECOND)
        WITH ('connector' = 'filesystem', 'path' = '{source}', 'format' = 'parquet');
        CREATE TEMPORARY VIEW big AS SELECT k, x2 FROM ev WHERE x > 2;
        CREATE TABLE out (key STRING, doubled INT)
        WITH ('connector' = 'memory', 'name' = 'sql_out', 'checkpoint' = '{tmp_path / "cp"}');
        EXPLAIN SELECT k FROM big;
        INSERT INTO out SELECT k, x2 FROM big
        """
    )
    assert results[:3] == [None, None, None]
    plan = results[3].collect()["plan"].to_list()
    assert any("with_watermark('ts', delay=4s)" in line for line in plan)
    query = results[4]
    assert isinstance(query, ms.StreamingQuery)
    query.process_all_available()
    query.stop()
    assert ms.table("sql_out").rows() == [("a", 6), ("a", 8), ("b", 10)]
    assert ms.table("sql_out").schema["doubled"] == pl.Int32
    assert ctx.tables() == ["big", "ev", "out"]


def test_stream_stream_interval_join(tmp_path: Path) -> None:
    left, right = ms.MemoryStream(SCHEMA), ms.MemoryStream(SCHEMA)
    ctx = ms.SQLContext(
        a=left.lazy().with_watermark("ts", "0s"), b=right.lazy().with_watermark("ts", "0s")
    )
    frame = ctx.execute(
        "SELECT a.x, b.x AS bx FROM a JOIN b ON a.k = b.k "
        "AND a.ts BETWEEN b.ts - INTERVAL '5' SECOND AND b.ts"
    )
    out: list[pl.DataFrame] = []
    left.add_data(events([0, 10, 20], ["a", "a", "b"], [1, 2, 3]))
    right.add_data(events([4, 6, 10, 30], ["a", "a", "a", "b"], [10, 20, 30, 40]))
    query = frame.foreach_batch(
        lambda df, _b: out.append(df),
        trigger=ms.Trigger.available_now(flush=True),
        checkpoint=str(tmp_path / "cp"),
    )
    query.await_termination()
    # b.ts - a.ts in [0, 5] s: (0, 4), (10, 10); (0, 6) is 6 s apart, (20, 30) 10 s.
    assert sorted(pl.concat(out).rows()) == [(1, 10), (2, 30)]


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("rn = 2", "a condition on rn other than rn = 1 or rn <= N"),
        ("rn > 1", "a condition on rn other than rn = 1 or rn <= N"),
    ],
)
def test_row_number_conditions_refused(condition: str, message: str) -> None:
    ctx = ms.SQLContext(ev=ms.MemoryStream(SCHEMA).lazy().with_processing_time("pt"))
    with pytest.raises(ms.PlanError, match=re.escape(message)):
        ctx.execute(
            "SELECT * FROM (SELECT k, pt, ROW_NUMBER() OVER (PARTITION BY k ORDER BY pt) AS rn "
            f"FROM ev) WHERE {condition}"
        )


def test_top_n_per_key_is_a_running_top_n(tmp_path: Path) -> None:
    # Nexmark q19's form: ROW_NUMBER() OVER (PARTITION BY k ORDER BY x DESC) <= N with no
    # window, in update mode keyed by (k, rn); the last row per position is the batch's.
    sql = (
        "SELECT * FROM (SELECT k, x, ROW_NUMBER() OVER (PARTITION BY k ORDER BY x DESC) AS rn "
        "FROM ev) WHERE rn <= 2"
    )
    expected = [("a", 4, 1), ("a", 3, 2), ("b", 5, 1), ("b", 2, 2)]
    stream = ms.MemoryStream(SCHEMA)
    frame = ms.SQLContext(ev=stream.lazy()).execute(sql)
    assert isinstance(frame, ms.StreamFrame)
    batches: list[list[tuple]] = []
    query = frame.foreach_batch(
        lambda df, _b: batches.append(sorted(df.rows())),
        output_mode="update",
        checkpoint=str(tmp_path / "cp"),
    )
    for part in (DATA[:3], DATA[3:]):
        stream.add_data(part)
        query.process_all_available()
    query.stop()
    assert [b for b in batches if b] == [
        [("a", 1, 2), ("a", 3, 1), ("b", 2, 1)],
        [("a", 3, 2), ("a", 4, 1), ("b", 2, 2), ("b", 5, 1)],
    ]
    assert static_rows(sql) == sorted(expected)
    with pytest.raises(
        ms.PlanError, match=re.escape("Top-N (ROW_NUMBER() <= N) without PARTITION BY")
    ):
        ms.SQLContext(ev=stream.lazy()).execute(
            "SELECT * FROM (SELECT k, x, ROW_NUMBER() OVER (ORDER BY x DESC) AS rn FROM ev) "
            "WHERE rn <= 2"
        )


def test_join_bound_on_a_truncated_window_start_refused() -> None:
    # A TVF's window_start is earlier than its row's time: judged by it, a join would
    # drop rows on time as late.
    ctx = ms.SQLContext(
        ev=ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s"),
        ev2=ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s"),
    )
    with pytest.raises(ms.PlanError, match="a time bound on window_start, which is not the left"):
        ctx.execute(
            "SELECT a.k FROM TABLE(TUMBLE(TABLE ev, DESCRIPTOR(ts), INTERVAL '10' SECOND)) AS a "
            "JOIN ev2 AS b ON a.k = b.k AND a.window_start BETWEEN b.ts - INTERVAL '1' SECOND "
            "AND b.ts"
        )


def test_window_join_of_tvf_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    left, right = ms.MemoryStream(SCHEMA), ms.MemoryStream(SCHEMA)
    ctx = ms.SQLContext(
        a=left.lazy().with_watermark("ts", "0s"), b=right.lazy().with_watermark("ts", "0s")
    )
    tvf = "SELECT * FROM TABLE(TUMBLE(TABLE {}, DESCRIPTOR(ts), INTERVAL '10' SECOND))"
    frame = ctx.execute(
        f"SELECT L.x, R.x AS rx, L.window_start FROM ({tvf.format('a')}) AS L "
        f"JOIN ({tvf.format('b')}) AS R ON L.k = R.k AND L.window_start = R.window_start "
        "AND L.window_end = R.window_end"
    )
    frame.explain()
    # Rows of one window lie less than its size apart: that bounds the state.
    assert "ts - ts in [-9s999ms999us, 9s999ms999us]" in capsys.readouterr().out
    batches = [
        (events([1, 9], ["a", "a"], [1, 2]), events([8], ["a"], [10])),
        (events([12], ["a"], [3]), events([11, 21], ["a", "b"], [20, 30])),
        (events([25], ["b"], [4]), events([31], ["b"], [40])),
    ]
    out: list[pl.DataFrame] = []
    query = frame.foreach_batch(lambda df, _b: out.append(df), checkpoint=str(tmp_path / "cp"))
    for lrows, rrows in batches:
        left.add_data(lrows)
        right.add_data(rrows)
        query.process_all_available()
    query.stop()
    w = [T0 + timedelta(seconds=s) for s in (0, 10, 20)]
    assert sorted(pl.concat(out).rows()) == [
        (1, 10, w[0]),
        (2, 10, w[0]),
        (3, 20, w[1]),
        (4, 30, w[2]),
    ]


def test_dedup_keep_first_by_processing_time(tmp_path: Path) -> None:
    stream = ms.MemoryStream(SCHEMA)
    ctx = ms.SQLContext(ev=stream.lazy().with_processing_time("pt"))
    frame = ctx.execute(
        "SELECT k, x, rn FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY k ORDER BY pt) AS rn "
        "FROM ev) WHERE rn = 1"
    )
    got = run(frame, stream, [DATA.slice(0, 2), DATA.slice(2)], tmp_path)
    assert got.rows() == [("a", 1, 1), ("b", 2, 1)]


def test_sql_picks_frames_from_scope() -> None:
    prices = pl.DataFrame({"item": ["a", "b"], "price": [3, 7]})  # noqa: F841 (found by ms.sql)
    stream = ms.MemoryStream({"item": pl.String})
    clicks = stream.lazy()

    def inner() -> ms.StreamFrame | pl.LazyFrame:
        return ms.sql("SELECT c.item, p.price FROM clicks AS c JOIN prices AS p ON c.item = p.item")

    assert isinstance(inner(), ms.StreamFrame)
    assert ms.sql("SELECT item FROM prices WHERE price > 5").collect().rows() == [("b",)]
    del clicks


def test_cli_sql_runs_a_file(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    DATA.write_parquet(source / "0.parquet")
    script = tmp_path / "job.sql"
    script.write_text(
        f"CREATE TABLE ev (k STRING, ts TIMESTAMP(6), x BIGINT) WITH ('connector' = "
        f"'filesystem', 'path' = '{source}', 'format' = 'parquet');\n"
        f"CREATE TABLE out (k STRING, x BIGINT) WITH ('connector' = 'filesystem', 'path' = "
        f"'{tmp_path / 'out'}', 'format' = 'parquet', 'checkpoint' = '{tmp_path / 'cp'}');\n"
        "INSERT INTO out SELECT k, x FROM ev WHERE x > 3;\n"
    )
    assert main(["sql", str(script), "--available-now"]) == 0
    assert sorted(ms.read_file_sink(str(tmp_path / "out")).rows()) == [("a", 4), ("b", 5)]


REFUSALS = {
    "ORDER BY": "SELECT k FROM ev ORDER BY k",
    "LIMIT": "SELECT k FROM ev LIMIT 3",
    "OVER": "SELECT k, SUM(x) OVER (PARTITION BY k ORDER BY ts) FROM ev",
    "UNION": "SELECT k FROM ev UNION SELECT k FROM ev",
    "INTERSECT": "SELECT k FROM ev INTERSECT SELECT k FROM ev",
    "EXCEPT": "SELECT k FROM ev EXCEPT SELECT k FROM ev",
    "outer join of two streams": "SELECT * FROM ev AS a LEFT JOIN ev2 AS b ON a.k = b.k "
    "AND a.ts BETWEEN b.ts - INTERVAL '1' SECOND AND b.ts",
    "subquery in an expression": "SELECT k FROM ev WHERE x IN (SELECT x FROM ev)",
    "ROLLUP/CUBE/GROUPING SETS": "SELECT k, COUNT(*) FROM ev GROUP BY ROLLUP (k)",
    "keep-first by event time": "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY k "
    "ORDER BY ts) AS rn FROM ev) WHERE rn = 1",
    "keep-last deduplication": "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY k "
    "ORDER BY pt DESC) AS rn FROM ev) WHERE rn = 1",
    **{
        construct: "SELECT * FROM ev MATCH_RECOGNIZE (PARTITION BY k ORDER BY ts " + clauses
        for construct, clauses in {
            "CLASSIFIER() in DEFINE": "MEASURES A.x AS ax PATTERN (A) "
            "DEFINE A AS CLASSIFIER() = 'A')",
            "MATCH_NUMBER() in DEFINE": "MEASURES A.x AS ax PATTERN (A) "
            "DEFINE A AS MATCH_NUMBER() > 1)",
            "MATCH_ROWTIME()": "MEASURES MATCH_ROWTIME() AS t PATTERN (A B) DEFINE A AS A.x > 1)",
            "FINAL in ALL ROWS PER MATCH": "MEASURES FINAL LAST(A.x) AS lx ALL ROWS PER MATCH "
            "PATTERN (A+) DEFINE A AS A.x > 1)",
            "NEXT in MEASURES": "MEASURES NEXT(A.x) AS nx PATTERN (A B) DEFINE A AS A.x > 1)",
            "NEXT of another pattern variable": "MEASURES A.x AS ax PATTERN (A B) "
            "DEFINE A AS A.x < NEXT(B.x))",
            "logical offset": "MEASURES LAST(A.x, 1) AS ax PATTERN (A+) DEFINE A AS A.x > 1)",
        }.items()
    },
    "MATCH_RECOGNIZE ORDER BY a column without a watermark": "SELECT * FROM ev "
    "MATCH_RECOGNIZE (PARTITION BY k ORDER BY pt MEASURES A.x AS ax PATTERN (A) "
    "DEFINE A AS A.x > 1)",
}


@pytest.mark.parametrize("construct", sorted(REFUSALS))
def test_refusal_names_construct_and_position(construct: str) -> None:
    from microstream.sql.refusals import REFUSED

    base = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s")
    ctx = ms.SQLContext(
        ev=base.with_processing_time("pt"),
        ev2=ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s"),
        st=DATA,
    )
    with pytest.raises(ms.PlanError) as info:
        ctx.execute(REFUSALS[construct])
    message = str(info.value)
    assert message.startswith(f"{construct} is not supported on a stream (line 1, column ")
    assert REFUSED[construct] in message


def test_every_documented_refusal_is_tested() -> None:
    from microstream.sql.refusals import REFUSED

    assert set(REFUSED) == set(REFUSALS)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 60), st.sampled_from(["a", "b", "c"]), st.integers(-5, 5)),
        min_size=1,
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 30), max_size=4),
)
def test_sql_equals_python_twin_and_batch(rows, cuts, tmp_path: Path) -> None:
    rows = sorted(rows)  # in event-time order: the 0 s watermark makes nothing late
    data = events([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    bounds = sorted({0, len(rows), *(min(c, len(rows)) for c in cuts)})
    batches = [data.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    sql = (
        "SELECT k, window_start, SUM(x) AS total, COUNT(*) AS n FROM TABLE(HOP(TABLE ev, "
        "DESCRIPTOR(ts), INTERVAL '5' SECOND, INTERVAL '15' SECOND)) WHERE x <> 0 "
        "GROUP BY window_start, window_end, k"
    )
    got = stream_rows(sql, tmp_path, batches)
    stream = ms.MemoryStream(SCHEMA)
    twin = (
        stream.lazy()
        .with_watermark("ts", "0s")
        .filter(pl.col("x") != 0)
        .group_by_dynamic("ts", every="5s", period="15s", group_by="k")
        .agg(total=pl.col("x").sum(), n=pl.len().cast(pl.Int64))
    )
    python = sorted(run(twin, stream, batches, tmp_path).select("k", "ts", "total", "n").rows())
    batch = ms.SQLContext(ev=data).execute(sql)
    assert isinstance(batch, pl.LazyFrame)
    assert got == python == sorted(batch.collect().rows())


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seconds=st.lists(st.integers(0, 50), min_size=1, max_size=25),
    cuts=st.lists(st.integers(0, 25), max_size=4),
)
def test_cumulate_equals_brute_force(seconds, cuts, tmp_path: Path) -> None:
    seconds = sorted(seconds)
    data = events(seconds, ["a"] * len(seconds), list(range(len(seconds))))
    bounds = sorted({0, len(seconds), *(min(c, len(seconds)) for c in cuts)})
    batches = [data.slice(a, b - a) for a, b in itertools.pairwise(bounds)]
    sql = (
        "SELECT window_start, window_end, COUNT(*) AS n, SUM(x) AS total FROM TABLE(CUMULATE("
        "TABLE ev, DESCRIPTOR(ts), INTERVAL '3' SECOND, INTERVAL '12' SECOND)) "
        "GROUP BY window_start, window_end"
    )
    # Every window [s, s + 3k) with s a multiple of 12 s, k = 1..4, that holds a row.
    expected: dict[tuple[int, int], list[int]] = {}
    for x, s in enumerate(seconds):
        start = s // 12 * 12
        for k in range(1, 5):
            if s < start + 3 * k:
                expected.setdefault((start, start + 3 * k), []).append(x)
    rows = sorted(
        (T0 + timedelta(seconds=a), T0 + timedelta(seconds=b), len(xs), sum(xs))
        for (a, b), xs in expected.items()
    )
    assert stream_rows(sql, tmp_path, batches) == rows
    assert sorted(ms.SQLContext(ev=data).execute(sql).collect().rows()) == rows


def test_cumulate_emits_each_window_at_its_own_end(tmp_path: Path) -> None:
    # Flink emits [0s, 5s) once the watermark passes 5s, not when [0s, 15s) closes.
    stream = ms.MemoryStream(SCHEMA)
    frame = ms.SQLContext(ev=stream.lazy().with_watermark("ts", "0s")).execute(
        "SELECT k, window_start, window_end, window_time, COUNT(*) AS n, SUM(x) AS total "
        "FROM TABLE(CUMULATE(TABLE ev, DESCRIPTOR(ts), INTERVAL '5' SECOND, "
        "INTERVAL '15' SECOND)) GROUP BY window_start, window_end, k"
    )
    assert isinstance(frame, ms.StreamFrame)
    emitted: dict[int, list] = {}
    query = frame.foreach_batch(
        lambda df, batch_id: emitted.__setitem__(batch_id, sorted(df.rows())),
        checkpoint=str(tmp_path / "cp"),
    )
    for seconds, keys, xs in [
        ([1, 3], ["a", "b"], [1, 2]),
        ([7], ["a"], [4]),
        ([12], ["a"], [8]),
        ([16], ["a"], [16]),
    ]:
        stream.add_data(events(seconds, keys, xs))
        query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None

    def at(s: int) -> datetime:
        return T0 + timedelta(seconds=s)

    def row(k: str, end: int, n: int, total: int) -> tuple:
        return (k, at(0), at(end), at(end) - timedelta(microseconds=1), n, total)

    assert emitted == {
        0: [],  # rows 1s, 3s; no-data batch 1: wm 3s
        1: [],
        2: [],  # row 7s; no-data batch 3: wm 7s
        # [0s, 5s) closed; [0s, 10s) and [0s, 15s) are still open
        3: [row("a", 5, 1, 1), row("b", 5, 1, 2)],
        4: [],  # row 12s; no-data batch 5: wm 12s
        # [0s, 10s) closed, with the 7s row
        5: [row("a", 10, 2, 5), row("b", 10, 1, 2)],
        6: [],  # row 16s; no-data batch 7: wm 16s
        # [0s, 15s) closed, the largest window of 0s: every row before 15s
        7: [row("a", 15, 3, 13), row("b", 15, 1, 2)],
    }


def test_aggregate_of_cumulate_aggregates_over_batches(tmp_path: Path) -> None:
    # window_start stays the event-time column, so an outer GROUP BY on it closes too.
    sql = (
        "SELECT s, e, MAX(n) AS m FROM (SELECT k, window_start AS s, window_end AS e, "
        "COUNT(*) AS n FROM TABLE(CUMULATE(TABLE ev, DESCRIPTOR(ts), INTERVAL '5' SECOND, "
        "INTERVAL '15' SECOND)) GROUP BY k, window_start, window_end) GROUP BY s, e"
    )
    batches = [
        events([1, 3], ["a", "b"], [1, 2]),
        events([7], ["a"], [4]),
        events([12], ["a"], [8]),
        events([16], ["a"], [16]),
    ]

    def at(s: int) -> datetime:
        return T0 + timedelta(seconds=s)

    expected = [
        (at(0), at(5), 1),
        (at(0), at(10), 2),
        (at(0), at(15), 3),
        (at(15), at(20), 1),
        (at(15), at(25), 1),
        (at(15), at(30), 1),
    ]
    assert stream_rows(sql, tmp_path, batches) == expected
    assert sorted(ms.SQLContext(ev=pl.concat(batches)).execute(sql).collect().rows()) == expected


def test_date_format_group_is_a_day_window(tmp_path: Path) -> None:
    # Nexmark q17's GROUP BY auction, DATE_FORMAT(ts, 'yyyy-MM-dd'): on a stream a day
    # window, each (key, day) emitted once, final, when the watermark passes the day's end.
    day = timedelta(days=1)
    first = events([3600, 7200, 3600], ["a", "a", "b"], [1, 2, 3])
    second = events([int(day.total_seconds()) + 60], ["a"], [4])
    third = events([2 * int(day.total_seconds()) + 60], ["b"], [5])
    sql = (
        "SELECT k, DATE_FORMAT(ts, 'yyyy-MM-dd') AS `day`, COUNT(*) AS n, SUM(x) AS total "
        "FROM ev GROUP BY k, DATE_FORMAT(ts, 'yyyy-MM-dd')"
    )
    stream = ms.MemoryStream(SCHEMA)
    frame = ms.SQLContext(ev=stream.lazy().with_watermark("ts", "0s")).execute(sql)
    assert isinstance(frame, ms.StreamFrame)
    batches: list[list[tuple]] = []
    query = frame.foreach_batch(
        lambda df, _b: batches.append(sorted(df.rows())), checkpoint=str(tmp_path / "cp")
    )
    for batch in (first, second, third):
        stream.add_data(batch)
        query.process_all_available()
    query.stop()
    emitted = [b for b in batches if b]
    assert emitted == [
        [("a", "2024-01-01", 2, 3), ("b", "2024-01-01", 1, 3)],  # when the watermark is in day 2
        [("a", "2024-01-02", 1, 4)],
    ]
    # Over static frames the formatted day is the key, as written: the batch result.
    static = ms.SQLContext(ev=pl.concat([first, second, third])).execute(sql)
    assert isinstance(static, pl.LazyFrame)
    assert sorted(static.collect().rows()) == [
        ("a", "2024-01-01", 2, 3),
        ("a", "2024-01-02", 1, 4),
        ("b", "2024-01-01", 1, 3),
        ("b", "2024-01-03", 1, 5),
    ]


def test_date_format_to_the_hour_is_an_hour_window(tmp_path: Path) -> None:
    rows = events([60, 3599, 3600, 7300], ["a", "a", "a", "a"], [1, 2, 3, 4])
    sql = (
        "SELECT DATE_FORMAT(ts, 'yyyy-MM-dd HH') AS h, COUNT(*) AS n FROM ev "
        "GROUP BY DATE_FORMAT(ts, 'yyyy-MM-dd HH')"
    )
    expected = [("2024-01-01 00", 2), ("2024-01-01 01", 1), ("2024-01-01 02", 1)]
    assert stream_rows(sql, tmp_path, [rows]) == expected
    # A month has no fixed length: 'yyyy-MM' stays a key of an update-mode aggregation.
    ctx = ms.SQLContext(ev=ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "0s"))
    hours = ctx.execute(sql)
    months = ctx.execute("SELECT COUNT(*) AS n FROM ev GROUP BY DATE_FORMAT(ts, 'yyyy-MM')")
    assert isinstance(hours, ms.StreamFrame) and isinstance(months, ms.StreamFrame)
    assert "every=1h" in str(hours.plan.stateful_nodes()[0].describe())
    assert "dynamic" not in str(months.plan.stateful_nodes()[0].describe())


def test_proctime_in_a_select_list(tmp_path: Path) -> None:
    # Nexmark q12: SELECT *, PROCTIME() AS p_time FROM bid, then a window over p_time.
    stream = ms.MemoryStream(SCHEMA)
    ctx = ms.SQLContext(ev=stream.lazy().with_watermark("ts", "0s"))
    stamped = ctx.execute("SELECT k, x, PROCTIME() AS p_time FROM ev")
    windowed = ctx.execute(
        "SELECT B.k, COUNT(*) AS n, TUMBLE_START(B.p_time, INTERVAL '1' DAY) AS ws "
        "FROM (SELECT *, PROCTIME() AS p_time FROM ev) B "
        "GROUP BY B.k, TUMBLE(B.p_time, INTERVAL '1' DAY)"
    )
    assert isinstance(stamped, ms.StreamFrame) and isinstance(windowed, ms.StreamFrame)
    assert stamped.collect_schema()["p_time"] == pl.Datetime("ms")
    rows: list[pl.DataFrame] = []
    windows: list[pl.DataFrame] = []
    stream.add_data(DATA)
    q2 = windowed.foreach_batch(
        lambda df, _b: windows.append(df),
        checkpoint=str(tmp_path / "b"),
        trigger=ms.Trigger.available_now(flush=True),
    )
    q2.await_termination()
    q1 = stamped.foreach_batch(lambda df, _b: rows.append(df), checkpoint=str(tmp_path / "a"))
    q1.process_all_available()
    stamp = q1.last_progress.batch_timestamp_ms
    q1.stop()
    out = pl.concat(rows)
    assert out["p_time"].dt.epoch("ms").to_list() == [stamp] * DATA.height
    assert sorted(out.select("k", "x").rows()) == sorted(DATA.select("k", "x").rows())
    # One batch read every row: each key's rows in the day window of that batch's time,
    # emitted at the end (the flush closes it).
    read = [p for p in q2.recent_progress if p.num_input_rows]
    assert len(read) == 1
    day = pl.Series([read[0].batch_timestamp_ms]).cast(pl.Datetime("ms")).dt.truncate("1d").item()
    assert sorted(pl.concat(windows).rows()) == [("a", 3, day), ("b", 2, day)]
    # Over static frames: one instant, the time the query was planned.
    static = ms.SQLContext(ev=DATA).execute("SELECT k, PROCTIME() AS p_time FROM ev").collect()
    assert static["p_time"].n_unique() == 1 and static.height == DATA.height


def _count_char(text: str | None, char: str) -> int:
    return 0 if text is None else text.count(char)


def test_scalar_functions_per_row_and_vectorized(tmp_path: Path) -> None:
    sql = "SELECT k, count_char(k || 'aa', 'a') AS n, twice(x) + 1 AS y FROM ev WHERE twice(x) > 4"

    def context(**tables: object) -> ms.SQLContext:
        return (
            ms.SQLContext(**tables)  # type: ignore[arg-type]
            .register_function("count_char", _count_char, pl.Int64)
            .register_function("twice", lambda s: s * 2, pl.Int64(), vectorized=True)
        )

    expected = [("a", 3, 7), ("a", 3, 9), ("b", 2, 11)]
    stream = ms.MemoryStream(SCHEMA)
    frame = context(ev=stream.lazy()).execute(sql)
    assert isinstance(frame, ms.StreamFrame)
    assert sorted(run(frame, stream, [DATA[:2], DATA[2:]], tmp_path).rows()) == expected
    static = context(ev=DATA).execute(sql)
    assert isinstance(static, pl.LazyFrame)
    assert sorted(static.collect().rows()) == expected
    # A SQL NULL reaches a per-row function as None.
    nulls = context(ev=pl.DataFrame({"k": [None, "a"]}, schema={"k": pl.String}))
    assert nulls.execute("SELECT count_char(k, 'a') AS n FROM ev").collect().rows() == [(0,), (1,)]


@pytest.mark.parametrize(
    ("name", "dtype", "message"),
    [
        ("upper", pl.String, "UPPER is a SQL keyword or built-in function"),
        ("tumble_start", pl.String, "TUMBLE_START is a SQL keyword or built-in function"),
        ("count-char", pl.Int64, "the name must be a SQL identifier; got 'count-char'"),
        ("f", int, "return_dtype must be a Polars dtype"),
    ],
)
def test_register_function_refuses(name: str, dtype: object, message: str) -> None:
    with pytest.raises(ms.PlanError, match=re.escape(message)):
        ms.SQLContext().register_function(name, len, dtype)  # type: ignore[arg-type]


def test_scalar_function_without_arguments_refused() -> None:
    ctx = ms.SQLContext(ev=DATA).register_function("one", lambda: 1, pl.Int64)
    with pytest.raises(ms.PlanError, match=re.escape("one() without arguments is not supported")):
        ctx.execute("SELECT one() AS o FROM ev")


def _deadline_streams() -> tuple[ms.MemoryStream, ms.MemoryStream, ms.SQLContext]:
    left, right = ms.MemoryStream(SCHEMA), ms.MemoryStream(SCHEMA)
    ctx = ms.SQLContext(
        # deadline: a time column that is no watermark column (as Nexmark's expires)
        a=left.lazy()
        .with_watermark("ts", "0s")
        .with_columns(deadline=pl.col("ts") + pl.duration(seconds=pl.col("x"))),
        b=right.lazy().with_watermark("ts", "0s"),
    )
    return left, right, ctx


def test_join_condition_on_a_time_column_without_watermark(tmp_path: Path) -> None:
    # Nexmark q4: B.ts BETWEEN A.ts AND A.deadline, beside a constant bound both ways.
    left, right, ctx = _deadline_streams()
    sql = (
        "SELECT a.k, a.x, b.x AS bx FROM a JOIN b ON a.k = b.k "
        "WHERE b.ts BETWEEN a.ts AND a.deadline AND b.ts <= a.ts + INTERVAL '10' SECOND"
    )
    frame = ctx.execute(sql)
    assert isinstance(frame, ms.StreamFrame)
    lefts = events([0, 0], ["a", "b"], [2, 8])  # deadlines at 2 s and 8 s
    rights = events([1, 3, 5, 9, 12], ["a", "a", "b", "b", "b"], [10, 11, 12, 13, 14])
    out: list[pl.DataFrame] = []
    left.add_data(lefts)
    right.add_data(rights)
    query = frame.foreach_batch(
        lambda df, _b: out.append(df),
        trigger=ms.Trigger.available_now(flush=True),
        checkpoint=str(tmp_path / "cp"),
    )
    query.await_termination()
    expected = [("a", 2, 10), ("b", 8, 12)]
    assert sorted(pl.concat(out).rows()) == expected
    static = ms.SQLContext(
        a=lefts.with_columns(deadline=pl.col("ts") + pl.duration(seconds=pl.col("x"))),
        b=rights,
    ).execute(sql)
    assert isinstance(static, pl.LazyFrame)
    assert sorted(static.collect().rows()) == expected


def test_join_bounded_only_by_a_column_without_watermark_refused() -> None:
    _, _, ctx = _deadline_streams()
    with pytest.raises(ms.PlanError) as info:
        ctx.execute("SELECT a.k FROM a JOIN b ON a.k = b.k AND b.ts BETWEEN a.ts AND a.deadline")
    message = str(info.value)
    assert message.startswith(
        "a time bound on deadline, which is not the left stream's watermark column"
    )
    assert "nothing says when a row has met its last match" in message
    assert "both ways with constant intervals" in message
