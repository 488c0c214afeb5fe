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

JSON and CSV payloads are also checked for columns the schema lacks (a JSON key
holding a value, a CSV field past the schema's last column) and, on request,
for schema columns they lack; the decoder reports the first payload holding
each, and the source applies ``extra_columns=`` / ``missing_columns=``. The
JSON check is one numpy pass over the batch's bytes while every key is
accounted for: the ``":`` tokens (less those of a null) must equal the non-null
values the schema's columns decoded, nested struct fields included. Only when
they differ are the rows compared one by one (still in bulk), and the keys of
the rows that differ extracted and parsed.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import polars as pl

from microstream.exceptions import PlanError, SinkError

if TYPE_CHECKING:
    from microstream._typing import KafkaFormat, KafkaSinkFormat, MissingColumnsPolicy

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
    extra
        ``{column: payload position}``: each column the schema lacks (and
        that was not in ``seen``), with the first good payload holding it.
    missing
        ``{column: payload position}``: each schema column some good payload
        lacks, with the first such payload; checked only with
        ``missing_columns="raise"``.
    """

    frame: pl.DataFrame
    index: list[int] | None
    bad: list[tuple[int, str]]
    extra: dict[str, int] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)


class PayloadDecoder(ABC):
    """Decodes record values in bulk into rows of :attr:`schema`."""

    schema: pl.Schema
    missing_columns: MissingColumnsPolicy = "insert"

    @abstractmethod
    def _bulk(self, payloads: Sequence[bytes], seen: Sequence[str] = ()) -> pl.DataFrame:
        """Rows of ``payloads`` (no None), one per payload, or raise.

        ``seen``: columns outside the schema also read (as text), for decoders
        that check for such columns.
        """

    def _check_columns(
        self, payloads: Sequence[bytes], frame: pl.DataFrame
    ) -> tuple[dict[str, int], dict[str, int]]:
        """``(extra, missing)`` of :class:`Decoded`, as positions in ``payloads``.

        ``frame`` holds the rows of ``payloads`` as :meth:`_bulk` read them.
        Formats whose payloads cannot hold other columns find none.
        """
        return {}, {}

    def describe_extra(self, column: str) -> str:
        """How a message names an extra column reported by :meth:`decode`."""
        return f"column {column!r}, which is not in the schema"

    def decode(self, payloads: Sequence[bytes | None], *, seen: Sequence[str] = ()) -> Decoded:
        """Decode ``payloads``; a None payload (a tombstone) is a row of nulls.

        ``seen`` are extra columns reported before in this run: they are not
        reported again (and a JSON decoder reads them along, so that the rows
        holding them stay on the cheap path of the check).

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
            frame = self._bulk(work, seen) if work else self._empty(seen)
            index: list[int] | None = None
            bad: list[tuple[int, str]] = []
        except _PANIC:
            frames, index, bad = self._bisect(work, 0, seen)
            frame = pl.concat(frames) if frames else self._empty(seen)
        good = work if index is None else [work[i] for i in index]
        extra, missing = self._check_columns(good, frame) if good else ({}, {})
        if seen:
            frame = frame.select(self.schema.names())
        if index is not None:  # positions in ``good`` to positions in ``work``
            extra = {c: index[i] for c, i in extra.items()}
            missing = {c: index[i] for c, i in missing.items()}
        if positions is None:
            return Decoded(frame, index, bad, extra, missing)
        # Map positions in ``work`` back to payload positions, and add the tombstones.
        kept = positions if index is None else [positions[i] for i in index]
        bad = [(positions[i], why) for i, why in bad]
        extra = {c: positions[i] for c, i in extra.items()}
        missing = {c: positions[i] for c, i in missing.items()}
        tombstones = [i for i, p in enumerate(payloads) if p is None]
        nulls = pl.DataFrame(schema=self.schema).clear(len(tombstones))
        merged = (
            pl.concat([frame, nulls])
            .with_columns(pl.Series("__position", kept + tombstones, pl.Int64))
            .sort("__position")
        )
        order = merged.get_column("__position").to_list()
        return Decoded(merged.drop("__position"), order, bad, extra, missing)

    def _empty(self, seen: Sequence[str]) -> pl.DataFrame:
        return pl.DataFrame(schema={**self.schema, **dict.fromkeys(seen, pl.String())})

    def _bisect(
        self, payloads: Sequence[bytes], base: int, seen: Sequence[str]
    ) -> tuple[list[pl.DataFrame], list[int], list[tuple[int, str]]]:
        """Frames of the good parts, their positions, and the bad payloads with reasons."""
        try:
            frame = self._bulk(payloads, seen)
        except _PANIC as exc:
            if len(payloads) == 1:
                return [], [], [(base, _reason(exc))]
            mid = len(payloads) // 2
            f1, i1, b1 = self._bisect(payloads[:mid], base, seen)
            f2, i2, b2 = self._bisect(payloads[mid:], base + mid, seen)
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

_KEY_TOKEN = r'"(?:[^"\\]|\\.)*"\s*:'
"""A JSON object key with its colon; matched from a string's start, it never starts inside one."""


def _joined(payloads: Sequence[bytes]) -> bytes:
    """The payloads as NDJSON: one line each."""
    data = b"\n".join(payloads)
    if data.count(b"\n") != len(payloads) - 1:
        # Raw newlines are whitespace in JSON (inside strings they are escaped):
        # flatten pretty-printed payloads so each stays one line.
        data = b"\n".join(p.replace(b"\n", b" ").replace(b"\r", b" ") for p in payloads)
    return data


def _keys_inside(value: pl.Expr, dtype: Any) -> pl.Expr | None:
    """Per row, how many object keys with a non-null value ``value`` holds; None: none ever."""
    if isinstance(dtype, pl.Struct):
        parts = []
        for f in dtype.fields:
            child = value.struct.field(f.name)
            inner = _keys_inside(child, f.dtype)
            parts.append(child.is_not_null().cast(pl.Int64))
            if inner is not None:
                parts.append(inner)
        return pl.sum_horizontal(*parts)
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = _keys_inside(pl.element(), dtype.inner)
        if inner is None:
            return None
        as_list = value.arr.to_list() if isinstance(dtype, pl.Array) else value
        return as_list.list.eval(inner).list.sum().fill_null(0)
    return None


class JsonDecoder(PayloadDecoder):
    """One JSON object per payload, parsed with the schema (absent fields are null).

    A key the schema lacks counts as an extra column when it holds a value:
    a key that is null in every payload carries nothing that is lost. A
    schema column counts as missing from a payload only when its key is
    absent (``"k": null`` is present).

    Examples
    --------
    >>> decoder = JsonDecoder(pl.Schema({"x": pl.Int64}), missing_columns="raise")
    >>> out = decoder.decode([b'{"x": 1}', b'{"x": 2, "y": 3}', b'{"y": null}'])
    >>> out.frame["x"].to_list(), out.extra, out.missing
    ([1, 2, None], {'y': 1}, {'x': 2})
    """

    def __init__(
        self, schema: pl.Schema, *, missing_columns: MissingColumnsPolicy = "insert"
    ) -> None:
        self.schema = schema
        self.missing_columns = missing_columns
        try:  # Refuse at plan time a dtype the JSON reader cannot produce.
            pl.read_ndjson(io.BytesIO(b"{}"), schema=schema)
        except _PANIC as exc:
            msg = f"format='json' cannot read schema {schema}: {_reason(exc)}"
            raise PlanError(msg) from None

    def _bulk(self, payloads: Sequence[bytes], seen: Sequence[str] = ()) -> pl.DataFrame:
        schema = {**self.schema, **dict.fromkeys(seen, pl.String())} if seen else self.schema
        frame = pl.read_ndjson(io.BytesIO(_joined(payloads)), schema=schema)
        return _check_height(frame, len(payloads), "JSON object")

    def _check_columns(
        self, payloads: Sequence[bytes], frame: pl.DataFrame
    ) -> tuple[dict[str, int], dict[str, int]]:
        missing = self._missing(payloads, frame) if self.missing_columns == "raise" else {}
        return self._extra(payloads, frame), missing

    def _values_per_row(self, frame: pl.DataFrame) -> pl.Expr:
        parts: list[pl.Expr] = []
        for name, dtype in frame.schema.items():
            parts.append(pl.col(name).is_not_null().cast(pl.Int64))
            inner = _keys_inside(pl.col(name), dtype)
            if inner is not None:
                parts.append(inner.fill_null(0))
        return pl.sum_horizontal(*parts)

    def _extra(self, payloads: Sequence[bytes], frame: pl.DataFrame) -> dict[str, int]:
        # Every key with a value is one '":' token (a null's is also a '":null' or '": null'
        # one), so
        # when the tokens match the values decoded, no key went unread. Keys written with
        # a space before the colon, quotes and colons inside strings, and objects held by
        # a String column make the counts differ: then the rows are looked at.
        tokens = _valued_keys(b"".join(payloads))
        nested = any(_keys_inside(pl.col(c), t) is not None for c, t in frame.schema.items())
        if nested:
            values = int(frame.select(self._values_per_row(frame).sum()).item())
        else:
            values = frame.height * frame.width - sum(frame.null_count().row(0))
        if tokens == values:
            return {}
        text = _text(payloads)
        per_row = (
            text.str.count_matches('":', literal=True)
            - text.str.count_matches('":null', literal=True)
            - text.str.count_matches('": null', literal=True)
        )
        expected = frame.select(self._values_per_row(frame)).to_series()
        rows = (per_row != expected).arg_true()
        candidates = text.gather(rows)
        found = candidates.str.extract_all(_KEY_TOKEN).explode().drop_nulls().unique()
        names: set[str] = set()
        for token in found.to_list():  # once per distinct key, not per record
            try:
                names.add(json.loads(token.rstrip()[:-1]))
            except ValueError:
                continue
        unknown = sorted(names - set(frame.columns))
        if not unknown:
            return {}
        held = _read_text(candidates, dict.fromkeys(unknown, pl.String()))
        out: dict[str, int] = {}
        for name in unknown:
            where = held.get_column(name).is_not_null().arg_true()
            if where.len():
                out[name] = int(rows[where[0]])
        return out

    def _missing(self, payloads: Sequence[bytes], frame: pl.DataFrame) -> dict[str, int]:
        names = self.schema.names()
        rows = frame.select(pl.any_horizontal(pl.col(names).is_null())).to_series().arg_true()
        if not rows.len():
            return {}
        # A null read is an absent key or a null value; with every null value made 0
        # (in strings too, where it is harmless), only absent keys read as null.
        text = _text(payloads).gather(rows).str.replace_all(r":(\s*)null", ":${1}0")
        held = _read_text(text, dict.fromkeys(names, pl.String()))
        out: dict[str, int] = {}
        for name in names:
            where = held.get_column(name).is_null().arg_true()
            if where.len():
                out[name] = int(rows[where[0]])
        return out


def _valued_keys(data: bytes) -> int:
    """How many '":' tokens ``data`` holds, less those followed by ``null`` or `` null``.

    numpy rather than ``bytes.count``, which slows down on a pattern that
    starts with a byte as frequent as '"'; indices are clipped rather than
    the data padded, as a copy of a large buffer costs more than the count.
    """
    a = np.frombuffer(data, dtype=np.uint8)
    last = len(a) - 1
    colons = np.flatnonzero(a == ord(":"))
    keys = colons[a[np.maximum(colons - 1, 0)] == ord('"')]
    keys = keys[keys > 0]
    value = keys + 1 + (a[np.minimum(keys + 1, last)] == ord(" "))
    null = value + 3 <= last
    for k, byte in enumerate(b"null"):
        null &= a[np.minimum(value + k, last)] == byte
    return len(keys) - int(np.count_nonzero(null))


def _first(mask: pl.Series) -> int:
    """The position of the first true value (there is one)."""
    return cast("int", mask.arg_true()[0])


def _text(payloads: Sequence[bytes]) -> pl.Series:
    """The payloads as one String per row, each on one line."""
    text = pl.Series(payloads, dtype=pl.Binary).cast(pl.String)
    if text.str.contains("[\r\n]").any():
        text = text.str.replace_all("[\r\n]", " ")
    return text


def _read_text(text: pl.Series, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """JSON lines (already checked to parse) read with ``schema``."""
    data = text.str.join("\n").item().encode()
    return pl.read_ndjson(io.BytesIO(data), schema=schema)


# -- CSV -------------------------------------------------------------------------------------------


class CsvDecoder(PayloadDecoder):
    """One CSV line per payload, no header; fields by position, missing ones null.

    Fields past the schema's columns are extra columns (named ``field N``,
    counted from 1) and are not read; a line with fewer fields than the
    schema lacks the last columns.

    Examples
    --------
    >>> decoder = CsvDecoder(pl.Schema({"a": pl.Int64, "b": pl.String}), missing_columns="raise")
    >>> out = decoder.decode([b"1,x", b"2", b'3,"y,z",4'])
    >>> out.frame.rows(), out.extra, out.missing
    ([(1, 'x'), (2, None), (3, 'y,z')], {'field 3': 2}, {'b': 1})
    """

    def __init__(
        self, schema: pl.Schema, *, missing_columns: MissingColumnsPolicy = "insert"
    ) -> None:
        self.schema = schema
        self.missing_columns = missing_columns

    def _bulk(self, payloads: Sequence[bytes], seen: Sequence[str] = ()) -> pl.DataFrame:
        frame = pl.read_csv(
            io.BytesIO(b"\n".join(payloads)),
            has_header=False,
            schema=self.schema,
            raise_if_empty=False,
            # Polars compares the first line's fields with the schema: without these, a
            # short or long first line is refused where later ones are padded or refused.
            missing_columns="insert",
            extra_columns="ignore",
        )
        return _check_height(frame, len(payloads), "CSV row")

    def describe_extra(self, column: str) -> str:
        """``field 3, past the schema's 2 columns``."""
        return f"{column}, past the schema's {len(self.schema)} columns"

    def _check_columns(
        self, payloads: Sequence[bytes], frame: pl.DataFrame
    ) -> tuple[dict[str, int], dict[str, int]]:
        text = pl.Series(payloads, dtype=pl.Binary).cast(pl.String)
        if text.str.contains('"', literal=True).any():
            # A separator between quotes is data; a doubled quote inside a quoted
            # field splits it in two quoted parts, both removed.
            text = text.str.replace_all('"[^"]*"', "")
        fields = text.str.count_matches(",", literal=True) + 1
        n = len(self.schema)
        most, least = cast("int", fields.max()), cast("int", fields.min())
        extra = {f"field {k}": _first(fields >= k) for k in range(n + 1, most + 1)}
        missing: dict[str, int] = {}
        if self.missing_columns == "raise":
            names = self.schema.names()
            for k in range(least + 1, n + 1):
                missing[names[k - 1]] = _first(fields < k)
        return extra, missing


# -- raw -------------------------------------------------------------------------------------------


class RawDecoder(PayloadDecoder):
    """The value bytes as they are: a Binary ``value`` column; never a bad record."""

    def __init__(self) -> None:
        self.schema = pl.Schema({"value": pl.Binary()})

    def _bulk(self, payloads: Sequence[bytes], seen: Sequence[str] = ()) -> pl.DataFrame:
        return pl.DataFrame({"value": pl.Series(payloads, dtype=pl.Binary)})

    def decode(self, payloads: Sequence[bytes | None], *, seen: Sequence[str] = ()) -> Decoded:
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

    def _bulk(self, payloads: Sequence[bytes], seen: Sequence[str] = ()) -> pl.DataFrame:
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
    fmt: KafkaFormat,
    schema: Mapping[str, Any] | pl.Schema | str | None,
    *,
    missing_columns: MissingColumnsPolicy = "insert",
) -> PayloadDecoder:
    """The decoder of a payload format (``schema`` is an Avro schema for ``"avro"``).

    ``missing_columns="raise"`` makes JSON and CSV decoders report the schema
    columns that payloads lack (:attr:`Decoded.missing`).

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
        return JsonDecoder(polars_schema, missing_columns=missing_columns)
    if fmt == "csv":
        return CsvDecoder(polars_schema, missing_columns=missing_columns)
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
