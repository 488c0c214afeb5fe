"""Decoding a batch's records into the source's rows: values, metadata and headers columns,
bad records by ``on_bad_record``, schema drift by ``extra_columns``/``missing_columns``.

A mixin of :class:`~connectors.kafka.source.KafkaSource`: the same code decodes a batch
on the driver and a split (:mod:`connectors.kafka.splits`) in another process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import polars as pl

from connectors.kafka.client import DEAD_LETTER_SCHEMA, HEADERS_DTYPE
from connectors.kafka.records import _headers_of, _Records
from microstream.exceptions import SchemaMismatchError, SourceError

if TYPE_CHECKING:
    from confluent_kafka import Message

    from connectors.kafka.source_spec import KafkaSourceSpec
    from microstream.protocols import SideOutput


class RecordDecoding:
    """``_decode`` and the policies it applies; the source holds the attributes below."""

    spec: KafkaSourceSpec
    description: str
    _logger: logging.Logger
    _side_output: SideOutput
    _ignored: dict[str, None]
    _metrics: dict[str, int]

    def _count(self, name: str, n: int) -> None:
        if n:
            self._metrics[name] = self._metrics.get(name, 0) + n

    def _decode(self, records: _Records) -> pl.DataFrame:
        spec = self.spec
        messages = records.messages
        meta = pl.DataFrame(
            {
                "topic": records.topics,
                "partition": records.partitions,
                "offset": records.offsets,
            }
        )
        if spec.include_metadata:
            stamps = [m.timestamp() for m in messages]
            meta = meta.with_columns(
                key=pl.Series([m.key() for m in messages], dtype=pl.Binary),
                timestamp=pl.Series([s[1] if s[0] else None for s in stamps], dtype=pl.Int64)
                .cast(pl.Datetime("ms"))
                .dt.replace_time_zone("UTC"),
            )
        if spec.include_headers:
            meta = meta.with_columns(
                headers=pl.Series(
                    [[{"key": k, "value": v} for k, v in _headers_of(m)] for m in messages],
                    dtype=HEADERS_DTYPE,
                )
            )
        decoded = spec.decoder.decode([m.value() for m in messages], seen=tuple(self._ignored))
        if decoded.bad:
            self._bad_records(decoded.bad, messages)
        if decoded.missing or decoded.extra:
            self._schema_drift(decoded.extra, decoded.missing, messages)
        if decoded.index is not None:
            meta = meta[decoded.index]
        frame = pl.concat([decoded.frame, meta], how="horizontal")
        return frame.select(spec.schema.names())

    def _bad_records(self, bad: list[tuple[int, str]], messages: list[Message]) -> None:
        spec = self.spec
        first, why = bad[0]
        m = messages[first]
        where = f"topic {m.topic()!r} partition {m.partition()} offset {m.offset()}"
        if spec.on_bad_record == "fail":
            more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
            msg = (
                f"{self.description}: bad record at {where}: {why}{more}. Fix or remove it, or "
                "pass on_bad_record='skip' or 'dead_letter'"
            )
            raise SourceError(msg)
        if spec.on_bad_record == "skip":
            self._count("bad_records_skipped", len(bad))
            self._logger.warning(
                "%s: skipped %d bad record(s); the first at %s: %s",
                self.description,
                len(bad),
                where,
                why,
            )
            return
        rows = [messages[i] for i, _ in bad]
        dead = pl.DataFrame(
            {
                "topic": [r.topic() for r in rows],
                "partition": [r.partition() for r in rows],
                "offset": [r.offset() for r in rows],
                "key": [r.key() for r in rows],
                "value": [r.value() for r in rows],
                "reason": [reason for _, reason in bad],
            },
            schema=DEAD_LETTER_SCHEMA,
        )
        assert spec.dead_letter is not None
        self._side_output.emit(spec.dead_letter, dead)
        self._count("bad_records_dead_lettered", len(bad))

    def _schema_drift(
        self, extra: Mapping[str, int], missing: Mapping[str, int], messages: list[Message]
    ) -> None:
        """Apply ``missing_columns`` and ``extra_columns`` to what the decoder found."""
        spec = self.spec

        def where(i: int) -> str:
            m = messages[i]
            return f"topic {m.topic()!r} partition {m.partition()} offset {m.offset()}"

        if missing:
            column, first = min(missing.items(), key=lambda item: item[1])
            msg = (
                f"{self.description}: the record at {where(first)} lacks column {column!r} of "
                "the schema (missing_columns='raise'). Pass missing_columns='insert' to read "
                "it as null, or remove the column from schema="
            )
            raise SchemaMismatchError(msg)
        if spec.extra_columns == "raise":
            column, first = min(extra.items(), key=lambda item: item[1])
            msg = (
                f"{self.description}: the record at {where(first)} has "
                f"{spec.decoder.describe_extra(column)} (extra_columns='raise'). Add it to "
                "schema= to read it, or pass extra_columns='ignore' to drop it (reported once)"
            )
            raise SchemaMismatchError(msg)
        new = {c: i for c, i in extra.items() if c not in self._ignored}
        for column, first in sorted(new.items(), key=lambda item: item[1]):
            self._logger.warning(
                "%s: the record at %s has %s; it is not read (extra_columns='ignore', "
                "reported once per run). Add it to schema= to read it",
                self.description,
                where(first),
                spec.decoder.describe_extra(column),
            )
        self._ignored.update(dict.fromkeys(new))
        self._count("new_columns_ignored", len(new))
