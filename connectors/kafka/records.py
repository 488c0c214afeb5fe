"""What the Kafka source handles between look-ups: partition bounds and losses, the cursor
of each assigned partition, and the records of a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import polars as pl

from connectors.kafka.client import (
    TopicPartitionKey,
)

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message


class _Bounds(NamedTuple):
    low: int
    """The earliest offset still in the partition."""
    high: int
    """The end offset (last stable offset under read_committed)."""


class _Loss(NamedTuple):
    tp: TopicPartitionKey
    first: int
    """The first offset lost."""
    end: int | None
    """One past the last offset lost; None when unknown."""
    resume: int | None
    """Where reading continues in this partition; None: the partition is gone."""
    replaced: bool
    """Whether the partition's log was replaced (its end is below the position)."""
    why: str

    def lost(self) -> int:
        """How many offsets are known to be lost (0 when the end is unknown)."""
        return 0 if self.end is None else max(0, self.end - self.first)

    def describe(self) -> str:
        t, p = self.tp
        span = f"[{self.first}, {self.end})" if self.end is not None else f"from {self.first} on"
        return f"topic {t!r} partition {p}: offsets {span} are lost ({self.why})"


class _Cursor:
    """One assigned partition: records consumed and not yet read by a batch.

    ``stash`` holds the partition's records from offset ``start`` up to
    ``next`` (exclusive; offsets may have gaps, e.g. transaction markers), in
    offset order; the consumer delivers the partition's records from ``next``
    on (once assigned again, if ``detached``).
    """

    __slots__ = ("_offsets", "detached", "next", "start", "stash")

    def __init__(self, start: int) -> None:
        self.start = start
        self.next = start
        self.stash: list[Message] = []
        self._offsets: list[np.ndarray] = []
        self.detached = False
        """Unassigned while its stash is full; assigned again at ``next``."""

    def add(self, messages: list[Message], offsets: np.ndarray) -> None:
        """Records the consumer delivered, in offset order."""
        if offsets[0] < self.next:  # (never seen: a record delivered twice)
            keep = np.flatnonzero(offsets >= self.next)
            if not len(keep):
                return
            messages, offsets = [messages[i] for i in keep.tolist()], offsets[keep]
        self.stash.extend(messages)
        self._offsets.append(offsets)
        self.next = int(offsets[-1]) + 1

    def reached(self, offset: int) -> None:
        """The end of the partition was at ``offset``: nothing below it is left to deliver."""
        self.next = max(self.next, offset)

    def _flat(self) -> np.ndarray:
        if len(self._offsets) != 1:
            self._offsets = [
                np.concatenate(self._offsets) if self._offsets else np.empty(0, np.int64)
            ]
        return self._offsets[0]

    def drop_before(self, offset: int) -> None:
        """Forget the records below ``offset``."""
        if offset > self.start:
            offsets = self._flat()
            k = int(np.searchsorted(offsets, offset))
            del self.stash[:k]
            self._offsets = [offsets[k:]]
            self.start = offset

    def take_until(self, end: int) -> tuple[list[Message], np.ndarray]:
        """The records below ``end``, removed; the stash then starts at ``end``."""
        offsets = self._flat()
        k = int(np.searchsorted(offsets, end))
        taken, self.stash = self.stash[:k], self.stash[k:]
        self._offsets = [offsets[k:]]
        self.start = max(self.start, end)
        return taken, offsets[:k]


class _Records(NamedTuple):
    """The records of a batch, ordered by topic, partition and offset, with those columns."""

    messages: list[Message]
    topics: pl.Series
    partitions: pl.Series
    offsets: pl.Series

    @staticmethod
    def join(segments: Sequence[tuple[TopicPartitionKey, list[Message], np.ndarray]]) -> _Records:
        """The records of each partition's segment, one after the other."""
        messages: list[Message] = []
        for _, part, _ in segments:
            messages.extend(part)
        lengths = np.array([len(part) for _, part, _ in segments], dtype=np.int64)
        which = pl.Series(np.repeat(np.arange(len(segments), dtype=np.int64), lengths))
        return _Records(
            messages,
            pl.Series("topic", [t for (t, _), _, _ in segments], pl.String).gather(which),
            pl.Series("partition", [p for (_, p), _, _ in segments], pl.Int32).gather(which),
            pl.Series(
                "offset",
                np.concatenate([o for _, _, o in segments]) if segments else [],
                pl.Int64,
            ),
        )

    @staticmethod
    def empty() -> _Records:
        return _Records.join([])


def _key_of(message: Message) -> TopicPartitionKey:
    return (str(message.topic()), int(message.partition() or 0))


def _offset_of(message: Message) -> int:
    offset = message.offset()
    return -1 if offset is None else offset


def _headers_of(message: Message) -> list[tuple[str, Any]]:
    headers = message.headers()
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def _retryable(text: str) -> Exception:
    """A transient error raised by the source itself (a timeout-like condition)."""
    return TimeoutError(text)


def _as_exception(error: KafkaError) -> Exception:
    from confluent_kafka import KafkaException

    return KafkaException(error)


def _range_losses(
    ranges: Mapping[TopicPartitionKey, tuple[int, int]], bounds: Mapping[TopicPartitionKey, _Bounds]
) -> list[_Loss]:
    """Offsets of the logged ``ranges`` that the partitions no longer hold."""
    losses = []
    for tp, (a, b) in ranges.items():
        bound = bounds.get(tp)
        if bound is None:
            why = "the partition no longer exists: the topic was deleted or the broker lost it"
            losses.append(_Loss(tp, a, b, None, True, why))
            continue
        if bound.low > a:
            why = (
                f"the earliest offset still in the partition is {bound.low} (retention or deletion)"
            )
            losses.append(_Loss(tp, a, min(bound.low, b), min(bound.low, b), False, why))
        if bound.high < b:
            first = max(a, bound.high, bound.low)
            why = (
                f"the partition now ends at offset {bound.high}: its log was truncated or "
                "replaced (a broker that lost its data, a topic recreated)"
            )
            if first < b:
                losses.append(_Loss(tp, first, b, None, True, why))
    return losses


def _apportion(
    available: Mapping[TopicPartitionKey, int], limit: int
) -> dict[TopicPartitionKey, int]:
    """Split ``limit`` offsets across partitions in proportion to what each has.

    Examples
    --------
    >>> _apportion({("t", 0): 10, ("t", 1): 30}, 8)
    {('t', 0): 2, ('t', 1): 6}
    >>> _apportion({("t", 0): 1, ("t", 1): 1, ("t", 2): 1}, 2)
    {('t', 0): 1, ('t', 1): 1, ('t', 2): 0}
    """
    total = sum(available.values())
    if total <= limit:
        return dict(available)
    share = {tp: limit * n // total for tp, n in available.items()}
    left = limit - sum(share.values())
    by_remainder = sorted(available, key=lambda tp: (-(limit * available[tp] % total), tp))
    for tp in by_remainder[:left]:
        share[tp] += 1
    return share
