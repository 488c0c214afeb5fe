"""When the Delta sink commits: the no-row batches it may leave out of the table's log.

A batch with no rows used to be an empty Delta commit that only recorded its
application transaction (``txn``). In append and update mode such a commit
changes nothing a reader sees, and exactly-once does not need it:

- a re-run of a batch the sink left out finds ``txn`` below its id and writes
  what it computes; the first attempt wrote nothing, so nothing is doubled;
- ``committed_batch()`` (the ``txn`` version) then names the last batch that
  had rows, never a batch beyond the last one that ran, so the engine's check
  for a lost write-ahead log (a sink holding a batch the log does not reach)
  refuses no checkpoint it accepted before; it accepts a log that lost only
  batches which wrote nothing to the table, and a re-run of those writes
  nothing twice either.

Complete mode commits every batch: an empty result there empties the table.
The batch that creates the table commits too (so the table exists with the
query's schema after the first batch), and so does an empty batch whose
columns differ from the table's (with ``merge_schema`` that adds the columns,
without it the mismatch is the same ``SinkError`` as before).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:
    from deltalake import DeltaTable, PostCommitHookProperties

__all__ = ["log_retention_property", "post_commit_hooks", "skips_empty_batch"]


def skips_empty_batch(table: DeltaTable | None, mode: str, data: pl.DataFrame) -> bool:
    """Whether batch ``data`` needs no Delta commit (see the module's docstring).

    Parameters
    ----------
    table
        The sink's handle of the table; None if the table does not exist yet.
    mode
        The query's output mode.
    data
        The batch's result.

    Examples
    --------
    >>> import polars as pl
    >>> skips_empty_batch(None, "append", pl.DataFrame({"x": []}))  # creates the table
    False
    >>> skips_empty_batch(None, "append", pl.DataFrame({"x": [1]}))
    False
    """
    if data.height or mode == "complete" or table is None:
        return False
    return {f.name for f in table.schema().fields} == set(data.columns)


_CHECKPOINT_INTERVAL = 100
"""Delta's default ``delta.checkpointInterval``."""


def post_commit_hooks(table: DeltaTable | None) -> PostCommitHookProperties | None:
    """The post-commit hooks of the sink's next commit on ``table`` (None: delta-rs' defaults).

    delta-rs runs the expired-log cleanup after every commit when the table
    allows it (``delta.enableExpiredLogCleanup``, on by default), and the
    cleanup lists the whole ``_delta_log`` directory: one listing of every log
    file per commit, a cost that grows with the table's versions. Delta's own
    writers clean up only when they write a checkpoint (every
    ``delta.checkpointInterval`` versions), and only files before it can go
    anyway, so the sink asks for the cleanup on those commits alone.

    Parameters
    ----------
    table
        The sink's handle, at the version the commit builds on (None: the
        commit creates the table).

    Examples
    --------
    >>> post_commit_hooks(None) is None  # the table's first commit: the defaults
    True
    """
    if table is None:
        return None
    from deltalake import PostCommitHookProperties

    config = table.metadata().configuration
    interval = int(config.get("delta.checkpointInterval") or _CHECKPOINT_INTERVAL)
    if (table.version() + 1) % max(interval, 1) == 0:
        return None  # a checkpoint commit: the cleanup as the table's properties say
    return PostCommitHookProperties(cleanup_expired_logs=False)


def log_retention_property(retention: timedelta) -> dict[str, str]:
    """The table properties that keep ``retention`` of log history (``delta.logRetentionDuration``).

    Examples
    --------
    >>> log_retention_property(timedelta(hours=1))
    {'delta.logRetentionDuration': 'interval 3600 seconds', 'delta.enableExpiredLogCleanup': 'true'}
    """
    seconds = int(retention.total_seconds())
    return {
        "delta.logRetentionDuration": f"interval {seconds} seconds",
        "delta.enableExpiredLogCleanup": "true",
    }
