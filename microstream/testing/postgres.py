"""A throwaway PostgreSQL server for tests, notebooks and demos.

:class:`PostgresServer` runs ``initdb`` into a temporary directory and starts
``postgres`` on ``127.0.0.1`` and a free port with ``wal_level=logical`` (so
logical replication slots, which ``ms.scan_postgres_cdc`` reads, can be
created), trust authentication for the ``postgres`` role, and ``fsync=off``
(the server's data is thrown away when it stops; a killed *client* is what the
crash tests exercise, never a killed server).

The binaries are found on ``PATH`` (``initdb``, ``postgres``) or under
``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run as root: when
the tests run as root (a CI machine) the server runs as the ``postgres``
operating-system user that Debian's package creates. The server is the test
process's own child and is killed with it (Linux), so a test killed mid-way
leaves no server behind.

The change-data-capture source decodes the WAL with the ``wal2json`` output
plugin (Debian: ``apt-get install postgresql-15-wal2json``; ``make test``
installs it when run as root); :meth:`PostgresServer.has_plugin` tells whether
the server has it.

Examples
--------
>>> from microstream.testing.postgres import PostgresServer
>>> with PostgresServer() as server:  # doctest: +SKIP
...     dsn = server.create_database("shop")
...     with server.connect("shop") as conn:
...         conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from microstream.exceptions import MissingDependencyError
from microstream.testing._process import die_with_parent_hook, free_port

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresError", "PostgresServer", "find_postgres_bin"]

logger = logging.getLogger("microstream.testing.postgres")


class PostgresError(RuntimeError):
    """The server could not be initialised or started, or did not answer."""


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None if there is none.

    ``initdb`` on ``PATH`` first (followed through links, so the server's own
    ``bin`` directory is returned), then the newest ``/usr/lib/postgresql/*/bin``.

    Examples
    --------
    >>> found = find_postgres_bin()
    >>> found is None or (found / "postgres").exists()
    True
    """
    initdb = shutil.which("initdb")
    if initdb is not None:
        directory = Path(os.path.realpath(initdb)).parent
        if (directory / "postgres").exists():
            return directory
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    return None


def _server_user() -> tuple[int, int] | None:
    """The (uid, gid) the server runs as: the ``postgres`` user when we are root, else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        msg = (
            "PostgreSQL refuses to run as root and there is no 'postgres' user to run it as; "
            "run the tests as another user, or install Debian's postgresql package"
        )
        raise PostgresError(msg) from None
    return entry.pw_uid, entry.pw_gid


def _require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        msg = "PostgresServer needs psycopg: pip install 'microstream[postgres]'"
        raise MissingDependencyError(msg) from exc


class PostgresServer:
    """A PostgreSQL server on ``127.0.0.1`` with a throwaway data directory (a context manager).

    Parameters
    ----------
    port
        The port to listen on; default a free one.
    bin_dir
        The directory of ``initdb`` and ``postgres``; default :func:`find_postgres_bin`.
    settings
        Extra server settings (``{"max_slot_wal_keep_size": "1MB"}``), added to
        ``wal_level=logical``, ``max_replication_slots=32``, ``fsync=off``.
    startup_timeout
        Seconds to wait for the server to accept connections.

    Attributes
    ----------
    port
        The port.
    data_dir
        The data directory (removed by :meth:`stop`).
    log_path
        The server's log (kept after :meth:`stop`, for a failed test's report).

    Examples
    --------
    >>> server = PostgresServer().start()  # doctest: +SKIP
    >>> server.dsn  # doctest: +SKIP
    'host=127.0.0.1 port=... user=postgres dbname=postgres'
    >>> server.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        settings: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        _require_psycopg()
        found = find_postgres_bin() if bin_dir is None else Path(bin_dir)
        if found is None:
            msg = (
                "PostgresServer needs PostgreSQL's server binaries (initdb, postgres) on PATH "
                "or under /usr/lib/postgresql/<version>/bin: apt-get install postgresql"
            )
            raise MissingDependencyError(msg)
        self.bin_dir = found
        self.port = free_port() if port is None else port
        self.settings = dict(settings or {})
        self.startup_timeout = startup_timeout
        self._user = _server_user()
        self.data_dir = Path(tempfile.mkdtemp(prefix="microstream-pg-"))
        self.log_path = Path(tempfile.mkdtemp(prefix="microstream-pg-log-")) / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- life cycle ------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """A libpq connection string to the ``postgres`` database."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """A libpq connection string to ``database`` on this server."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    @property
    def is_running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def _as_server_user(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a command as the server's user."""
        if self._user is None:
            return {}
        return {"user": self._user[0], "group": self._user[1], "extra_groups": []}

    def _run_as_server_user(self, args: list[str]) -> None:
        result = subprocess.run(args, capture_output=True, check=False, **self._as_server_user())
        if result.returncode != 0:
            msg = (
                f"{args[0]} failed (exit {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()[-2000:]}"
            )
            raise PostgresError(msg)

    def start(self) -> PostgresServer:
        """Initialise the data directory (first start) and start the server; returns self.

        Raises
        ------
        PostgresError
            ``initdb`` failed, or the server did not accept connections in time
            (the message holds the end of its log).
        """
        if self.is_running:
            return self
        if self._user is not None:
            os.chown(self.data_dir, *self._user)
            os.chown(self.log_path.parent, *self._user)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run_as_server_user(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.data_dir),
            "wal_level": "logical",
            "max_replication_slots": "32",
            "max_wal_senders": "8",
            "fsync": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        args = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509 (imports nothing, no locks)
                **self._as_server_user(),
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.is_running:
                break
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        msg = f"PostgreSQL did not accept connections on port {self.port}: {last}\n{tail}"
        self.stop()
        raise PostgresError(msg)

    def _shutdown(self) -> None:
        """Stop the server process (fast shutdown: sessions are ended, data kept)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server, wait ``down_for`` seconds, and start it again with its data.

        Clients see their connections ended and refused meanwhile, as when a
        database server restarts.
        """
        self._shutdown()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its data directory."""
        self._shutdown()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to ``database``."""
        import psycopg

        return psycopg.connect(self.dsn_for(database), autocommit=True)

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its connection string."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def has_plugin(self, name: str) -> bool:
        """Whether the server has the logical decoding output plugin ``name`` (``wal2json``)."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT setting FROM pg_config() WHERE name = 'PKGLIBDIR'"
            ).fetchone()
        if row is None:
            return False
        return Path(str(row[0]), f"{name}.so").exists()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"PostgresServer(port={self.port}, {state})"
