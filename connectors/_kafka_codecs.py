"""Payload formats of the Kafka connector: bulk decoding and encoding of record values.

Decoding never builds Python objects per field: JSON payloads are joined with
newlines and parsed by :func:`polars.read_ndjson`, CSV lines by
:func:`polars.read_csv`, and Avro payloads (plain *schemaless* Avro, as
``fastavro.schemaless_writer`` and Java's ``BinaryEncoder`` write them) are
framed as one block of an Avro object container file and read by
:func:`polars.read_avro`.

Avro has no record boundaries of its own, so a bulk decode is checked: the
encoded length of every decoded row is computed from its values with Polars
expressions and must equal its payload's length; a record that does not fit
the schema shifts the decoding and cannot pass. Schemas with types whose
length cannot be computed that way (maps, non-null unions, enums, decimals,
``time-*``) are checked per record with ``fastavro`` instead (slower).

When a bulk parse fails, the bad records are found by bisection (halves are
parsed in bulk again, down to single records), so one bad record in ``n``
costs about ``2 log2(n)`` bulk parses, not ``n`` single ones.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import PlanError, SinkError

if TYPE_CHECKING:
    from microstream._typing import KafkaFormat, KafkaSinkFormat

__all__ = [
    "Decoded",
    "PayloadDecoder",
    "avro_schema_for",
    "encode_values",
    "make_decoder",
]

_PANIC: tuple[type[BaseException], ...] = (Exception, pl.exceptions.PanicException)
"""What a Polars reader raises on bad input: errors, and panics on some inputs."""


class _BadPayloadsError(Exception):
    """A bulk parse that must be bisected: why."""


@dataclass(frozen=True)
class Decoded:
    """The result of decoding a list of payloads.

    Attributes
    ----------
    frame
        One row per good payload (tombstones included, as all-null rows), in
        payload order, with the decoder's schema.
    index
        The payload position of each row of ``frame``; None when every
        payload gave a row (``frame`` row ``i`` is payload ``i``).
    bad
        ``(payload position, reason)`` of the payloads that did not decode.
    """

    frame: pl.DataFrame
    index: list[int] | None
    bad: list[tuple[int, str]]


class PayloadDecoder(ABC):
    """Decodes record values in bulk into rows of :attr:`schema`."""

    schema: pl.Schema

    @abstractmethod
    def _bulk(self, payloads: Sequence[bytes]) -> pl.DataFrame:
        """Rows of ``payloads`` (no None), one per payload, or raise."""

    def decode(self, payloads: Sequence[bytes | None]) -> Decoded:
        """Decode ``payloads``; a None payload (a tombstone) is a row of nulls.

        Examples
        --------
        >>> decoder = make_decoder("json", {"x": pl.Int64})
        >>> out = decoder.decode([b'{"x": 1}', b'{"x": oops', None])
        >>> out.frame["x"].to_list(), out.index, out.bad[0][0]
        ([1, None], [0, 2], 1)
        """
        positions: list[int] | None = None
        work: Sequence[bytes]
        if None in payloads:
            positions = [i for i, p in enumerate(payloads) if p is not None]
            work = [p for p in payloads if p is not None]
        else:
            work = payloads  # type: ignore[assignment]  # no None in it
        try:
            frame = self._bulk(work) if work else pl.DataFrame(schema=self.schema)
            index: list[int] | None = None
            bad: list[tuple[int, str]] = []
        except _PANIC:
            frames, index, bad = self._bisect(work, 0)
            frame = pl.concat(frames) if frames else pl.DataFrame(schema=self.schema)
        if positions is None:
            return Decoded(frame, index, bad)
        # Map positions in ``work`` back to payload positions, and add the tombstones.
        kept = positions if index is None else [positions[i] for i in index]
        bad = [(positions[i], why) for i, why in bad]
        tombstones = [i for i, p in enumerate(payloads) if p is None]
        nulls = pl.DataFrame(schema=self.schema).clear(len(tombstones))
        merged = (
            pl.concat([frame, nulls])
            .with_columns(pl.Series("__position", kept + tombstones, pl.Int64))
            .sort("__position")
        )
        order = merged.get_column("__position").to_list()
        return Decoded(merged.drop("__position"), order, bad)

    def _bisect(
        self, payloads: Sequence[bytes], base: int
    ) -> tuple[list[pl.DataFrame], list[int], list[tuple[int, str]]]:
        """Frames of the good parts, their positions, and the bad payloads with reasons."""
        try:
            frame = self._bulk(payloads)
        except _PANIC as exc:
            if len(payloads) == 1:
                return [], [], [(base, _reason(exc))]
            mid = len(payloads) // 2
            f1, i1, b1 = self._bisect(payloads[:mid], base)
            f2, i2, b2 = self._bisect(payloads[mid:], base + mid)
            return f1 + f2, i1 + i2, b1 + b2
        return [frame], list(range(base, base + len(payloads))), []


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_height(frame: pl.DataFrame, expected: int, what: str) -> pl.DataFrame:
    if frame.height != expected:
        if expected == 1:
            msg = f"the payload holds {frame.height} {what}s, not one"
        else:
            msg = f"{expected} payloads gave {frame.height} {what}s"
        raise _BadPayloadsError(msg)
    return frame


# -- JSON ------------------------------------------------------------------------------------------


class JsonDecoder(PayloadDecoder):
    """One JSON object per payload, parsed with the schema (absent fields are null)."""

    def __init__(self, schema: pl.Schema) -> None:
        self.schema = schema
        try:  # Refuse at plan time a dtype the JSON reader cannot produce.
            pl.read_ndjson(io.BytesIO(b"{}"), schema=schema)
        except _PANIC as exc:
            msg = f"format='json' cannot read schema {schema}: {_reason(exc)}"
            raise PlanError(msg) from None

    def _bulk(self, payloads: Sequence[bytes]) -> pl.DataFrame:
        data = b"\n".join(payloads)
        if data.count(b"\n") != len(payloads) - 1:
            # Raw newlines are whitespace in JSON (inside strings they are escaped):
            # flatten pretty-printed payloads so each stays one line.
            data = b"\n".join(p.replace(b"\n", b" ").replace(b"\r", b" ") for p in payloads)
        frame = pl.read_ndjson(io.BytesIO(data), schema=self.schema)
        return _check_height(frame, len(payloads), "JSON object")


# -- CSV -------------------------------------------------------------------------------------------


class CsvDecoder(PayloadDecoder):
    """One CSV line per payload, no header; fields by position, missing ones null."""

    def __init__(self, schema: pl.Schema) -> None:
        self.schema = schema

    def _bulk(self, payloads: Sequence[bytes]) -> pl.DataFrame:
        frame = pl.read_csv(
            io.BytesIO(b"\n".join(payloads)),
            has_header=False,
            schema=self.schema,
            raise_if_empty=False,
        )
        return _check_height(frame, len(payloads), "CSV row")


# -- raw -------------------------------------------------------------------------------------------


class RawDecoder(PayloadDecoder):
    """The value bytes as they are: a Binary ``value`` column; never a bad record."""

    def __init__(self) -> None:
        self.schema = pl.Schema({"value": pl.Binary()})

    def _bulk(self, payloads: Sequence[bytes]) -> pl.DataFrame:
        return pl.DataFrame({"value": pl.Series(payloads, dtype=pl.Binary)})

    def decode(self, payloads: Sequence[bytes | None]) -> Decoded:
        """Every payload, a tombstone as null."""
        return Decoded(pl.DataFrame({"value": pl.Series(payloads, dtype=pl.Binary)}), None, [])


# -- Avro ------------------------------------------------------------------------------------------


def _zigzag_len(value: pl.Expr) -> pl.Expr:
    """Bytes of Avro's zig-zag varint encoding of an integer expression."""
    v = value.cast(pl.Int64)
    z = pl.when(v >= 0).then(v.cast(pl.UInt64) * 2).otherwise((-(v + 1)).cast(pl.UInt64) * 2 + 1)
    return pl.sum_horizontal(
        pl.lit(1, pl.Int64), *((z >= 1 << (7 * k)).cast(pl.Int64) for k in range(1, 10))
    )


