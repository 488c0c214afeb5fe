"""The Kafka source's batches in parts: topic-partition offset ranges read by other
processes (``SplittableSource``).

A batch ``(start, end]`` of the Kafka source is an offset range per topic-partition.
:func:`plan_kafka_splits` gives one :class:`KafkaSplit` per partition with records in
the batch, cut into consecutive sub-ranges of at most :data:`SPLIT_RECORDS` offsets
(one hot partition is several tasks, not one huge one), in the order ``read`` gives
rows: by topic, partition, then offset. So the splits' reads concatenated in order are
``read(start, end)`` row for row.

A split carries the spec (bootstrap servers, the librdkafka ``options`` with any
security settings, the decode spec: format, schema, metadata and headers columns, the
bad-record and schema-drift policies), the group id and its range. Its :meth:`read`
builds a consumer of its own in the process that runs it, assigns exactly its range,
consumes to its end with the source's own code (``KafkaSource._fetch``: the same stall
timeout, the same out-of-range and lost-offsets look-ups, so a record deleted between
planning and reading is the :class:`~microstream.DataLossError` a local read raises,
naming the topic, the partition and the offsets), decodes with the source's own
``_decode`` and closes the consumer. No consumer is kept between splits: a process
reads whatever split Ray gives it, so a cached consumer would rarely be positioned
where the next split starts, and an open client per process would outlive the query.

Only ranges whose read needs nothing of the driver are split:

- ``on_bad_record="fail"`` (the default): a bad record fails the split with the text
  ``read`` raises (naming the topic, partition and offset; "and N more" counts the
  split's bad records, not the batch's). ``"skip"`` counts ``bad_records_skipped``
  and ``"dead_letter"`` emits side-output rows, both on the driver: such a source is
  read on the driver.
- ``fail_on_data_loss=True`` (the default): with False, a loss is skipped over and
  counted as ``offsets_lost`` by the driver, so the driver reads.
- A batch that ``latest_offset`` did not just plan in this run (one replayed from the
  write-ahead log after a restart) has its offsets looked up on the driver first, as
  ``read`` does, so a loss is reported "in the logged range of the batch" either way.

``extra_columns="ignore"`` (the default) is split: a column a record has beyond the
schema is logged by the process that read it and is not counted in the driver's
``new_columns_ignored``. ``isolation.level`` needs nothing of the driver (librdkafka
leaves out aborted records itself), so both levels split.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from connectors.kafka.offsets import _kafka_offset
from connectors.kafka.records import _range_losses
from microstream.checkpoint.storage import Storage
from microstream.protocols import Offset, SourceContext

if TYPE_CHECKING:
    import polars as pl

    from connectors.kafka.client import TopicPartitionKey
    from connectors.kafka.records import _Loss
    from connectors.kafka.source import KafkaSource
    from connectors.kafka.source_spec import KafkaSourceSpec

__all__ = ["SPLIT_RECORDS", "KafkaSplit", "plan_kafka_splits", "split_ranges"]

SPLIT_RECORDS = 100_000
"""At most this many offsets per split: a partition with more in one batch is cut into
consecutive sub-ranges (about 10-30 MB of JSON records; a task reads and decodes one in
well under a second)."""

_UNUSED_STORAGE = "memory://microstream-kafka-split"
"""A split's reader never touches its source directory (only ``initial_offset`` does,
which a split never calls), so it gets one that is never written."""


@dataclass(frozen=True)
class KafkaSplit:
    """Offsets ``[first, end)`` of one topic-partition of a Kafka source's batch, read
    by one process.

    Examples
    --------
    >>> import polars as pl
    >>> from connectors.kafka.source_spec import KafkaSourceSpec
    >>> from microstream.testing.tansu import TansuBroker
    >>> with TansuBroker() as broker:
    ...     broker.create_topic("doc-split", partitions=2)
    ...     _ = broker.produce("doc-split", [{"id": n} for n in range(5)], partition=1)
    ...     spec = KafkaSourceSpec(
    ...         broker.bootstrap_servers, topic="doc-split", schema={"id": pl.Int64}
    ...     )
    ...     KafkaSplit(spec, "microstream-doc", "doc-split", 1, 1, 4).read()["id"].to_list()
    [1, 2, 3]
    """

    spec: KafkaSourceSpec
    group_id: str
    """The source's consumer group (the split's consumer never joins or commits it)."""
    topic: str
    partition: int
    first: int
    """The first offset read."""
    end: int
    """One past the last offset read (the batch's end position in the partition, or the
    start of the next sub-range)."""

    def read(self) -> pl.DataFrame:
        """The range's records, decoded, in offset order, as ``KafkaSource.read`` gives
        them for this share of its batch.

        Raises
        ------
        DataLossError
            Offsets of the range no longer exist (deleted by retention, a broker that
            lost its data): the topic, the partition and the lost offsets are named.
        SourceError
            A bad record (``on_bad_record="fail"``), or no records for ``retry_timeout``.
        SchemaMismatchError
            ``extra_columns="raise"`` or ``missing_columns="raise"`` and a record that
            does not fit.
        """
        reader = self._reader()
        try:
            records = reader._fetch({(self.topic, self.partition): (self.first, self.end)})
            return reader._decode(records)
        finally:
            reader.stop()

    def _reader(self) -> KafkaSource:
        """The runtime source of the spec, with this process's own consumer."""
        spec = _with_options(self.spec, {**self.spec.options, "group.id": self.group_id})
        context = SourceContext(index=0, storage=Storage(_UNUSED_STORAGE), query_id="split")
        return spec.build(context)


