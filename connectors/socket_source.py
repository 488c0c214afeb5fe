"""The socket source: text lines read from a TCP server, for demos (Spark's ``socket`` source).

The source connects to ``host:port`` when the query starts and a thread reads the
lines the server sends into memory. Each line gets a number: lines received over the
query's life, counted on from the offsets in the write-ahead log. An offset is such a
count; a batch ``(start, end]`` is the lines numbered ``start .. end - 1``, kept in
memory until the batch is committed.

**Not replayable.** The lines live only in this process: after a crash or a stop
before ``commits/N``, the re-run of batch ``N`` finds its lines gone and reads it as
empty (a warning names the lost range), and lines the server sent while no query ran
are never seen. A durable sink (files, Delta, Kafka, PostgreSQL, HTTP,
``foreach_batch``) would therefore not hold every line exactly once, so the engine
refuses the source with one unless ``acknowledge_not_replayable=True``
(:class:`~microstream.protocols.NonReplayableSourceSpec`); the memory and console
sinks take it as it is. As Spark says of its own: for testing and demos only.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import polars as pl
from pydantic import Field, ValidationError

from microstream.exceptions import OffsetError, SourceError
from microstream.protocols import Offset, SourceContext

__all__ = ["SocketOffset", "SocketSource", "SocketSourceSpec"]

_CONNECT_TIMEOUT_S = 10.0


class SocketOffset(Offset):
    """The number of lines received so far (the next line's number).

    Examples
    --------
    >>> SocketOffset(lines=7).distance(SocketOffset(lines=3))
    4
    """

    lines: int = Field(ge=0)

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other``."""
        return self.lines >= _socket_offset(other, "compare with").lines

    def distance(self, other: Offset) -> int | None:
        """Lines between ``other`` and this offset."""
        return self.lines - _socket_offset(other, "measure from").lines


def _socket_offset(offset: Offset, action: str) -> SocketOffset:
    if not isinstance(offset, SocketOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a SocketOffset"
        raise OffsetError(msg)
    return offset


@dataclass(frozen=True)
class SocketSourceSpec:
    """Text lines from a TCP server, one row per line (for demos: not replayable).

    Parameters
    ----------
    host
        The server's host name or address.
    port
        The server's TCP port. The server must be listening when the query
        starts (``nc -lk 9999`` is one).
    include_timestamp
        Add a ``timestamp`` column (``Datetime("us")``, UTC): when the line
        was received.
    acknowledge_not_replayable
        Accept that lines in flight at a crash or a stop are lost, and with
        them exactly-once output: needed to write to a durable sink (files,
        Delta, Kafka, PostgreSQL, HTTP, ``foreach_batch``). The memory and
        console sinks do not need it.

    Notes
    -----
    Rows: ``value`` (String, the line without its ``\\n`` or ``\\r\\n``; bytes
    that are not UTF-8 are replaced with U+FFFD), then ``timestamp`` if asked
    for, in the order received. When the server closes the connection the
    source stops receiving (the query keeps running, with empty batches).

    Examples
    --------
    >>> spec = SocketSourceSpec("localhost", 9999, include_timestamp=True)
    >>> spec.describe(), list(spec.schema)
    ('SocketSource[localhost:9999]', ['value', 'timestamp'])
    """

    kind: ClassVar[str] = "socket"

    host: str
    port: int
    _: KW_ONLY
    include_timestamp: bool = False
    acknowledge_not_replayable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            msg = f"host must be a host name or address; got {self.host!r}"
            raise ValueError(msg)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            msg = f"port must be an integer from 1 to 65535; got {self.port!r}"
            raise ValueError(msg)
        if not 1 <= self.port <= 65535:
            msg = f"port must be an integer from 1 to 65535; got {self.port!r}"
            raise ValueError(msg)

    @property
    def schema(self) -> pl.Schema:
        """``{"value": String}``, plus ``"timestamp": Datetime("us")`` with ``include_timestamp``."""
        columns: dict[str, pl.DataType] = {"value": pl.String()}
        if self.include_timestamp:
            columns["timestamp"] = pl.Datetime("us")
        return pl.Schema(columns)

    def identity(self) -> dict[str, Any]:
        """The server's address."""
        return {"host": self.host, "port": self.port}

    def describe(self) -> str:
        """One line: ``SocketSource[host:port]``."""
        return f"SocketSource[{self.host}:{self.port}]"

    def build(self, context: SourceContext) -> SocketSource:
        """The runtime source: connects to the server and starts receiving."""
        return SocketSource(self, context)


class SocketSource:
    """The runtime side of :class:`SocketSourceSpec` (see the module docstring)."""

    def __init__(self, spec: SocketSourceSpec, context: SourceContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        self._logger = context.logger
        try:
            self._socket = socket.create_connection(
                (spec.host, spec.port), timeout=_CONNECT_TIMEOUT_S
            )
        except OSError as exc:
            msg = (
                f"{self.description}: cannot connect to {spec.host}:{spec.port}: {exc}; start "
                f"the server first (for a demo: nc -lk {spec.port})"
            )
            raise SourceError(msg) from None
        self._socket.settimeout(None)
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._times_us: list[int] = []
        self._base: int | None = None  # the number of this run's first line
        self._dropped = 0  # lines of this run forgotten by commit (before self._lines[0])
        self._fixed_received: int | None = None  # lines of this run available_now stops at
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._receive, name=f"socket-source-{spec.host}:{spec.port}", daemon=True
        )
        self._thread.start()

    def _receive(self) -> None:
        reader = self._socket.makefile("rb")
        try:
            for raw in reader:
                line = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", errors="replace")
                with self._lock:
                    self._lines.append(line)
                    self._times_us.append(time.time_ns() // 1000)
        except OSError as exc:
            if not self._closed.is_set():
                self._logger.warning("%s: receiving stopped: %s", self.description, exc)
        else:
            if not self._closed.is_set():
                self._logger.info("%s: the server closed the connection", self.description)
        finally:
            reader.close()

    def _base_from(self, offset: SocketOffset) -> int:
        """The number of this run's first line; the first batch of the run fixes it."""
        if self._base is None:
            self._base = offset.lines
        return self._base

    def initial_offset(self) -> SocketOffset:
        """No lines yet."""
        return SocketOffset(lines=0)

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> SocketOffset:
        """Every line received so far (or by :meth:`prepare_for_available_now`)."""
        begin = _socket_offset(start, "start a batch at")
        with self._lock:
            base = self._base_from(begin)
            received = self._dropped + len(self._lines)
        if self._fixed_received is not None:
            received = min(received, self._fixed_received)
        return SocketOffset(lines=max(begin.lines, base + received))

    def prepare_for_available_now(self) -> None:
        """Stop at the lines received by now."""
        with self._lock:
            self._fixed_received = self._dropped + len(self._lines)

    def lag(self, end: Offset) -> int | None:
        """Lines received beyond ``end``."""
        with self._lock:
            if self._base is None:
                return None
            received = self._base + self._dropped + len(self._lines)
        return max(0, received - _socket_offset(end, "measure lag from").lines)

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The lines numbered ``start .. end - 1`` still in memory (see the module docstring)."""
        low = _socket_offset(start, "read from").lines
        last = _socket_offset(end, "read to")
        high = last.lines
        if high < low:
            msg = f"{self.description}: cannot read ({low}, {high}]: the end is before the start"
            raise OffsetError(msg)
        with self._lock:
            # A batch logged by an earlier run (re-run after a crash) comes before any
            # latest_offset: its lines were that process's, so this run numbers from its end.
            base = self._base_from(last)
            first = base + self._dropped  # the number of self._lines[0]
            lines = self._lines[max(low - first, 0) : max(high - first, 0)]
            times = self._times_us[max(low - first, 0) : max(high - first, 0)]
        if low < base:
            self._logger.warning(
                "%s: lines %d to %d were received by an earlier run and are lost (the socket "
                "source cannot replay them)",
                self.description,
                low,
                min(high, base) - 1,
            )
        frame = pl.DataFrame({"value": pl.Series("value", lines, dtype=pl.String)})
        if self.spec.include_timestamp:
            frame = frame.with_columns(
                pl.Series("timestamp", times, dtype=pl.Int64).cast(pl.Datetime("us"))
            )
        return frame

    def parse_offset(self, data: dict[str, Any]) -> SocketOffset:
        """A :class:`SocketOffset` from its JSON form in the write-ahead log."""
        try:
            return SocketOffset.model_validate(data)
        except ValidationError as exc:
            msg = (
                f"{self.description}: {data!r} is not a socket source offset "
                f"(expected {{'lines': <int >= 0>}}): {exc.errors()[0]['msg']}"
            )
            raise OffsetError(msg) from None

    def commit(self, end: Offset) -> None:
        """Forget the lines before ``end`` (memory holds the uncommitted lines only)."""
        upto = _socket_offset(end, "commit").lines
        with self._lock:
            if self._base is None:
                return
            drop = min(max(upto - self._base - self._dropped, 0), len(self._lines))
            del self._lines[:drop]
            del self._times_us[:drop]
            self._dropped += drop

    def stop(self) -> None:
        """Close the connection and end the receiving thread."""
        self._closed.set()
        with contextlib.suppress(OSError):  # already closed by the server
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._thread.join(timeout=5)
