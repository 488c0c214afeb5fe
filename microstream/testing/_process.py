"""What the local service helpers (Kafka broker, S3 API, PostgreSQL) share: a free port
and a child process that dies with its parent."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable

__all__ = ["die_with_parent_hook", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now.

    Examples
    --------
    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent_hook() -> Callable[[], None] | None:
    """A function for ``preexec_fn`` that asks Linux to kill the child when we die.

    A test process killed by SIGKILL, or a restarted notebook kernel, then leaves no
    server behind. (Linux sends the signal when the *thread* that started the child
    ends; start servers from the main thread.) libc is loaded here, in the parent: the
    hook itself imports nothing and takes no lock, as code between fork and exec must.
    ``subprocess`` changes the child's user before it calls the hook, and the hook must
    come after that change (changing credentials clears the parent-death signal).
    None off Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return hook
