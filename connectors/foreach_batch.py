"""``foreach_batch``: hand each batch and its id to a user function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from microstream.protocols import SinkContext

__all__ = ["ForeachBatchSink", "ForeachBatchSinkSpec"]


@dataclass(frozen=True, eq=False)
class ForeachBatchSinkSpec:
    """Calls ``function(df, batch_id)`` once per batch.

    The batch id is what makes the function's writes exactly-once: after a
    crash the last uncommitted batch is handed over again with the same id and
    the same rows, so a function that writes idempotently by batch id (an
    upsert, a ``txn`` version, a file named by the id) applies it once.
    """

    kind = "foreach_batch"
    output_modes = frozenset({"append", "update", "complete"})
    durable = True

    function: Callable[[pl.DataFrame, int], object]

    def describe(self) -> str:
        name = getattr(self.function, "__qualname__", repr(self.function))
        return f"ForeachBatch[{name}]"

    def build(self, context: SinkContext) -> ForeachBatchSink:
        return ForeachBatchSink(self.function, self.describe())


class ForeachBatchSink:
    def __init__(self, function: Callable[[pl.DataFrame, int], object], description: str):
        self.function = function
        self.description = description

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        self.function(data, batch_id)

    def stop(self) -> None:
        pass
