"""A blocking connection to a RabbitMQ stream broker, over ``rstream``'s asyncio client.

The trigger loop calls sources and sinks from one thread and waits for each
call, so :class:`StreamConnection` runs ``rstream``'s low-level client in an
event loop of its own, on a daemon thread, and offers blocking calls: find a
stream's first or last offset, read the messages of an offset range, publish
messages with given publishing ids and wait for every confirm, and ask the
broker for a producer's last publishing id (its deduplication state).

A connection that cannot be opened, or that breaks, and a stream the broker
says is not available yet (it recovers its streams after a restart), are
retried with a backoff (50 ms to 1 s) for ``retry_timeout`` seconds: a
restarting broker is waited for. What the broker answers (no such stream, access refused) is not
retried.

Message bodies are AMQP 1.0 messages, as every RabbitMQ stream client writes
them: the sink writes one application-properties section (the same for every
message of a batch, encoded once) and one data section per message; the source
takes the body of each message it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from microstream.exceptions import MissingDependencyError

__all__ = [
    "BrokerAnswerError",
    "BrokerUnreachableError",
    "Chunk",
    "StreamConnection",
    "StreamUrl",
    "encode_messages",
    "require_rstream",
]

T = TypeVar("T")

_STREAM_DOES_NOT_EXIST = 0x02
_FRAME_BYTES = 900_000
"""Bytes of messages per publish frame (below the client's 1 MiB frame limit)."""


def require_rstream() -> None:
    """Raise a one-line error naming the install command when ``rstream`` is missing."""
    try:
        import rstream  # noqa: F401
    except ImportError as exc:
        msg = "the RabbitMQ stream connectors need rstream: pip install 'microstream[rabbitmq]'"
        raise MissingDependencyError(msg) from exc


class BrokerUnreachableError(Exception):
    """No connection to the broker within the retry timeout."""


class BrokerAnswerError(Exception):
    """The broker refused a request; ``code`` is its response code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def no_such_stream(self) -> bool:
        """Whether the broker said the stream does not exist."""
        return self.code == _STREAM_DOES_NOT_EXIST


@dataclass(frozen=True)
class StreamUrl:
    """The parts of a ``rabbitmq-stream://user:password@host:port/vhost`` URL.

    Examples
    --------
    >>> url = StreamUrl.parse("rabbitmq-stream://app:s%40cret@mq:5552/%2F")
    >>> url.host, url.port, url.vhost, url.username, url.password, url.where
    ('mq', 5552, '/', 'app', 's@cret', 'mq:5552')
    >>> StreamUrl.parse("amqp://mq")
    Traceback (most recent call last):
    ...
    ValueError: url must be 'rabbitmq-stream://user:password@host:port/vhost'; got a url of scheme 'amqp'
    """

    host: str
    port: int
    vhost: str
    username: str
    password: str

    @classmethod
    def parse(cls, url: str) -> StreamUrl:
        """Parse ``url`` (port 5552, vhost ``/`` and ``guest``/``guest`` by default)."""
        if not isinstance(url, str):
            msg = f"url must be a 'rabbitmq-stream://...' string; got {url!r}"
            raise ValueError(msg)
        parts = urlsplit(url)
        if parts.scheme not in ("rabbitmq-stream", "rabbitmq-stream+tls"):
            msg = (
                "url must be 'rabbitmq-stream://user:password@host:port/vhost'; got a url of "
                f"scheme {parts.scheme!r}"
            )
            raise ValueError(msg)
        if parts.scheme.endswith("+tls"):
            msg = "rabbitmq-stream+tls:// URLs are not supported yet; use rabbitmq-stream://"
            raise ValueError(msg)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 5552,
            vhost=unquote(path) if path else "/",
            username=unquote(parts.username) if parts.username else "guest",
            password=unquote(parts.password) if parts.password else "guest",
        )

    @property
    def where(self) -> str:
        """``host:port``, for messages (never the credentials)."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Chunk:
    """Messages of one delivered chunk: their offsets, AMQP bodies and the chunk's time (ms)."""

    offsets: list[int]
    bodies: list[bytes]
    timestamp_ms: int


def _amqp_body(data: bytes) -> bytes:
    """The body of an AMQP 1.0 message (its data sections joined, or its value as text)."""
    from rstream.amqp import amqp_decoder

    message = amqp_decoder(data)
    body = message.body
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, list):  # several data sections
        return b"".join(bytes(part) for part in body)
    value = message.value if body is None else body
    return b"" if value is None else str(value).encode()


def encode_messages(payloads: Sequence[bytes], properties: dict[str, str]) -> list[bytes]:
    """AMQP 1.0 messages: ``properties`` as application properties, each payload as data.

    The properties section is encoded once (by ``rstream``'s AMQP encoder); each
    message is that section followed by one data section holding its payload.

    Examples
    --------
    >>> from rstream.amqp import amqp_decoder
    >>> [message] = encode_messages([b'{"a":1}'], {"batch": "7"})
    >>> decoded = amqp_decoder(message)
    >>> decoded.body, decoded.application_properties
    (b'{"a":1}', {b'batch': b'7'})
    """
    from rstream.amqp import AMQPMessage

    header = bytes(AMQPMessage(application_properties=properties))
    # AMQPMessage writes no body section when it has none: what it wrote is the properties.
    data = b"\x00\x53\x75\xb0"  # described type 0x75 (data), vbin32
    pack = struct.Struct(">I").pack
    return [header + data + pack(len(p)) + p for p in payloads]


