"""Named fault points for crash testing.

The trigger loop and the sinks call ``faults.reach("batch.after_wal")`` at
each step where a crash matters. When the environment variable
``MICROSTREAM_FAULTS`` names that point (``"batch.after_wal"`` or
``"batch.after_wal@3"`` for its third visit in this process; several points
separated by commas), the process kills itself with SIGKILL right there: no
``finally`` blocks, no flushing, exactly like a machine that loses power.
Without the variable a fault point costs one dictionary lookup.

``sink.after_data`` is reached by the file sink between its data files and its
manifest entry; the Delta sink writes data and its ``txn`` in one commit, so
there the point falls right after that commit (the window between Delta's data
files and its log entry is covered by the random-time kills of the crash tests).
The PostgreSQL sink reaches it inside the batch's transaction, rows and progress
row written but not committed (a kill there rolls both back).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["FAULT_POINTS", "FaultInjector"]

FAULT_POINTS = (
    "source.after_log",
    "batch.before_wal",
    "batch.after_wal",
    "batch.after_read",
    "batch.after_compute",
    "sink.after_data",
    "batch.after_sink",
    "batch.before_commit",
    "batch.after_commit",
)
"""Every named point, in the order one batch reaches them."""


class FaultInjector:
    """Kills the process at configured points (tests only).

    Examples
    --------
    >>> FaultInjector.from_env({}).armed
    False
    >>> FaultInjector.from_env({"MICROSTREAM_FAULTS": "batch.after_wal@2"}).targets
    {'batch.after_wal': 2}
    """

    def __init__(self, targets: dict[str, int]):
        unknown = sorted(set(targets) - set(FAULT_POINTS))
        if unknown:
            msg = f"unknown fault point(s) {unknown}; known points: {', '.join(FAULT_POINTS)}"
            raise ValueError(msg)
        self.targets = targets
        self.armed = bool(targets)
        self._visits: Counter[str] = Counter()

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ[str] | None = None) -> FaultInjector:
        env = os.environ if environ is None else environ
        spec = env.get("MICROSTREAM_FAULTS", "").strip()
        targets: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, nth = part.partition("@")
            targets[name] = int(nth) if nth else 1
        return cls(targets)

    def reach(self, point: str) -> None:
        if not self.armed or point not in self.targets:
            return
        self._visits[point] += 1
        if self._visits[point] == self.targets[point]:
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = FaultInjector({})
