"""Retrying a connector's call on transient errors, for its ``retry_timeout``.

The Kinesis and Pub/Sub clients turn their libraries' own retries off (one attempt a
call, short timeouts) and retry here instead, so a server that is down is waited for
as long as the user asked, and no longer. Each client says which errors are
transient; the loop, the backoff and the final error are the same for all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from microstream.exceptions import MicrostreamError

__all__ = ["retry_transient"]

T = TypeVar("T")

FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


def retry_transient(
    call: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    retry_timeout_s: float,
    what: str,
    error: type[MicrostreamError],
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """``call()``, retried with backoff (50 ms doubling to 1 s) while it fails transiently.

    Errors ``is_transient`` accepts are retried until ``retry_timeout_s`` has passed;
    then ``error`` is raised naming ``what``, the attempts and the last error. Any other
    error is raised as it is, for the caller to name. ``on_retry`` hears the first
    transient error (to log that the call is being retried).

    Examples
    --------
    >>> from microstream.exceptions import SourceError
    >>> calls = []
    >>> def flaky() -> str:
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionError("refused")
    ...     return "ok"
    >>> transient = lambda exc: isinstance(exc, ConnectionError)
    >>> retry_transient(
    ...     flaky, is_transient=transient, retry_timeout_s=5, what="pull", error=SourceError
    ... ), len(calls)
    ('ok', 3)
    >>> def down() -> str:
    ...     raise ConnectionError("refused")
    >>> retry_transient(
    ...     down, is_transient=transient, retry_timeout_s=0.1, what="pull", error=SourceError
    ... )
    Traceback (most recent call last):
    ...
    microstream.exceptions.SourceError: pull failed 2 times within retry_timeout=0.1s; last error: ConnectionError: refused
    """
    deadline = time.monotonic() + retry_timeout_s
    backoff = FIRST_BACKOFF_S
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
            backoff = min(backoff * 2, MAX_BACKOFF_S)
