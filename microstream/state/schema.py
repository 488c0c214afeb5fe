"""Typed per-key state: pydantic models and Polars schemas as rows of Arrow columns.

``map_groups_with_state(fn, state_schema=...)`` keeps one state value per key in
a :class:`~microstream.state.StateStore`, which holds plain Polars columns: a
checkpoint is data, never code, so a state value is never pickled. A
:class:`StateSchema` is the bridge:

- a pydantic model class: each field is a column (``int`` -> Int64, ``float``
  -> Float64, ``str`` -> String, ``bool`` -> Boolean, ``datetime`` -> Datetime
  (naive: aware values are stored as UTC; ``AwareDatetime`` -> Datetime in
  UTC), ``date``, ``time``, ``timedelta``, ``bytes``, ``list[X]`` -> List,
  a nested model -> Struct, ``X | None`` -> nullable X; ``Annotated[int,
  pl.Int32]`` picks the Polars dtype). The user sees model instances.
- a Polars schema (``{"count": pl.Int64, ...}``): the user sees a ``dict`` of
  the row; an update is validated against the dtypes (strictly: ``1.5`` is no
  Int64, ``"1"`` no number) by a pydantic model derived from the schema.
"""

from __future__ import annotations

import datetime as dt
import types
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import polars as pl
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NaiveDatetime,
    ValidationError,
    create_model,
)

from microstream.exceptions import PlanError

__all__ = ["StateSchema", "model_polars_schema"]

_INT_RANGES = {
    pl.Int8: (-(2**7), 2**7 - 1),
    pl.Int16: (-(2**15), 2**15 - 1),
    pl.Int32: (-(2**31), 2**31 - 1),
    pl.Int64: (-(2**63), 2**63 - 1),
    pl.UInt8: (0, 2**8 - 1),
    pl.UInt16: (0, 2**16 - 1),
    pl.UInt32: (0, 2**32 - 1),
    pl.UInt64: (0, 2**64 - 1),
}
_SIMPLE: dict[Any, pl.DataType] = {
    bool: pl.Boolean(),
    int: pl.Int64(),
    float: pl.Float64(),
    str: pl.String(),
    bytes: pl.Binary(),
    dt.date: pl.Date(),
    dt.time: pl.Time(),
    dt.timedelta: pl.Duration("us"),
}


