"""``ms.scan_kinesis``: the records of an Amazon Kinesis data stream, per-shard positions in the WAL.

Planning a batch (``latest_offset``) reads the new records of every readable shard
(:func:`~connectors.kinesis.shards.readable_shards`: children after their parents) up
to the rate limit, and logs, per shard, the sequence number of the last record taken
and the count of records read so far. ``read(start, end)`` decodes the records planning
kept; a re-run after a crash reads each shard again from just after ``start``'s
sequence number up to and including ``end``'s, and checks it found exactly the logged
number of records: a range trimmed by the stream's retention (or a stream deleted and
created again) is a :class:`~microstream.exceptions.DataLossError` naming the shard and
the range. Nothing is acknowledged in Kinesis: positions live in the checkpoint only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import polars as pl
from pydantic import BaseModel, ConfigDict, ValidationError

from connectors._kafka_codecs import PayloadDecoder
from connectors._payload_formats import payload_decoder
from connectors.kinesis.client import error_code, is_missing, make_client, retrying
from connectors.kinesis.shards import KinesisOffset, ShardInfo, ShardPosition, readable_shards
from microstream.exceptions import DataLossError, OffsetError, PlanError, SourceError
from microstream.protocols import Offset, SourceContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from microstream._typing import BadRecordPolicy, KafkaFormat
    from microstream.protocols import SideOutputTarget

__all__ = ["KinesisSource", "KinesisSourceSpec"]

METADATA_SCHEMA = pl.Schema(
    {
        "partition_key": pl.String(),
        "shard_id": pl.String(),
        "sequence_number": pl.String(),
        "arrival_time": pl.Datetime("ms", "UTC"),
    }
)
DEAD_LETTER_SCHEMA = pl.Schema(
    {
        "shard_id": pl.String(),
        "sequence_number": pl.String(),
        "partition_key": pl.String(),
        "value": pl.Binary(),
        "reason": pl.String(),
    }
)
"""Columns of a dead-letter row; the engine appends ``batch_id``."""

_GET_LIMIT = 10_000  # the most GetRecords returns in one call
_INITIAL_FILE = "initial.json"


class _Initial(BaseModel):
    """Where shards the query has not read yet start (``sources/<n>/initial.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at_timestamp_ms: int | None = None
    """None: each shard's oldest record (``TRIM_HORIZON``); else ``AT_TIMESTAMP``."""


class _Record(NamedTuple):
    sequence: str
    data: bytes
    partition_key: str
    arrival_ms: int | None


@dataclass(frozen=True, init=False)
class KinesisSourceSpec:
    """The records of an Amazon Kinesis data stream, decoded into columns.

    Parameters
    ----------
    stream
        The stream's name.
    format
        How record data is decoded: ``"json"``, ``"csv"``, ``"avro"``,
        ``"protobuf"`` or ``"raw"`` (a Binary ``value`` column), with the
        Kafka source's codecs (bulk decoding, bad records found by bisection).
    schema
        The data's columns (name to polars dtype), for ``"avro"`` an Avro
        record schema, for ``"protobuf"`` a generated message class or
        ``{"descriptor_set": <file>, "message": <full name>}``. Required
        except for ``"raw"``.
    starting_position
        Where a new query starts in each shard: ``"trim_horizon"`` (default:
        the oldest record kept), ``"latest"`` (records that arrive after the
        query first starts) or a datetime (records that arrived at or after
        it, naive = UTC). Resolved on the first start and kept in the
        checkpoint; shards created later (by a split or merge) start there
        too.
    max_records_per_trigger
        About this many records per batch, split evenly over the shards being
        read (at least one each; not applied to ``Trigger.once()``).
    include_metadata
        Add ``partition_key``, ``shard_id``, ``sequence_number`` (String) and
        ``arrival_time`` (Datetime ms UTC, Kinesis' approximate arrival).
    on_bad_record
        Data that does not decode: ``"fail"``, ``"skip"`` or ``"dead_letter"``.
    dead_letter
        With ``"dead_letter"``: a memory table name or a function
        ``(df, batch_id)`` getting ``shard_id``, ``sequence_number``,
        ``partition_key``, ``value``, ``reason``.
    retry_timeout
        How long connection errors, timeouts, throttling and 5xx replies are
        retried (backoff 50 ms doubling to 1 s) before the query fails.
    options
        Keyword arguments of ``boto3.client("kinesis", ...)``: ``region_name``,
        ``endpoint_url``, credentials, a botocore ``config``. Never shown, not
        part of the query's identity. Without them boto3 reads the ``AWS_*``
        environment and ``~/.aws``.

    Examples
    --------
    >>> spec = KinesisSourceSpec("clicks", schema={"user": pl.Int64}, include_metadata=True)
    >>> spec.describe(), list(spec.schema)
    ('KinesisSource[clicks]', ['user', 'partition_key', 'shard_id', 'sequence_number', 'arrival_time'])
    """

    kind: ClassVar[str] = "kinesis"

    stream: str
    format: KafkaFormat = "json"
    schema_: Mapping[str, Any] | str | type | None = field(default=None, repr=False)
    starting_position: str | datetime = "trim_horizon"
    max_records_per_trigger: int | None = None
    include_metadata: bool = False
    on_bad_record: BadRecordPolicy = "fail"
    dead_letter: SideOutputTarget | None = field(default=None, compare=False)
    retry_timeout: str | timedelta | float = "30s"
    options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __init__(
        self,
        stream: str,
        *,
        format: KafkaFormat = "json",
        schema: Mapping[str, Any] | str | type | None = None,
        starting_position: str | datetime = "trim_horizon",
        max_records_per_trigger: int | None = None,
        include_metadata: bool = False,
        on_bad_record: BadRecordPolicy = "fail",
        dead_letter: SideOutputTarget | None = None,
        retry_timeout: str | timedelta | float = "30s",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(stream, str) or not stream:
            msg = f"stream must be a stream name; got {stream!r}"
            raise ValueError(msg)
        if not isinstance(starting_position, datetime) and starting_position not in (
            "trim_horizon",
            "latest",
        ):
            msg = (
                "starting_position must be 'trim_horizon', 'latest' or a datetime; got "
                f"{starting_position!r}"
            )
            raise ValueError(msg)
        if max_records_per_trigger is not None and (
            isinstance(max_records_per_trigger, bool)
            or not isinstance(max_records_per_trigger, int)
            or max_records_per_trigger < 1
        ):
            msg = f"max_records_per_trigger must be a positive integer; got {max_records_per_trigger!r}"
            raise ValueError(msg)
        if on_bad_record not in ("fail", "skip", "dead_letter"):
            msg = f"on_bad_record must be 'fail', 'skip' or 'dead_letter'; got {on_bad_record!r}"
            raise ValueError(msg)
        if (on_bad_record == "dead_letter") != (dead_letter is not None):
            msg = "dead_letter= is needed with on_bad_record='dead_letter', and only with it"
            raise ValueError(msg)
        parse_duration(retry_timeout, name="retry_timeout")
        decoder = payload_decoder(format, schema)
        if include_metadata:
            clash = sorted(set(decoder.schema) & set(METADATA_SCHEMA))
            if clash:
                msg = f"include_metadata=True adds {clash}, which the data's schema has too"
                raise PlanError(msg)
        for name, value in (
            ("stream", stream),
            ("format", format),
            ("schema_", schema),
            ("starting_position", starting_position),
            ("max_records_per_trigger", max_records_per_trigger),
            ("include_metadata", include_metadata),
            ("on_bad_record", on_bad_record),
            ("dead_letter", dead_letter),
            ("retry_timeout", retry_timeout),
            ("options", None if options is None else dict(options)),
        ):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_decoder", decoder)

    def __hash__(self) -> int:
        return hash((self.stream, self.format, str(self.schema_)))

    @property
    def decoder(self) -> PayloadDecoder:
        """The payload decoder of ``format`` and ``schema``."""
        decoder: PayloadDecoder = self.__dict__["_decoder"]
        return decoder

    @property
    def schema(self) -> pl.Schema:
        """The decoded columns, then the metadata columns if asked for."""
        columns = dict(self.decoder.schema)
        if self.include_metadata:
            columns.update(METADATA_SCHEMA)
        return pl.Schema(columns)

    @property
    def retry_timeout_s(self) -> float:
        """``retry_timeout`` in seconds."""
        return parse_duration(self.retry_timeout).total_seconds()

    def identity(self) -> dict[str, Any]:
        """The stream and the format: what a checkpoint's positions mean."""
        return {"stream": self.stream, "format": self.format}

    def describe(self) -> str:
        """One line: ``KinesisSource[stream]``."""
        return f"KinesisSource[{self.stream}]"

    def build(self, context: SourceContext) -> KinesisSource:
        """The runtime source (checks that the stream exists)."""
        return KinesisSource(self, context)


class KinesisSource:
    """The runtime side of :class:`KinesisSourceSpec` (see the module docstring)."""

    def __init__(self, spec: KinesisSourceSpec, context: SourceContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        self._logger = context.logger
        self._side_output = context.side_output
        self._client = make_client(spec.options)
        self._counts: dict[str, int] = {}
        # records planning read, kept for read(): shard -> (after sequence, records)
        self._planned: dict[str, tuple[str | None, list[_Record]]] = {}
        self._cap_ms: int | None = None  # available-now: records that arrived by then
        if spec.dead_letter is not None:
            self._side_output.declare(spec.dead_letter, DEAD_LETTER_SCHEMA)
        storage = context.storage
        if storage.exists(_INITIAL_FILE):
            self._initial = storage.read_model(_INITIAL_FILE, _Initial)
        else:
            self._list_shards(first=True)  # the stream must exist before anything is kept
            start = spec.starting_position
            if start == "trim_horizon":
                initial = _Initial()
            elif start == "latest":
                initial = _Initial(at_timestamp_ms=time.time_ns() // 1_000_000)
            else:
                assert isinstance(start, datetime)
                aware = start if start.tzinfo is not None else start.replace(tzinfo=timezone.utc)
                initial = _Initial(at_timestamp_ms=int(aware.timestamp() * 1000))
            storage.write_model(_INITIAL_FILE, initial, overwrite=False)
            self._initial = initial

    # -- calls to Kinesis ---------------------------------------------------------------------

    def _call(self, what: str, call: Any, **kwargs: Any) -> Any:
        return retrying(
            lambda: call(**kwargs),
            retry_timeout_s=self.spec.retry_timeout_s,
            what=f"{self.description}: {what}",
            error=SourceError,
            on_retry=lambda why: self._logger.warning(
                "%s: %s: %s; retrying", self.description, what, why
            ),
        )

    def _list_shards(self, *, first: bool = False) -> list[ShardInfo]:
        shards: list[ShardInfo] = []
        kwargs: dict[str, Any] = {"StreamName": self.spec.stream}
        try:
            while True:
                page = self._call("listing shards", self._client.list_shards, **kwargs)
                shards.extend(ShardInfo.from_listing(s) for s in page["Shards"])
                token = page.get("NextToken")
                if not token:
                    return shards
                kwargs = {"NextToken": token}
        except Exception as exc:
            if not is_missing(exc):
                raise
            if first:
                msg = f"{self.description}: stream {self.spec.stream!r} does not exist: create it first"
                raise SourceError(msg) from None
            msg = (
                f"{self.description}: stream {self.spec.stream!r} does not exist any more; the "
                "records this query has not read are lost. Start over with a new checkpoint"
            )
            raise DataLossError(msg) from None

    def _iterator(self, shard: str, after: str | None) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.spec.stream, "ShardId": shard}
        if after is not None:
            kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=after)
        elif self._initial.at_timestamp_ms is None:
            kwargs.update(ShardIteratorType="TRIM_HORIZON")
        else:
            kwargs.update(
                ShardIteratorType="AT_TIMESTAMP", Timestamp=self._initial.at_timestamp_ms / 1000
            )
        try:
            reply = self._call(f"opening shard {shard}", self._client.get_shard_iterator, **kwargs)
        except Exception as exc:
            if is_missing(exc):
                self._list_shards()  # names a deleted stream as data loss
                msg = (
                    f"{self.description}: shard {shard} is gone (expired by the stream's "
                    "retention) while this query still had records of it to read: they are lost"
                )
                raise DataLossError(msg) from None
            raise
        iterator: str = reply["ShardIterator"]
        return iterator

    def _get(self, shard: str, iterator: str, after: str | None, limit: int) -> dict[str, Any]:
        """One GetRecords call; an expired iterator is opened again after ``after``."""
        try:
            reply: dict[str, Any] = self._call(
                f"reading shard {shard}",
                self._client.get_records,
                ShardIterator=iterator,
                Limit=limit,
            )
        except Exception as exc:
            if error_code(exc) != "ExpiredIteratorException":
                raise
            fresh = self._iterator(shard, after)
            reply = self._call(
                f"reading shard {shard}", self._client.get_records, ShardIterator=fresh, Limit=limit
            )
        return reply

    def _fetch(
        self, info: ShardInfo, position: ShardPosition, limit: int | None
    ) -> tuple[list[_Record], bool]:
        """The new records of a shard after ``position`` (at most ``limit``) and whether
        the shard is exhausted: closed, and read to its end."""
        records: list[_Record] = []
        after = position.sequence
        iterator = self._iterator(info.shard_id, after)
        while limit is None or len(records) < limit:
            ask = _GET_LIMIT if limit is None else min(_GET_LIMIT, limit - len(records))
            reply = self._get(info.shard_id, iterator, after, ask)
            batch = [_record(r) for r in reply["Records"]]
            if self._cap_ms is not None:
                cap = self._cap_ms
                kept = [r for r in batch if r.arrival_ms is None or r.arrival_ms <= cap]
                if len(kept) < len(batch):  # the rest arrived after available-now began
                    records.extend(kept)
                    return records, False
            records.extend(batch)
            if batch:
                after = batch[-1].sequence
            following = reply.get("NextShardIterator")
            if following is None:
                return records, True  # a closed shard read to its end
            closed = info.ending_sequence is not None
            if closed and after is not None and int(after) >= int(info.ending_sequence or 0):
                return records, True
            if reply.get("MillisBehindLatest", 0) == 0:  # caught up with the shard's tip
                return records, closed and not batch
            iterator = following
        return records, False

    # -- Source -------------------------------------------------------------------------------

    def initial_offset(self) -> KinesisOffset:
        """No shard read yet."""
        return KinesisOffset()

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> KinesisOffset:
        """Read the new records of every readable shard (children after exhausted parents),
        keep them for :meth:`read`, and return the positions after them."""
        begin = _kinesis_offset(start, "start a batch at")
        listing = self._list_shards()
        by_id = {info.shard_id: info for info in listing}
        for shard, position in begin.shards.items():
            if shard not in by_id and not position.exhausted:
                msg = (
                    f"{self.description}: shard {shard} is no longer listed (expired by the "
                    f"stream's retention) but this query read it only up to sequence number "
                    f"{position.sequence}: its later records are lost. Start over with a new "
                    "checkpoint, or keep the stream's retention longer than the query may lag"
                )
                raise DataLossError(msg)
        limit = self.spec.max_records_per_trigger if rate_limited else None
        remaining = limit
        end = dict(begin.shards)
        planned: dict[str, tuple[str | None, list[_Record]]] = {}
        visited: set[str] = set()
        while remaining is None or remaining > 0:
            todo = [
                s for s in readable_shards(listing, KinesisOffset(shards=end)) if s not in visited
            ]
            if not todo:
                break
            share = None if remaining is None else max(1, remaining // len(todo))
            for shard in todo:
                visited.add(shard)
                position = end.get(shard, ShardPosition())
                take = None if remaining is None or share is None else min(share, remaining)
                if take == 0:
                    break
                records, exhausted = self._fetch(by_id[shard], position, take)
                if records:
                    planned[shard] = (position.sequence, records)
                if records or exhausted:
                    end[shard] = ShardPosition(
                        sequence=records[-1].sequence if records else position.sequence,
                        records=position.records + len(records),
                        exhausted=exhausted,
                    )
                if remaining is not None:
                    remaining -= len(records)
        self._planned = planned
        return KinesisOffset(shards=end)

    def prepare_for_available_now(self) -> None:
        """Fix the end: records that arrived by now (Kinesis' approximate arrival time)."""
        self._cap_ms = time.time_ns() // 1_000_000

    def lag(self, end: Offset) -> int | None:
        """Not known without reading the stream (Kinesis has no end offsets)."""
        return None

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The records in ``(start, end]``, shard by shard (in shard id order: parents first)."""
        low = _kinesis_offset(start, "read from")
        high = _kinesis_offset(end, "read to")
        parts: list[tuple[str, list[_Record]]] = []
        for shard in sorted(high.shards):
            stop = high.shards[shard]
            first = low.shards.get(shard, ShardPosition())
            expected = stop.records - first.records
            if expected < 0:
                msg = f"{self.description}: cannot read shard {shard} backwards ({first} to {stop})"
                raise OffsetError(msg)
            if expected == 0:
                continue
            kept = self._planned.get(shard)
            if kept is not None and kept[0] == first.sequence and len(kept[1]) == expected:
                parts.append((shard, kept[1]))
            else:
                parts.append((shard, self._reread(shard, first, stop, expected)))
        return self._decode(parts)

    def _reread(
        self, shard: str, first: ShardPosition, stop: ShardPosition, expected: int
    ) -> list[_Record]:
        """A logged range again: the records after ``first`` up to ``stop``'s sequence."""
        assert stop.sequence is not None
        upto = int(stop.sequence)
        records: list[_Record] = []
        after = first.sequence
        iterator = self._iterator(shard, after)
        while True:
            reply = self._get(shard, iterator, after, _GET_LIMIT)
            batch = [_record(r) for r in reply["Records"]]
            records.extend(r for r in batch if int(r.sequence) <= upto)
            if batch:
                after = batch[-1].sequence
            reached = bool(batch) and int(batch[-1].sequence) >= upto
            following = reply.get("NextShardIterator")
            if (
                reached
                or following is None
                or (not batch and reply.get("MillisBehindLatest", 0) == 0)
            ):
                break
            iterator = following
        if len(records) != expected or not records or records[-1].sequence != stop.sequence:
            msg = (
                f"{self.description}: shard {shard}, records after sequence number "
                f"{first.sequence or '(the start)'} up to {stop.sequence}: the log says "
                f"{expected} records, the stream now has {len(records)} of them (trimmed by the "
                "stream's retention, or the stream was created again): the range cannot be "
                "replayed. Start over with a new checkpoint, or keep the stream's retention "
                "longer than the query may lag"
            )
            raise DataLossError(msg)
        return records

    def _decode(self, parts: list[tuple[str, list[_Record]]]) -> pl.DataFrame:
        spec = self.spec
        records = [r for _, rs in parts for r in rs]
        shards = [shard for shard, rs in parts for _ in rs]
        decoded = spec.decoder.decode([r.data for r in records])
        meta = pl.DataFrame(
            {
                "partition_key": [r.partition_key for r in records],
                "shard_id": shards,
                "sequence_number": [r.sequence for r in records],
                "arrival_time": pl.Series([r.arrival_ms for r in records], dtype=pl.Int64)
                .cast(pl.Datetime("ms"))
                .dt.replace_time_zone("UTC"),
            },
            schema=METADATA_SCHEMA,
        )
        if decoded.bad:
            self._bad_records(decoded.bad, records, shards)
        if decoded.index is not None:
            meta = meta[decoded.index]
        if not spec.include_metadata:
            return decoded.frame.select(spec.schema.names())
        return pl.concat([decoded.frame, meta], how="horizontal").select(spec.schema.names())

    def _bad_records(
        self, bad: list[tuple[int, str]], records: list[_Record], shards: list[str]
    ) -> None:
        spec = self.spec
        first, why = bad[0]
        where = f"shard {shards[first]} sequence number {records[first].sequence}"
        if spec.on_bad_record == "fail":
            more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
            msg = (
                f"{self.description}: bad record at {where}: {why}{more}. Fix the producer, or "
                "pass on_bad_record='skip' or 'dead_letter'"
            )
            raise SourceError(msg)
        if spec.on_bad_record == "skip":
            self._count("bad_records_skipped", len(bad))
            self._logger.warning(
                "%s: skipped %d bad record(s); the first at %s: %s",
                self.description,
                len(bad),
                where,
                why,
            )
            return
        dead = pl.DataFrame(
            {
                "shard_id": [shards[i] for i, _ in bad],
                "sequence_number": [records[i].sequence for i, _ in bad],
                "partition_key": [records[i].partition_key for i, _ in bad],
                "value": [records[i].data for i, _ in bad],
                "reason": [reason for _, reason in bad],
            },
            schema=DEAD_LETTER_SCHEMA,
        )
        assert spec.dead_letter is not None
        self._side_output.emit(spec.dead_letter, dead)
        self._count("bad_records_dead_lettered", len(bad))

    def _count(self, name: str, n: int) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    def metrics(self) -> dict[str, int]:
        """Counts since the last call: ``bad_records_skipped``, ``bad_records_dead_lettered``."""
        counts, self._counts = self._counts, {}
        return counts

    def parse_offset(self, data: dict[str, Any]) -> KinesisOffset:
        """A :class:`KinesisOffset` from its JSON form in the write-ahead log."""
        try:
            return KinesisOffset.model_validate(data)
        except ValidationError as exc:
            msg = (
                f"{self.description}: {data!r} is not a Kinesis offset (expected "
                f"{{'shards': {{shard id: {{'sequence': ..., 'records': ..., 'exhausted': ...}}}}}}): "
                f"{exc.errors()[0]['msg']}"
            )
            raise OffsetError(msg) from None

    def commit(self, end: Offset) -> None:
        """Nothing to acknowledge: positions live in the checkpoint."""
        self._planned = {}

    def stop(self) -> None:
        """Close the client's connections."""
        self._client.close()


def _record(raw: Mapping[str, Any]) -> _Record:
    arrival = raw.get("ApproximateArrivalTimestamp")
    return _Record(
        sequence=str(raw["SequenceNumber"]),
        data=bytes(raw["Data"]),
        partition_key=str(raw.get("PartitionKey", "")),
        arrival_ms=None if arrival is None else int(arrival.timestamp() * 1000),
    )


def _kinesis_offset(offset: Offset, action: str) -> KinesisOffset:
    if not isinstance(offset, KinesisOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a KinesisOffset"
        raise OffsetError(msg)
    return offset
