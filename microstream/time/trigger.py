"""Triggers: when the next micro-batch starts."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from microstream.time.duration import parse_duration

__all__ = ["Trigger"]


class Trigger(BaseModel):
    """When micro-batches run.

    Build one with :meth:`every`, :meth:`once` or :meth:`available_now`; the
    default of every sink (``trigger=None``) runs the next batch as soon as the
    previous one finished and new data is there.

    Examples
    --------
    >>> Trigger.every("5s").interval
    datetime.timedelta(seconds=5)
    >>> Trigger.available_now().kind
    'available_now'
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["processing_time", "once", "available_now"]
    interval: timedelta = timedelta(0)
    flush: bool = False

    @classmethod
    def every(cls, interval: str | timedelta | float) -> Trigger:
        """Start a batch every ``interval`` of processing time.

        A batch that takes longer than the interval delays the next one; missed
        intervals are not made up (as in Spark).
        """
        return cls(kind="processing_time", interval=parse_duration(interval, name="interval"))

    @classmethod
    def once(cls) -> Trigger:
        """Run one batch over everything available, ignoring rate limits, then stop."""
        return cls(kind="once")

    @classmethod
    def available_now(cls, *, flush: bool = False) -> Trigger:
        """Process everything available at start, in rate-limited batches, then stop.

        The scheduled-job mode: run it from cron or an orchestrator to process
        what is new and exit.

        Parameters
        ----------
        flush
            Once the input is drained, advance the watermark past every event
            (to 9999-12-31) in one last batch, so every window is emitted: a
            bounded replay then equals the batch result. The checkpoint keeps
            that watermark, so rows that arrive later for the same checkpoint
            are late: use ``flush`` for backfills and Kappa replays into a
            fresh output, not for a job that runs again on new data.
        """
        return cls(kind="available_now", flush=flush)

    @property
    def stops_by_itself(self) -> bool:
        return self.kind != "processing_time"


DEFAULT_TRIGGER = Trigger(kind="processing_time", interval=timedelta(0))
