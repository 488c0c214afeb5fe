"""Positions in a Kinesis stream, and which shards a batch may read (parents before children).

An offset holds, per shard, the sequence number of the last record read and whether
the shard is *exhausted* (closed by a split or merge and read to its end). Kinesis
sequence numbers are decimal strings, increasing within a shard; they are compared
as integers.

When a shard is split or merged it is closed and one or two children take over its
hash keys; a record with a given partition key is in the parent until the reshard and
in a child after it. Reading a child only after its parents are exhausted keeps the
records of a partition key in order, as the Kinesis Client Library does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from microstream.exceptions import OffsetError
from microstream.protocols import Offset

__all__ = ["KinesisOffset", "ShardInfo", "ShardPosition", "readable_shards"]


class ShardPosition(BaseModel):
    """Where a query is in one shard.

    Attributes
    ----------
    sequence
        The sequence number of the last record read; None: none yet (the shard is
        read from the query's starting position).
    records
        How many records of the shard the query has read: a replay of a range must
        find exactly the difference (fewer means records were trimmed meanwhile).
    exhausted
        The shard is closed and every record of it was read.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sequence: str | None = None
    records: int = 0
    exhausted: bool = False


class KinesisOffset(Offset):
    """The position in every shard a query has read from (``offsets/N`` of the WAL).

    Examples
    --------
    >>> a = KinesisOffset(shards={"shardId-0": ShardPosition(sequence="5", records=5)})
    >>> b = KinesisOffset(shards={"shardId-0": ShardPosition(sequence="12", records=12)})
    >>> b.follows_or_equals(a), a.follows_or_equals(b), b.distance(a)
    (True, False, 7)
    """

    shards: dict[str, ShardPosition] = {}

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether every shard of ``other`` is at or after its position there."""
        if not isinstance(other, KinesisOffset):
            msg = f"cannot compare a KinesisOffset with a {type(other).__name__} ({other!r})"
            raise OffsetError(msg)
        for shard, before in other.shards.items():
            now = self.shards.get(shard)
            if now is None or (before.exhausted and not now.exhausted):
                return False
            if before.sequence is not None and (
                now.sequence is None or int(now.sequence) < int(before.sequence)
            ):
                return False
        return True

    def distance(self, other: Offset) -> int | None:
        """Records between ``other`` and this offset."""
        if not isinstance(other, KinesisOffset):
            return None
        before = sum(p.records for p in other.shards.values())
        return sum(p.records for p in self.shards.values()) - before


class ShardInfo(BaseModel):
    """One shard as ``ListShards`` describes it."""

    model_config = ConfigDict(frozen=True)

    shard_id: str
    parents: tuple[str, ...] = ()
    ending_sequence: str | None = None
    """Set when the shard is closed (split or merged): its last sequence number."""

    @classmethod
    def from_listing(cls, shard: Mapping[str, Any]) -> ShardInfo:
        """From one entry of ``ListShards``' ``Shards``."""
        parents = tuple(
            p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p
        )
        ending = shard.get("SequenceNumberRange", {}).get("EndingSequenceNumber")
        return cls(shard_id=shard["ShardId"], parents=parents, ending_sequence=ending)


def readable_shards(listing: Sequence[ShardInfo], position: KinesisOffset) -> list[str]:
    """The shards a batch starting at ``position`` may read, in listing order.

    A shard is readable when it is not exhausted and each of its parents is exhausted
    in ``position`` or no longer listed (expired by retention, or created before the
    stream's oldest shard the query saw). A listed parent the query has not exhausted
    holds the older records of the child's keys, so the child waits.

    Examples
    --------
    A split of shard 0 into 1 and 2, then a merge of 1 and 2 into 3:

    >>> listing = [
    ...     ShardInfo(shard_id="s0", ending_sequence="9"),
    ...     ShardInfo(shard_id="s1", parents=("s0",), ending_sequence="20"),
    ...     ShardInfo(shard_id="s2", parents=("s0",), ending_sequence="21"),
    ...     ShardInfo(shard_id="s3", parents=("s1", "s2")),
    ... ]
    >>> readable_shards(listing, KinesisOffset())
    ['s0']
    >>> done = ShardPosition(sequence="9", exhausted=True)
    >>> readable_shards(listing, KinesisOffset(shards={"s0": done}))
    ['s1', 's2']
    >>> readable_shards(listing, KinesisOffset(shards={"s0": done, "s1": done}))
    ['s2']
    >>> readable_shards(listing, KinesisOffset(shards={"s0": done, "s1": done, "s2": done}))
    ['s3']
    >>> readable_shards(listing[1:], KinesisOffset())  # s0 expired: its children are roots
    ['s1', 's2']
    """
    listed = {shard.shard_id for shard in listing}
    readable = []
    for shard in listing:
        if position.shards.get(shard.shard_id, ShardPosition()).exhausted:
            continue
        if all(
            parent not in listed or position.shards.get(parent, ShardPosition()).exhausted
            for parent in shard.parents
        ):
            readable.append(shard.shard_id)
    return readable
