"""Kafka client plumbing shared by the source and the sink: options, errors, schemas."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import polars as pl

from microstream.exceptions import (
    MissingDependencyError,
)

if TYPE_CHECKING:
    from confluent_kafka import KafkaError


_CLIENT_LOGGER = logging.getLogger("microstream.kafka.client")
"""librdkafka's own log lines (connection failures while a broker is down, ...)."""

TopicPartitionKey = tuple[str, int]
T = TypeVar("T")

METADATA_SCHEMA = pl.Schema(
    {
        "key": pl.Binary(),
        "topic": pl.String(),
        "partition": pl.Int32(),
        "offset": pl.Int64(),
        "timestamp": pl.Datetime("ms", "UTC"),
    }
)
HEADERS_DTYPE = pl.List(pl.Struct({"key": pl.String(), "value": pl.Binary()}))
DEAD_LETTER_SCHEMA = pl.Schema(
    {
        "topic": pl.String(),
        "partition": pl.Int32(),
        "offset": pl.Int64(),
        "key": pl.Binary(),
        "value": pl.Binary(),
        "reason": pl.String(),
    }
)
"""Columns of a dead-letter row; the engine appends ``batch_id``."""

_FETCH_MAX = 10_000
"""Most records asked of one ``consume`` call."""
_STASH_MAX = 100_000
"""Records of one partition kept past its batch's end before it is unassigned (librdkafka's
own ``queued.min.messages``: what it prefetches of a partition anyway). A broker may send
one partition far ahead of the others (on Tansu, tens of thousands of records)."""
_FRESH_S = 1.0
"""Offsets looked up this recently are reused at start-up (``initial_offset`` and then
``prepare_for_available_now`` run back to back)."""
_REQUEST_TIMEOUT_S = 10.0
_POLL_S = 0.2
_MAX_BACKOFF_S = 1.0
_CONSUMER_ONLY = ("group.", "isolation.level", "auto.offset.reset", "enable.auto.",
                  "auto.commit.", "enable.partition.eof", "fetch.", "session.timeout.ms",
                  "heartbeat.interval.ms", "max.poll.interval.ms", "partition.assignment",
                  "queued.", "check.crcs", "allow.auto.create.topics", "coordinator.",
                  "on_commit", "group.protocol")  # fmt: skip
_PRODUCER_ONLY = ("linger.ms", "batch.", "compression.", "acks", "request.required.acks",
                  "transactional.", "transaction.", "enable.idempotence", "message.timeout.ms",
                  "message.send.max.retries", "retries", "queue.buffering.", "delivery.",
                  "partitioner", "sticky.", "enable.gapless.guarantee", "dr_", "on_delivery",
                  "request.timeout.ms")  # fmt: skip
_FATAL_CODES = frozenset(
    {
        "_AUTHENTICATION",
        "SASL_AUTHENTICATION_FAILED",
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "_INVALID_ARG",
        "_UNSUPPORTED_FEATURE",
    }
)


def _require_kafka() -> None:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        msg = (
            "the Kafka connector needs confluent-kafka (and fastavro for Avro), which is not "
            "installed: pip install 'microstream[kafka]'"
        )
        raise MissingDependencyError(msg) from exc


def _kafka_error(exc: BaseException) -> KafkaError | None:
    from confluent_kafka import KafkaException

    if isinstance(exc, KafkaException) and exc.args:
        error = exc.args[0]
        return error if hasattr(error, "code") else None
    return None


def _is_transient(exc: BaseException) -> bool:
    """Whether an error from a client call may go away by itself (a broker down, a timeout)."""
    if isinstance(exc, TimeoutError):
        return True
    error = _kafka_error(exc)
    if error is None:
        return False
    return not error.fatal() and error.name() not in _FATAL_CODES


def _client_options(options: Mapping[str, Any], role: str) -> dict[str, Any]:
    """The ``options`` that apply to a client of ``role`` ("consumer", "producer", "admin").

    librdkafka warns about (and ignores) settings of the other kind of client.
    """
    drop = _PRODUCER_ONLY if role == "consumer" else _CONSUMER_ONLY
    return {k: v for k, v in options.items() if not k.startswith(drop)}
