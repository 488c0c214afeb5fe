"""``match_recognize`` against a brute-force batch matcher, over random event sequences.

The oracle here is written apart from the operator: it parses nothing (patterns are
generated as trees and printed), and for every start row of a whole, sorted
partition it enumerates the ways to map rows to variables with recursive
generators in SQL:2016's preference order (greedy: one more iteration first;
reluctant: one fewer; alternation: left first), checking each row's DEFINE with
running semantics in plain Python; the first mapping that completes is the match,
then ``after_match`` says where the next starts. MEASURES are computed in Python too:
with ONE ROW PER MATCH over the whole match (*final*), with ALL ROWS PER MATCH once
per row over the match's rows up to it (*running*), with ``classifier()`` (the row's
variable) and ``match_number()`` (counted per partition). DEFINE may read
``next(v)``, the row after the one tried (null after the partition's last row).

The stream gets the same events in a random arrival order (out of order within
the watermark delay, sometimes beyond it: those rows are late, and the oracle
leaves out exactly the rows the ``on_late`` side output received), cut into random
batches, with the query stopped and restarted from its checkpoint at random
points, then flushed (``available_now(flush=True)``) so every row is final.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microstream as ms
from microstream import pattern as mp

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCHEMA = pl.Schema(
    {"id": pl.Int64, "ts": pl.Datetime("us"), "k": pl.String, "e": pl.String, "v": pl.Int64}
)
T0 = datetime(2024, 1, 1)
VARIABLES = ("A", "B", "C")

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")

# -- patterns as trees --------------------------------------------------------------------

Node = tuple[Any, ...]
"""("var", name) | ("cat", [nodes]) | ("alt", [nodes]) | ("rep", node, low, high, greedy)."""


def nullable(node: Node) -> bool:
    kind = node[0]
    if kind == "var":
        return False
    if kind == "cat":
        return all(nullable(n) for n in node[1])
    if kind == "alt":
        return any(nullable(n) for n in node[1])
    return node[2] == 0 or nullable(node[1])


def text(node: Node) -> str:
    kind = node[0]
    if kind == "var":
        return str(node[1])
    if kind == "cat":
        return " ".join(text(n) if n[0] != "alt" else f"({text(n)})" for n in node[1])
    if kind == "alt":
        return " | ".join(text(n) for n in node[1])
    _, body, low, high, greedy = node
    inner = text(body) if body[0] == "var" else f"({text(body)})"
    mark = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
    if mark is None:
        mark = f"{{{low},}}" if high is None else f"{{{low},{high}}}"
    return inner + mark + ("" if greedy else "?")


def names(node: Node) -> set[str]:
    kind = node[0]
    if kind == "var":
        return {node[1]}
    if kind in ("cat", "alt"):
        return set().union(*(names(n) for n in node[1]))
    return names(node[1])


@st.composite
def quantified(draw: st.DrawFn, body: st.SearchStrategy[Node]) -> Node:
    inner = draw(body)
    if nullable(inner):  # only ? over a group that can match nothing (see the operator's refusals)
        return ("rep", inner, 0, 1, draw(st.booleans()))
    low, high = draw(
        st.sampled_from([(0, None), (1, None), (0, 1), (2, 2), (1, 3), (2, None), (0, 2)])
    )
    return ("rep", inner, low, high, draw(st.booleans()))


leaves = st.sampled_from(VARIABLES).map(lambda v: ("var", v))
patterns = st.recursive(
    leaves,
    lambda inner: st.one_of(
        quantified(inner),
        st.lists(inner, min_size=2, max_size=3).map(lambda items: ("cat", items)),
        st.lists(inner, min_size=2, max_size=2).map(lambda items: ("alt", items)),
    ),
    max_leaves=5,
).filter(lambda node: not nullable(node))

# -- conditions: a Polars expression for the operator, Python for the oracle ------------------


@dataclass
class Mapping:
    """What a condition sees: the partition's rows, the match's start, the labels so far
    (the current row's included) and the current row."""

    rows: list[dict[str, Any]]
    start: int
    labels: list[str]

    @property
    def current(self) -> int:
        return self.start + len(self.labels) - 1

    def of(self, var: str | None) -> list[dict[str, Any]]:
        return [
            self.rows[self.start + i]
            for i, label in enumerate(self.labels)
            if var is None or label == var
        ]


def _v(m: Mapping) -> Any:
    return m.rows[m.current]["v"]


def _lt(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a < b


def _sum(values: list[Any]) -> Any:
    present = [x for x in values if x is not None]
    return sum(present) if present else None


def _prev(m: Mapping) -> Any:
    return m.rows[m.current - 1]["v"] if m.current >= 1 else None


def _next(m: Mapping) -> Any:
    return m.rows[m.current + 1]["v"] if m.current + 1 < len(m.rows) else None


def _first_a(m: Mapping) -> Any:
    rows = m.of("A")
    return rows[0]["v"] if rows else None


Condition = tuple[str, pl.Expr, Callable[[Mapping], bool], set[str]]
CONDITIONS: list[Condition] = [
    ("v < 2", pl.col("v") < 2, lambda m: _lt(_v(m), 2), set()),
    ("v >= 2", pl.col("v") >= 2, lambda m: _lt(1, _v(m)), set()),
    ("v > prev(v)", pl.col("v") > mp.prev("v"), lambda m: _lt(_prev(m), _v(m)), set()),
    (
        "v >= first(A.v)",
        pl.col("v") >= mp.first("A.v"),
        lambda m: _lt(_first_a(m), _v(m)) or (_v(m) is not None and _v(m) == _first_a(m)),
        {"A"},
    ),
    ("count(B) <= 2", mp.count("B") <= 2, lambda m: len(m.of("B")) <= 2, {"B"}),
    ("sum(v) <= 6", mp.sum("v") <= 6, lambda m: _lt(_sum([r["v"] for r in m.of(None)]), 7), set()),
    ("e == p", pl.col("e") == "p", lambda m: m.rows[m.current]["e"] == "p", set()),
    ("v < next(v)", pl.col("v") < mp.next("v"), lambda m: _lt(_v(m), _next(m)), set()),
    ("always", pl.lit(True), lambda m: True, set()),
]


# -- the oracle -------------------------------------------------------------------------------


def first_match(
    tree: Node,
    rows: list[dict[str, Any]],
    start: int,
    define: dict[str, Callable[[Mapping], bool]],
    within_s: int | None,
) -> list[str] | None:
    """The preferred mapping of rows from ``start``, enumerated with generators."""

    def fits(pos: int) -> bool:
        return within_s is None or (rows[pos]["ts"] - rows[start]["ts"]).total_seconds() < within_s

    def paths(node: Node, pos: int, labels: list[str]) -> Iterator[tuple[int, list[str]]]:
        kind = node[0]
        if kind == "var":
            if pos < len(rows) and fits(pos):
                tried = [*labels, node[1]]
                condition = define.get(node[1])
                if condition is None or condition(Mapping(rows, start, tried)):
                    yield pos + 1, tried
        elif kind == "cat":
            yield from sequence(node[1], pos, labels)
        elif kind == "alt":
            for option in node[1]:
                yield from paths(option, pos, labels)
        else:
            yield from repeat(node, 0, pos, labels)

    def sequence(items: list[Node], pos: int, labels: list[str]) -> Iterator[tuple[int, list[str]]]:
        if not items:
            yield pos, labels
            return
        for after, mapped in paths(items[0], pos, labels):
            yield from sequence(items[1:], after, mapped)

    def repeat(
        node: Node, count: int, pos: int, labels: list[str]
    ) -> Iterator[tuple[int, list[str]]]:
        _, body, low, high, greedy = node

        def again() -> Iterator[tuple[int, list[str]]]:
            if high is None or count < high:
                for after, mapped in paths(body, pos, labels):
                    yield from repeat(node, count + 1, after, mapped)

        if greedy:
            yield from again()
        if count >= low:
            yield pos, labels
        if not greedy:
            yield from again()

    for _, labels in paths(tree, start, []):
        return labels
    return None


def measures_of(
    rows: list[dict[str, Any]],
    start: int,
    labels: list[str],
    present: set[str],
    number: int,
    every: bool,
) -> list[tuple[Any, ...]]:
    """The output rows of one match: one (final measures), or one per row (running)."""
    out = []
    for upto in range(1, len(labels) + 1) if every else [len(labels)]:
        m = Mapping(rows, start, labels[:upto])
        end = m.current
        values = [r["v"] for r in m.of(None)]
        measured: list[Any] = [
            rows[start]["id"],
            rows[end]["id"],
            upto,
            _sum(values),
            max((x for x in values if x is not None), default=None),
            rows[end - 1]["v"] if end >= 1 else None,
            rows[end]["v"],
        ]
        for var in VARIABLES:
            if var in present:
                measured.append(len(m.of(var)))
        if "A" in present:
            measured.append(_first_a(m))
        if "B" in present:
            bs = m.of("B")
            measured.append(bs[-1]["v"] if bs else None)
        measured += [m.labels[-1], number]
        row = rows[end]
        if every:  # partition, order, measures, the other input columns
            out.append((row["k"], row["ts"], *measured, row["id"], row["e"], row["v"]))
        else:
            out.append((row["k"], *measured))
    return out


def measures_exprs(present: set[str]) -> dict[str, pl.Expr]:
    exprs = {
        "start": mp.first("id"),
        "end": mp.last("id"),
        "n": mp.count(),
        "sum_v": mp.sum("v"),
        "max_v": mp.max("v"),
        "prev_v": mp.prev("v"),
        "cur_v": pl.col("v"),
    }
    for var in VARIABLES:
        if var in present:
            exprs[f"n_{var}"] = mp.count(var)
    if "A" in present:
        exprs["first_a"] = mp.first("A.v")
    if "B" in present:
        exprs["last_b"] = mp.last("B.v")
    exprs["cls"] = mp.classifier()
    exprs["num"] = mp.match_number()
    return exprs


def oracle(
    frame: pl.DataFrame,
    tree: Node,
    define: dict[str, Callable[[Mapping], bool]],
    after_match: str,
    within_s: int | None,
    rows_per_match: str = "one",
) -> list[tuple[Any, ...]]:
    present = names(tree)
    out = []
    for (_,), part in frame.sort("ts", "id").group_by(["k"], maintain_order=True):
        rows = part.to_dicts()
        start, number = 0, 0
        while start < len(rows):
            labels = first_match(tree, rows, start, define, within_s)
            if labels is None:
                start += 1
                continue
            number += 1
            out += measures_of(rows, start, labels, present, number, rows_per_match == "all")
            head, _, var = after_match.partition(":")
            at = [i for i, label in enumerate(labels) if label == var]
            if head == "skip_past_last_row":
                start += len(labels)
            elif head == "skip_to_next_row" or not at:
                start += 1
            else:
                target = at[0] if head == "skip_to_first" else at[-1]
                start += target if target > 0 else 1
    return out


# -- the stream -------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    tree = draw(patterns)
    present = names(tree)
    usable = [c for c in CONDITIONS if c[3] <= present]
    define = {var: draw(st.sampled_from(usable)) for var in sorted(present)}
    define = {var: c for var, c in define.items() if c[0] != "always" or draw(st.booleans())}
    n = draw(st.integers(min_value=1, max_value=24))
    times = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    times.sort()
    jitter = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    arrival = sorted(range(n), key=lambda i: (times[i] + jitter[i], i))
    events = [
        {
            "ts": T0 + timedelta(seconds=times[i]),
            "k": draw(st.sampled_from(["x", "y"])),
            "e": draw(st.sampled_from(["p", "q"])),
            "v": draw(st.one_of(st.integers(0, 4), st.integers(0, 4), st.none())),
        }
        for i in arrival
    ]
    for position, event in enumerate(events):
        event["id"] = position  # the arrival order: ties in event time keep it
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=5)))
    skips = ["skip_past_last_row", "skip_to_next_row"]
    skips += [
        f"{how}:{var}" for how in ("skip_to_first", "skip_to_last") for var in sorted(present)
    ]
    return {
        "tree": tree,
        "define": define,
        "events": pl.DataFrame(events, schema=SCHEMA),
        "cuts": cuts,
        "restarts": draw(st.sets(st.sampled_from(cuts), max_size=2)) if cuts else set(),
        "after_match": draw(st.sampled_from(skips)),
        "within": draw(st.sampled_from([None, 3, 8, 20])),
        "delay": draw(st.sampled_from([0, 2, 5])),
        "rows": draw(st.sampled_from(["one", "all"])),
    }