class StreamConnection:
    """One connection to a broker, used from one thread at a time (see the module docstring).

    Parameters
    ----------
    url
        The broker.
    retry_timeout_s
        How long a connection that cannot be opened, or breaks, is retried.
    name
        The connection's name (shown by the broker's management tools).
    """

    def __init__(self, url: StreamUrl, *, retry_timeout_s: float, name: str) -> None:
        require_rstream()
        self.url = url
        self.retry_timeout_s = retry_timeout_s
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"rabbitmq-{name}", daemon=True
        )
        self._thread.start()
        self._client: Any = None
        self._publisher: tuple[str, str] | None = None
        self._subscription = 0

    # -- running coroutines from the caller's thread -------------------------------------------

    def _call(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(_awaited(make), self._loop)
        return future.result(timeout)

    def _retrying(self, what: str, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work(client)``, reconnecting and retrying a lost connection for the retry timeout."""
        from rstream.exceptions import ServerError, StreamDoesNotExist, StreamNotAvailable

        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.05
        failure: Exception
        while True:
            try:
                client = self._connected()
                return self._call(lambda client=client: work(client))  # type: ignore[misc]
            except StreamDoesNotExist as exc:
                raise BrokerAnswerError(str(exc), _STREAM_DOES_NOT_EXIST) from exc
            except StreamNotAvailable as exc:  # a restarting broker recovers its streams
                failure = exc
            except ServerError as exc:
                if "closed" not in str(exc).lower():
                    raise BrokerAnswerError(
                        str(exc) or type(exc).__name__, getattr(exc, "code", None)
                    ) from exc
                failure = exc
            except (OSError, EOFError, asyncio.TimeoutError, ConnectionError) as exc:
                failure = exc
            except Exception as exc:
                if type(exc).__name__ not in ("ConnectionClosed", "IncompleteReadError"):
                    raise
                failure = exc
            self._drop_client()
            if time.monotonic() >= deadline:
                msg = (
                    f"cannot {what}: the broker at {self.url.where} did not answer for "
                    f"{self.retry_timeout_s:g} s (retry_timeout): {failure!r}"
                )
                raise BrokerUnreachableError(msg) from failure
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def _connected(self) -> Any:
        if self._client is not None and self._client.is_connection_alive():
            return self._client
        self._drop_client()
        from rstream.client import Addr, ClientPool

        url = self.url
        pool = ClientPool(
            url.host,
            url.port,
            vhost=url.vhost,
            username=url.username,
            password=url.password,
            frame_max=1024 * 1024,
            heartbeat=60,
            load_balancer_mode=False,
            max_retries=1,
        )

        async def open_client() -> Any:
            # A closed connection is noticed by the next call (which reconnects); the handler
            # only keeps rstream from logging it as an error with a traceback.
            return await asyncio.wait_for(
                pool.new(self.name, Addr(url.host, url.port), connection_closed_handler=_closed),
                10,
            )

        self._client = self._call(open_client)
        return self._client

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._publisher = None
        if client is not None:

            async def close() -> None:
                try:
                    await asyncio.wait_for(client.close(), 2)
                except Exception:  # a broken connection: nothing to keep
                    return

            self._call(close)

    def close(self) -> None:
        """Close the connection and stop the event loop's thread."""
        self._drop_client()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # -- streams and offsets -------------------------------------------------------------------

    def stream_exists(self, stream: str) -> bool:
        """Whether ``stream`` exists."""

        async def work(client: Any) -> bool:
            exists: bool = await client.stream_exists(stream)
            return exists

        return self._retrying(f"look up stream {stream!r}", work)

    def create_stream(self, stream: str, arguments: dict[str, Any]) -> None:
        """Create ``stream`` with ``arguments`` (``max-length-bytes``, ...), if it is missing."""

        async def work(client: Any) -> None:
            if not await client.stream_exists(stream):
                await client.create_stream(stream, arguments or None)

        self._retrying(f"create stream {stream!r}", work)

    def delete_stream(self, stream: str) -> None:
        """Delete ``stream`` (and its messages) if it exists."""

        async def work(client: Any) -> None:
            if await client.stream_exists(stream):
                await client.delete_stream(stream)

        self._retrying(f"delete stream {stream!r}", work)

    def edge(self, stream: str, *, last: bool, wait_s: float) -> Chunk | None:
        """The stream's first (or last) chunk, or None when it holds no message within ``wait_s``.

        The broker delivers the chunk at once when there is one, so ``wait_s`` is
        waited only for an empty stream.
        """
        from rstream import constants, schema

        kind = constants.OffsetType.LAST if last else constants.OffsetType.FIRST
        chunks = self.read(
            stream, schema.OffsetSpec.from_params(kind, None), stop=lambda _: True, idle_s=wait_s
        )
        return chunks[0] if chunks else None

    def read(
        self,
        stream: str,
        spec: Any,
        *,
        stop: Callable[[Chunk], bool],
        idle_s: float,
    ) -> list[Chunk]:
        """The chunks delivered by a subscription at ``spec``, until ``stop(chunk)`` or idle.

        Reading ends when ``stop`` returns True for a chunk, or when no chunk came
        for ``idle_s`` seconds.
        """
        from rstream import schema

        def work(client: Any) -> Awaitable[list[Chunk]]:
            return self._subscribe(client, stream, spec, stop, idle_s, schema)

        return self._retrying(f"read stream {stream!r}", work)

    async def _subscribe(
        self,
        client: Any,
        stream: str,
        spec: Any,
        stop: Callable[[Chunk], bool],
        idle_s: float,
        schema: Any,
    ) -> list[Chunk]:
        self._subscription = (self._subscription + 1) % 250
        sid = self._subscription
        frames: asyncio.Queue[Any] = asyncio.Queue()

        async def on_deliver(frame: Any) -> None:
            await frames.put(frame)

        client.add_handler(schema.Deliver, on_deliver, name=str(sid))
        await client.run_queue_listener_task(sid, on_deliver)
        chunks: list[Chunk] = []
        try:
            await client.subscribe(stream, sid, spec, initial_credit=4)
            while True:
                try:
                    frame = await asyncio.wait_for(frames.get(), idle_s)
                except asyncio.TimeoutError:
                    if not client.is_connection_alive():
                        raise ConnectionError("the connection closed while reading") from None
                    break
                await client.credit(sid, 1)
                if frame.chunk_type != 0:  # tracking chunks hold no messages
                    continue
                raw = frame.get_messages()
                first = frame.chunk_first_offset
                chunk = Chunk(
                    offsets=list(range(first, first + len(raw))),
                    bodies=[_amqp_body(m) for m in raw],
                    timestamp_ms=frame.timestamp,
                )
                chunks.append(chunk)
                if stop(chunk):
                    break
        finally:
            if client.is_connection_alive():
                with contextlib.suppress(Exception):  # an unsubscribed or gone subscription
                    await asyncio.wait_for(client.unsubscribe(sid), 5)
            await client.stop_queue_listener_task(sid)
            client.remove_handler(schema.Deliver, str(sid))
        return chunks

    # -- publishing ----------------------------------------------------------------------------

    def publisher_sequence(self, stream: str, reference: str) -> int:
        """The last publishing id the broker stored for producer ``reference`` (0: none)."""

        async def work(client: Any) -> int:
            sequence: int = await client.query_publisher_sequence(stream, reference)
            return sequence

        return self._retrying(f"ask for producer {reference!r}'s last publishing id", work)

    def publish(
        self, stream: str, reference: str, ids: Sequence[int], messages: Sequence[bytes]
    ) -> list[tuple[int, int]]:
        """Publish ``messages`` with publishing ``ids`` as producer ``reference``; wait for all.

        Returns the ``(publishing id, response code)`` of every message the
        broker refused (empty when all were confirmed). Messages whose id is at
        or below the producer's last one are confirmed by the broker without
        being stored (its deduplication).
        """
        from rstream import schema

        async def work(client: Any) -> list[tuple[int, int]]:
            if self._publisher != (stream, reference):
                await client.declare_publisher(stream, reference, 0)
                self._publisher = (stream, reference)
            pending = set(ids)
            errors: list[tuple[int, int]] = []
            settled = asyncio.Event()

            def on_confirm(frame: Any) -> None:
                pending.difference_update(frame.publishing_ids)
                if not pending:
                    settled.set()

            def on_error(frame: Any) -> None:
                for error in frame.errors:
                    errors.append((error.publishing_id, error.response_code))
                    pending.discard(error.publishing_id)
                if not pending:
                    settled.set()

            client.add_handler(schema.PublishConfirm, on_confirm, name="microstream")
            client.add_handler(schema.PublishError, on_error, name="microstream")
            try:
                frame: list[Any] = []
                size = 0
                for pid, data in zip(ids, messages):
                    frame.append(schema.Message(publishing_id=pid, filter_value=None, data=data))
                    size += len(data) + 16
                    if size >= _FRAME_BYTES or len(frame) >= 5000:
                        await client.publish(frame, 0)
                        frame, size = [], 0
                if frame:
                    await client.publish(frame, 0)
                while pending:
                    if not client.is_connection_alive():
                        raise ConnectionError("the connection closed before every confirm came")
                    try:
                        await asyncio.wait_for(settled.wait(), 1.0)
                    except asyncio.TimeoutError:
                        continue
            finally:
                client.remove_handler(schema.PublishConfirm, "microstream")
                client.remove_handler(schema.PublishError, "microstream")
            return errors

        return self._retrying(f"publish to stream {stream!r}", work)


async def _closed(info: Any) -> None:
    """A connection closed: nothing to do until the next call."""


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    return await make()
