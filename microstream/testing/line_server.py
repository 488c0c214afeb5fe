"""A local TCP server that sends text lines to whoever connects: ``nc -lk`` for tests.

:class:`LineServer` listens on a free port of 127.0.0.1 from a thread of the current
process; :meth:`LineServer.send` writes lines to every connected client (after
:meth:`LineServer.wait_for_clients`, so none is missed), :meth:`LineServer.disconnect`
closes their connections. For ``ms.scan_socket`` in tests, doctests and demos.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

from microstream.testing._process import free_port

__all__ = ["LineServer"]


class LineServer:
    """A TCP server on 127.0.0.1 that sends the lines it is given to its clients.

    Examples
    --------
    >>> with LineServer() as server:
    ...     client = socket.create_connection(("127.0.0.1", server.port))
    ...     server.wait_for_clients(1)
    ...     server.send("hello", "world")
    ...     received = client.makefile("r").readline()
    ...     client.close()
    >>> received
    'hello\\n'
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LineServer:
        """Listen on :attr:`port` and accept clients."""
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        self._thread = threading.Thread(
            target=self._accept, args=(listener,), name=f"line-server-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                self._clients.append(client)

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        with self._lock:
            return len(self._clients)

    def wait_for_clients(self, count: int, timeout: float = 10.0) -> None:
        """Block until ``count`` clients are connected (``TimeoutError`` after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while self.clients < count:
            if time.monotonic() > deadline:
                msg = f"{self.clients} of {count} clients connected to port {self.port} in {timeout} s"
                raise TimeoutError(msg)
            time.sleep(0.01)

    def send(self, *lines: str | bytes) -> None:
        """Write each line, with a ``\\n``, to every connected client."""
        data = b"".join(
            (line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines
        )
        with self._lock:
            for client in self._clients:
                client.sendall(data)

    def disconnect(self) -> None:
        """Close every client connection (the server keeps listening)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def stop(self) -> None:
        """Close the clients and stop listening."""
        self.disconnect()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):  # never accepted anything
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LineServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
