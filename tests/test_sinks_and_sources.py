"""End-to-end through real queries: console and memory sinks, rate source, Delta static joins."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms


def test_console_sink_prints_every_batch(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    source = ms.MemoryStream({"x": pl.Int64})
    query = source.lazy().with_columns(y=pl.col("x") + 1).sink_console(name=name)
    source.add_data({"x": [1, 2]})
    query.process_all_available(timeout=30)
    source.add_data({"x": [41]})
    query.process_all_available(timeout=30)
    query.stop()
    out = capsys.readouterr().out
    assert out.index("Batch: 0") < out.index("Batch: 1")
    batch0, batch1 = out.split("Batch: 1")
    assert "shape: (2, 2)" in batch0 and "│ 2   ┆ 3   │" in batch0
    assert "shape: (1, 2)" in batch1 and "│ 41  ┆ 42  │" in batch1


def test_memory_sink_skips_a_replayed_batch(session: ms.Session) -> None:
    session.register_table("t")
    batch = pl.DataFrame({"x": [1]})
    assert session.write_table("t", 0, batch, replace=False)
    assert not session.write_table("t", 0, batch, replace=False)
    assert session.write_table("t", 1, batch, replace=False)
    assert session.table("t")["x"].to_list() == [1, 1]


def test_a_memory_table_is_the_output_of_the_query_writing_it(name: str, tmp_path: Path) -> None:
    """As Spark's memory sink: a restart on the checkpoint goes on with the table (its
    replayed batch skipped), another query starts it anew (before, its batch ids the first
    query had used were skipped silently: a cell run again showed the old rows), and a
    second query while the first runs is refused."""
    first, second = ms.MemoryStream({"x": pl.Int64}), ms.MemoryStream({"x": pl.Int64})
    one = first.lazy().sink_memory(name, checkpoint=tmp_path / "one")
    first.add_data({"x": [1]})
    one.process_all_available(timeout=30)
    with pytest.raises(ms.SinkError, match=rf"memory table '{name}' is the output of query"):
        second.lazy().sink_memory(name, checkpoint=tmp_path / "two")
    one.stop()
    again = first.lazy().sink_memory(name, checkpoint=tmp_path / "one")  # the same query
    first.add_data({"x": [3]})
    again.process_all_available(timeout=30)
    again.stop()
    assert ms.table(name)["x"].to_list() == [1, 3]
    two = second.lazy().sink_memory(name, checkpoint=tmp_path / "two")
    second.add_data({"x": [2]})
    two.process_all_available(timeout=30)
    two.stop()
    assert ms.table(name)["x"].to_list() == [2]
    session = ms.Session()
    session.register_table("t")
    batch = pl.DataFrame({"x": [1]})
    assert session.write_table("t", 0, batch, replace=False, writer="q1")
    assert session.write_table("t", 0, batch, replace=False, writer="q2")  # a side table
    assert not session.write_table("t", 0, batch, replace=False, writer="q1")
    assert session.table("t")["x"].to_list() == [1, 1]


def test_foreach_batch_gets_ids_in_order(tmp_path: Path) -> None:
    source = ms.MemoryStream({"x": pl.Int64})
    calls: list[tuple[int, list[int]]] = []
    query = source.lazy().foreach_batch(
        lambda df, batch_id: calls.append((batch_id, df["x"].to_list())),
        checkpoint=tmp_path / "cp",
    )
    for chunk in ([1, 2], [3], [4, 5, 6]):
        source.add_data({"x": chunk})
        query.process_all_available(timeout=30)
    query.stop()
    assert calls == [(0, [1, 2]), (1, [3]), (2, [4, 5, 6])]


def test_rate_source_rows_are_exact(name: str, tmp_path: Path) -> None:
    start = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=2)
    frame = ms.scan_rate(500, num_partitions=2, start_timestamp=start)
    query = frame.sink_memory(name, trigger=ms.Trigger.available_now(), checkpoint=tmp_path / "cp")
    assert query.await_termination(timeout=60)
    out = ms.table(name).sort("value")
    n = out.height
    assert n >= 1000  # two seconds' worth were due at start
    assert out["value"].to_list() == list(range(n))
    expected_ts = pl.Series(
        "timestamp", [start + timedelta(milliseconds=2 * v) for v in range(n)], pl.Datetime("us")
    )
    assert_frame_equal(out.select("timestamp"), expected_ts.to_frame(), check_dtypes=False)


def test_join_with_delta_table_rereads_new_versions(name: str, tmp_path: Path) -> None:
    from deltalake import DeltaTable, write_deltalake

    users = str(tmp_path / "users")
    write_deltalake(users, pl.DataFrame({"user": [1, 2], "country": ["NL", "FR"]}))
    source = ms.MemoryStream({"user": pl.Int64, "amount": pl.Float64})
    query = source.lazy().join(DeltaTable(users), on="user", how="left").sink_memory(name)
    source.add_data({"user": [1, 2], "amount": [1.0, 2.0]})
    query.process_all_available(timeout=30)
    write_deltalake(
        users, pl.DataFrame({"user": [1, 2], "country": ["BE", "ES"]}), mode="overwrite"
    )
    source.add_data({"user": [1, 2, 3], "amount": [3.0, 4.0, 5.0]})
    query.process_all_available(timeout=30)
    query.stop()
    out = ms.table(name).sort("amount")
    assert out.rows() == [
        (1, 1.0, "NL"),
        (2, 2.0, "FR"),
        (1, 3.0, "BE"),
        (2, 4.0, "ES"),
        (3, 5.0, None),
    ]


def test_a_third_party_sink_runs_exactly_once_through_sink(tmp_path: Path) -> None:
    """``StreamFrame.sink(spec)`` starts any sink; a re-run batch reaches it with its id."""
    from microstream.exceptions import PlanError

    class DictSink:
        description = "DictSink"

        def __init__(self, out: dict[int, list[tuple[Any, ...]]]) -> None:
            self.out = out

        def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
            self.out[batch_id] = data.rows()

        def stop(self) -> None:
            pass

    @dataclass(frozen=True, eq=False)
    class DictSinkSpec:
        out: dict[int, list[tuple[Any, ...]]] = field(default_factory=dict)
        kind = "dict"
        output_modes = frozenset({"append"})
        durable = True

        def describe(self) -> str:
            return "DictSink"

        def build(self, context: Any) -> DictSink:
            return DictSink(self.out)

    stream = ms.MemoryStream({"x": pl.Int64})
    spec = DictSinkSpec()
    query = (
        stream.lazy().with_columns(y=pl.col("x") * 2).sink(spec, checkpoint=str(tmp_path / "cp"))
    )
    try:
        stream.add_data({"x": [1, 2]})
        query.process_all_available(timeout=30)
        stream.add_data({"x": [3]})
        query.process_all_available(timeout=30)
    finally:
        query.stop()
    assert spec.out == {0: [(1, 2), (2, 4)], 1: [(3, 6)]}
    with pytest.raises(PlanError, match=r"DictSink does not support output_mode='update'"):
        stream.lazy().sink(spec, output_mode="update")


COMMON_SINK_OPTIONS = ("checkpoint", "checkpoint_options", "name", "runtime", "key_groups")


@pytest.mark.parametrize(
    ("verb", "arguments"),
    [
        ("sink_kafka", {"bootstrap_servers": "localhost:1", "topic": "t"}),
        ("sink_kinesis", {"stream": "s", "partition_key": "k"}),
        ("sink_rabbitmq_stream", {"url": "rabbitmq-stream://localhost:1", "stream": "s"}),
        ("sink_pubsub", {"topic": "projects/p/topics/t"}),
        ("sink_http", {"url": "http://localhost:1/in"}),
    ],
)
def test_message_sink_verbs_pass_every_common_option_to_sink(
    verb: str, arguments: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each message-system verb takes the frame's common options (checkpoint_options was
    missing from sink_kafka, sink_rabbitmq_stream and sink_pubsub) and hands them on."""
    seen: dict[str, Any] = {}

    def sink(self: ms.StreamFrame, spec: object, **options: Any) -> str:
        seen.update(options)
        return "started"

    monkeypatch.setattr(ms.StreamFrame, "sink", sink)
    frame = ms.MemoryStream({"k": pl.String}).lazy()
    given = {option: object() for option in COMMON_SINK_OPTIONS}
    assert getattr(frame, verb)(**arguments, **given) == "started"
    assert {option: seen[option] for option in COMMON_SINK_OPTIONS} == given
