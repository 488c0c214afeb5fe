"""``format="protobuf"``: the decoder, then through Kafka (Tansu), Kinesis (moto), RabbitMQ
streams (a private node) and Pub/Sub (the emulator).

The message types are built from descriptors here (no ``protoc`` on the machine): an
``Order`` with a nested message, a repeated message, an enum, a repeated scalar and a
well-known ``Timestamp``; the same descriptors written as a descriptor set file.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms

pytest.importorskip("protarrow")
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    timestamp_pb2,
)

from connectors._protobuf_codec import ProtobufDecoder


def _order_file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name="shop/order.proto",
        package="shop",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    t = descriptor_pb2.FieldDescriptorProto
    status = f.enum_type.add(name="Status")
    status.value.add(name="NEW", number=0)
    status.value.add(name="PAID", number=1)
    address = f.message_type.add(name="Address")
    address.field.add(name="city", number=1, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    item = f.message_type.add(name="Item")
    item.field.add(name="sku", number=1, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    item.field.add(name="qty", number=2, type=t.TYPE_INT32, label=t.LABEL_OPTIONAL)
    order = f.message_type.add(name="Order")
    order.field.add(name="id", number=1, type=t.TYPE_INT64, label=t.LABEL_OPTIONAL)
    order.field.add(name="customer", number=2, type=t.TYPE_STRING, label=t.LABEL_OPTIONAL)
    order.field.add(
        name="status", number=3, type=t.TYPE_ENUM, type_name=".shop.Status", label=t.LABEL_OPTIONAL
    )
    order.field.add(
        name="address", number=4, type=t.TYPE_MESSAGE, type_name=".shop.Address",
        label=t.LABEL_OPTIONAL,
    )  # fmt: skip
    order.field.add(
        name="items", number=5, type=t.TYPE_MESSAGE, type_name=".shop.Item", label=t.LABEL_REPEATED
    )
    order.field.add(name="tags", number=6, type=t.TYPE_STRING, label=t.LABEL_REPEATED)
    order.field.add(
        name="created", number=7, type=t.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp",
        label=t.LABEL_OPTIONAL,
    )  # fmt: skip
    return f


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    return [timestamp, _order_file()]


def order_class() -> Any:
    """The class a generated ``order_pb2`` module would define (in the default pool, where
    generated code registers its types and the well-known ``Timestamp`` is)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("shop/order.proto")
    except KeyError:
        pool.Add(_order_file())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Order"))


Order = order_class()


@pytest.fixture
def descriptor_set(tmp_path: Path) -> Path:
    path = tmp_path / "types.desc"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=_files()).SerializeToString())
    return path


def orders() -> list[bytes]:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(datetime(2026, 1, 2, 3, 4, 5))
    return [
        Order(
            id=1,
            customer="ann",
            status=1,
            address={"city": "Oslo"},
            items=[{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}],
            tags=["x", "y"],
            created=created,
        ).SerializeToString(),
        Order(id=2, customer="bob").SerializeToString(),
    ]


EXPECTED = [
    {
        "id": 1,
        "customer": "ann",
        "status": "PAID",
        "address": {"city": "Oslo"},
        "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}],
        "tags": ["x", "y"],
        "created": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    },
    {
        "id": 2,
        "customer": "bob",
        "status": "NEW",
        "address": None,
        "items": [],
        "tags": [],
        "created": None,
    },
]


def test_messages_decode_into_nested_columns() -> None:
    decoder = ProtobufDecoder(Order)
    assert decoder.schema == pl.Schema(
        {
            "id": pl.Int64,
            "customer": pl.String,
            "status": pl.String,
            "address": pl.Struct({"city": pl.String}),
            "items": pl.List(pl.Struct({"sku": pl.String, "qty": pl.Int32})),
            "tags": pl.List(pl.String),
            "created": pl.Datetime("ns", "UTC"),
        }
    )
    decoded = decoder.decode([*orders(), b"\x08", None])
    assert decoded.frame.to_dicts()[:2] == EXPECTED
    assert decoded.index == [0, 1, 3]
    assert [i for i, _ in decoded.bad] == [2]
    assert "not a Order message" in decoded.bad[0][1]
    assert decoded.frame.row(2) == (None,) * 7  # the tombstone


def test_a_descriptor_set_names_the_message(descriptor_set: Path) -> None:
    decoder = ProtobufDecoder({"descriptor_set": str(descriptor_set), "message": "shop.Order"})
    assert decoder.decode(orders()).frame.to_dicts() == EXPECTED
    with pytest.raises(ms.PlanError, match=r"has no message 'shop.Nope'.*'shop.Order'"):
        ProtobufDecoder({"descriptor_set": str(descriptor_set), "message": "shop.Nope"})
    with pytest.raises(ms.PlanError, match="needs schema= as a generated message class"):
        ProtobufDecoder({"id": pl.Int64})


