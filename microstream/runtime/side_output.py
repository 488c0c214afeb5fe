"""Rows a source sets aside while a batch is read (the Kafka source's dead letters)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:
    from microstream.protocols import QuerySession, SideOutputTarget

__all__ = ["SourceSideOutput"]


class SourceSideOutput:
    """The engine side of ``SourceContext.side_output``: rows a source set aside.

    Rows emitted while a batch is read are kept per target and routed once per
    batch (a memory table is written once per batch id), with the batch id
    appended, like late rows.
    """

    def __init__(self, session: QuerySession) -> None:
        self._session = session
        self.writer = ""  # the query's id, once known
        self._batch_id = -1
        self._pending: list[tuple[SideOutputTarget, pl.DataFrame]] = []

    def declare(self, target: SideOutputTarget, schema: pl.Schema) -> None:
        if isinstance(target, str):
            self._session.register_table(target, pl.Schema({**schema, "batch_id": pl.Int64()}))

    def emit(self, target: SideOutputTarget, rows: pl.DataFrame) -> None:
        if rows.height:
            self._pending.append((target, rows))

    def begin(self, batch_id: int) -> None:
        self._batch_id, self._pending = batch_id, []

    def route(self) -> None:
        pending, self._pending = self._pending, []
        targets: list[SideOutputTarget] = []
        for target, _ in pending:
            if not any(target is t or target == t for t in targets):
                targets.append(target)
        for target in targets:
            rows = pl.concat(
                [r for t, r in pending if t is target or t == target], how="diagonal_relaxed"
            ).with_columns(batch_id=pl.lit(self._batch_id, pl.Int64))
            if isinstance(target, str):
                self._session.write_table(
                    target, self._batch_id, rows, replace=False, writer=self.writer
                )
            else:
                target(rows, self._batch_id)
