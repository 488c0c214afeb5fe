"""Google Cloud Pub/Sub clients, for a real project or for the emulator.

``google-cloud-pubsub`` is imported here only, and only when a connector is built
(``pip install 'microstream[pubsub]'``). With ``endpoint="host:port"`` the clients talk
to that server without credentials, as the library does itself for the emulator
(``PUBSUB_EMULATOR_HOST``); without it they use the environment's Google credentials.

Calls are made once each (the library's own retries off) and retried by
:func:`retrying` for the connector's ``retry_timeout``: a server that is down is
waited for as long as the user asked, and no longer. The gRPC channel to an
``endpoint`` reconnects at most a second after a failure (gRPC's default backoff
grows to two minutes, past any sensible ``retry_timeout``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from microstream.exceptions import MicrostreamError, MissingDependencyError

__all__ = [
    "is_transient",
    "publisher_client",
    "require_pubsub",
    "retrying",
    "subscriber_client",
]

T = TypeVar("T")

_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def require_pubsub() -> None:
    """Raise a one-line error naming the install command when the library is missing."""
    try:
        from google.cloud import pubsub_v1  # noqa: F401
    except ImportError as exc:
        msg = "the Pub/Sub connectors need google-cloud-pubsub: pip install 'microstream[pubsub]'"
        raise MissingDependencyError(msg) from exc


def subscriber_client(endpoint: str | None) -> Any:
    """A ``SubscriberClient`` (synchronous pull, acks, ack deadlines)."""
    require_pubsub()
    from google.cloud import pubsub_v1

    if endpoint is None:
        return pubsub_v1.SubscriberClient()
    import grpc
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    channel = grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


def publisher_client(endpoint: str | None, *, ordering: bool, retry_timeout_s: float) -> Any:
    """A ``PublisherClient``, with message ordering enabled when ``ordering``.

    Its publishes retry transient errors (:func:`is_transient`) for ``retry_timeout_s``
    in all, each attempt given at most 10 s.
    """
    require_pubsub()
    from google.api_core.retry import Retry
    from google.cloud import pubsub_v1

    retry = Retry(
        predicate=is_transient,
        initial=_FIRST_BACKOFF_S,
        maximum=_MAX_BACKOFF_S,
        multiplier=2.0,
        timeout=retry_timeout_s,
    )
    options = pubsub_v1.types.PublisherOptions(
        enable_message_ordering=ordering, retry=retry, timeout=min(10.0, retry_timeout_s)
    )
    if endpoint is None:
        return pubsub_v1.PublisherClient(publisher_options=options)
    import grpc
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    channel = grpc.insecure_channel(endpoint, options=_CHANNEL_OPTIONS)
    return pubsub_v1.PublisherClient(
        publisher_options=options, transport=PublisherGrpcTransport(channel=channel)
    )


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass if the call is made again: the server unreachable or
    overloaded, a call past its deadline, an aborted or internal error."""
    from google.api_core import exceptions

    return isinstance(
        exc,
        (
            exceptions.ServiceUnavailable,
            exceptions.DeadlineExceeded,
            exceptions.InternalServerError,
            exceptions.Aborted,
            exceptions.ResourceExhausted,
            exceptions.Unknown,
            ConnectionError,
            TimeoutError,
        ),
    )


def retrying(
    call: Callable[[], T],
    *,
    retry_timeout_s: float,
    what: str,
    error: type[MicrostreamError],
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """``call()``, retried with backoff (50 ms doubling to 1 s) on transient errors.

    Errors that :func:`is_transient` accepts are retried until ``retry_timeout_s``
    has passed; then ``error`` is raised naming ``what``, the attempts and the last
    error. Any other error is raised as it is, for the caller to name.

    Examples
    --------
    >>> from microstream.exceptions import SourceError
    >>> calls = []
    >>> def flaky() -> str:
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionError("refused")
    ...     return "ok"
    >>> retrying(flaky, retry_timeout_s=5, what="pull", error=SourceError), len(calls)
    ('ok', 3)
    >>> def down() -> str:
    ...     raise ConnectionError("refused")
    >>> retrying(down, retry_timeout_s=0.1, what="pull", error=SourceError)
    Traceback (most recent call last):
    ...
    microstream.exceptions.SourceError: pull failed 2 times within retry_timeout=0.1s; last error: ConnectionError: refused
    """
    deadline = time.monotonic() + retry_timeout_s
    backoff = _FIRST_BACKOFF_S
    attempts = 0
    while True:
        attempts += 1
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() + backoff > deadline:
                msg = (
                    f"{what} failed {attempts} times within retry_timeout={retry_timeout_s:g}s; "
                    f"last error: {type(exc).__name__}: {exc}"
                )
                raise error(msg) from exc
            if on_retry is not None and attempts == 1:
                on_retry(f"{type(exc).__name__}: {exc}")
            time.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