_FIXED_SIZE = {"null": 0, "boolean": 1, "float": 4, "double": 8}
_INT_LOGICAL = {None, "date", "timestamp-millis", "timestamp-micros", "local-timestamp-millis",
                "local-timestamp-micros"}  # fmt: skip


def _encoded_len(avro_type: Any, value: pl.Expr, named: dict[str, Any]) -> pl.Expr | None:
    """An expression for the encoded length of ``value``, or None if not computable."""
    if isinstance(avro_type, str) and avro_type in named:
        avro_type = named[avro_type]
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        if len(avro_type) != 2 or len(branches) != 1:
            return None  # only ["null", T] maps to a nullable column
        inner = _encoded_len(branches[0], value, named)
        if inner is None:
            return None
        return pl.when(value.is_null()).then(pl.lit(1, pl.Int64)).otherwise(1 + inner)
    if isinstance(avro_type, dict):
        kind = avro_type.get("type")
        logical = avro_type.get("logicalType")
        name = avro_type.get("name")
        if kind == "record":
            if name:
                named[name] = avro_type
            parts = []
            for f in avro_type["fields"]:
                part = _encoded_len(f["type"], value.struct.field(f["name"]), named)
                if part is None:
                    return None
                parts.append(part)
            return pl.sum_horizontal(pl.lit(0, pl.Int64), *parts)
        if kind == "array":
            item = _encoded_len(avro_type["items"], pl.element(), named)
            if item is None:
                return None
            n = value.list.len()
            items = value.list.eval(item).list.sum().cast(pl.Int64)
            return pl.when(n == 0).then(pl.lit(1, pl.Int64)).otherwise(_zigzag_len(n) + items + 1)
        if kind == "fixed":
            if name:
                named[name] = avro_type
            return None if logical else pl.lit(int(avro_type["size"]), pl.Int64)
        if kind in ("int", "long"):
            return _zigzag_len(value.to_physical()) if logical in _INT_LOGICAL else None
        if kind in ("string", "bytes", "boolean", "float", "double", "null"):
            return None if logical not in (None, "uuid") else _encoded_len(kind, value, named)
        return None  # enum, map, unknown
    if avro_type in _FIXED_SIZE:
        return pl.lit(_FIXED_SIZE[avro_type], pl.Int64)
    if avro_type in ("int", "long"):
        return _zigzag_len(value)
    if avro_type == "string":
        n = value.str.len_bytes().cast(pl.Int64)
        return _zigzag_len(n) + n
    if avro_type == "bytes":
        n = value.bin.size().cast(pl.Int64)
        return _zigzag_len(n) + n
    return None


