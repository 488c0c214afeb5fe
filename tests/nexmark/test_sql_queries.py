"""Nexmark in Flink SQL (DDL with WATERMARK, then the query) equals the Python versions.

q0-q3 (stateless, interval join), q4 (an interval join also bounded on a column
that is no watermark, then an aggregate of an aggregate), q5 (a window aggregate joined with the maximum
per window, an aggregate of an aggregate), q7 (a window aggregate joined back to
the bids by an interval on its window end), q8 (Flink's window join of two window
aggregates) q11 (session windows), q12 (a processing-time window over ``PROCTIME()``),
q14 (a scalar UDF registered with ``register_function``), q17 (``GROUP BY
DATE_FORMAT(date_time, 'yyyy-MM-dd')``: a day window), q19 (Top-N per auction: a running Top-N in update mode), q21 (REGEXP_EXTRACT) and q22
(SPLIT_INDEX) are written as in nexmark/nexmark's ``queries/*.sql`` (column names in
this project's snake case); q7 keeps the Python version's half-open window (see its
docstring). Where the text differs from Flink's, the query says why.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl
import pytest
from nexmark.query import assert_same_result, load, run_batch, run_stream

import microstream as ms

COLUMNS = {
    "person": "id BIGINT, name STRING, email_address STRING, credit_card STRING, city STRING, "
    "state STRING, date_time TIMESTAMP(3), extra STRING",
    "auction": "id BIGINT, item_name STRING, description STRING, initial_bid BIGINT, "
    "reserve BIGINT, date_time TIMESTAMP(3), expires TIMESTAMP(3), seller BIGINT, "
    "category BIGINT, extra STRING",
    "bid": "auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING, "
    "date_time TIMESTAMP(3), extra STRING",
}

QUERIES = {
    "q0": "SELECT auction, bidder, price, date_time, extra FROM bid",
    "q1": "SELECT auction, bidder, 0.908 * price AS price, date_time, extra FROM bid",
    "q2": "SELECT auction, price FROM bid WHERE MOD(auction, 123) = 0",
    # Beam's 600 s expiry as the interval join's bound, as the Python q3's within=.
    "q3": """
        SELECT P.name, P.city, P.state, A.id
        FROM auction AS A INNER JOIN person AS P
          ON A.seller = P.id
         AND P.date_time BETWEEN A.date_time - INTERVAL '600' SECOND
                             AND A.date_time + INTERVAL '600' SECOND
        WHERE A.category = 10 AND P.state IN ('OR', 'ID', 'CA')
    """,
    # Flink's q4, plus the bound the Python q4 assumes (MAX_AUCTION_SPAN): B.date_time <=
    # A.expires is on no watermark column, so alone it could never let the join forget an
    # auction; beside a constant bound it filters the join's rows. The closing time in the
    # GROUP BY (determined by the auction, as id is) lets each auction's maximum close
    # when the watermark passes it, so the average counts final maxima only.
    "q4": """
        SELECT Q.category, AVG(Q.final) AS final
        FROM (
          SELECT MAX(B.price) AS final, A.category
          FROM auction A, bid B
          WHERE A.id = B.auction
            AND B.date_time BETWEEN A.date_time AND A.expires
            AND B.date_time <= A.date_time + INTERVAL '10' SECOND
          GROUP BY A.id, A.category, A.date_time + INTERVAL '10' SECOND
        ) Q
        GROUP BY Q.category
    """,
    "q5": """
        SELECT AuctionBids.auction, AuctionBids.num
        FROM (
          SELECT auction, COUNT(*) AS num, window_start AS starttime, window_end AS endtime
          FROM TABLE(HOP(TABLE bid, DESCRIPTOR(date_time), INTERVAL '2' SECOND, INTERVAL '10' SECOND))
          GROUP BY auction, window_start, window_end
        ) AS AuctionBids
        JOIN (
          SELECT MAX(CountBids.num) AS maxn, CountBids.starttime, CountBids.endtime
          FROM (
            SELECT COUNT(*) AS num, window_start AS starttime, window_end AS endtime
            FROM TABLE(HOP(TABLE bid, DESCRIPTOR(date_time), INTERVAL '2' SECOND, INTERVAL '10' SECOND))
            GROUP BY auction, window_start, window_end
          ) AS CountBids
          GROUP BY CountBids.starttime, CountBids.endtime
        ) AS MaxBids
        ON AuctionBids.starttime = MaxBids.starttime
        AND AuctionBids.endtime = MaxBids.endtime
        AND AuctionBids.num >= MaxBids.maxn
    """,
    "q7": """
        SELECT B.auction, B.bidder, B.price, B.date_time, B.extra
        FROM bid B
        JOIN (
          SELECT MAX(price) AS maxprice, window_end AS date_time
          FROM TABLE(TUMBLE(TABLE bid, DESCRIPTOR(date_time), INTERVAL '10' SECOND))
          GROUP BY window_start, window_end
        ) B1
        ON B.price = B1.maxprice
        WHERE B.date_time >= B1.date_time - INTERVAL '10' SECOND AND B.date_time < B1.date_time
    """,
    "q8": """
        SELECT P.id, P.name, P.starttime
        FROM (
          SELECT id, name, window_start AS starttime, window_end AS endtime
          FROM TABLE(TUMBLE(TABLE person, DESCRIPTOR(date_time), INTERVAL '10' SECOND))
          GROUP BY id, name, window_start, window_end
        ) P
        JOIN (
          SELECT seller, window_start AS starttime, window_end AS endtime
          FROM TABLE(TUMBLE(TABLE auction, DESCRIPTOR(date_time), INTERVAL '10' SECOND))
          GROUP BY seller, window_start, window_end
        ) A
        ON P.id = A.seller AND P.starttime = A.starttime AND P.endtime = A.endtime
    """,
    "q11": """
        SELECT B.bidder, COUNT(*) AS bid_count,
               SESSION_START(B.date_time, INTERVAL '10' SECOND) AS starttime,
               SESSION_END(B.date_time, INTERVAL '10' SECOND) AS endtime
        FROM bid B
        GROUP BY B.bidder, SESSION(B.date_time, INTERVAL '10' SECOND)
    """,
    "q12": """
        SELECT B.bidder, COUNT(*) AS bid_count,
               TUMBLE_START(B.p_time, INTERVAL '10' SECOND) AS starttime,
               TUMBLE_END(B.p_time, INTERVAL '10' SECOND) AS endtime
        FROM (SELECT *, PROCTIME() AS p_time FROM bid) B
        GROUP BY B.bidder, TUMBLE(B.p_time, INTERVAL '10' SECOND)
    """,
    "q14": """
        SELECT auction, bidder, 0.908 * price AS price,
          CASE
            WHEN HOUR(date_time) >= 8 AND HOUR(date_time) <= 18 THEN 'dayTime'
            WHEN HOUR(date_time) <= 6 OR HOUR(date_time) >= 20 THEN 'nightTime'
            ELSE 'otherTime'
          END AS bid_time_type,
          date_time, extra, count_char(extra, 'c') AS c_counts
        FROM bid
        WHERE 0.908 * price > 1000000 AND 0.908 * price < 50000000
    """,
    # Flink's AVG of a BIGINT is a BIGINT; microstream's AVG is a DOUBLE, so the
    # truncated mean is written out.
    "q17": """
        SELECT
          auction,
          DATE_FORMAT(date_time, 'yyyy-MM-dd') AS `day`,
          COUNT(*) AS total_bids,
          COUNT(*) FILTER (WHERE price < 10000) AS rank1_bids,
          COUNT(*) FILTER (WHERE price >= 10000 AND price < 1000000) AS rank2_bids,
          COUNT(*) FILTER (WHERE price >= 1000000) AS rank3_bids,
          MIN(price) AS min_price,
          MAX(price) AS max_price,
          SUM(price) / COUNT(*) AS avg_price,
          SUM(price) AS sum_price
        FROM bid
        GROUP BY auction, DATE_FORMAT(date_time, 'yyyy-MM-dd')
    """,
    # A Top-N per auction, no window: a running Top-N in update mode keyed by
    # (auction, rank_number), as Flink's Top-N with the row number in its output.
    "q19": """
        SELECT * FROM
        (SELECT *, ROW_NUMBER() OVER (PARTITION BY auction ORDER BY price DESC) AS rank_number
         FROM bid)
        WHERE rank_number <= 10
    """,
    "q21": """
        SELECT auction, bidder, price, channel,
          CASE
            WHEN LOWER(channel) = 'apple' THEN '0'
            WHEN LOWER(channel) = 'google' THEN '1'
            WHEN LOWER(channel) = 'facebook' THEN '2'
            WHEN LOWER(channel) = 'baidu' THEN '3'
            ELSE REGEXP_EXTRACT(url, '(&|^)channel_id=([^&]*)', 2)
          END AS channel_id
        FROM bid
        WHERE REGEXP_EXTRACT(url, '(&|^)channel_id=([^&]*)', 2) IS NOT NULL
           OR LOWER(channel) IN ('apple', 'google', 'facebook', 'baidu')
    """,
    "q22": """
        SELECT auction, bidder, price, channel,
          SPLIT_INDEX(url, '/', 3) AS dir1,
          SPLIT_INDEX(url, '/', 4) AS dir2,
          SPLIT_INDEX(url, '/', 5) AS dir3
        FROM bid
    """,
}


def count_char(text: str | None, char: str) -> int:
    """Nexmark's UDF ``count_char``: occurrences of ``char`` in ``text`` (0 for NULL)."""
    return 0 if text is None else text.count(char)


