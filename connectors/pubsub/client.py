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

from collections.abc import Callable
from typing import Any, TypeVar

from connectors._retry import FIRST_BACKOFF_S, MAX_BACKOFF_S, retry_transient
from microstream.exceptions import MicrostreamError, MissingDependencyError

__all__ = [
    "is_transient",
    "publisher_client",
    "require_pubsub",
    "retrying",
    "subscriber_client",
]

T = TypeVar("T")

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
        initial=FIRST_BACKOFF_S,  # the same backoff as retry_transient
        maximum=MAX_BACKOFF_S,
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
    """``call()``, retried on this client's transient errors (:func:`is_transient`) for
    ``retry_timeout_s``: :func:`connectors._retry.retry_transient`."""
    return retry_transient(
        call,
        is_transient=is_transient,
        retry_timeout_s=retry_timeout_s,
        what=what,
        error=error,
        on_retry=on_retry,
    )
