"""Read a Pub/Sub subscription (``scan_pubsub``): acked after the batch commits, replayed exactly.

Pub/Sub has no offsets: a subscriber pulls messages, holds each for an ack
deadline, and acknowledges it, or gets it again later. The life of a batch:

1. **Planning** (``latest_offset``) pulls up to ``max_messages_per_trigger``
   messages, extends their ack deadline to ``ack_deadline``, and writes them
   whole (message id, data, publish time, ordering key, attributes) as the
   source log entry ``sources/<n>/<k>.arrow`` (Arrow IPC) before the batch's
   ``offsets/N``. The offset is ``k``, the entry's number.
2. **Reading** ``(start, end]`` reads the entries ``start + 1 .. end`` from the
   checkpoint: a batch re-run after a crash reads exactly the same messages,
   whatever Pub/Sub redelivers meanwhile.
3. **Acknowledging.** ``commit(end)``, called after ``commits/N``, acks the
   messages of the entries up to ``end``. Until then Pub/Sub keeps them; a
   process that dies gets them redelivered (after their ack deadline) to the
   next run.
4. **Deduplicating.** A pulled message whose id is in a logged entry is not
   taken again: if its entry is committed, it is acked at once (a redelivery of
   a message the crash left unacked); otherwise it is acked when its entry
   commits. Entries older than ``dedup_retention`` (by the time they were
   logged) are deleted once committed, and their ids forgotten: that bounds the
   source's state.

Entries logged by ``latest_offset`` whose batch never reached the WAL are
offered again by the next ``latest_offset`` call (the batch is planned from
them, not from a new pull).
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._kafka_codecs import PayloadDecoder
from connectors._payload_formats import payload_decoder
from connectors.pubsub.client import require_pubsub, retrying, subscriber_client
from microstream.exceptions import CheckpointError, OffsetError, PlanError, SourceError
from microstream.protocols import Offset, SourceContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from microstream._typing import KafkaFormat

__all__ = ["METADATA_COLUMNS", "PubSubOffset", "PubSubSource", "PubSubSourceSpec"]

METADATA_COLUMNS: dict[str, pl.DataType] = {
    "_message_id": pl.String(),
    "_publish_time": pl.Datetime("us", "UTC"),
    "_ordering_key": pl.String(),
}
"""The columns ``include_metadata=True`` adds."""

_LOG_SCHEMA = {
    "message_id": pl.String(),
    "data": pl.Binary(),
    "publish_time": pl.Datetime("us", "UTC"),
    "ordering_key": pl.String(),
    "attributes": pl.List(pl.Struct({"key": pl.String(), "value": pl.String()})),
    "logged_at": pl.Float64(),
}


class PubSubOffset(Offset):
    """The last source log entry a batch covers (``-1``: none yet).

    Examples
    --------
    >>> PubSubOffset(entry=3).follows_or_equals(PubSubOffset(entry=2))
    True
    """

    entry: int

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other``."""
        return self.entry >= _offset(other).entry

    def distance(self, other: Offset) -> int | None:
        """Log entries (batches) between ``other`` and this offset."""
        return self.entry - _offset(other).entry


def _offset(offset: Offset) -> PubSubOffset:
    if not isinstance(offset, PubSubOffset):
        msg = f"expected a PubSubOffset; got a {type(offset).__name__} ({offset!r})"
        raise OffsetError(msg)
    return offset