def _varint(n: int) -> bytes:
    """Avro's zig-zag varint of a non-negative int (block counts and sizes)."""
    z, out = n << 1, bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


class AvroDecoder(PayloadDecoder):
    """Plain schemaless Avro payloads of one writer schema, read by Polars in one block."""

    def __init__(self, avro_schema: Mapping[str, Any] | str) -> None:
        import fastavro

        try:
            parsed_json = json.loads(avro_schema) if isinstance(avro_schema, str) else avro_schema
            self._parsed: dict[str, Any] = dict(fastavro.parse_schema(dict(parsed_json)))  # type: ignore[arg-type]
        except Exception as exc:
            msg = f"schema is not a valid Avro record schema: {exc}"
            raise PlanError(msg) from None
        if self._parsed.get("type") != "record":
            msg = f"format='avro' needs an Avro schema of type 'record'; got {self._parsed.get('type')!r}"
            raise PlanError(msg)
        header = io.BytesIO()
        fastavro.writer(header, self._parsed, [], codec="null")
        self._header = header.getvalue()
        self._sync = self._header[-16:]
        try:
            self.schema = pl.read_avro(io.BytesIO(self._header)).schema
        except _PANIC as exc:
            msg = f"polars cannot read this Avro schema: {_reason(exc)}"
            raise PlanError(msg) from None
        raw = json.loads(json.dumps(parsed_json))
        self._length = _encoded_len(raw, pl.struct(pl.all()), {})

    def _bulk(self, payloads: Sequence[bytes]) -> pl.DataFrame:
        if self._length is None:
            for payload in payloads:  # no length expression for this schema: check each
                self._check_one(payload)
        data = b"".join(payloads)
        block = self._header + _varint(len(payloads)) + _varint(len(data)) + data + self._sync
        frame = _check_height(pl.read_avro(io.BytesIO(block)), len(payloads), "Avro record")
        if self._length is not None:
            sizes = frame.select(self._length.alias("n")).get_column("n")
            expected = pl.Series([len(p) for p in payloads], dtype=pl.Int64)
            wrong = (sizes != expected).arg_true()
            if wrong.len():
                i = wrong[0]
                msg = (
                    f"the payload does not match the Avro schema (decoded as {sizes[i]} "
                    f"bytes, it has {expected[i]})"
                )
                raise _BadPayloadsError(msg)
        return frame

    def _check_one(self, payload: bytes) -> None:
        import fastavro

        buffer = io.BytesIO(payload)
        try:
            fastavro.schemaless_reader(buffer, self._parsed, None)
        except Exception as exc:
            msg = f"the payload does not match the Avro schema: {_reason(exc)}"
            raise _BadPayloadsError(msg) from None
        if buffer.tell() != len(payload):
            msg = (
                f"the payload does not match the Avro schema ({len(payload) - buffer.tell()} "
                "bytes left after the record)"
            )
            raise _BadPayloadsError(msg)


