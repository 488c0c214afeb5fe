"""A throwaway RabbitMQ broker with the stream plugin, for tests, notebooks and demos.

:class:`RabbitMQServer` starts Debian's ``rabbitmq-server`` as a private node:
its own node name, its own ports (AMQP, stream protocol, Erlang distribution and
the ``epmd`` port mapper, all free ports), its own data, log and cookie
directory under a temporary directory, and the ``rabbitmq_stream`` plugin
enabled. It never touches a system broker (``/var/lib/rabbitmq``). The user is
RabbitMQ's default ``guest``/``guest``, allowed from ``127.0.0.1``.

The broker is the test process's own child (the Erlang VM replaces the start
script, so it dies with the test process on Linux); its ``epmd`` is stopped by
:meth:`RabbitMQServer.stop`.

``rabbitmq-server`` comes from Debian (``apt-get install rabbitmq-server``;
``make test`` installs it when run as root); :func:`find_rabbitmq_server`
tells whether it is there.

Examples
--------
>>> from microstream.testing.rabbitmq import RabbitMQServer
>>> with RabbitMQServer() as broker:  # doctest: +SKIP
...     broker.url
'rabbitmq-stream://guest:guest@127.0.0.1:.../%2F'
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from microstream.exceptions import MissingDependencyError
from microstream.testing._process import die_with_parent_hook, free_port

__all__ = ["RabbitMQError", "RabbitMQServer", "find_rabbitmq_server"]

_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class RabbitMQError(RuntimeError):
    """The broker could not be started, or did not open its stream port in time."""


def find_rabbitmq_server() -> Path | None:
    """The ``rabbitmq-server`` start script that runs in the foreground, or None.

    Debian's ``/usr/sbin/rabbitmq-server`` switches to the ``rabbitmq`` user and
    the system node; the script under ``/usr/lib/rabbitmq/bin`` runs the node we
    configure.

    Examples
    --------
    >>> found = find_rabbitmq_server()
    >>> found is None or found.name == "rabbitmq-server"
    True
    """
    path = Path(_SCRIPT)
    return path if path.exists() else None


class RabbitMQServer:
    """A private RabbitMQ node on ``127.0.0.1`` with the stream plugin (a context manager).

    Parameters
    ----------
    startup_timeout
        Seconds to wait for the stream port to accept connections.

    Attributes
    ----------
    stream_port, amqp_port
        The ports of the stream protocol and of AMQP 0.9.1.
    base_dir
        The node's data, logs and cookie (removed by :meth:`stop`).

    Examples
    --------
    >>> broker = RabbitMQServer().start()  # doctest: +SKIP
    >>> broker.restart(down_for=1.0)  # doctest: +SKIP
    >>> broker.stop()  # doctest: +SKIP
    """

    def __init__(self, *, startup_timeout: float = 60.0) -> None:
        script = find_rabbitmq_server()
        if script is None:
            msg = (
                "RabbitMQServer needs Debian's rabbitmq-server (its stream plugin is built in): "
                "apt-get install rabbitmq-server"
            )
            raise MissingDependencyError(msg)
        self.script = script
        self.startup_timeout = startup_timeout
        self.stream_port = free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"microstream-{uuid.uuid4().hex[:8]}@localhost"
        self.base_dir = Path(tempfile.mkdtemp(prefix="microstream-rabbitmq-"))
        self._process: subprocess.Popen[bytes] | None = None
        (self.base_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"stream.listeners.tcp.1 = 127.0.0.1:{self.stream_port}\n"
            "stream.advertised_host = 127.0.0.1\n"
            f"stream.advertised_port = {self.stream_port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
        )

    @property
    def url(self) -> str:
        """The broker's stream URL (user ``guest``, virtual host ``/``)."""
        return f"rabbitmq-stream://guest:guest@127.0.0.1:{self.stream_port}/%2F"

    @property
    def log_path(self) -> Path:
        """The node's log file (kept until :meth:`stop`)."""
        return self.base_dir / "log" / f"{self.node}.log"

    @property
    def is_running(self) -> bool:
        """Whether the broker's process is alive."""
        return self._process is not None and self._process.poll() is None

    def _environment(self) -> dict[str, str]:
        base = str(self.base_dir)
        return {
            **os.environ,
            "HOME": base,  # the Erlang cookie goes there, not into the user's home
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq.conf",
            "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
            "RABBITMQ_LOG_BASE": f"{base}/log",
            "RABBITMQ_ENABLED_PLUGINS": "rabbitmq_stream",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins",
            "RABBITMQ_PLUGINS_EXPAND_DIR": f"{base}/plugins-expand",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            # The start script then execs the Erlang VM (no shell in between), so the VM is
            # our child, gets our SIGTERM, and dies with us (the parent-death signal).
            "RUNNING_UNDER_SYSTEMD": "true",
        }

    def start(self) -> RabbitMQServer:
        """Start the node (its data kept from an earlier start); returns self.

        Raises
        ------
        RabbitMQError
            The node exited or did not open its stream port in time (the
            message holds the end of its log).
        """
        if self.is_running:
            return self
        with open(self.base_dir / "console.log", "ab") as console:
            self._process = subprocess.Popen(
                [str(self.script)],
                env=self._environment(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509 (imports nothing, no locks)
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self.is_running:
            try:
                with socket.create_connection(("127.0.0.1", self.stream_port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        tail = ""
        for log in (self.log_path, self.base_dir / "console.log"):
            if log.exists():
                tail += log.read_text(errors="replace")[-1500:]
        msg = f"RabbitMQ did not open its stream port {self.stream_port}:\n{tail}"
        self.stop()
        raise RabbitMQError(msg)

    def _shutdown(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the VM stops the node cleanly
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the node, wait ``down_for`` seconds, and start it again with its streams."""
        self._shutdown()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        """Stop the node and its ``epmd``, and remove its directory."""
        self._shutdown()
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        if Path(epmd).exists():
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"], capture_output=True, check=False
            )
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RabbitMQServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"RabbitMQServer(stream_port={self.stream_port}, {state})"
