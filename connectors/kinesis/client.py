"""What the Kinesis source and sink share: the boto3 client and the retry of transient errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from connectors._retry import retry_transient
from microstream.exceptions import MicrostreamError, MissingDependencyError

__all__ = ["is_missing", "make_client", "retrying"]

T = TypeVar("T")

_RETRIED_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "InternalFailure",
        "ServiceUnavailable",
        "KMSThrottlingException",
    }
)


def make_client(options: Mapping[str, Any] | None) -> Any:
    """A boto3 Kinesis client; ``options`` are ``boto3.client`` keyword arguments.

    botocore's own retries are off (one attempt a call, short timeouts): :func:`retrying`
    retries for the connector's ``retry_timeout`` instead, so a server that is down is
    waited for as long as the user asked, and no longer.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        msg = "the Kinesis connector needs boto3: pip install 'microstream[kinesis]'"
        raise MissingDependencyError(msg) from None
    kwargs = dict(options or {})
    config = Config(
        retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=20
    )
    given = kwargs.pop("config", None)
    return boto3.client("kinesis", config=config.merge(given) if given else config, **kwargs)


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ``ClientError`` (None for other errors)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def is_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says the stream (or shard) does not exist."""
    return error_code(exc) == "ResourceNotFoundException"


def _transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, (ConnectionError, HTTPClientError)):
        return True  # refused, reset, timed out: the endpoint may come back
    if isinstance(exc, ClientError):
        code = error_code(exc) or ""
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _RETRIED_CODES or status >= 500
    return False


def retrying(
    call: Callable[[], T],
    *,
    retry_timeout_s: float,
    what: str,
    error: type[MicrostreamError],
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """``call()``, retried on this client's transient errors (:func:`_transient`) for
    ``retry_timeout_s``: :func:`connectors._retry.retry_transient`."""
    return retry_transient(
        call,
        is_transient=_transient,
        retry_timeout_s=retry_timeout_s,
        what=what,
        error=error,
        on_retry=on_retry,
    )
