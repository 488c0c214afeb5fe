"""RabbitMQ streams: a source replayable by offset and an exactly-once sink.

**Source** (:class:`RabbitMQStreamSourceSpec`, ``ms.scan_rabbitmq_stream``):
offsets are the stream's message offsets, logged in the write-ahead log; a
batch reads exactly the messages of its logged ``(start, end]`` range, and a
range that retention deleted is a ``DataLossError``. See
:mod:`connectors.rabbitmq.source`.

**Sink** (:class:`RabbitMQStreamSinkSpec`, ``StreamFrame.sink_rabbitmq_stream``):
one named producer per query whose publishing ids are derived from the batch
id and the row's position, so the broker's deduplication stores every row once
across re-runs. See :mod:`connectors.rabbitmq.sink`.

``rstream`` is an optional dependency, imported only when used
(``pip install 'microstream[rabbitmq]'``).
"""

from connectors.rabbitmq.sink import RabbitMQStreamSink, RabbitMQStreamSinkSpec
from connectors.rabbitmq.source import (
    METADATA_COLUMNS,
    RabbitMQStreamOffset,
    RabbitMQStreamSource,
    RabbitMQStreamSourceSpec,
)

__all__ = [
    "METADATA_COLUMNS",
    "RabbitMQStreamOffset",
    "RabbitMQStreamSink",
    "RabbitMQStreamSinkSpec",
    "RabbitMQStreamSource",
    "RabbitMQStreamSourceSpec",
]
