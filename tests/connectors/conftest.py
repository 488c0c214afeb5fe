"""Fixtures shared by the connector tests: runtime contexts over a tmp checkpoint.

The Kafka broker fixtures (``kafka_broker``, ``kafka_topic``) are in ``tests/conftest.py``,
shared with the replay and crash tests.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from microstream.api.session import Session
from microstream.checkpoint.storage import Storage
from microstream.protocols import SinkContext, SourceContext


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