@dataclass(frozen=True, init=False)
class PubSubSourceSpec:
    """The messages of a Pub/Sub subscription, acknowledged only after their batch commits.

    Parameters
    ----------
    subscription
        ``"projects/<project>/subscriptions/<name>"`` (it must exist). One query per
        subscription: two readers would split its messages.
    format
        The message data: ``"json"``, ``"csv"``, ``"avro"`` (schemaless),
        ``"protobuf"`` (a serialised message of the type given as ``schema=``) or
        ``"raw"`` (a Binary ``value`` column). Decoded in bulk.
    schema
        The columns of ``"json"``/``"csv"``, the Avro schema of ``"avro"``, for
        ``"protobuf"`` a generated message class or ``{"descriptor_set": <file>,
        "message": <full name>}``.
    max_messages_per_trigger
        At most this many messages per batch (one pull; 1000 by default, Pub/Sub's
        limit per pull).
    include_metadata
        Add ``_message_id``, ``_publish_time`` and ``_ordering_key``.
    on_bad_record
        A message whose data does not decode: ``"fail"`` (a ``SourceError`` naming its
        message id; the batch and its messages stay unacknowledged, so Pub/Sub
        redelivers them to the next run) or ``"skip"`` (left out of the batch, counted
        as ``bad_records_skipped``, and acknowledged with the batch).
    ack_deadline
        How long Pub/Sub holds a pulled message for this query before it
        redelivers it (set on every pulled message; 10 s to 600 s). A batch
        should commit within it.
    dedup_retention
        How long the ids of logged messages are kept to drop redeliveries
        (``"10m"``); longer costs more checkpoint files.
    retry_timeout
        How long a pull, an ack or a deadline extension is retried (backoff 50 ms
        doubling to 1 s) while the server is unreachable, overloaded or past its
        deadline, before the query fails with a ``SourceError``.
    endpoint
        ``"host:port"`` of a Pub/Sub server to use without credentials and TLS
        (the emulator); default Google's, with the environment's credentials.

    Examples
    --------
    >>> spec = PubSubSourceSpec("projects/p/subscriptions/s", schema={"id": pl.Int64})
    >>> spec.describe(), spec.identity()
    ('PubSub[projects/p/subscriptions/s]', {'subscription': 'projects/p/subscriptions/s', 'format': 'json'})
    """

    kind: ClassVar[str] = "pubsub"

    subscription: str
    format: KafkaFormat
    max_messages_per_trigger: int
    include_metadata: bool
    on_bad_record: str
    ack_deadline_s: int
    dedup_retention_s: float
    retry_timeout_s: float = field(compare=False)
    endpoint: str | None = field(compare=False)
    decoder: PayloadDecoder = field(repr=False, compare=False)
    schema: pl.Schema = field(compare=False)

    def __init__(
        self,
        subscription: str,
        *,
        format: KafkaFormat = "json",
        schema: Mapping[str, Any] | pl.Schema | str | type | None = None,
        max_messages_per_trigger: int = 1000,
        include_metadata: bool = False,
        on_bad_record: str = "fail",
        ack_deadline: str | timedelta | float = "60s",
        dedup_retention: str | timedelta | float = "10m",
        retry_timeout: str | timedelta | float = "30s",
        endpoint: str | None = None,
    ) -> None:
        parts = subscription.split("/") if isinstance(subscription, str) else []
        if len(parts) != 4 or parts[0] != "projects" or parts[2] != "subscriptions":
            msg = (
                "subscription must be 'projects/<project>/subscriptions/<name>'; got "
                f"{subscription!r}"
            )
            raise ValueError(msg)
        limit = max_messages_per_trigger
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            msg = f"max_messages_per_trigger must be an int from 1 to 1000; got {limit!r}"
            raise ValueError(msg)
        if on_bad_record not in ("fail", "skip"):
            msg = f"on_bad_record must be 'fail' or 'skip'; got {on_bad_record!r}"
            raise ValueError(msg)
        deadline = parse_duration(ack_deadline, name="ack_deadline").total_seconds()
        if not 10 <= deadline <= 600:
            msg = f"ack_deadline must be from 10 s to 600 s (Pub/Sub's range); got {ack_deadline!r}"
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
        put(self, "subscription", subscription)
        put(self, "format", format)
        put(self, "max_messages_per_trigger", limit)
        put(self, "include_metadata", include_metadata)
        put(self, "on_bad_record", on_bad_record)
        put(self, "ack_deadline_s", int(deadline))
        retention = parse_duration(dedup_retention, name="dedup_retention").total_seconds()
        put(self, "dedup_retention_s", retention)
        retry = parse_duration(retry_timeout, name="retry_timeout").total_seconds()
        put(self, "retry_timeout_s", retry)
        put(self, "endpoint", endpoint)
        put(self, "decoder", decoder)
        put(self, "schema", pl.Schema(columns))

    def identity(self) -> dict[str, Any]:
        """The subscription and the data format (fingerprinted)."""
        return {"subscription": self.subscription, "format": self.format}

    def describe(self) -> str:
        """One line: ``PubSub[projects/p/subscriptions/s]``."""
        return f"PubSub[{self.subscription}]"

    def build(self, context: SourceContext) -> PubSubSource:
        """The runtime source, with its log loaded from ``context.storage``."""
        return PubSubSource(self, context)


