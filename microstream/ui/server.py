"""The dashboard's HTTP server: a read-only view of queries, on the standard library alone.

1. :func:`start_ui` checks where to bind (loopback unless ``allow_remote``),
   builds a :class:`Dashboard` (which owns its server, its thread and the list of
   checkpoints it shows: no module state) and starts serving on a daemon thread.
2. Every GET is answered from what the queries hold at that moment
   (:mod:`microstream.ui.views`): two static pages, their script and style
   (package data in ``static/``), and the JSON they poll every second.
3. Nothing else is served. POST, PUT, DELETE and PATCH get ``405``: there is no
   request that stops, resets or changes a query. Without ``allow_remote`` a
   request whose ``Host`` is not the loopback address gets ``421``, so a page
   on another site cannot reach the dashboard through DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from microstream.api.session import Session, default_session
from microstream.exceptions import MicrostreamError
from microstream.ui.views import DashboardQuery, dashboard_queries, state_view

__all__ = ["Dashboard", "start_ui"]

logger = logging.getLogger("microstream")

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_QUERY_PAGE = ("query.html", "text/html; charset=utf-8")
# The page may load and fetch only from this server, and runs no inline script.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATE_ROWS = 200
"""Rows of a state store the page shows (the rest: ``ms.read_state`` or ``microstream state``)."""


def start_ui(
    *,
    port: int = 8080,
    host: str = "127.0.0.1",
    allow_remote: bool = False,
    checkpoints: Sequence[str] = (),
    session: Session | None = None,
) -> Dashboard:
    """Serve a live, read-only dashboard of the queries of this process.

    The page lists the session's queries (running, and recently finished)
    and the ``checkpoints`` given; a query's page shows, updated every second,
    its input and processed rows per second, batch duration by phase, the
    watermark against the wall clock, state rows and bytes per operator, late
    rows, source lag, the plan, the last error and a table of its state. Nothing
    is loaded from outside the server, and no request can change a query.

    Parameters
    ----------
    port
        TCP port; 0 picks a free one (read it back from ``.port`` or ``.url``).
    host
        Address to bind. Only a loopback address (``127.0.0.1``, ``::1``,
        ``localhost``) unless ``allow_remote``.
    allow_remote
        Allow binding to another address. Anyone who can reach it then sees
        every query's plan, progress and state (the data itself, read-only),
        without authentication or TLS; put it behind an authenticating proxy
        or an SSH tunnel instead where you can.
    checkpoints
        Checkpoint directories or URLs to show as well, read from their
        progress logs (queries of other processes, or that ran before).
    session
        The session whose queries are shown (default: the process's).

    Returns
    -------
    Dashboard
        The running server; ``.url``, ``.port``, ``.stop()``; a context manager.

    Raises
    ------
    MicrostreamError
        ``host`` is not a loopback address and ``allow_remote`` is False, or
        the port cannot be bound (in use, or not allowed).

    Examples
    --------
    >>> import microstream as ms
    >>> ui = ms.start_ui(port=0)
    >>> ui.url.startswith("http://127.0.0.1:")
    True
    >>> ui.stop()
    >>> ms.start_ui(host="0.0.0.0")
    Traceback (most recent call last):
    ...
    microstream.exceptions.MicrostreamError: start_ui(host='0.0.0.0') would show every query's data to the network, unauthenticated; pass allow_remote=True (microstream ui: --allow-remote) to bind to it anyway, or keep the default host='127.0.0.1'
    """
    if not allow_remote and not _is_loopback(host):
        msg = (
            f"start_ui(host={host!r}) would show every query's data to the network, "
            "unauthenticated; pass allow_remote=True (microstream ui: --allow-remote) to bind "
            "to it anyway, or keep the default host='127.0.0.1'"
        )
        raise MicrostreamError(msg)
    dashboard = Dashboard(
        host=host,
        port=port,
        allow_remote=allow_remote,
        checkpoints=list(checkpoints),
        session=session or default_session,
    )
    dashboard.start()
    return dashboard


class Dashboard:
    """A running dashboard server (returned by :func:`start_ui`); owns its state.

    Examples
    --------
    >>> with Dashboard(host="127.0.0.1", port=0, checkpoints=[]) as ui:
    ...     ui.port > 0
    True
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        checkpoints: list[str],
        session: Session | None = None,
        allow_remote: bool = False,
    ):
        self.session = session or default_session
        self.checkpoints = checkpoints
        self.allow_remote = allow_remote
        try:
            self._server = _Server((host, port), _Handler, dashboard=self)
        except OSError as exc:
            msg = f"the dashboard cannot listen on {host}:{port}: {exc.strerror or exc}; pick another port (0: any free one)"
            raise MicrostreamError(msg) from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address of the query list, e.g. ``http://127.0.0.1:8080/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Serve on a daemon thread (the process can exit while it serves)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},  # how long stop() may wait for the loop
                name=f"microstream-ui-{self.port}",
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; the queries are not touched."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def queries(self) -> list[DashboardQuery]:
        return dashboard_queries(self.session, self.checkpoints)

    def allowed_hosts(self) -> set[str]:
        """``Host`` header values accepted without ``allow_remote``."""
        return {f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")}

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Dashboard {self.url}>"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        dashboard: Dashboard,
    ):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.dashboard = dashboard
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "microstream-ui"

    # -- read-only: GET and HEAD, nothing else ---------------------------------------

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _refuse(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            _json({"error": "the dashboard is read-only: only GET and HEAD are served"}),
            "application/json",
            extra={"Allow": "GET, HEAD"},
        )

    def do_POST(self) -> None:
        self._refuse()

    def do_PUT(self) -> None:
        self._refuse()

    def do_DELETE(self) -> None:
        self._refuse()

    def do_PATCH(self) -> None:
        self._refuse()

    # -- routes -------------------------------------------------------------------------

    def _answer(self, *, send_body: bool) -> None:
        self._send_body = send_body
        dashboard = self.server.dashboard
        if not dashboard.allow_remote and self.headers.get("Host") not in dashboard.allowed_hosts():
            self._send(
                HTTPStatus.MISDIRECTED_REQUEST,
                _json({"error": f"unexpected Host header {self.headers.get('Host')!r}"}),
                "application/json",
            )
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        try:
            if path in _STATIC:
                self._static(*_STATIC[path])
            elif path == "/api/queries":
                self._json([q.summary() for q in dashboard.queries()])
            elif path.startswith("/query/"):
                self._find(path.removeprefix("/query/"))
                self._static(*_QUERY_PAGE)
            elif path.startswith("/api/query/") and path.endswith("/state"):
                query = self._find(path.removeprefix("/api/query/").removesuffix("/state"))
                params = parse_qs(url.query)
                store = params.get("store", [""])[0]
                frame = query.state(store, limit=STATE_ROWS)
                self._json(state_view(frame, store=store, limit=STATE_ROWS))
            elif path.startswith("/api/query/"):
                self._json(self._find(path.removeprefix("/api/query/")).detail())
            else:
                raise _NotFoundError(f"no page {path!r} on the dashboard")
        except _NotFoundError as exc:
            self._send(HTTPStatus.NOT_FOUND, _json({"error": str(exc)}), "application/json")
        except MicrostreamError as exc:  # an unreadable checkpoint, an unknown state store
            self._send(HTTPStatus.BAD_REQUEST, _json({"error": str(exc)}), "application/json")

    def _find(self, key: str) -> DashboardQuery:
        for query in self.server.dashboard.queries():
            if query.key == key:
                return query
        msg = f"no query {key!r} on the dashboard (it may have been dropped from the session)"
        raise _NotFoundError(msg)

    def _static(self, name: str, content_type: str) -> None:
        body = resources.files("microstream.ui").joinpath("static", name).read_bytes()
        self._send(HTTPStatus.OK, body, content_type)

    def _json(self, value: Any) -> None:
        self._send(HTTPStatus.OK, _json(value), "application/json")

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        *,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if getattr(self, "_send_body", True):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("ui: " + format, *args)


class _NotFoundError(Exception):
    """An unknown page or query: 404."""


def _json(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
