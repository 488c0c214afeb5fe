"""Amazon Kinesis Data Streams: a replayable source with per-shard positions, and a sink.

**Source** (:class:`KinesisSourceSpec`, ``ms.scan_kinesis``): offsets are, per shard,
the last sequence number read and the count of records read; a batch re-run reads
exactly its logged range again, or fails with a ``DataLossError`` when the stream no
longer holds it. Children of a split or merge are read after their parents are
exhausted. See :mod:`connectors.kinesis.source` and :mod:`connectors.kinesis.shards`.

**Sink** (:class:`KinesisSinkSpec`, ``StreamFrame.sink_kinesis``): at least once,
records tagged with the query, batch and row in JSON. See :mod:`connectors.kinesis.sink`.

``boto3`` is an optional dependency, imported only when used
(``pip install 'microstream[kinesis]'``).
"""

from connectors.kinesis.shards import KinesisOffset, ShardPosition
from connectors.kinesis.sink import BATCH_FIELDS, KinesisSink, KinesisSinkSpec
from connectors.kinesis.source import KinesisSource, KinesisSourceSpec

__all__ = [
    "BATCH_FIELDS",
    "KinesisOffset",
    "KinesisSink",
    "KinesisSinkSpec",
    "KinesisSource",
    "KinesisSourceSpec",
    "ShardPosition",
]