def _with_options(spec: KafkaSourceSpec, options: dict[str, object]) -> KafkaSourceSpec:
    """``spec`` with other librdkafka ``options`` (not part of the spec's identity)."""
    out = copy.copy(spec)
    object.__setattr__(out, "options", options)
    return out


def split_ranges(
    ranges: dict[TopicPartitionKey, tuple[int, int]], split_records: int = SPLIT_RECORDS
) -> list[tuple[TopicPartitionKey, int, int]]:
    """``ranges`` (``{tp: (first, end)}``) as ``(tp, first, end)`` sub-ranges of at most
    ``split_records`` offsets, by topic, partition and offset; empty ranges give none.

    Examples
    --------
    >>> split_ranges({("t", 1): (0, 5), ("t", 0): (3, 4), ("t", 2): (7, 7)}, 2)
    [(('t', 0), 3, 4), (('t', 1), 0, 2), (('t', 1), 2, 4), (('t', 1), 4, 5)]
    """
    out = []
    for tp in sorted(ranges):
        first, end = ranges[tp]
        out += [(tp, a, min(a + split_records, end)) for a in range(first, end, split_records)]
    return out


def plan_kafka_splits(
    source: KafkaSource, start: Offset, end: Offset, *, split_records: int = SPLIT_RECORDS
) -> list[KafkaSplit] | None:
    """The splits of ``source``'s batch ``(start, end]``, or None: the driver reads it
    (the module docstring says when).

    Raises
    ------
    DataLossError
        A batch replayed from the log whose offsets are no longer all in the partitions.

    Examples
    --------
    >>> import polars as pl
    >>> from connectors.kafka.source_spec import KafkaSourceSpec
    >>> from microstream.testing.tansu import TansuBroker
    >>> with TansuBroker() as broker:
    ...     broker.create_topic("doc-plan", partitions=3)
    ...     _ = broker.produce("doc-plan", [{"id": n} for n in range(5)], partition=0)
    ...     _ = broker.produce("doc-plan", [{"id": 9}], partition=2)
    ...     spec = KafkaSourceSpec(
    ...         broker.bootstrap_servers, topic="doc-plan", schema={"id": pl.Int64}
    ...     )
    ...     ctx = SourceContext(index=0, storage=Storage("memory://doc-plan"), query_id="q")
    ...     source = spec.build(ctx)
    ...     start = source.initial_offset()
    ...     end = source.latest_offset(start, rate_limited=False)
    ...     splits = plan_kafka_splits(source, start, end, split_records=3)
    ...     rows = [s.read()["id"].to_list() for s in splits]
    ...     source.stop()
    >>> [(s.partition, s.first, s.end) for s in splits], rows
    ([(0, 0, 3), (0, 3, 5), (2, 0, 1)], [[0, 1, 2], [3, 4], [9]])
    """
    spec = source.spec
    if spec.on_bad_record != "fail" or not spec.fail_on_data_loss:
        return None
    begin, stop = _kafka_offset(start, "read from"), _kafka_offset(end, "read to")
    ranges = {
        tp: (stop.read_from(tp, begin), pos)
        for tp, pos in stop.positions().items()
        if stop.read_from(tp, begin) < pos
    }
    if not ranges:
        return []
    if source._planned != (begin, stop):
        _check_replayed(source, ranges)
    return [
        KafkaSplit(spec, source.group_id, tp[0], tp[1], a, b)
        for tp, a, b in split_ranges(ranges, split_records)
    ]


def _check_replayed(source: KafkaSource, ranges: dict[TopicPartitionKey, tuple[int, int]]) -> None:
    """What ``read`` checks of a batch it did not plan: its offsets are all still there."""

    def attempt(timeout: float) -> tuple[None, list[_Loss]]:
        return None, _range_losses(ranges, source._fetch_bounds(timeout))

    _, losses = source._until_stable("look up the offsets of the batch", attempt)
    if losses:
        raise source._data_loss(losses, "in the logged range of the batch")
