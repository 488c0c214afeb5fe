"""Read a RabbitMQ stream (``scan_rabbitmq_stream``): offsets in the WAL, exact replay.

A RabbitMQ stream is an append-only log whose messages have offsets (0, 1, 2, ...;
chunks of the broker's own bookkeeping may take offsets too, so there can be
gaps). The life of a batch:

1. **Offsets.** An offset is the last message offset a batch covers (``-1``
   before the first message). When the query first starts, its position is
   the one ``starting_offset`` names: before the stream's first retained
   message (``"first"``), after its last one (``"next"``), or before a given
   offset.
2. **Planning** (``latest_offset``) asks the broker for the stream's last chunk
   (a subscription at ``last``, delivered at once), reads from ``start + 1`` up
   to that chunk's last message, or ``max_messages_per_trigger`` messages, and
   picks ``end`` = the last offset read. ``end`` is logged in ``offsets/N``
   before the batch is read; the messages read are kept for the read.
3. **Reading** ``(start, end]`` subscribes at offset ``start + 1`` and keeps the
   messages with ``start < offset <= end``, so a batch re-run after a crash
   reads exactly the same messages, in offset order.
4. **Retention.** The broker deletes old segments by the stream's retention
   (``max-length-bytes``, ``max-age``). When messages of ``(start, ...]`` were
   deleted before the query read them, reading is a
   :class:`~microstream.exceptions.DataLossError` naming the lost range; a
   deleted stream is one too.

Nothing is acknowledged: the broker keeps no consumer state for the query (its
position is the write-ahead log's), and ``commit`` does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._kafka_codecs import PayloadDecoder
from connectors._payload_formats import payload_decoder
from connectors.rabbitmq.client import (
    BrokerAnswerError,
    BrokerUnreachableError,
    Chunk,
    StreamConnection,
    StreamUrl,
    require_rstream,
)
from microstream.exceptions import DataLossError, OffsetError, PlanError, SourceError
from microstream.protocols import Offset, SourceContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from microstream._typing import KafkaFormat, RabbitMQStartingOffset

__all__ = [
    "METADATA_COLUMNS",
    "RabbitMQStreamOffset",
    "RabbitMQStreamSource",
    "RabbitMQStreamSourceSpec",
]

METADATA_COLUMNS: dict[str, pl.DataType] = {
    "_offset": pl.Int64(),
    "_timestamp": pl.Datetime("ms", "UTC"),
}
"""The columns ``include_metadata=True`` adds: the message's offset and its chunk's time."""

_EMPTY_WAIT_S = 0.25
"""How long an empty stream is waited on for a chunk (a non-empty one answers at once)."""


class RabbitMQStreamOffset(Offset):
    """The last message offset a batch covers (``-1``: none yet).

    Examples
    --------
    >>> a, b = RabbitMQStreamOffset(offset=4), RabbitMQStreamOffset(offset=9)
    >>> b.follows_or_equals(a), a.follows_or_equals(b), b.distance(a)
    (True, False, 5)
    """

    offset: int

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other``."""
        return self.offset >= _offset(other).offset

    def distance(self, other: Offset) -> int | None:
        """Offsets between ``other`` and this one (messages, if the stream has no gaps)."""
        return self.offset - _offset(other).offset


def _offset(offset: Offset) -> RabbitMQStreamOffset:
    if not isinstance(offset, RabbitMQStreamOffset):
        msg = f"expected a RabbitMQStreamOffset; got a {type(offset).__name__} ({offset!r})"
        raise OffsetError(msg)
    return offset


