"""The segment-buffer SIGKILL test's subprocess: ``tests/join_pipeline.py`` killed inside
a buffer's commit.

``JOIN_SEGMENTS_KILL="<where>:<side>@<n>"`` SIGKILLs the process the ``n``-th time the
``side`` buffer (``left`` or ``right``) reaches ``where``: ``files`` (its segment and
marks files of the version written, its manifest not) or ``manifest`` (its manifest
written: the left one's before the right buffer commits). The engine's fault points
(``MICROSTREAM_FAULTS``) come before and after the state commit, not inside it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from microstream.state.segment_buffer import SegmentBuffer
from tests.join_pipeline import main


def arm(spec: str) -> None:
    where, _, rest = spec.partition(":")
    side, _, nth = rest.partition("@")
    visits = [0]
    method = {"files": "_write", "manifest": "commit"}[where]
    original: Callable[..., Any] = getattr(SegmentBuffer, method)

    def killing(self: SegmentBuffer, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if self.operator.endswith(f"/{side}"):
            visits[0] += 1
            if visits[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(SegmentBuffer, method, killing)


if __name__ == "__main__":
    if os.environ.get("JOIN_SEGMENTS_KILL"):
        arm(os.environ["JOIN_SEGMENTS_KILL"])
    sys.exit(main())