def run_stream(scenario: dict[str, Any]) -> tuple[list[tuple[Any, ...]], pl.DataFrame]:
    events: pl.DataFrame = scenario["events"]
    tree: Node = scenario["tree"]
    source = ms.MemoryStream(SCHEMA)
    late: list[pl.DataFrame] = []
    within = scenario["within"]
    frame = (
        source.lazy()
        .with_watermark("ts", f"{scenario['delay']}s", on_late=lambda df, _: late.append(df))
        .match_recognize(
            partition_by="k",
            order_by="ts",
            pattern=text(tree),
            define={var: c[1] for var, c in scenario["define"].items()},
            measures=measures_exprs(names(tree)),
            after_match=scenario["after_match"],
            within=None if within is None else f"{within}s",
            rows_per_match=scenario["rows"],
        )
    )
    checkpoint = f"memory://oracle_{uuid.uuid4().hex[:8]}"
    emitted: list[pl.DataFrame] = []

    def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
        return frame.foreach_batch(
            lambda df, _: emitted.append(df), trigger=trigger, checkpoint=checkpoint
        )

    def finish(query: ms.StreamingQuery) -> None:
        query.stop()
        if query.exception() is not None:
            raise query.exception()  # type: ignore[misc]

    bounds = [0, *scenario["cuts"], events.height]
    query = start(None)
    for lo, hi in itertools.pairwise(bounds):
        source.add_data(events.slice(lo, hi - lo))
        query.process_all_available(timeout=30)
        if hi in scenario["restarts"]:
            finish(query)
            query = start(None)
    finish(query)
    flush = start(ms.Trigger.available_now(flush=True))
    flush.await_termination(timeout=60)
    finish(flush)
    rows = [row for df in emitted for row in df.rows()]
    dropped = pl.concat(late) if late else pl.DataFrame(schema=SCHEMA)
    return rows, dropped


