"""The Google Cloud Pub/Sub emulator, for tests, notebooks and demos.

:class:`PubSubEmulator` starts the emulator that the Google Cloud CLI installs as
its ``pubsub-emulator`` component (a Java 17 program: what ``gcloud beta emulators
pubsub start`` runs), on ``127.0.0.1`` and a free port, with its data in a
temporary directory; it is the test process's own child and dies with it.
Connectors reach it with ``endpoint=emulator.endpoint``; :meth:`create_topic` and
:meth:`create_subscription` set up what a test needs (``pip install
'microstream[pubsub]'``).

Examples
--------
>>> from microstream.testing.pubsub import PubSubEmulator
>>> with PubSubEmulator() as emulator:  # doctest: +SKIP
...     topic = emulator.create_topic("events")
...     subscription = emulator.create_subscription("events", "reader")
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from microstream.exceptions import MissingDependencyError
from microstream.testing._process import die_with_parent_hook, free_port

__all__ = ["PubSubEmulator", "PubSubEmulatorError", "find_pubsub_emulator"]

PROJECT = "microstream-test"


class PubSubEmulatorError(RuntimeError):
    """The emulator did not start, or did not open its port in time."""


def find_pubsub_emulator() -> Path | None:
    """The emulator's start script of the Google Cloud CLI's ``pubsub-emulator`` component.

    Examples
    --------
    >>> found = find_pubsub_emulator()
    >>> found is None or found.name == "cloud-pubsub-emulator"
    True
    """
    gcloud = shutil.which("gcloud")
    roots = [Path("/usr/lib/google-cloud-sdk")]
    if gcloud is not None:
        roots.insert(0, Path(gcloud).resolve().parent.parent)
    for root in roots:
        script = root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
        if script.exists():
            return script
    return None


class PubSubEmulator:
    """The Pub/Sub emulator on ``127.0.0.1`` and a free port (a context manager).

    Attributes
    ----------
    endpoint
        ``"127.0.0.1:<port>"``, the connectors' ``endpoint=``.
    project
        The project of the topics and subscriptions the helpers create.
    """

    def __init__(self, *, project: str = PROJECT, startup_timeout: float = 60.0) -> None:
        script = find_pubsub_emulator()
        if script is None:
            msg = (
                "PubSubEmulator needs the Google Cloud CLI's pubsub-emulator component "
                "(gcloud components install pubsub-emulator) and Java 17"
            )
            raise MissingDependencyError(msg)
        self.script = script
        self.project = project
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.data_dir = Path(tempfile.mkdtemp(prefix="microstream-pubsub-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the emulator."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> PubSubEmulator:
        """Start the emulator; returns self.

        Raises
        ------
        PubSubEmulatorError
            It exited or did not open its port in time (the message holds its output).
        """
        log = self.data_dir / "emulator.log"
        with open(log, "ab") as out:
            self._process = subprocess.Popen(
                [str(self.script), "--host=127.0.0.1", f"--port={self.port}"],
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent_hook(),  # noqa: PLW1509 (imports nothing, no locks)
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        text = log.read_text(errors="replace")[-2000:]
        self.stop()
        msg = f"the Pub/Sub emulator did not open port {self.port}:\n{text}"
        raise PubSubEmulatorError(msg)

    def stop(self) -> None:
        """Stop the emulator and remove its directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> PubSubEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _clients(self) -> tuple[Any, Any]:
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        publisher = pubsub_v1.PublisherClient(
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(self.endpoint))
        )
        subscriber = pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(self.endpoint))
        )
        return publisher, subscriber

    def create_topic(self, name: str) -> str:
        """Create topic ``name``; returns its path ``projects/<project>/topics/<name>``."""
        publisher, _ = self._clients()
        path = f"projects/{self.project}/topics/{name}"
        publisher.create_topic(name=path)
        return path

    def create_subscription(
        self, topic: str, name: str, *, ack_deadline_s: int = 10, ordering: bool = False
    ) -> str:
        """Create subscription ``name`` of topic ``topic``; returns its path."""
        _, subscriber = self._clients()
        path = f"projects/{self.project}/subscriptions/{name}"
        subscriber.create_subscription(
            request={
                "name": path,
                "topic": f"projects/{self.project}/topics/{topic}",
                "ack_deadline_seconds": ack_deadline_s,
                "enable_message_ordering": ordering,
            }
        )
        subscriber.close()
        return path

    def publish(self, topic: str, payloads: list[bytes], ordering_key: str = "") -> list[str]:
        """Publish ``payloads`` to ``topic`` (a name); returns their message ids."""
        import grpc
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        publisher = pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(
                enable_message_ordering=bool(ordering_key)
            ),
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(self.endpoint)),
        )
        path = f"projects/{self.project}/topics/{topic}"
        futures = [publisher.publish(path, p, ordering_key=ordering_key) for p in payloads]
        ids = [str(f.result(timeout=30)) for f in futures]
        publisher.stop()
        return ids

    def pull(self, subscription: str, max_messages: int = 1000) -> list[Any]:
        """Pull and acknowledge up to ``max_messages`` of ``subscription`` (a name)."""
        _, subscriber = self._clients()
        path = f"projects/{self.project}/subscriptions/{subscription}"
        with warnings.catch_warnings():  # return_immediately: an empty answer at once
            warnings.simplefilter("ignore", DeprecationWarning)
            response = subscriber.pull(
                request={
                    "subscription": path,
                    "max_messages": max_messages,
                    "return_immediately": True,
                },
                timeout=10,
            )
        received = list(response.received_messages)
        if received:
            subscriber.acknowledge(
                request={"subscription": path, "ack_ids": [m.ack_id for m in received]}
            )
        subscriber.close()
        return [m.message for m in received]

    def __repr__(self) -> str:
        state = (
            "running" if self._process is not None and self._process.poll() is None else "stopped"
        )
        return f"PubSubEmulator(port={self.port}, {state})"
