"""Google Cloud Pub/Sub clients, for a real project or for the emulator.

``google-cloud-pubsub`` is imported here only, and only when a connector is built
(``pip install 'microstream[pubsub]'``). With ``endpoint="host:port"`` the clients talk
to that server without credentials, as the library does itself for the emulator
(``PUBSUB_EMULATOR_HOST``); without it they use the environment's Google credentials.
"""

from __future__ import annotations

from typing import Any

from microstream.exceptions import MissingDependencyError

__all__ = ["publisher_client", "require_pubsub", "subscriber_client"]


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

    channel = grpc.insecure_channel(endpoint)
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


def publisher_client(endpoint: str | None, *, ordering: bool) -> Any:
    """A ``PublisherClient``, with message ordering enabled when ``ordering``."""
    require_pubsub()
    from google.cloud import pubsub_v1

    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=ordering)
    if endpoint is None:
        return pubsub_v1.PublisherClient(publisher_options=options)
    import grpc
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    channel = grpc.insecure_channel(endpoint)
    return pubsub_v1.PublisherClient(
        publisher_options=options, transport=PublisherGrpcTransport(channel=channel)
    )