def _key(row: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(repr(x) for x in row)


@SETTINGS
@given(scenarios())
def test_stream_matches_the_brute_force_oracle(scenario: dict[str, Any]) -> None:
    rows, dropped = run_stream(scenario)
    kept = scenario["events"].join(dropped.select("id"), on="id", how="anti")
    expected = oracle(
        kept,
        scenario["tree"],
        {var: c[2] for var, c in scenario["define"].items()},
        scenario["after_match"],
        scenario["within"],
        scenario["rows"],
    )
    assert sorted(rows, key=_key) == sorted(expected, key=_key), (
        text(scenario["tree"]),
        {var: c[0] for var, c in scenario["define"].items()},
    )


def test_the_oracle_follows_sql_preference() -> None:
    """The oracle itself, on cases worked by hand (so a wrong oracle cannot agree with a
    wrong operator): greedy, reluctant, alternation order."""
    rows = [
        {"id": i, "k": "x", "ts": T0 + timedelta(seconds=i), "e": e, "v": i}
        for i, e in enumerate("pppq")
    ]
    p = {"A": lambda m: m.rows[m.current]["e"] == "p", "B": lambda m: True}
    greedy = ("cat", [("rep", ("var", "A"), 1, None, True), ("var", "B")])
    reluctant = ("cat", [("rep", ("var", "A"), 1, None, False), ("var", "B")])
    assert first_match(greedy, rows, 0, p, None) == ["A", "A", "A", "B"]
    assert first_match(reluctant, rows, 0, p, None) == ["A", "B"]
    assert first_match(("alt", [("var", "B"), ("var", "A")]), rows, 0, p, None) == ["B"]
    assert first_match(greedy, rows, 0, p, 3) == ["A", "A", "B"]
    assert first_match(greedy, rows, 3, p, None) is None
    # next(v) reads the row after the one tried; after the last row it is null.
    rising = {"A": lambda m: _lt(_v(m), _next(m))}
    assert first_match(("rep", ("var", "A"), 1, None, True), rows, 1, rising, None) == ["A", "A"]
    # ALL ROWS PER MATCH: one row per matched row, running measures; the match's number.
    labels = ["A", "A", "A", "B"]
    every = measures_of(rows, 0, labels, {"A", "B"}, 7, every=True)
    assert [r[4] for r in every] == [1, 2, 3, 4]  # count(*) up to each row
    assert [r[-5:-3] for r in every] == [("A", 7), ("A", 7), ("A", 7), ("B", 7)]
    one = measures_of(rows, 0, labels, {"A", "B"}, 7, every=False)
    assert len(one) == 1 and one[0][-2:] == ("B", 7)
