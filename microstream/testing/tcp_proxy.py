"""A TCP proxy to take a local service down and bring it back, its state intact.

:class:`TcpProxy` forwards a free port of 127.0.0.1 to a target address from threads
of the current process. :meth:`TcpProxy.cut` closes its connections and stops
listening (clients get "connection refused", as from a server that is down);
:meth:`TcpProxy.restore` listens on the same port again. The service behind keeps
its data, which a restarted in-memory server (moto, Tansu) would lose.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from microstream.testing._process import free_port

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; :meth:`cut` and :meth:`restore` it.

    Examples
    --------
    >>> from microstream.testing.line_server import LineServer
    >>> with LineServer() as server, TcpProxy(("127.0.0.1", server.port)) as proxy:
    ...     client = socket.create_connection(("127.0.0.1", proxy.port))
    ...     server.wait_for_clients(1)
    ...     server.send("through")
    ...     line = client.makefile("r").readline()
    ...     client.close()
    ...     proxy.cut()
    ...     try:
    ...         socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    ...     except ConnectionRefusedError:
    ...         refused = True
    >>> line, refused
    ('through\\n', True)
    """

    def __init__(self, target: tuple[str, int], port: int | None = None) -> None:
        self.target = target
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, for an HTTP service behind the proxy."""
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> TcpProxy:
        """Listen (again) and forward new connections."""
        if self._listener is not None:
            return self
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def cut(self) -> None:
        """Close every connection and stop listening (connections are refused)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> TcpProxy:
        return self.restore()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cut()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes from ``source`` to ``sink`` until either side closes."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