class PubSubSource:
    """The runtime side of :class:`PubSubSourceSpec` (see the module docstring)."""

    def __init__(self, spec: PubSubSourceSpec, context: SourceContext) -> None:
        require_pubsub()
        self.spec = spec
        self.description = spec.describe()
        self._storage = context.storage
        self._logger = context.logger
        self._faults = context.faults
        self._client: Any = None
        self._entries: dict[int, pl.DataFrame] = {}
        self._entry_of: dict[str, int] = {}
        self._counts: dict[str, int] = {}  # bad_records_skipped since metrics() last ran
        self._acks: dict[int, list[str]] = {}
        self._committed = -1
        for k in self._storage.list_numbered("", suffix=".arrow"):
            frame = self._load(k)
            self._entry_of.update(dict.fromkeys(frame["message_id"].to_list(), k))

    def _load(self, k: int) -> pl.DataFrame:
        if k not in self._entries:
            name = f"{k}.arrow"
            try:
                self._entries[k] = pl.read_ipc(io.BytesIO(self._storage.read_bytes(name)))
            except FileNotFoundError:
                msg = (
                    f"{self.description}: source log entry {self._storage.display(name)} is missing"
                )
                raise CheckpointError(msg) from None
            except Exception as exc:
                msg = f"{self.description}: source log entry {self._storage.display(name)} is corrupt: {exc}"
                raise CheckpointError(msg) from exc
        return self._entries[k]

    def _subscriber(self) -> Any:
        if self._client is None:
            self._client = subscriber_client(self.spec.endpoint)
        return self._client

    def _call(self, what: str, work: Any) -> Any:
        """``work(client)``, retried on transient errors for ``retry_timeout``.

        ``work`` makes one gRPC call, without the library's retries and with the
        per-attempt ``timeout`` given by :attr:`_attempt_s`.
        """
        from google.api_core import exceptions

        try:
            return retrying(
                lambda: work(self._subscriber()),
                retry_timeout_s=self.spec.retry_timeout_s,
                what=f"{self.description}: {what}",
                error=SourceError,
                on_retry=lambda why: self._logger.warning(
                    "%s: %s: %s; retrying", self.description, what, why
                ),
            )
        except exceptions.NotFound as exc:
            msg = f"{self.description}: cannot {what}: the subscription does not exist ({exc.message})"
            raise SourceError(msg) from exc
        except exceptions.GoogleAPIError as exc:
            msg = f"{self.description}: cannot {what}: {exc}"
            raise SourceError(msg) from exc

    @property
    def _attempt_s(self) -> float:
        # A cut connection fails a call at once; a server that hangs must not hold one
        # attempt past the whole retry_timeout.
        return max(1.0, min(10.0, self.spec.retry_timeout_s))

    # -- the Source contract --------------------------------------------------------------------

    def parse_offset(self, data: dict[str, Any]) -> PubSubOffset:
        """The offset from its JSON form in the WAL: ``{"entry": 4}``."""
        return PubSubOffset.model_validate(data)

    def initial_offset(self) -> PubSubOffset:
        """Before the first log entry (the subscription's unacked messages come first)."""
        return PubSubOffset(entry=-1)

    def prepare_for_available_now(self) -> None:
        """Nothing to fix: Pub/Sub has no end; an available-now run ends at the first pull
        that finds no new message."""

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> PubSubOffset:
        """The next log entry: one logged earlier and not yet in the WAL, or a new pull.

        Raises
        ------
        SourceError
            The subscription does not exist, Pub/Sub refused the pull, or the server
            stayed unreachable for ``retry_timeout``.
        """
        begin = _offset(start).entry
        self._committed = max(self._committed, begin)
        if self._storage.exists(f"{begin + 1}.arrow"):
            return PubSubOffset(entry=begin + 1)  # logged, but its batch never reached the WAL
        with warnings.catch_warnings():
            # return_immediately is deprecated (Pub/Sub may then answer empty while messages
            # wait); without it an idle pull blocks every trigger for seconds.
            warnings.simplefilter("ignore", DeprecationWarning)
            response = self._pull()
        received = list(response.received_messages)
        if received:
            self._call(
                "extend the ack deadline",
                lambda c: c.modify_ack_deadline(
                    request={
                        "subscription": self.spec.subscription,
                        "ack_ids": [m.ack_id for m in received],
                        "ack_deadline_seconds": self.spec.ack_deadline_s,
                    },
                    retry=None,
                    timeout=self._attempt_s,
                ),
            )
        fresh = []
        now_acked: list[str] = []
        for m in received:
            k = self._entry_of.get(m.message.message_id)
            if k is None:
                fresh.append(m)
            elif k <= self._committed:
                now_acked.append(m.ack_id)  # a redelivery of a committed message
            else:
                self._acks.setdefault(k, []).append(m.ack_id)
        if now_acked:
            self._ack(now_acked)
        if not fresh:
            return PubSubOffset(entry=begin)
        k = begin + 1
        entry = pl.DataFrame(
            {
                "message_id": [m.message.message_id for m in fresh],
                "data": [bytes(m.message.data) for m in fresh],
                "publish_time": [m.message.publish_time for m in fresh],
                "ordering_key": [m.message.ordering_key for m in fresh],
                "attributes": [
                    [{"key": a, "value": v} for a, v in m.message.attributes.items()] for m in fresh
                ],
                "logged_at": [time.time()] * len(fresh),
            },
            schema=_LOG_SCHEMA,
        )
        buffer = io.BytesIO()
        entry.write_ipc(buffer)
        self._storage.write_bytes(f"{k}.arrow", buffer.getvalue(), overwrite=False)
        self._faults.reach("source.after_log")
        self._entries[k] = entry
        self._entry_of.update(dict.fromkeys(entry["message_id"].to_list(), k))
        self._acks[k] = [m.ack_id for m in fresh]
        return PubSubOffset(entry=k)

    def _pull(self) -> Any:
        return self._call(
            "pull messages",
            lambda c: c.pull(
                request={
                    "subscription": self.spec.subscription,
                    "max_messages": self.spec.max_messages_per_trigger,
                    "return_immediately": True,
                },
                retry=None,
                timeout=self._attempt_s,
            ),
        )

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The messages of the log entries in ``(start, end]``, decoded, in pull order.

        Raises
        ------
        SourceError
            A message whose data does not decode (``on_bad_record="fail"``).
        """
        begin, finish = _offset(start).entry, _offset(end).entry
        frames = [self._load(k) for k in range(begin + 1, finish + 1)]
        logged = pl.concat(frames) if frames else pl.DataFrame(schema=_LOG_SCHEMA)
        decoded = self.spec.decoder.decode(logged["data"].to_list())
        if decoded.bad:
            position, why = decoded.bad[0]
            message_id = logged["message_id"][position]
            if self.spec.on_bad_record == "fail":
                more = f" (and {len(decoded.bad) - 1} more)" if len(decoded.bad) > 1 else ""
                msg = (
                    f"{self.description}: bad message {message_id!r}: {why}{more}; it stays "
                    "unacknowledged (Pub/Sub redelivers it to the next run): fix the "
                    "producer, pass on_bad_record='skip', or route it with the "
                    "subscription's dead-letter policy"
                )
                raise SourceError(msg)
            skipped = self._counts.get("bad_records_skipped", 0) + len(decoded.bad)
            self._counts["bad_records_skipped"] = skipped
            self._logger.warning(
                "%s: skipped %d bad message(s); the first %r: %s",
                self.description,
                len(decoded.bad),
                message_id,
                why,
            )
        frame = decoded.frame
        if self.spec.include_metadata:
            kept = logged if decoded.index is None else logged[list(decoded.index)]
            frame = frame.with_columns(
                kept["message_id"].alias("_message_id"),
                kept["publish_time"].alias("_publish_time"),
                kept["ordering_key"].alias("_ordering_key"),
            )
        return frame.select(list(self.spec.schema))

    def metrics(self) -> dict[str, int]:
        """``bad_records_skipped`` since the previous call."""
        counts, self._counts = self._counts, {}
        return counts

    def _ack(self, ack_ids: list[str]) -> None:
        for i in range(0, len(ack_ids), 1000):
            part = ack_ids[i : i + 1000]
            self._call(
                "acknowledge messages",
                lambda c, p=part: c.acknowledge(
                    request={"subscription": self.spec.subscription, "ack_ids": p},
                    retry=None,
                    timeout=self._attempt_s,
                ),
            )

    def commit(self, end: Offset) -> None:
        """Ack the messages of the entries up to ``end``; forget entries past the retention."""
        finish = _offset(end).entry
        self._committed = max(self._committed, finish)
        done = [k for k in self._acks if k <= finish]
        ack_ids = [a for k in done for a in self._acks.pop(k)]
        if ack_ids:
            self._ack(ack_ids)
        cutoff = time.time() - self.spec.dedup_retention_s
        for k in sorted(set(self._entry_of.values())):
            if k > finish:
                break
            entry = self._load(k)
            if entry.height and float(entry["logged_at"].max()) >= cutoff:  # type: ignore[arg-type]
                break
            for message_id in entry["message_id"].to_list():
                self._entry_of.pop(message_id, None)
            self._entries.pop(k, None)
            self._storage.delete(f"{k}.arrow")

    def stop(self) -> None:
        """Close the client (unacked messages are redelivered to the next run)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