@pytest.mark.integration
def test_kafka_protobuf_records_with_bad_ones_dead_lettered(
    kafka_broker: Any, kafka_topic: str
) -> None:
    kafka_broker.produce(kafka_topic, [orders()[0], b"\x08", orders()[1]])
    frame = ms.scan_kafka(
        kafka_broker.bootstrap_servers,
        topic=kafka_topic,
        format="protobuf",
        schema=Order,
        on_bad_record="dead_letter",
        dead_letter="protobuf_kafka_dead",
    )
    query = frame.sink_memory("protobuf_kafka")
    query.process_all_available()
    query.stop()
    assert ms.table("protobuf_kafka").to_dicts() == EXPECTED
    assert ms.table("protobuf_kafka_dead").select("offset", "value").rows() == [(1, b"\x08")]


@pytest.mark.integration
def test_kinesis_protobuf_records_from_a_descriptor_set(
    moto_server: Any, descriptor_set: Path
) -> None:
    boto3 = pytest.importorskip("boto3")
    name = f"s-{uuid.uuid4().hex[:12]}"
    client = boto3.client("kinesis", **moto_server.aws_options())
    client.create_stream(StreamName=name, ShardCount=1)
    for payload in [orders()[0], b"\x08", orders()[1]]:
        client.put_record(StreamName=name, Data=payload, PartitionKey="k")
    frame = ms.scan_kinesis(
        name,
        format="protobuf",
        schema={"descriptor_set": str(descriptor_set), "message": "shop.Order"},
        on_bad_record="skip",
        options=moto_server.aws_options(),
    )
    query = frame.sink_memory("protobuf_kinesis")
    query.process_all_available()
    query.stop()
    assert ms.table("protobuf_kinesis").to_dicts() == EXPECTED


@pytest.mark.integration
def test_rabbitmq_stream_protobuf_messages_with_a_bad_one_failing_or_skipped(
    rabbitmq_server: Any, rabbitmq_stream: str, tmp_path: Path
) -> None:
    from connectors.rabbitmq.client import StreamConnection, StreamUrl, encode_messages

    conn = StreamConnection(StreamUrl.parse(rabbitmq_server.url), retry_timeout_s=10, name="t")
    try:
        conn.create_stream(rabbitmq_stream, {})
        bodies = [orders()[0], b"\x08", orders()[1]]
        assert conn.publish(rabbitmq_stream, "p", [1, 2, 3], encode_messages(bodies, {})) == []
    finally:
        conn.close()
    failing = ms.scan_rabbitmq_stream(
        rabbitmq_server.url, rabbitmq_stream, format="protobuf", schema=Order
    )
    query = failing.foreach_batch(
        lambda df, i: None, checkpoint=tmp_path / "fail", trigger=ms.Trigger.available_now()
    )
    with pytest.raises(ms.SourceError, match=r"bad message at offset 1: .*not a Order message"):
        query.await_termination(timeout=60)

    skipping = ms.scan_rabbitmq_stream(
        rabbitmq_server.url,
        rabbitmq_stream,
        format="protobuf",
        schema=Order,
        on_bad_record="skip",
        include_metadata=True,
    )
    query = skipping.sink_memory("protobuf_rabbitmq")
    query.process_all_available()
    query.stop()
    out = ms.table("protobuf_rabbitmq")
    assert out.drop("_offset", "_timestamp").to_dicts() == EXPECTED
    assert out["_offset"].to_list() == [0, 2]


@pytest.mark.integration
def test_pubsub_protobuf_messages_from_a_descriptor_set_and_a_bad_one_failing(
    pubsub_emulator: Any, name: str, descriptor_set: Path, tmp_path: Path
) -> None:
    pubsub_emulator.create_topic(name)
    subscription = pubsub_emulator.create_subscription(name, name)
    schema = {"descriptor_set": str(descriptor_set), "message": "shop.Order"}
    pubsub_emulator.publish(name, orders())
    frame = ms.scan_pubsub(
        subscription, format="protobuf", schema=schema, endpoint=pubsub_emulator.endpoint
    )
    query = frame.sink_memory(name, checkpoint=tmp_path / "cp")
    query.process_all_available(timeout=30)
    query.stop()
    assert ms.table(name).sort("id").to_dicts() == EXPECTED

    [bad_id] = pubsub_emulator.publish(name, [b"\x08"])
    # the good messages were acknowledged when their batch committed: only the bad one comes
    query = frame.foreach_batch(lambda df, i: None, checkpoint=tmp_path / "bad")
    with pytest.raises(ms.SourceError, match=f"bad message '{bad_id}': .*not a Order message"):
        query.process_all_available(timeout=30)
    query.stop()
