"""A local HTTP endpoint for tests and demos of ``sink_http``: it records every request
and fails on purpose when told to.

:class:`RecordingHttpServer` serves on a free port of 127.0.0.1 from a thread of the
current process (the standard library's ``ThreadingHTTPServer``: no dependency, no
subprocess). Every request is recorded (method, path, headers, body) in arrival order;
:meth:`RecordingHttpServer.respond` queues the replies of the next requests (a status,
a body, a delay before answering: a 503 to retry, a 400 to fail, a delay longer than
the client's timeout); requests beyond the queue get ``200``. :meth:`stop` and
:meth:`start` close and reopen the same port, for the "server down, then back" case.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from microstream.testing._process import free_port

__all__ = ["RecordedRequest", "RecordingHttpServer", "Reply"]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received (and answered with ``status``)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass(frozen=True)
class Reply:
    """How the server answers one request: ``status`` with ``body``, after ``delay`` seconds."""

    status: int = 200
    body: bytes = b""
    delay: float = 0.0


@dataclass
class _Script:
    lock: threading.Lock = field(default_factory=threading.Lock)
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)


class RecordingHttpServer:
    """An HTTP server on 127.0.0.1 that records requests and replies as scripted.

    Examples
    --------
    >>> import urllib.request
    >>> with RecordingHttpServer() as server:
    ...     server.respond(Reply(status=201, body=b"made"))
    ...     request = urllib.request.Request(server.url("/in"), data=b"x", method="POST")
    ...     with urllib.request.urlopen(request) as response:
    ...         answer = response.status, response.read()
    >>> answer
    (201, b'made')
    >>> [(r.method, r.path, r.body, r.status) for r in server.requests]
    [('POST', '/in', b'x', 201)]
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._script = _Script()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = "/") -> str:
        """``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, oldest first (a copy)."""
        with self._script.lock:
            return list(self._script.requests)

    def respond(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order (then ``200`` again)."""
        with self._script.lock:
            self._script.replies.extend(replies)

    def clear(self) -> None:
        """Forget the recorded requests and the queued replies."""
        with self._script.lock:
            self._script.requests.clear()
            self._script.replies.clear()

    def start(self) -> RecordingHttpServer:
        """Listen on :attr:`port` (again, after :meth:`stop`)."""
        script = self._script

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self._handle()

            def do_PUT(self) -> None:
                self._handle()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with script.lock:
                    reply = script.replies.popleft() if script.replies else Reply()
                    script.requests.append(
                        RecordedRequest(
                            self.command, self.path, dict(self.headers.items()), body, reply.status
                        )
                    )
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output clean

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"http-test-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (requests are refused until :meth:`start`)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> RecordingHttpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