def make_decoder(
    fmt: KafkaFormat, schema: Mapping[str, Any] | pl.Schema | str | None
) -> PayloadDecoder:
    """The decoder of a payload format (``schema`` is an Avro schema for ``"avro"``).

    Raises
    ------
    PlanError
        A schema that is missing, or that the format cannot read.

    Examples
    --------
    >>> make_decoder("csv", {"a": pl.Int64, "b": pl.String}).decode([b"1,x", b"2"]).frame.rows()
    [(1, 'x'), (2, None)]
    """
    if fmt == "raw":
        if schema is not None:
            msg = f"format='raw' has a fixed schema (value: Binary); got schema={schema!r}"
            raise PlanError(msg)
        return RawDecoder()
    if schema is None:
        what = "an Avro record schema (dict or JSON text)" if fmt == "avro" else "schema="
        msg = (
            f"format={fmt!r} needs {what}: Kafka records carry no schema of their own, e.g. "
            "schema={'user': pl.Int64, 'amount': pl.Float64}"
            if fmt != "avro"
            else f"format='avro' needs {what} as schema="
        )
        raise PlanError(msg)
    if fmt == "avro":
        if isinstance(schema, pl.Schema):
            msg = "format='avro' needs schema= as an Avro schema (dict or JSON text), not a polars schema"
            raise PlanError(msg)
        return AvroDecoder(schema)
    if isinstance(schema, str):
        msg = f"format={fmt!r} needs schema= as a mapping of column to polars dtype; got {schema!r}"
        raise PlanError(msg)
    try:
        polars_schema = pl.Schema(schema)
    except (TypeError, ValueError) as exc:
        msg = f"schema must map column names to polars dtypes; got {schema!r}: {exc}"
        raise PlanError(msg) from None
    if fmt == "json":
        return JsonDecoder(polars_schema)
    if fmt == "csv":
        return CsvDecoder(polars_schema)
    msg = f"format must be 'json', 'avro', 'raw' or 'csv'; got {fmt!r}"
    raise ValueError(msg)