@dataclass(frozen=True, init=False)
class RabbitMQStreamSourceSpec:
    """The messages of a RabbitMQ stream as an unbounded table, replayable by offset.

    Parameters
    ----------
    url
        The broker: ``"rabbitmq-stream://user:password@host:5552/vhost"`` (the
        virtual host URL-encoded: ``%2F`` for ``/``). Never shown, not part of
        the query's identity.
    stream
        The stream to read (it must exist).
    format
        The message bodies: ``"json"`` (one JSON object per message),
        ``"csv"`` (one CSV line), ``"avro"`` (schemaless Avro of the record
        schema given as ``schema=``), ``"protobuf"`` (a serialised message of
        the type given as ``schema=``) or ``"raw"`` (the body as a Binary
        ``value`` column). Decoded in bulk.
    schema
        The columns of ``"json"``/``"csv"`` (a mapping of name to polars
        dtype), the Avro schema of ``"avro"``, for ``"protobuf"`` a generated
        message class or ``{"descriptor_set": <file>, "message": <full
        name>}``; none for ``"raw"``.
    starting_offset
        Where a query that first starts begins: ``"first"`` (the first message
        the stream retains), ``"next"`` (messages published from now on) or an
        offset (the first message read). A restarted query continues from its
        checkpoint.
    max_messages_per_trigger
        At most this many messages per batch (not applied to ``Trigger.once()``).
    include_metadata
        Add ``_offset`` (Int64) and ``_timestamp`` (the time the broker wrote
        the message's chunk, ms, UTC).
    on_bad_record
        A body that does not decode: ``"fail"`` (a ``SourceError`` naming its
        offset) or ``"skip"`` (left out, counted as ``bad_records_skipped``).
    retry_timeout
        How long an unreachable broker (a restart) is retried, with a backoff
        from 50 ms to 1 s, before the query fails. ``"30s"`` by default.

    Examples
    --------
    >>> spec = RabbitMQStreamSourceSpec(
    ...     "rabbitmq-stream://mq:5552/%2F", "events", schema={"id": pl.Int64}
    ... )
    >>> spec.describe(), spec.identity(), list(spec.schema)
    ('RabbitMQStream[events]', {'stream': 'events', 'vhost': '/', 'format': 'json'}, ['id'])
    >>> dict(RabbitMQStreamSourceSpec("rabbitmq-stream://mq", "events", format="raw").schema)
    {'value': Binary}
    """

    kind: ClassVar[str] = "rabbitmq_stream"

    url: str = field(repr=False, compare=False)
    stream: str
    format: KafkaFormat
    starting_offset: RabbitMQStartingOffset
    max_messages_per_trigger: int | None
    include_metadata: bool
    on_bad_record: str
    retry_timeout_s: float
    vhost: str
    decoder: PayloadDecoder = field(repr=False, compare=False)
    schema: pl.Schema = field(compare=False)

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        format: KafkaFormat = "json",
        schema: Mapping[str, Any] | pl.Schema | str | type | None = None,
        starting_offset: RabbitMQStartingOffset = "first",
        max_messages_per_trigger: int | None = None,
        include_metadata: bool = False,
        on_bad_record: str = "fail",
        retry_timeout: str | timedelta | float = "30s",
    ) -> None:
        parsed = StreamUrl.parse(url)
        if not isinstance(stream, str) or not stream or len(stream.encode()) > 255:
            msg = f"stream must be a stream name (1 to 255 bytes); got {stream!r}"
            raise ValueError(msg)
        if isinstance(starting_offset, bool) or not (
            starting_offset in ("first", "next")
            or (isinstance(starting_offset, int) and starting_offset >= 0)
        ):
            msg = f"starting_offset must be 'first', 'next' or an offset >= 0; got {starting_offset!r}"
            raise ValueError(msg)
        limit = max_messages_per_trigger
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            msg = f"max_messages_per_trigger must be a positive int or None; got {limit!r}"
            raise ValueError(msg)
        if on_bad_record not in ("fail", "skip"):
            msg = f"on_bad_record must be 'fail' or 'skip'; got {on_bad_record!r}"
            raise ValueError(msg)
        decoder = payload_decoder(format, schema)
        columns = dict(decoder.schema)
        if include_metadata:
            clash = set(columns) & set(METADATA_COLUMNS)
            if clash:
                msg = f"include_metadata=True adds {sorted(clash)}, which the schema has already"
                raise PlanError(msg)
            columns.update(METADATA_COLUMNS)
        put = object.__setattr__
        put(self, "url", url)
        put(self, "stream", stream)
        put(self, "format", format)
        put(self, "starting_offset", starting_offset)
        put(self, "max_messages_per_trigger", limit)
        put(self, "include_metadata", include_metadata)
        put(self, "on_bad_record", on_bad_record)
        put(
            self,
            "retry_timeout_s",
            parse_duration(retry_timeout, name="retry_timeout").total_seconds(),
        )
        put(self, "vhost", parsed.vhost)
        put(self, "decoder", decoder)
        put(self, "schema", pl.Schema(columns))

    def identity(self) -> dict[str, Any]:
        """The stream and the body format (fingerprinted: a change refuses the checkpoint)."""
        return {"stream": self.stream, "vhost": self.vhost, "format": self.format}

    def describe(self) -> str:
        """One line: ``RabbitMQStream[events]``."""
        return f"RabbitMQStream[{self.stream}]"

    def build(self, context: SourceContext) -> RabbitMQStreamSource:
        """The runtime source (connects when first used)."""
        return RabbitMQStreamSource(self, context)


