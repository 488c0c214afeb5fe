"""Publish to a Pub/Sub topic, at least once, in order per ordering key (``sink_pubsub``).

Each row is one message: its data the row (``format``), its attributes
``microstream.query_id``, ``microstream.batch_id`` and ``microstream.row`` (the
row's position in the batch), and, with ``ordering_key=``, that column's value
as the message's ordering key (Pub/Sub then delivers the messages of a key in
the order published, to subscriptions with message ordering enabled).
``add_batch`` returns once Pub/Sub accepted every message.

**At least once.** Pub/Sub has no publisher-side deduplication: a batch re-run
after a crash publishes its rows again, with the same three attributes, so a
consumer that needs each row once drops a message whose ``(query id, batch id,
row)`` it has seen (a re-run batch has the same rows in the same order when the
query is stateless over a replayable source; the rows of an aggregation are
sorted by key before publishing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._kafka_codecs import encode_values
from connectors.pubsub.client import publisher_client, require_pubsub
from microstream.exceptions import SinkError
from microstream.protocols import SinkContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from microstream._typing import KafkaSinkFormat

__all__ = ["PubSubSink", "PubSubSinkSpec"]


@dataclass(frozen=True)
class PubSubSinkSpec:
    """Publish each batch's rows to a Pub/Sub topic (at least once; ordered per key).

    Parameters
    ----------
    topic
        ``"projects/<project>/topics/<name>"`` (it must exist).
    format
        ``"json"`` (every column, one JSON object), ``"avro"`` (schemaless) or
        ``"raw"`` (the ``value`` column).
    ordering_key
        A String column whose value is each message's ordering key (None: no key).
    attributes
        Static attributes added to every message.
    retry_timeout
        How long a publish is retried (backoff 50 ms doubling to 1 s) while the server
        is unreachable, overloaded or past its deadline, before the batch fails with a
        ``SinkError``.
    endpoint
        ``"host:port"`` of a Pub/Sub server without credentials and TLS (the emulator).

    Examples
    --------
    >>> PubSubSinkSpec("projects/p/topics/t", ordering_key="user").describe()
    'PubSubSink[projects/p/topics/t]'
    """

    kind: ClassVar[str] = "pubsub_sink"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "update", "complete"})
    durable: ClassVar[bool] = True

    topic: str
    _: KW_ONLY
    format: KafkaSinkFormat = "json"
    ordering_key: str | None = None
    attributes: Mapping[str, str] | None = None
    retry_timeout: str | timedelta | float = "30s"
    endpoint: str | None = None

    def __post_init__(self) -> None:
        parts = self.topic.split("/") if isinstance(self.topic, str) else []
        if len(parts) != 4 or parts[0] != "projects" or parts[2] != "topics":
            msg = f"topic must be 'projects/<project>/topics/<name>'; got {self.topic!r}"
            raise ValueError(msg)
        if self.format not in ("json", "avro", "raw"):
            msg = f"format must be 'json', 'avro' or 'raw'; got {self.format!r}"
            raise ValueError(msg)
        parse_duration(self.retry_timeout, name="retry_timeout")

    def describe(self) -> str:
        """One line: ``PubSubSink[projects/p/topics/t]``."""
        return f"PubSubSink[{self.topic}]"

    def build(self, context: SinkContext) -> PubSubSink:
        """The runtime sink."""
        return PubSubSink(self, context)


class PubSubSink:
    """The runtime side of :class:`PubSubSinkSpec` (see the module docstring)."""

    def __init__(self, spec: PubSubSinkSpec, context: SinkContext) -> None:
        require_pubsub()
        self.spec = spec
        self.description = spec.describe()
        self._query_id = context.query_id
        self._order = list(context.key_columns or ())
        self._retry_s = parse_duration(spec.retry_timeout).total_seconds()
        self._client = publisher_client(
            spec.endpoint, ordering=spec.ordering_key is not None, retry_timeout_s=self._retry_s
        )

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Publish every row of ``batch_id``; return once Pub/Sub accepted all of them.

        Raises
        ------
        SinkError
            The ordering key column is missing or not text, or Pub/Sub refused a message.
        """
        if data.height == 0:
            return
        key = self.spec.ordering_key
        if key is not None and (key not in data.columns or data.schema[key] != pl.String):
            found = data.schema.get(key)
            msg = (
                f"{self.description}: ordering_key={key!r} must name a String column of the "
                f"batch; got {'no such column' if found is None else found}"
            )
            raise SinkError(msg)
        order = [c for c in self._order if c in data.columns]
        if order:
            data = data.sort(order, nulls_last=True, maintain_order=True)
        payloads = encode_values(data, self.spec.format)
        keys = [""] * data.height if key is None else data[key].fill_null("").to_list()
        static = dict(self.spec.attributes or {})
        futures: list[Any] = []
        for row, (payload, ordering) in enumerate(zip(payloads, keys)):
            futures.append(
                self._client.publish(
                    self.spec.topic,
                    payload,
                    ordering_key=ordering,
                    **static,
                    **{
                        "microstream.query_id": self._query_id,
                        "microstream.batch_id": str(batch_id),
                        "microstream.row": str(row),
                    },
                )
            )
        failed: list[BaseException] = []
        for future in futures:
            try:
                # The publisher retries for retry_timeout itself; the margin covers
                # batching and the last attempt.
                future.result(timeout=self._retry_s + 15)
            except Exception as exc:
                failed.append(exc)
        if failed:
            for ordering in set(keys) - {""}:
                self._client.resume_publish(self.spec.topic, ordering)  # a failed key pauses
            msg = (
                f"{self.description}: Pub/Sub refused {len(failed)} message(s) of batch "
                f"{batch_id} (the first: {failed[0]}); the batch is published again when the "
                "query restarts"
            )
            raise SinkError(msg)

    def stop(self) -> None:
        """Flush and close the publisher."""
        self._client.stop()