class StateSchema:
    """A ``state_schema`` argument resolved to stored columns and user-facing values.

    Parameters
    ----------
    spec
        A pydantic model class, or a Polars schema (``pl.Schema`` or a mapping
        of column names to dtypes).
    what
        How error messages name the argument.

    Examples
    --------
    >>> from pydantic import BaseModel
    >>> class Counter(BaseModel):
    ...     n: int = 0
    ...     tags: list[str] = []
    >>> schema = StateSchema(Counter)
    >>> schema.schema
    Schema([('n', Int64), ('tags', List(String))])
    >>> schema.validate(Counter(n=2, tags=["a"]))
    ({'n': 2, 'tags': ['a']}, Counter(n=2, tags=['a']))
    >>> schema.value_of({"n": 2, "tags": ["a"]})
    Counter(n=2, tags=['a'])
    >>> StateSchema({"n": pl.Int64}).validate({"n": 1.5})
    Traceback (most recent call last):
    ...
    ValueError: ... n: Input should be a valid integer ...
    """

    def __init__(self, spec: Any, *, what: str = "state_schema"):
        if isinstance(spec, type) and issubclass(spec, BaseModel):
            self.model: type[BaseModel] | None = spec
            self.schema = model_polars_schema(spec, what=what)
            self._validator: type[BaseModel] = spec
        elif isinstance(spec, (pl.Schema, Mapping)):
            try:
                self.schema = pl.Schema(spec)
            except (TypeError, ValueError) as exc:
                msg = f"{what} must map column names to Polars dtypes; got {spec!r} ({exc})"
                raise PlanError(msg) from None
            if not len(self.schema):
                msg = f"{what} must have at least one column; got {spec!r}"
                raise PlanError(msg)
            self.model = None
            self._validator = _model_of_schema("State", self.schema, what)
        else:
            msg = (
                f"{what} must be a pydantic model class or a Polars schema "
                f"(e.g. {{'count': pl.Int64}}); got {spec!r} instead"
            )
            raise PlanError(msg)

    @property
    def names(self) -> list[str]:
        return self.schema.names()

    def describe(self) -> str:
        if self.model is not None:
            return self.model.__name__
        return "{" + ", ".join(f"{k!r}: {v}" for k, v in self.schema.items()) + "}"

    def fingerprint(self) -> dict[str, str]:
        return {name: str(dtype) for name, dtype in self.schema.items()}

    def validate(self, value: Any) -> tuple[dict[str, Any], Any]:
        """The stored row (plain Python values by column) of a state value, and the value.

        Accepts an instance of the model (revalidated: fields may have been
        assigned since), a dict of the fields, or a one-row DataFrame. The
        value returned is a fresh model instance, or the row for a Polars schema.

        Raises
        ------
        ValueError
            The value does not match the schema; the message says where.
        """
        if isinstance(value, pl.DataFrame):
            if value.height != 1:
                msg = f"a state value given as a DataFrame must have one row; got {value.height}"
                raise ValueError(msg)
            value = value.to_dicts()[0]
        elif isinstance(value, BaseModel):
            if self.model is not None and not isinstance(value, self.model):
                msg = f"the state is a {self.model.__name__}; got a {type(value).__name__} instead"
                raise ValueError(msg)
            value = value.model_dump()
        if not isinstance(value, Mapping):
            expected = self.model.__name__ if self.model is not None else "dict of the columns"
            msg = f"the state must be a {expected}; got {type(value).__name__} {value!r}"
            raise ValueError(msg)
        try:
            validated = self._validator.model_validate(dict(value))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err['input']!r})"
                for err in exc.errors()
            )
            msg = f"the value does not match {self.describe()}: {problems}"
            raise ValueError(msg) from None
        row = validated.model_dump()
        return row, (validated if self.model is not None else row)

    def value_of(self, row: dict[str, Any]) -> Any:
        """What the user sees of a stored row: a model instance, or the row as a dict.

        Raises
        ------
        ValueError
            The stored row no longer fits the model.
        """
        if self.model is None:
            return row
        try:
            return self.model.model_validate(row)
        except ValidationError as exc:
            msg = f"the stored state does not fit {self.model.__name__}: {exc}"
            raise ValueError(msg) from None

    def frame(self, rows: Sequence[dict[str, Any] | None]) -> pl.DataFrame:
        """Stored rows (``None``: all columns null) as a frame of exactly :attr:`schema`."""
        blank = dict.fromkeys(self.schema.names())
        return pl.DataFrame([blank if r is None else r for r in rows], schema=self.schema)


