"""A local S3 API for tests, notebooks and demos: ``moto_server`` on 127.0.0.1.

:class:`MotoS3Server` runs moto's S3 server (``pip install 'moto[server]'``) as
a subprocess on a free port of 127.0.0.1 and stops it on exit (the subprocess
also exits by itself when its parent dies, even by SIGKILL);
:meth:`MotoS3Server.create_bucket` gives a fresh bucket as an
:class:`S3Bucket`, which knows the two spellings of its storage options:

- :attr:`S3Bucket.fsspec_options` for fsspec/s3fs — the file source and sink,
  checkpoints (``checkpoint_options=``), ``ms.read_file_sink``;
- :attr:`S3Bucket.delta_options` for delta-rs (``sink_delta``,
  ``DeltaStaticTable``, ``deltalake.DeltaTable``, ``pl.read_delta``), which
  uses object_store's keys.

A subprocess rather than moto's in-process ``ThreadedMotoServer``: a server
in the test's own interpreter competes for its GIL with the code under test
(delta-rs and Polars call it from native threads) and shares moto's
process-wide state with anything in the tests that uses moto's mocks; a
subprocess does neither, and it starts in about half a second.

Conditional writes: moto 5.x honours ``If-None-Match: *`` on PutObject and
CompleteMultipartUpload (412 if the key exists), which is what s3fs sends for
``pipe_file(..., mode="create")`` and what delta-rs 1.x sends for every commit
file of ``_delta_log/`` — so concurrent Delta commits and write-once checkpoint
files are safe on this server exactly as on AWS S3. :attr:`S3Bucket.delta_options`
asks for it explicitly (``AWS_CONDITIONAL_PUT=etag``) so that a change of
delta-rs' default cannot silently turn it off; no ``AWS_S3_ALLOW_UNSAFE_RENAME``
and no DynamoDB lock are needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

from microstream.exceptions import MissingDependencyError
from microstream.testing._process import free_port

__all__ = ["MotoS3Server", "S3Bucket"]

_ATTEMPTS = 3  # a port found free can be taken before moto binds it: try another

# moto's server, leaving as soon as its parent is gone (even by SIGKILL, when no
# stop() runs): the parent holds the write end of its stdin, whose EOF ends it.
_SERVER = """
import os, sys, threading

def leave_with_parent():
    sys.stdin.buffer.read()
    os._exit(0)

threading.Thread(target=leave_with_parent, daemon=True).start()
from moto.server import main
main(sys.argv[1:])
"""


@dataclass(frozen=True)
class S3Bucket:
    """One bucket on an S3 endpoint, with its storage options.

    Attributes
    ----------
    name
        The bucket name.
    endpoint_url
        ``http://127.0.0.1:<port>`` of the server.
    key, secret, region
        Credentials and region (moto accepts any credentials).

    Examples
    --------
    >>> bucket = S3Bucket("data", "http://127.0.0.1:5000")
    >>> bucket.url("in/a.parquet")
    's3://data/in/a.parquet'
    >>> bucket.fsspec_options["endpoint_url"]
    'http://127.0.0.1:5000'
    >>> bucket.delta_options["AWS_ALLOW_HTTP"]
    'true'
    """

    name: str
    endpoint_url: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    def url(self, path: str = "") -> str:
        """The ``s3://`` URL of ``path`` in the bucket (the bucket itself for ``""``)."""
        path = path.strip("/")
        return f"s3://{self.name}/{path}" if path else f"s3://{self.name}"

    @property
    def fsspec_options(self) -> dict[str, Any]:
        """Options for s3fs (``storage_options=`` of fsspec-based code), a new dict each time."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"region_name": self.region},
        }

    @property
    def delta_options(self) -> dict[str, str]:
        """Options for delta-rs (``storage_options=`` of Delta code), a new dict each time."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": self.region,
            # Commit files with If-None-Match: * (delta-rs 1.x does by default; say so).
            "AWS_CONDITIONAL_PUT": "etag",
        }


class MotoS3Server:
    """moto's S3 server in a subprocess on 127.0.0.1, as a context manager.

    Parameters
    ----------
    host
        Address to listen on; keep the default (tests never listen beyond
        the loopback interface).
    startup_timeout
        Seconds to wait for the server to answer.

    Raises
    ------
    MissingDependencyError
        moto is not installed.
    RuntimeError
        The server did not start (its log is in the message).

    Examples
    --------
    >>> import fsspec
    >>> with MotoS3Server() as server:
    ...     bucket = server.create_bucket("doctest-moto")
    ...     fs = fsspec.filesystem("s3", **bucket.fsspec_options)
    ...     _ = fs.pipe_file(bucket.url("a/b.txt"), b"hello", mode="create")
    ...     fs.cat_file(bucket.url("a/b.txt"))
    b'hello'
    """

    def __init__(self, *, host: str = "127.0.0.1", startup_timeout: float = 30.0) -> None:
        self.host = host
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://<host>:<port>`` of the running server."""
        if self._port is None:
            msg = "the moto S3 server is not running: call start() or use it in a with block"
            raise RuntimeError(msg)
        return f"http://{self.host}:{self._port}"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        if self._process is not None:
            return
        if importlib.util.find_spec("moto") is None:
            msg = (
                "the local S3 server needs moto, which is not installed: pip install 'moto[server]'"
            )
            raise MissingDependencyError(msg)
        failures = []
        for _ in range(_ATTEMPTS):
            port = free_port(self.host)
            log = tempfile.TemporaryFile()  # noqa: SIM115 (the server writes to it until stop())
            process = subprocess.Popen(
                [sys.executable, "-c", _SERVER, "-H", self.host, "-p", str(port)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            if self._wait_until_up(process, port):
                self._process, self._log, self._port = process, log, port
                return
            _terminate(process)
            log.seek(0)
            failures.append(f"port {port}: {log.read()[-2000:].decode(errors='replace')}")
            log.close()
        msg = (
            f"moto's S3 server did not start on {self.host} within {self.startup_timeout}s; "
            "its output:\n" + "\n".join(failures)
        )
        raise RuntimeError(msg)

    def _wait_until_up(self, process: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.host}:{port}/", timeout=1):
                    return True
            except urllib.error.HTTPError:
                return True  # any HTTP answer: it is up
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the server (its buckets are gone with it)."""
        process, self._process, self._port = self._process, None, None
        if process is not None:
            _terminate(process)
        if self._log is not None:
            self._log.close()
            self._log = None

    def aws_options(self, endpoint_url: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``boto3.client(service, ...)`` for this server (any service
        moto serves: Kinesis too), a new dict each time; ``endpoint_url`` replaces the
        server's (a :class:`~microstream.testing.tcp_proxy.TcpProxy` in front of it)."""
        return {
            "endpoint_url": endpoint_url or self.endpoint_url,
            "region_name": "us-east-1",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }

    def create_bucket(self, name: str | None = None) -> S3Bucket:
        """Create a bucket (a fresh ``test-<random>`` one by default).

        Raises
        ------
        RuntimeError
            The server refused (e.g. an invalid or existing bucket name).
        """
        bucket = S3Bucket(name or f"test-{uuid.uuid4().hex[:16]}", self.endpoint_url)
        # moto does not check signatures: a bare PUT creates the bucket.
        request = urllib.request.Request(f"{self.endpoint_url}/{bucket.name}", method="PUT")
        try:
            with urllib.request.urlopen(request, data=b"", timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            msg = f"cannot create bucket {bucket.name!r} on {self.endpoint_url}: {exc}: {body}"
            raise RuntimeError(msg) from None
        return bucket

    def __enter__(self) -> MotoS3Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
