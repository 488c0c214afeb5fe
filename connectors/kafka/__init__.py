"""Kafka: a replayable source, and a sink that tags every record with its batch.

**Source.** An offset is the position (the next offset to read) of every
topic-partition; the write-ahead log holds the ``(start, end]`` positions of
each batch, and a batch reads exactly those offsets by assigning the
partitions and seeking (no consumer-group membership, no rebalancing), so a
re-run reads the same records. Records are consumed in bulk
(``consume(num_messages=...)``) and decoded in bulk (see
:mod:`connectors._kafka_codecs`); the only Python work per record is
reading its offset (and partition) once, and its value. The consumer stays
assigned between batches, so librdkafka fetches the next records while a
batch is decoded, computed and written, and records consumed past a
partition's end are kept for the next batch instead of being fetched again
(any other start is a seek). Partitions that appear later (a topic
that grew, a new topic matching ``pattern``) are read from their start.
After each batch commits, the positions are committed as the offsets of a
consumer group (``microstream-<query id>`` unless ``options`` set
``group.id``), so the usual lag tools see the query's progress; they are
never read back (the log is the truth).

**Data loss.** Before offsets are used, they are checked against the
partition's earliest and end offsets: a partition that vanished, an end
below the query's position (a broker that lost its data, a topic recreated)
or an earliest offset above it (retention) is a :class:`DataLossError`
naming the topic, the partition and the missing range, unless
``fail_on_data_loss=False``: then the query continues from the earliest
available offset, logs a warning and counts the lost offsets in progress.
The offsets are looked up when a batch is planned (``latest_offset``) and
when a logged batch is re-run (``read``); a batch just planned is read
without a second look-up, and with ``Trigger.available_now()`` the ends are
looked up once, at start (as Spark does). With ``fail_on_data_loss=True``, a
loss after the look-up shows when the records are fetched: an
out-of-range error, or (a broker that answers with no records) a look-up
after ``retry_timeout`` without records, either way a :class:`DataLossError`.
Kafka offsets alone cannot tell a topic recreated with at least as many
records as the query had read from the old one; like Spark, this goes
unnoticed.

**Sink.** See :class:`KafkaSinkSpec` for the guarantee of each mode.

``confluent-kafka`` and ``fastavro`` are optional dependencies, imported
only when used (``pip install 'microstream[kafka]'``).
"""

from connectors.kafka.offsets import KafkaOffset
from connectors.kafka.sink import BATCH_ID_HEADER, QUERY_ID_HEADER, KafkaSink, KafkaSinkSpec
from connectors.kafka.source import KafkaSource
from connectors.kafka.source_spec import KafkaSourceSpec

__all__ = [
    "BATCH_ID_HEADER",
    "QUERY_ID_HEADER",
    "KafkaOffset",
    "KafkaSink",
    "KafkaSinkSpec",
    "KafkaSource",
    "KafkaSourceSpec",
]