def model_polars_schema(model: type[BaseModel], *, what: str = "state_schema") -> pl.Schema:
    """The Polars columns a pydantic model's fields are stored as.

    Examples
    --------
    >>> from typing import Annotated
    >>> from pydantic import BaseModel
    >>> class Track(BaseModel):
    ...     name: str | None = None
    ...     speeds: list[float] = []
    ...     hops: Annotated[int, pl.Int32] = 0
    >>> model_polars_schema(Track)
    Schema([('name', String), ('speeds', List(Float64)), ('hops', Int32)])

    A nested model is a Struct column, a list of them a List of Structs.
    """
    if not model.__pydantic_complete__:
        try:
            model.model_rebuild()
        except Exception as exc:  # pydantic raises several kinds for unresolved names
            msg = (
                f"{what} {model.__name__} is not fully defined ({exc}); define it where the "
                "names its annotations use are importable"
            )
            raise PlanError(msg) from None
    columns: dict[str, pl.DataType] = {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if info.metadata:  # Annotated[...] metadata that pydantic lifted off the type
            annotation = Annotated[(annotation, *info.metadata)]
        columns[name] = _dtype_of(annotation, f"{what} {model.__name__}.{name}")
    if not columns:
        msg = f"{what} {model.__name__} has no fields; a state needs at least one"
        raise PlanError(msg)
    return pl.Schema(columns)


def _dtype_of(annotation: Any, where: str) -> pl.DataType:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        for meta in args[1:]:
            if isinstance(meta, pl.DataType):
                return meta
            if isinstance(meta, type) and issubclass(meta, pl.DataType):
                return meta()
        return _dtype_of(args[0], where)
    if origin in (Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        if len(present) == 1:
            return _dtype_of(present[0], where)
        msg = f"{where}: a union of {present} has no single Polars dtype; use one type"
        raise PlanError(msg)
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) == 1 and next(iter(kinds)) in _SIMPLE:
            return _SIMPLE[next(iter(kinds))]
        msg = f"{where}: Literal{list(args)} mixes types; use values of one type"
        raise PlanError(msg)
    if origin in (list, tuple, set, frozenset, Sequence):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(set(items)) > 1:
            msg = f"{where}: tuple{list(items)} has items of several types; use a nested model"
            raise PlanError(msg)
        if not items:
            msg = f"{where}: give the item type, e.g. list[int]"
            raise PlanError(msg)
        return pl.List(_dtype_of(items[0], where))
    if annotation is AwareDatetime:
        return pl.Datetime("us", "UTC")
    if annotation in (dt.datetime, NaiveDatetime):
        return pl.Datetime("us")
    if annotation in _SIMPLE:
        return _SIMPLE[annotation]
    if annotation is Decimal:
        return pl.Decimal(38, 18)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pl.Struct(model_polars_schema(annotation, what=where.split(" ", maxsplit=1)[0]))
    msg = (
        f"{where}: {annotation!r} has no Polars column type; use int, float, str, bool, bytes, "
        "datetime, date, time, timedelta, Decimal, list[...], a nested pydantic model, "
        "or Annotated[..., pl.<dtype>]"
    )
    raise PlanError(msg)


def _model_of_schema(name: str, schema: pl.Schema, what: str) -> type[BaseModel]:
    """A strict pydantic model whose fields are the (nullable, required) columns of ``schema``."""
    fields: dict[str, Any] = {
        column: (_python_type(dtype, f"{what} column {column!r}", column) | None, ...)
        for column, dtype in schema.items()
    }
    config = ConfigDict(extra="forbid", strict=True)
    model: type[BaseModel] = create_model(name, __config__=config, **fields)
    return model


def _python_type(dtype: pl.DataType, where: str, name: str) -> Any:
    base = dtype.base_type()
    if base in _INT_RANGES:
        low, high = _INT_RANGES[base]
        return Annotated[int, Field(ge=low, le=high)]
    if dtype.is_float():
        return float
    if base in (pl.String, pl.Categorical):
        return str
    if isinstance(dtype, pl.Enum):
        return Literal[tuple(dtype.categories.to_list())]
    if base is pl.Datetime:
        return dt.datetime
    if isinstance(dtype, pl.Struct):
        return _model_of_schema(
            f"State_{name}", pl.Schema({f.name: f.dtype for f in dtype.fields}), where
        )
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner() if isinstance(dtype.inner, type) else dtype.inner
        return list[_python_type(inner, where, name) | None]  # type: ignore[misc]
    simple = {
        pl.Boolean: bool,
        pl.Binary: bytes,
        pl.Date: dt.date,
        pl.Time: dt.time,
        pl.Duration: dt.timedelta,
        pl.Decimal: Decimal,
    }
    if base in simple:
        return simple[base]
    msg = f"{where}: dtype {dtype} cannot hold a state value"
    raise PlanError(msg)
