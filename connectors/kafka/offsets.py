"""The Kafka source's offset: the next position of every topic-partition."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from connectors.kafka.client import TopicPartitionKey
from microstream.exceptions import (
    OffsetError,
)
from microstream.protocols import Offset

if TYPE_CHECKING:
    pass


# -- offsets ---------------------------------------------------------------------------------------


class KafkaOffset(Offset):
    """The position of every topic-partition: the next offset to read.

    A batch ``(start, end]`` reads offsets ``start[tp] .. end[tp] - 1`` of
    each partition ``tp`` of ``end``; a partition absent from ``start`` (new
    since) is read from offset 0.

    Attributes
    ----------
    topics
        ``{topic: {partition: next offset}}``.
    resets
        Only in the end offset of a batch that followed a data loss with
        ``fail_on_data_loss=False``: ``{topic: {partition: offset}}`` of
        partitions whose log was replaced (the broker lost its data, the topic
        was recreated); the batch reads them from that offset of the new log.
    epoch
        How many such resets happened; an offset with a higher epoch follows
        one with a lower epoch even where its positions are lower.

    Examples
    --------
    >>> a = KafkaOffset(topics={"t": {0: 5, 1: 2}})
    >>> b = KafkaOffset(topics={"t": {0: 7, 1: 2, 2: 4}})
    >>> b.follows_or_equals(a), a.follows_or_equals(b)
    (True, False)
    >>> b.distance(a)  # 2 more in partition 0, 4 in the new partition 2
    6
    """

    topics: dict[str, dict[int, int]] = Field(default_factory=dict)
    resets: dict[str, dict[int, int]] = Field(default_factory=dict)
    epoch: int = Field(default=0, ge=0)

    def positions(self) -> dict[TopicPartitionKey, int]:
        """``{(topic, partition): next offset}``."""
        return {(t, p): pos for t, parts in self.topics.items() for p, pos in parts.items()}

    def read_from(self, tp: TopicPartitionKey, start: KafkaOffset) -> int:
        """Where a batch from ``start`` to this offset begins reading partition ``tp``."""
        if self.epoch > start.epoch:
            reset = self.resets.get(tp[0], {}).get(tp[1])
            if reset is not None:
                return reset
        return start.topics.get(tp[0], {}).get(tp[1], 0)

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other`` in every partition of ``other``."""
        start = _kafka_offset(other, "compare with")
        if self.epoch != start.epoch:
            return self.epoch > start.epoch
        mine = self.positions()
        return all(tp in mine and mine[tp] >= pos for tp, pos in start.positions().items())

    def distance(self, other: Offset) -> int | None:
        """Offsets from ``other`` to here, summed over partitions."""
        start = _kafka_offset(other, "measure from")
        return sum(max(0, pos - self.read_from(tp, start)) for tp, pos in self.positions().items())


def _kafka_offset(offset: Offset, action: str) -> KafkaOffset:
    if not isinstance(offset, KafkaOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a KafkaOffset"
        raise OffsetError(msg)
    return offset


def _nest(positions: Mapping[TopicPartitionKey, int]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for (t, p), pos in sorted(positions.items()):
        out.setdefault(t, {})[p] = pos
    return out
