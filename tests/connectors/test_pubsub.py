"""The Pub/Sub source and sink against the emulator (``pubsub_emulator``: the Google Cloud
CLI's pubsub-emulator, started once per session), a topic and subscription per test."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from connectors.pubsub import PubSubOffset, PubSubSourceSpec
from microstream.checkpoint.storage import Storage
from microstream.exceptions import SourceError
from microstream.protocols import SourceContext
from microstream.testing.pubsub import PubSubEmulator
from microstream.testing.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

SCHEMA = {"id": pl.Int64, "name": pl.String}


def rows(ids: range) -> list[bytes]:
    return [json.dumps({"id": i, "name": f"n{i}"}).encode() for i in ids]


def setup(emulator: PubSubEmulator, name: str) -> tuple[str, str]:
    emulator.create_topic(name)
    return name, emulator.create_subscription(name, name)


def source_of(spec: PubSubSourceSpec, checkpoint: Path) -> Any:
    return spec.build(
        SourceContext(index=0, storage=Storage(str(checkpoint / "sources" / "0")), query_id="q")
    )


def test_batches_hold_the_pulled_messages_and_are_acked_after_commit(
    pubsub_emulator: PubSubEmulator, name: str, tmp_path: Path
) -> None:
    topic, subscription = setup(pubsub_emulator, name)
    ids = pubsub_emulator.publish(topic, rows(range(5)))
    frame = ms.scan_pubsub(
        subscription,
        schema=SCHEMA,
        max_messages_per_trigger=3,
        include_metadata=True,
        ack_deadline="10s",
        endpoint=pubsub_emulator.endpoint,
    )
    batches: list[pl.DataFrame] = []
    query = frame.foreach_batch(
        lambda df, _: batches.append(df),
        checkpoint=tmp_path / "cp",
        trigger=ms.Trigger.available_now(),
    )
    query.await_termination(timeout=60)
    assert [df.height for df in batches] == [3, 2]
    out = pl.concat(batches).sort("id")
    assert out.select("id", "name", "_message_id", "_ordering_key").rows() == [
        (i, f"n{i}", ids[i], "") for i in range(5)
    ]
    # Committed, so acknowledged: past the ack deadline nothing is delivered again.
    time.sleep(10.5)
    assert pubsub_emulator.pull(name) == []


def test_a_batch_not_committed_is_replayed_from_its_log_and_redeliveries_are_dropped(
    pubsub_emulator: PubSubEmulator, name: str, tmp_path: Path
) -> None:
    topic, subscription = setup(pubsub_emulator, name)
    pubsub_emulator.publish(topic, rows(range(4)))
    spec = PubSubSourceSpec(subscription, schema=SCHEMA, endpoint=pubsub_emulator.endpoint)
    first = source_of(spec, tmp_path)
    start = PubSubOffset(entry=-1)
    end = first.latest_offset(start, rate_limited=True)
    assert end == PubSubOffset(entry=0)
    logged = first.read(start, end).sort("id")
    # The process dies before commits/0: nothing was acked, and once the messages' ack
    # deadline passes Pub/Sub delivers them again (here: at once, by a deadline of 0).
    from connectors.pubsub.client import subscriber_client

    client = subscriber_client(pubsub_emulator.endpoint)
    client.modify_ack_deadline(
        request={"subscription": subscription, "ack_ids": first._acks[0], "ack_deadline_seconds": 0}
    )
    client.close()
    first._client.close()  # no stop(): a dead process acknowledges nothing

    second = source_of(spec, tmp_path)  # the restarted query's source, same checkpoint
    try:
        # The batch logged for entry 0 is offered again and reads the same messages.
        assert second.latest_offset(start, rate_limited=True) == PubSubOffset(entry=0)
        assert second.read(start, end).sort("id").equals(logged)
        # The redelivered copies are recognised by id: no new batch of them.
        assert second.latest_offset(end, rate_limited=True) == end
        second.commit(end)
        pubsub_emulator.publish(topic, rows(range(4, 5)))
        nxt = second.latest_offset(end, rate_limited=True)
        assert second.read(end, nxt)["id"].to_list() == [4]
        second.commit(nxt)
    finally:
        second.stop()
    assert logged["id"].to_list() == [0, 1, 2, 3]
    assert pubsub_emulator.pull(name) == []  # everything acked once committed


@pytest.fixture
def proxy(pubsub_emulator: PubSubEmulator) -> Iterator[TcpProxy]:
    host, port = pubsub_emulator.endpoint.rsplit(":", 1)
    with TcpProxy((host, int(port))) as proxy:
        yield proxy


def cutting_batch(
    proxy: TcpProxy, seen: list[int], *, on_batch: int, restore_after: float | None
) -> Any:
    """A foreach_batch function recording ids that cuts the server while ``on_batch`` runs
    (after its messages were pulled and logged, before their ack)."""

    def run(df: pl.DataFrame, batch_id: int) -> None:
        seen.extend(df["id"].to_list())
        if batch_id == on_batch:
            proxy.cut()
            if restore_after is not None:
                threading.Timer(restore_after, proxy.restore).start()

    return run


def until_seen(query: ms.StreamingQuery, seen: list[int], count: int) -> None:
    deadline = time.monotonic() + 20
    while len(seen) < count and time.monotonic() < deadline:
        query.process_all_available(timeout=30)
        time.sleep(0.1)


def test_a_server_down_then_back_within_retry_timeout_is_waited_for(
    pubsub_emulator: PubSubEmulator, proxy: TcpProxy, name: str, tmp_path: Path
) -> None:
    topic, subscription = setup(pubsub_emulator, name)
    pubsub_emulator.publish(topic, rows(range(3)))
    seen: list[int] = []
    frame = ms.scan_pubsub(
        subscription, schema=SCHEMA, retry_timeout="20s", endpoint=f"127.0.0.1:{proxy.port}"
    )
    query = frame.foreach_batch(
        cutting_batch(proxy, seen, on_batch=0, restore_after=1.0), checkpoint=tmp_path / "cp"
    )
    try:
        started = time.monotonic()
        # Batch 0's ack (after commits/0) and the next pull meet the cut server and wait.
        query.process_all_available(timeout=30)
        assert time.monotonic() - started >= 1.0
        # While the server was down, nothing was lost: new messages come through.
        pubsub_emulator.publish(topic, rows(range(3, 6)))
        proxy.cut()
        back = threading.Timer(1.0, proxy.restore)
        back.start()
        back.join()
        # return_immediately lets a pull answer empty while messages wait (more so on a
        # fresh connection): the running query takes them at a later trigger.
        until_seen(query, seen, 6)
        assert query.exception() is None
    finally:
        query.stop()
    assert sorted(seen) == list(range(6))
    assert len(seen) == 6


def test_a_server_down_past_retry_timeout_fails_naming_the_cause_and_a_restart_resumes(
    pubsub_emulator: PubSubEmulator, proxy: TcpProxy, name: str, tmp_path: Path
) -> None:
    topic, subscription = setup(pubsub_emulator, name)
    pubsub_emulator.publish(topic, rows(range(3)))
    seen: list[int] = []
    checkpoint = tmp_path / "cp"

    def start() -> ms.StreamingQuery:
        frame = ms.scan_pubsub(
            subscription,
            schema=SCHEMA,
            retry_timeout="2s",
            ack_deadline="10s",
            endpoint=f"127.0.0.1:{proxy.port}",
        )
        return frame.foreach_batch(
            cutting_batch(proxy, seen, on_batch=0, restore_after=None), checkpoint=checkpoint
        )

    query = start()
    started = time.monotonic()
    with pytest.raises(SourceError) as failure:
        query.process_all_available(timeout=30)
    waited = time.monotonic() - started
    query.stop()
    message = str(failure.value)
    assert f"PubSub[{subscription}]: acknowledge messages failed" in message
    assert "within retry_timeout=2s; last error: ServiceUnavailable" in message
    assert 1.0 <= waited < 10.0  # gives up when the next backoff would pass 2 s
    assert seen == [0, 1, 2]

    proxy.restore()
    pubsub_emulator.publish(topic, rows(range(3, 5)))
    query = start()  # batch 0 is in commits/ now: it does not cut again
    try:
        until_seen(query, seen, 5)
        assert query.exception() is None
    finally:
        query.stop()
    assert seen == [0, 1, 2, 3, 4]


def test_failure_paths_missing_subscription_and_bad_messages(
    pubsub_emulator: PubSubEmulator, name: str, tmp_path: Path
) -> None:
    missing = ms.scan_pubsub(
        f"projects/{pubsub_emulator.project}/subscriptions/nope-{name}",
        schema=SCHEMA,
        endpoint=pubsub_emulator.endpoint,
    )
    query = missing.foreach_batch(lambda df, i: None, checkpoint=tmp_path / "m")
    with pytest.raises(SourceError, match="the subscription does not exist"):
        query.process_all_available(timeout=30)
    query.stop()

    topic, subscription = setup(pubsub_emulator, name)
    [bad_id] = pubsub_emulator.publish(topic, [b"{oops"])
    frame = ms.scan_pubsub(subscription, schema=SCHEMA, endpoint=pubsub_emulator.endpoint)
    query = frame.foreach_batch(lambda df, i: None, checkpoint=tmp_path / "b")
    with pytest.raises(SourceError, match=f"bad message '{bad_id}'"):
        query.process_all_available(timeout=30)
    query.stop()


def test_bad_messages_skipped_are_counted_left_out_and_acknowledged(
    pubsub_emulator: PubSubEmulator, name: str, tmp_path: Path
) -> None:
    topic, subscription = setup(pubsub_emulator, name)
    ids = pubsub_emulator.publish(topic, [*rows(range(2)), b"{oops", *rows(range(2, 3))])
    frame = ms.scan_pubsub(
        subscription,
        schema=SCHEMA,
        include_metadata=True,
        on_bad_record="skip",
        endpoint=pubsub_emulator.endpoint,
    )
    seen: list[pl.DataFrame] = []
    query = frame.foreach_batch(
        lambda df, i: seen.append(df),
        checkpoint=tmp_path / "cp",
        trigger=ms.Trigger.available_now(),
    )
    query.await_termination(timeout=60)
    out = pl.concat(seen).sort("id")
    assert out.select("id", "name").rows() == [(0, "n0"), (1, "n1"), (2, "n2")]
    assert out["_message_id"].to_list() == ids[:2] + ids[3:]  # metadata of the kept rows
    skipped = sum(p.sources[0].metrics.get("bad_records_skipped", 0) for p in query.recent_progress)
    assert skipped == 1
    # The bad message's ack id is kept with its entry's like every pulled message's, so
    # it is acknowledged when the batch commits (shown for all of an entry's messages by
    # test_batches_hold_the_pulled_messages_and_are_acked_after_commit).

    with pytest.raises(ValueError, match="on_bad_record must be 'fail' or 'skip'"):
        ms.scan_pubsub(subscription, schema=SCHEMA, on_bad_record="dead_letter")


def test_the_sink_publishes_every_row_with_its_ordering_key_and_batch_attributes(
    pubsub_emulator: PubSubEmulator, name: str, tmp_path: Path
) -> None:
    pubsub_emulator.create_topic(name)
    pubsub_emulator.create_subscription(name, name, ordering=True)
    events = ms.MemoryStream({"user": pl.String, "n": pl.Int64})
    query = events.lazy().sink_pubsub(
        f"projects/{pubsub_emulator.project}/topics/{name}",
        ordering_key="user",
        endpoint=pubsub_emulator.endpoint,
        checkpoint=tmp_path / "cp",
    )
    events.add_data({"user": ["a", "b", "a", "a", "b"], "n": [1, 2, 3, 4, 5]})
    query.process_all_available(timeout=30)
    query.stop()
    messages = pubsub_emulator.pull(name)
    got = [
        (
            m.ordering_key,
            json.loads(m.data)["n"],
            m.attributes["microstream.batch_id"],
            m.attributes["microstream.row"],
        )
        for m in messages
    ]
    assert sorted(got) == [
        ("a", 1, "0", "0"),
        ("a", 3, "0", "2"),
        ("a", 4, "0", "3"),
        ("b", 2, "0", "1"),
        ("b", 5, "0", "4"),
    ]
    # Within a key, delivery follows publishing order.
    for key in ("a", "b"):
        ns = [n for k, n, _, _ in got if k == key]
        assert ns == sorted(ns)
    assert {m.attributes["microstream.query_id"] for m in messages} == {query.id}


def test_the_sink_waits_for_a_server_down_then_back(
    pubsub_emulator: PubSubEmulator, proxy: TcpProxy, name: str, tmp_path: Path
) -> None:
    from connectors.pubsub import PubSubSinkSpec

    pubsub_emulator.create_topic(name)
    pubsub_emulator.create_subscription(name, name)
    events = ms.MemoryStream({"n": pl.Int64})
    spec = PubSubSinkSpec(
        f"projects/{pubsub_emulator.project}/topics/{name}",
        retry_timeout="20s",
        endpoint=f"127.0.0.1:{proxy.port}",
    )
    query = events.lazy().sink(spec, checkpoint=tmp_path / "cp")
    try:
        events.add_data({"n": [1, 2]})
        query.process_all_available(timeout=30)
        proxy.cut()
        back = threading.Timer(1.0, proxy.restore)
        back.start()
        events.add_data({"n": [3, 4]})
        query.process_all_available(timeout=30)
        back.join()
        assert query.exception() is None
    finally:
        query.stop()
    got = sorted(json.loads(m.data)["n"] for m in pubsub_emulator.pull(name))
    assert got == [1, 2, 3, 4]