@dataclass
class _Read:
    """Messages read from ``(start, end]``, in offset order."""

    start: int
    end: int
    offsets: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    times: list[int] = field(default_factory=list)


class RabbitMQStreamSource:
    """The runtime side of :class:`RabbitMQStreamSourceSpec` (see the module docstring)."""

    def __init__(self, spec: RabbitMQStreamSourceSpec, context: SourceContext) -> None:
        require_rstream()
        self.spec = spec
        self.description = spec.describe()
        self._logger = context.logger
        self._url = StreamUrl.parse(spec.url)
        self._conn: StreamConnection | None = None
        self._until: int | None = None
        self._planned: _Read | None = None
        self._counts: dict[str, int] = {}

    def _connection(self) -> StreamConnection:
        if self._conn is None:
            self._conn = StreamConnection(
                self._url,
                retry_timeout_s=self.spec.retry_timeout_s,
                name=f"microstream-{self.spec.stream}",
            )
        return self._conn

    def _broker(self, what: str, work: Any, position: int | None = None) -> Any:
        """``work(connection)``, with the broker's failures as the source's errors.

        ``position``: the query's offset, when it has one; a missing stream then
        means its unread messages are lost.
        """
        try:
            return work(self._connection())
        except BrokerUnreachableError as exc:
            raise SourceError(f"{self.description}: {exc}") from exc
        except BrokerAnswerError as exc:
            if exc.no_such_stream and position is not None:
                msg = (
                    f"{self.description}: stream {self.spec.stream!r} does not exist any more (it "
                    f"was deleted): the messages after offset {position} that the query has not "
                    "read are lost. Start over with a new checkpoint"
                )
                raise DataLossError(msg) from exc
            if exc.no_such_stream:
                raise self._missing(what) from exc
            msg = (
                f"{self.description}: cannot {what}: the broker at {self._url.where} answered {exc}"
            )
            raise SourceError(msg) from exc

    def _missing(self, what: str) -> SourceError:
        return SourceError(
            f"{self.description}: cannot {what}: there is no stream {self.spec.stream!r} on the "
            f"broker at {self._url.where} (virtual host {self.spec.vhost!r})"
        )

    def _last_offset(self, position: int | None = None) -> int:
        """The stream's last message offset now (``-1``: empty)."""
        chunk = self._broker(
            "find the stream's end",
            lambda c: c.edge(self.spec.stream, last=True, wait_s=_EMPTY_WAIT_S),
            position,
        )
        return -1 if chunk is None else chunk.offsets[-1]

    # -- the Source contract --------------------------------------------------------------------

    def parse_offset(self, data: dict[str, Any]) -> RabbitMQStreamOffset:
        """The offset from its JSON form in the WAL: ``{"offset": 41}``."""
        return RabbitMQStreamOffset.model_validate(data)

    def initial_offset(self) -> RabbitMQStreamOffset:
        """The position ``starting_offset`` names, when the query first starts.

        Raises
        ------
        SourceError
            The stream does not exist, or the broker is unreachable.
        """
        start = self.spec.starting_offset
        if start == "next":
            return RabbitMQStreamOffset(offset=self._last_offset())
        if start == "first":
            chunk = self._broker(
                "find the stream's start",
                lambda c: c.edge(self.spec.stream, last=False, wait_s=_EMPTY_WAIT_S),
            )
            return RabbitMQStreamOffset(offset=-1 if chunk is None else chunk.offsets[0] - 1)
        assert isinstance(start, int)
        if not self._broker("look up the stream", lambda c: c.stream_exists(self.spec.stream)):
            raise self._missing("look up the stream")
        return RabbitMQStreamOffset(offset=start - 1)

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> RabbitMQStreamOffset:
        """The last offset available now (or within the rate limit), read ahead for ``read``.

        Raises
        ------
        DataLossError
            Messages after ``start`` were deleted by retention, or the stream was.
        """
        begin = _offset(start).offset
        last = self._last_offset(begin) if self._until is None else self._until
        if last <= begin:
            return RabbitMQStreamOffset(offset=begin)
        limit = self.spec.max_messages_per_trigger if rate_limited else None
        read = self._read(begin, last, limit)
        self._planned = read
        return RabbitMQStreamOffset(offset=read.end)

    def prepare_for_available_now(self) -> None:
        """Fix the end of the stream at its last message now."""
        try:
            self._until = self._last_offset()
        except SourceError as exc:
            if "there is no stream" not in str(exc):
                raise
            self._until = None  # the first batch says whether the query lost data or never had any

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """Exactly the messages with ``start < offset <= end``, decoded.

        Raises
        ------
        DataLossError
            Messages of the range were deleted by retention, or the stream was.
        SourceError
            A body that does not decode (``on_bad_record="fail"``).
        """
        begin, finish = _offset(start).offset, _offset(end).offset
        planned, self._planned = self._planned, None
        if finish <= begin:
            return self._decode(_Read(begin, begin))
        if planned is not None and planned.start == begin and planned.end == finish:
            return self._decode(planned)
        read = self._read(begin, finish, None)
        if read.end != finish:
            msg = (
                f"{self.description}: the batch's range ({begin}, {finish}] ends at offset "
                f"{finish}, but the stream now ends at {read.end}: its messages were deleted "
                "(the stream was deleted and created again?)"
            )
            raise DataLossError(msg)
        return self._decode(read)

    def _read(self, begin: int, last: int, limit: int | None) -> _Read:
        """Messages of ``(begin, last]``, the first ``limit`` of them if given."""
        from rstream import constants, schema

        out = _Read(begin, begin)

        def stop(chunk: Chunk) -> bool:
            for offset, body in zip(chunk.offsets, chunk.bodies):
                if offset <= begin or offset > last:
                    continue
                out.offsets.append(offset)
                out.bodies.append(body)
                out.times.append(chunk.timestamp_ms)
                if limit is not None and len(out.offsets) >= limit:
                    return True
            return chunk.offsets[-1] >= last

        spec = schema.OffsetSpec.from_params(constants.OffsetType.OFFSET, begin + 1)

        def work(conn: StreamConnection) -> list[Chunk]:
            out.offsets.clear()
            out.bodies.clear()
            out.times.clear()
            return conn.read(self.spec.stream, spec, stop=stop, idle_s=5.0)

        chunks = self._broker("read the stream", work, begin)
        first = chunks[0].offsets[0] if chunks else begin + 1
        if first > begin + 1:
            # A gap: offsets the broker's own chunks took, or messages retention deleted.
            first = self._retained_from(begin)
        if first > begin + 1:
            msg = (
                f"{self.description}: the stream no longer holds offsets {begin + 1} to "
                f"{first - 1}: the broker deleted them (the stream's retention, max-length-bytes "
                "or max-age) before the query read them, so they are lost. Start over with a new "
                "checkpoint, and keep more of the stream (a longer retention) or read it sooner"
            )
            raise DataLossError(msg)
        out.end = out.offsets[-1] if out.offsets else begin
        return out

    def _retained_from(self, position: int) -> int:
        """The first offset the stream still holds."""
        chunk = self._broker(
            "find the stream's start",
            lambda c: c.edge(self.spec.stream, last=False, wait_s=_EMPTY_WAIT_S),
            position,
        )
        return 0 if chunk is None else chunk.offsets[0]

    def _decode(self, read: _Read) -> pl.DataFrame:
        decoded = self.spec.decoder.decode(read.bodies)
        frame = decoded.frame
        if decoded.bad:
            position, why = decoded.bad[0]
            if self.spec.on_bad_record == "fail":
                more = f" (and {len(decoded.bad) - 1} more)" if len(decoded.bad) > 1 else ""
                msg = (
                    f"{self.description}: bad message at offset {read.offsets[position]}: {why}"
                    f"{more}. Fix the producer, or pass on_bad_record='skip'"
                )
                raise SourceError(msg)
            self._counts["bad_records_skipped"] = self._counts.get("bad_records_skipped", 0) + len(
                decoded.bad
            )
            self._logger.warning(
                "%s: skipped %d bad message(s); the first at offset %d: %s",
                self.description,
                len(decoded.bad),
                read.offsets[position],
                why,
            )
        if self.spec.include_metadata:
            kept = decoded.index if decoded.index is not None else range(len(read.offsets))
            frame = frame.with_columns(
                pl.Series("_offset", [read.offsets[i] for i in kept], pl.Int64),
                pl.Series("_timestamp", [read.times[i] for i in kept], pl.Int64).cast(
                    pl.Datetime("ms", "UTC")
                ),
            )
        return frame.select(list(self.spec.schema))

    def metrics(self) -> dict[str, int]:
        """``bad_records_skipped`` since the previous call."""
        counts, self._counts = self._counts, {}
        return counts

    def commit(self, end: Offset) -> None:
        """Nothing to do: the query's position is its write-ahead log's."""

    def stop(self) -> None:
        """Close the connection."""
        self._planned = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
