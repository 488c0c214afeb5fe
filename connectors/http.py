"""The HTTP sink: each batch POSTed in chunks, every chunk under an idempotency key.

A batch's rows are cut into chunks of ``chunk_rows`` rows, in order; chunk ``c`` of
batch ``N`` is one ``POST`` whose body is the chunk as JSON lines (or one JSON array)
and whose ``Idempotency-Key`` header is ``<query id>-<N>-<c>``. A re-run of a batch
after a crash has the same rows in the same order (the engine replays the logged
range), hence the same chunks under the same keys: an endpoint that remembers the
keys it processed (the IETF ``Idempotency-Key`` draft; Stripe and others) applies
each chunk once. The sink itself cannot ask an endpoint what it already holds, so it
is **at-least-once**, and exactly-once only with an endpoint that honours the key.

Failures: a connection error, a timeout, ``408``, ``429`` or a ``5xx`` reply is
retried with exponential backoff (50 ms doubling to 2 s) until ``retry_timeout``
has passed, then the batch fails with a :class:`~microstream.exceptions.SinkError`
naming the chunk, its key and the last error; any other non-2xx reply fails the
batch at once, naming the status and the first bytes of the reply. A failed batch
is re-run from its first chunk when the query restarts (chunks already accepted are
sent again under their keys).

Requests go through the standard library (``urllib``): no dependency.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, ClassVar

import polars as pl

from microstream.exceptions import SinkError
from microstream.protocols import SinkContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from microstream._typing import HttpSinkFormat

__all__ = ["IDEMPOTENCY_HEADER", "HttpSink", "HttpSinkSpec"]

IDEMPOTENCY_HEADER = "Idempotency-Key"
_CONTENT_TYPES = {"ndjson": "application/x-ndjson", "json": "application/json"}
_RETRIED_STATUSES = frozenset({408, 429})  # and every 5xx
_REPLY_PREVIEW = 200  # bytes of a failed reply quoted in the error
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class HttpSinkSpec:
    """POST each batch's rows to an HTTP endpoint, in chunks under idempotency keys.

    Parameters
    ----------
    url
        The endpoint (``http://`` or ``https://``) every chunk is POSTed to.
    format
        The body of a chunk: ``"ndjson"`` (one JSON object per row and line,
        ``Content-Type: application/x-ndjson``) or ``"json"`` (one JSON array
        of objects, ``application/json``). Written by Polars' JSON writers:
        dates and datetimes as ISO 8601 text, nulls as ``null``.
    chunk_rows
        At most this many rows per request. A batch of ``n`` rows is
        ``ceil(n / chunk_rows)`` requests, sent one after the other; an empty
        batch sends nothing. Changing it changes the chunks (and their keys)
        of a batch re-run after a restart.
    headers
        Extra headers on every request (``Authorization``, ...). Never shown.
        ``Idempotency-Key`` and ``Content-Type`` are the sink's.
    timeout
        How long one request may take (connect, send, reply) before it counts
        as failed and is retried: ``"10s"``, a ``timedelta`` or seconds.
    retry_timeout
        How long a chunk is retried (connection errors, timeouts, ``408``,
        ``429``, ``5xx``) with backoff from 50 ms doubling to 2 s before the
        batch fails with a ``SinkError``.

    Notes
    -----
    Guarantee: **at-least-once**. Chunk ``c`` of batch ``N`` carries
    ``Idempotency-Key: <query id>-<N>-<c>``; a batch re-run after a crash or a
    failure sends the same rows in the same chunks under the same keys, so an
    endpoint that deduplicates on the key receives every row exactly once.

    Examples
    --------
    >>> spec = HttpSinkSpec("http://127.0.0.1:8080/events", chunk_rows=500)
    >>> spec.describe(), sorted(spec.output_modes)
    ('HttpSink[http://127.0.0.1:8080/events]', ['append', 'complete', 'update'])
    >>> HttpSinkSpec("ftp://host/x")
    Traceback (most recent call last):
    ...
    ValueError: url must start with http:// or https://; got 'ftp://host/x'
    """

    kind: ClassVar[str] = "http_sink"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "update", "complete"})
    durable: ClassVar[bool] = True

    url: str
    _: KW_ONLY
    format: HttpSinkFormat = "ndjson"
    chunk_rows: int = 1000
    headers: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    timeout: str | timedelta | float = "10s"
    retry_timeout: str | timedelta | float = "30s"

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            msg = f"url must start with http:// or https://; got {self.url!r}"
            raise ValueError(msg)
        if self.format not in _CONTENT_TYPES:
            msg = f"format must be 'ndjson' or 'json'; got {self.format!r}"
            raise ValueError(msg)
        if isinstance(self.chunk_rows, bool) or not isinstance(self.chunk_rows, int):
            msg = f"chunk_rows must be a positive integer; got {self.chunk_rows!r}"
            raise ValueError(msg)
        if self.chunk_rows < 1:
            msg = f"chunk_rows must be a positive integer; got {self.chunk_rows!r}"
            raise ValueError(msg)
        if self.headers is not None:
            reserved = sorted(
                name
                for name in self.headers
                if name.lower() in ("idempotency-key", "content-type", "content-length")
            )
            if reserved:
                msg = f"headers may not set {reserved}: the sink sets them on every request"
                raise ValueError(msg)
            object.__setattr__(self, "headers", dict(self.headers))
        if parse_duration(self.timeout, name="timeout") <= timedelta(0):
            msg = f"timeout must be positive; got {self.timeout!r}"
            raise ValueError(msg)
        parse_duration(self.retry_timeout, name="retry_timeout")

    def describe(self) -> str:
        """One line: ``HttpSink[<url>]``."""
        return f"HttpSink[{self.url}]"

    def build(self, context: SinkContext) -> HttpSink:
        """The runtime sink."""
        return HttpSink(self, context)


class HttpSink:
    """The runtime side of :class:`HttpSinkSpec` (see the module docstring)."""

    def __init__(self, spec: HttpSinkSpec, context: SinkContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        self.query_id = context.query_id
        self._logger = context.logger
        self._timeout_s = parse_duration(spec.timeout).total_seconds()
        self._retry_s = parse_duration(spec.retry_timeout).total_seconds()
        self._headers = {"Content-Type": _CONTENT_TYPES[spec.format], **(spec.headers or {})}

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """POST the batch's chunks in order, each under its idempotency key.

        Raises
        ------
        SinkError
            A chunk was refused (a non-retried status: the message names it and
            quotes the reply's first bytes), or kept failing for ``retry_timeout``.
        """
        rows = self.spec.chunk_rows
        for chunk, offset in enumerate(range(0, data.height, rows)):
            part = data.slice(offset, rows)
            body = (
                part.write_ndjson() if self.spec.format == "ndjson" else part.write_json()
            ).encode()
            self._post(batch_id, chunk, body)

    def _post(self, batch_id: int, chunk: int, body: bytes) -> None:
        key = f"{self.query_id}-{batch_id}-{chunk}"
        request = urllib.request.Request(
            self.spec.url,
            data=body,
            method="POST",
            headers={**self._headers, IDEMPOTENCY_HEADER: key},
        )
        where = (
            f"{self.description}: chunk {chunk} of batch {batch_id} ({IDEMPOTENCY_HEADER}: {key})"
        )
        deadline = time.monotonic() + self._retry_s
        backoff = _FIRST_BACKOFF_S
        attempts = 0
        while True:
            attempts += 1
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    response.read()
                return
            except urllib.error.HTTPError as exc:
                reply = _preview(exc)
                if exc.code not in _RETRIED_STATUSES and exc.code < 500:
                    msg = (
                        f"{where} was refused with HTTP {exc.code} {exc.reason}: {reply}; not "
                        "retried (a client error); fix the request or the endpoint and restart "
                        "the query, which sends the batch again"
                    )
                    raise SinkError(msg) from None
                reason = f"HTTP {exc.code} {exc.reason}: {reply}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                if isinstance(cause, (TimeoutError, socket.timeout)):
                    reason = f"no reply within timeout={self.spec.timeout!r}"
                else:
                    reason = f"{type(cause).__name__}: {cause}"
            if time.monotonic() + backoff > deadline:
                msg = (
                    f"{where} failed {attempts} times within retry_timeout="
                    f"{self.spec.retry_timeout!r}; last error: {reason}. Restart the query "
                    "when the endpoint is back: the batch is sent again under the same keys"
                )
                raise SinkError(msg)
            log = self._logger.warning if attempts == 1 else self._logger.debug
            log("%s: %s; retrying (attempt %d)", where, reason, attempts + 1)
            time.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def stop(self) -> None:
        """Nothing to release: every request closes its connection."""


def _preview(error: urllib.error.HTTPError) -> str:
    """The first bytes of a failed reply, quoted (``b''`` when it has no body)."""
    try:
        head = error.read(_REPLY_PREVIEW + 1)
    except OSError:
        head = b""
    text = repr(head[:_REPLY_PREVIEW])
    return text + (" ..." if len(head) > _REPLY_PREVIEW else "")
