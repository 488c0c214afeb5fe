"""The event-time watermark: how far event time has surely progressed.

Per watermarked input, ``wm_i = truncate_ms(max event time seen) - delay``
(Spark keeps watermarks in milliseconds; truncating the maximum first makes
microstream's watermarks equal Spark's). The global watermark combines the
inputs' (``"min"`` by default, ``"max"`` as an option), skipping inputs idle
for longer than their ``idle_timeout`` unless all are idle, and never goes
backwards. Before any input has seen an event there is no watermark
(:data:`NO_WATERMARK_US`, below every representable time): nothing is late and
nothing closes, whatever the first rows' times (1960 included). The watermark a batch runs with is fixed before it starts and
logged in its WAL entry; the maxima it is computed from are kept in each
commit entry, so a restart computes exactly the same next watermark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["FLUSH_WATERMARK_US", "NO_WATERMARK_US", "WatermarkInput", "WatermarkTracker"]

NO_WATERMARK_US = -(2**63)
"""No event seen yet: below every Int64 time, so no row is late and no window closes."""

FLUSH_WATERMARK_US = 2**63 - 1
"""The largest Int64 time: the watermark of ``available_now(flush=True)``'s last batch. It
closes every window whose end can be represented, the year-9999 ones included."""

WatermarkPolicy = Literal["min", "max"]


@dataclass
class WatermarkInput:
    """One ``with_watermark`` input."""

    delay_us: int
    idle_timeout_us: int | None = None
    max_event_us: int | None = None
    last_active: float = field(default_factory=time.monotonic)

    def watermark(self) -> int | None:
        if self.max_event_us is None:
            return None
        return (self.max_event_us // 1000) * 1000 - self.delay_us


class WatermarkTracker:
    """Computes the watermark of the next batch from the maxima seen so far.

    Examples
    --------
    >>> tracker = WatermarkTracker([WatermarkInput(delay_us=10_000_000)])
    >>> tracker.current_us == NO_WATERMARK_US
    True
    >>> tracker.observe([70_000_123], now=0.0)
    >>> tracker.advance(now=0.0)
    60000000
    """

    def __init__(self, inputs: Sequence[WatermarkInput], policy: WatermarkPolicy = "min"):
        self.inputs = list(inputs)
        self.policy = policy
        self.current_us = NO_WATERMARK_US

    @property
    def enabled(self) -> bool:
        return bool(self.inputs)

    def restore(self, watermark_us: int, max_event_us: Sequence[int | None]) -> None:
        """Resume from a commit entry."""
        self.current_us = watermark_us
        for item, value in zip(self.inputs, max_event_us):
            item.max_event_us = value

    def observe(self, max_event_us: Sequence[int | None], now: float | None = None) -> None:
        """Record one batch's largest event time per input (None: no rows)."""
        now = time.monotonic() if now is None else now
        for item, value in zip(self.inputs, max_event_us):
            if value is None:
                continue
            item.last_active = now
            if item.max_event_us is None or value > item.max_event_us:
                item.max_event_us = value

    def advance(self, now: float | None = None) -> int:
        """The watermark for the next batch (never below the current one)."""
        now = time.monotonic() if now is None else now
        marks = []
        active = []
        for item in self.inputs:
            mark = item.watermark()
            idle = (
                item.idle_timeout_us is not None
                and (now - item.last_active) * 1_000_000 >= item.idle_timeout_us
            )
            marks.append(mark)
            if not idle:
                active.append(mark)
        # Idle inputs stop holding the watermark back; if all are idle, all count.
        considered = active if active else marks
        if not considered:
            return self.current_us
        if self.policy == "min":
            if any(m is None for m in considered):
                return self.current_us  # an input that has sent nothing holds it at the start
            candidate = min(m for m in considered if m is not None)
        else:
            known = [m for m in considered if m is not None]
            if not known:
                return self.current_us
            candidate = max(known)
        self.current_us = max(self.current_us, candidate)
        return self.current_us

    def maxima(self) -> list[int | None]:
        return [item.max_event_us for item in self.inputs]
