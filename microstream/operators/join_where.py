"""``join_where`` of two streams: the equality keys and the time bound read from its predicates.

Examples
--------
>>> import polars as pl
>>> left = pl.Schema({"k": pl.Int64, "t": pl.Datetime("us")})
>>> right = pl.Schema({"k": pl.Int64, "t": pl.Datetime("us")})
>>> where = parse_join_where(
...     left,
...     right,
...     (
...         pl.col("k") == pl.col("k_right"),
...         pl.col("t_right") >= pl.col("t"),
...         pl.col("t_right") <= pl.col("t") + pl.duration(minutes=5),
...     ),
...     "_right",
... )
>>> where.left_on, where.lower_us, where.upper_us
(('k',), 0, 300000000)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from microstream.exceptions import PlanError

__all__ = ["WhereJoin", "parse_join_where"]

_FLIP = {"Lt": "Gt", "LtEq": "GtEq", "Gt": "Lt", "GtEq": "LtEq"}


@dataclass(frozen=True)
class WhereJoin:
    """What ``join_where``'s predicates say: equality keys and a time bound."""

    left_on: tuple[str, ...]
    right_on: tuple[str, ...]
    left_time: str
    right_time: str
    lower_us: int
    upper_us: int


def parse_join_where(
    left: pl.Schema, right: pl.Schema, predicates: tuple[pl.Expr, ...], suffix: str
) -> WhereJoin:
    """Read ``join_where`` predicates of two streams: ``==`` between a left and a right
    column (the keys), and comparisons of the two time columns with a constant
    duration offset (``pl.col("t_r") <= pl.col("t_l") + pl.duration(minutes=5)``),
    which bound ``right_time - left_time``. Anything else is a PlanError: a predicate
    the join cannot use to evict state would keep it forever."""
    import json

    def side_of(name: str) -> tuple[str, str]:
        if name in left:
            return "left", name
        if name in right:
            return "right", name
        if name.endswith(suffix) and name[: -len(suffix)] in right:
            return "right", name[: -len(suffix)]
        msg = f"join_where: {name!r} is a column of neither stream"
        raise PlanError(msg)

    def term(node: Any, text: str) -> tuple[str, str, int]:
        """``col`` or ``col +/- duration``: (side, column, offset in us)."""
        if "Column" in node:
            return (*side_of(node["Column"]), 0)
        binary = node.get("BinaryExpr")
        if binary and binary["op"] in ("Plus", "Minus") and "Column" in binary["left"]:
            offset = _duration_us(binary["right"])
            if offset is not None:
                sign = 1 if binary["op"] == "Plus" else -1
                return (*side_of(binary["left"]["Column"]), sign * offset)
        msg = (
            f"join_where of two streams: cannot use {text}; compare a time column of each "
            "side, optionally plus or minus a constant pl.duration(...)"
        )
        raise PlanError(msg)

    keys: list[tuple[str, str]] = []
    lower: list[int] = []
    upper: list[int] = []
    times: set[tuple[str, str]] = set()
    for predicate in predicates:
        text = str(predicate)
        tree = json.loads(predicate.meta.serialize(format="json"))
        binary = tree.get("BinaryExpr")
        if binary is None or binary["op"] not in ("Eq", *_FLIP):
            msg = (
                f"join_where of two streams: cannot use the predicate {text}; use equality "
                "between a left and a right column, and <, <=, >, >= between the time columns"
            )
            raise PlanError(msg)
        a, b = term(binary["left"], text), term(binary["right"], text)
        if a[0] == b[0]:
            msg = f"join_where: {text} compares two columns of the {a[0]} stream"
            raise PlanError(msg)
        op = binary["op"]
        if a[0] == "right":  # write it as left OP right
            a, b, op = b, a, _FLIP.get(op, op)
        if op == "Eq":
            if a[2] or b[2]:
                msg = f"join_where: an equality key cannot have an offset: {text}"
                raise PlanError(msg)
            keys.append((a[1], b[1]))
            continue
        times.add((a[1], b[1]))
        # l + oa OP r + ob  <=>  r - l  OP'  oa - ob, OP' flipped
        bound = a[2] - b[2]
        if op in ("Lt", "LtEq"):  # r - l > / >= bound
            lower.append(bound + (1 if op == "Lt" else 0))
        else:  # r - l < / <= bound
            upper.append(bound - (1 if op == "Gt" else 0))
    if not keys:
        msg = (
            "join_where of two streams needs an equality predicate between a left and a "
            "right column (a cross join of two streams has unbounded state)"
        )
        raise PlanError(msg)
    if len(times) != 1 or not lower or not upper:
        msg = (
            "join_where of two streams needs a lower and an upper bound on the same pair of "
            f"time columns (e.g. r >= l and r <= l + pl.duration(hours=1)); got {len(lower)} "
            f"lower and {len(upper)} upper bound(s) over {sorted(times)}"
        )
        raise PlanError(msg)
    (left_time, right_time) = times.pop()
    return WhereJoin(
        left_on=tuple(k for k, _ in keys),
        right_on=tuple(k for _, k in keys),
        left_time=left_time,
        right_time=right_time,
        lower_us=max(lower),
        upper_us=min(upper),
    )


def _duration_us(node: Any) -> int | None:
    """A constant duration literal (possibly aliased) in microseconds, else None."""
    if "Alias" in node:
        node = node["Alias"][0]
    scalar = node.get("Literal", {}).get("Scalar", {}) if isinstance(node, dict) else {}
    value = scalar.get("Duration") if isinstance(scalar, dict) else None
    if not value:
        return None
    amount, unit = value
    per_us = {"Microseconds": 1, "Milliseconds": 1000}
    if unit == "Nanoseconds":
        return int(amount) // 1000
    return int(amount) * per_us[unit] if unit in per_us else None
