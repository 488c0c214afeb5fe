"""``sink_console``: print every batch (for notebooks and debugging)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

import polars as pl

from microstream.protocols import SinkContext

__all__ = ["ConsoleSink", "ConsoleSinkSpec"]


@dataclass(frozen=True, eq=False)
class ConsoleSinkSpec:
    """Prints each batch with its id; at most ``num_rows`` rows per batch."""

    kind = "console"
    output_modes = frozenset({"append", "update", "complete"})
    durable = False

    num_rows: int = 20
    stream: TextIO | None = None

    def describe(self) -> str:
        return "ConsoleSink"

    def build(self, context: SinkContext) -> ConsoleSink:
        return ConsoleSink(self.num_rows, self.stream)


class ConsoleSink:
    description = "ConsoleSink"

    def __init__(self, num_rows: int, stream: TextIO | None):
        self.num_rows = num_rows
        self.stream = stream

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        out = self.stream or sys.stdout
        with pl.Config(tbl_rows=self.num_rows):
            print(f"Batch: {batch_id}\n{data}", file=out, flush=True)

    def stop(self) -> None:
        pass