def context(**tables: pl.LazyFrame) -> ms.SQLContext:
    return ms.SQLContext(**tables).register_function("count_char", count_char, pl.Int64)


def ddl(root: Path, name: str, max_files: int) -> str:
    return (
        f"CREATE TABLE {name} ({COLUMNS[name]}, "
        "WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND) WITH ("
        f"'connector' = 'filesystem', 'path' = '{root / name}', 'format' = 'parquet', "
        f"'max-files-per-trigger' = '{max_files}')"
    )


@pytest.mark.parametrize("max_files", [1, 5])
@pytest.mark.parametrize("name", sorted(QUERIES))
def test_sql_equals_python(name: str, max_files: int, nexmark_root: Path, tmp_path: Path) -> None:
    module = load(name)
    ctx = context()
    for table in module.INPUTS:
        ctx.execute(ddl(nexmark_root, table, max_files))
    frame = ctx.execute(QUERIES[name])
    assert isinstance(frame, ms.StreamFrame)
    frames: list[pl.DataFrame] = []
    query = frame.foreach_batch(
        lambda df, _batch_id: frames.append(df),
        trigger=ms.Trigger.available_now(flush=True),
        checkpoint=tempfile.mkdtemp(dir=tmp_path),
        output_mode=getattr(module, "OUTPUT_MODE", "append"),
    )
    query.await_termination()
    progress = query.recent_progress
    assert len(progress) >= 12 // max_files
    assert sum(op.num_rows_dropped_late for p in progress for op in p.state_operators) == 0
    result = pl.concat(frames, how="vertical_relaxed")
    _, expected = run_batch(module, nexmark_root)
    assert expected.height > 0
    if not hasattr(module, "compare"):  # q12's compare checks the stream's own columns
        assert result.columns == expected.columns
    assert_same_result(module, result, expected)
    # The same text over static frames is the batch result too.
    static = context(
        **{t: pl.scan_parquet(str(nexmark_root / t / "*.parquet")) for t in module.INPUTS}
    ).execute(QUERIES[name])
    assert isinstance(static, pl.LazyFrame)
    assert_same_result(module, static.collect(), expected)


def test_q19_python_version_equals_batch(nexmark_root: Path) -> None:
    # q19 is not in the benchmark's list (every peer runs that list): its Python version
    # is checked here, with one file per trigger.
    module = load("q19")
    run = run_stream(module, nexmark_root, max_files_per_trigger=1)
    assert run.batches >= 12
    _, expected = run_batch(module, nexmark_root)
    assert expected.height > 0
    assert_same_result(module, run.result, expected)