# -- encoding (the sink) ---------------------------------------------------------------------------

_AVRO_TYPES: dict[type[pl.DataType], Any] = {
    pl.Boolean: "boolean",
    pl.Int8: "int",
    pl.Int16: "int",
    pl.Int32: "int",
    pl.Int64: "long",
    pl.UInt8: "int",
    pl.UInt16: "int",
    pl.UInt32: "long",
    pl.Float32: "float",
    pl.Float64: "double",
    pl.String: "string",
    pl.Binary: "bytes",
    pl.Date: {"type": "int", "logicalType": "date"},
}


def _avro_type(name: str, dtype: Any) -> Any:
    if isinstance(dtype, pl.Datetime):
        logical = "timestamp-millis" if dtype.time_unit == "ms" else "timestamp-micros"
        if dtype.time_zone is None:
            logical = f"local-{logical}"
        return {"type": "long", "logicalType": logical}
    if isinstance(dtype, pl.List):
        return {"type": "array", "items": ["null", _avro_type(name, dtype.inner)]}
    if isinstance(dtype, pl.Struct):
        return {
            "type": "record",
            "name": f"{name}_record",
            "fields": [
                {"name": f.name, "type": ["null", _avro_type(f.name, f.dtype)]}
                for f in dtype.fields
            ],
        }
    avro = _AVRO_TYPES.get(dtype.base_type())
    if avro is None:
        msg = (
            f"column {name!r} has dtype {dtype}, which has no Avro type here; cast it "
            "(e.g. to pl.String) or pass avro_schema="
        )
        raise PlanError(msg)
    return avro


def avro_schema_for(schema: pl.Schema, name: str = "Row") -> dict[str, Any]:
    """An Avro record schema for rows of ``schema``; every field nullable.

    Examples
    --------
    >>> avro_schema_for(pl.Schema({"id": pl.Int64}))
    {'type': 'record', 'name': 'Row', 'fields': [{'name': 'id', 'type': ['null', 'long']}]}
    """
    return {
        "type": "record",
        "name": name,
        "fields": [{"name": c, "type": ["null", _avro_type(c, t)]} for c, t in schema.items()],
    }


def encode_values(
    frame: pl.DataFrame, fmt: KafkaSinkFormat, avro_schema: Mapping[str, Any] | None = None
) -> list[bytes]:
    """One payload per row of ``frame``.

    ``"json"``: every column, one JSON object per row (written by Polars'
    NDJSON writer and split at newlines; Binary columns as base64 text).
    ``"avro"``: every column, schemaless Avro of ``avro_schema`` (fastavro
    encodes row by row: Avro is a row format). ``"raw"``: the ``value``
    column's bytes (String is UTF-8 encoded).

    Examples
    --------
    >>> encode_values(pl.DataFrame({"a": [1, None]}), "json")
    [b'{"a":1}', b'{"a":null}']
    """
    if fmt == "json":
        binary = [c for c, t in frame.schema.items() if t == pl.Binary]
        if binary:
            frame = frame.with_columns(pl.col(binary).bin.encode("base64"))
        try:
            text = frame.write_ndjson()
        except _PANIC as exc:
            msg = f"cannot encode the batch as JSON: {_reason(exc)}"
            raise SinkError(msg) from None
        return text.encode().split(b"\n")[:-1] if frame.height else []
    if fmt == "raw":
        column = frame.get_column("value")
        if column.dtype == pl.String:
            column = column.cast(pl.Binary)
        return column.to_list()
    import fastavro

    parsed = fastavro.parse_schema(dict(avro_schema or avro_schema_for(frame.schema)))
    out = []
    for row in frame.iter_rows(named=True):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, row)
        out.append(buffer.getvalue())
    return out
