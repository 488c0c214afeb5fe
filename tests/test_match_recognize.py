"""``StreamFrame.match_recognize``: exact rows for hand-written cases.

Each case feeds events (a partition ``k``, a time in seconds, a label ``e`` and a
value ``v``) in batches through a memory stream, then runs
``available_now(flush=True)`` on the checkpoint so every row is final, and checks
the exact rows emitted: every quantifier, greedy against reluctant, alternation,
each ``after_match`` strategy, ``within``, ``prev``/``first``/``last`` and
aggregates; then when a match is emitted (only once it is decided), late rows, a
restart, and the plan-time refusals.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream import pattern as mp
from microstream.operators.pattern import parse_pattern

# most cases use unbounded quantifiers without within on purpose (test_refusals and
# test_unbounded_quantifier_without_within_warns check the warning)
pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")

T0 = datetime(2024, 1, 1)
SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "k": pl.String, "e": pl.String, "v": pl.Int64})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def events(
    text: str, *, k: str = "x", start: int = 0, values: Sequence[int] | None = None
) -> pl.DataFrame:
    """``"a b b c"`` -> rows one second apart with those labels, ``v`` their positions."""
    labels = text.split()
    vs = list(values) if values is not None else list(range(start, start + len(labels)))
    return pl.DataFrame(
        {
            "ts": [at(start + i) for i in range(len(labels))],
            "k": [k] * len(labels),
            "e": labels,
            "v": vs,
        },
        schema=SCHEMA,
    )


def is_(label: str) -> pl.Expr:
    return pl.col("e") == label


SPAN = {"first_v": mp.first("v"), "last_v": mp.last("v"), "n": mp.count()}


class Run:
    """Feed batches one by one (each processed), then flush on the same checkpoint."""

    def __init__(
        self,
        build: Callable[[ms.StreamFrame], ms.StreamFrame],
        batches: Sequence[pl.DataFrame],
        *,
        delay: str = "0s",
        flush: bool = True,
        restart_after: int | None = None,
    ):
        source = ms.MemoryStream(SCHEMA)
        self.late_name = f"late_{uuid.uuid4().hex[:8]}"
        frame = build(source.lazy().with_watermark("ts", delay, on_late=self.late_name))
        checkpoint = f"memory://match_{uuid.uuid4().hex[:8]}"
        self.per_batch: list[pl.DataFrame] = []
        self.steps: list[list[tuple[Any, ...]]] = []
        """The rows emitted so far, after each batch was fed and processed."""
        self.progress: list[ms.QueryProgress] = []

        def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
            return frame.foreach_batch(
                lambda df, _: self.per_batch.append(df), trigger=trigger, checkpoint=checkpoint
            )

        query = start(None)
        try:
            for i, batch in enumerate(batches):
                source.add_data(batch)
                query.process_all_available(timeout=30)
                self.steps.append(self.rows())
                if restart_after == i:
                    query.stop()
                    self._check(query)
                    query = start(None)
        finally:
            query.stop()
        self._check(query)
        self.before_flush = len(self.per_batch)
        if flush:
            query = start(ms.Trigger.available_now(flush=True))
            query.await_termination(timeout=60)
            self._check(query)

    def _check(self, query: ms.StreamingQuery) -> None:
        self.progress += query.recent_progress
        if query.exception() is not None:
            raise query.exception()  # type: ignore[misc]

    def rows(self) -> list[tuple[Any, ...]]:
        return [row for df in self.per_batch for row in df.rows()]

    def late(self) -> pl.DataFrame:
        return ms.table(self.late_name)


def match(
    pattern: str,
    define: dict[str, pl.Expr],
    batches: Sequence[pl.DataFrame],
    *,
    measures: dict[str, pl.Expr] | None = None,
    **options: Any,
) -> list[tuple[Any, ...]]:
    run_options = {k: options.pop(k) for k in ("delay", "flush", "restart_after") if k in options}
    return Run(
        lambda f: f.match_recognize(
            partition_by="k",
            order_by="ts",
            pattern=pattern,
            define=define,
            measures=measures or SPAN,
            **options,
        ),
        batches,
        **run_options,
    ).rows()


ABC = {"A": is_("a"), "B": is_("b"), "C": is_("c")}


def of(*variables: str) -> dict[str, pl.Expr]:
    return {v: ABC[v] for v in variables}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # rows: 0:a 1:b 2:b 3:b 4:c 5:a 6:c 7:a 8:b 9:c
        ("A B C", [("x", 7, 9, 3)]),
        ("A B+ C", [("x", 0, 4, 5), ("x", 7, 9, 3)]),
        ("A B* C", [("x", 0, 4, 5), ("x", 5, 6, 2), ("x", 7, 9, 3)]),
        ("A B? C", [("x", 5, 6, 2), ("x", 7, 9, 3)]),
        ("A B{3} C", [("x", 0, 4, 5)]),
        ("A B{2} C", []),
        ("A B{2,} C", [("x", 0, 4, 5)]),
        ("A B{1,2} C", [("x", 7, 9, 3)]),
        ("A B{,3} C", [("x", 0, 4, 5), ("x", 5, 6, 2), ("x", 7, 9, 3)]),
        ("(A B)+ C", [("x", 7, 9, 3)]),
        ("A (B | C)+", [("x", 0, 4, 5), ("x", 5, 6, 2), ("x", 7, 9, 3)]),
    ],
)
def test_each_quantifier(pattern: str, expected: list[tuple[Any, ...]]) -> None:
    batches = [events("a b b b c a c a b c")]
    assert match(pattern, ABC, batches) == expected


def test_greedy_takes_the_most_rows_reluctant_the_fewest() -> None:
    # B and C both accept "b"; C also accepts "c": B+ takes every b it can, B+? one.
    define = {"A": is_("a"), "B": is_("b"), "C": is_("b") | is_("c")}
    batches = [events("a b b b c")]
    assert match("A B+ C", define, batches) == [("x", 0, 4, 5)]
    assert match("A B+? C", define, batches) == [("x", 0, 2, 3)]
    assert match("A B*? C", define, batches) == [("x", 0, 1, 2)]
    assert match("A B{2,3}? C", define, batches) == [("x", 0, 3, 4)]
    # a reluctant ? prefers to skip B
    assert match("A B?? C", define, batches) == [("x", 0, 1, 2)]
    assert match("A B? C", define, batches) == [("x", 0, 2, 3)]


def test_alternation_prefers_the_left_branch() -> None:
    # both branches can match "a b"; the measure says which variable took row 1
    define = {"A": is_("a"), "X": is_("b"), "Y": is_("b")}
    measures = {"first_v": mp.first("v"), "via_x": mp.count("X"), "via_y": mp.count("Y")}
    batches = [events("a b")]
    assert match("A (X | Y)", define, batches, measures=measures) == [("x", 0, 1, 0)]
    assert match("A (Y | X)", define, batches, measures=measures) == [("x", 0, 0, 1)]
    # the left branch fails further on: the right one is taken
    define = {"A": is_("a"), "X": is_("b"), "Y": is_("b"), "Z": is_("z")}
    measures = {"first_v": mp.first("v"), "last_v": mp.last("v"), "y": mp.count("Y")}
    assert match("A (X Z | Y)", define, batches, measures=measures) == [("x", 0, 1, 1)]


@pytest.mark.parametrize(
    ("after_match", "expected"),
    [
        ("skip_past_last_row", [("x", 0, 3, 4)]),
        ("skip_to_next_row", [("x", 0, 3, 4), ("x", 1, 3, 3), ("x", 2, 3, 2)]),
        # to the first B: the row after the match's first row here
        ("skip_to_first:B", [("x", 0, 3, 4), ("x", 1, 3, 3), ("x", 2, 3, 2)]),
        # to the last B (row 2): it starts the next match
        ("skip_to_last:B", [("x", 0, 3, 4), ("x", 2, 3, 2)]),
        # A is the match's first row: skipping there would loop, so the next row
        ("skip_to_first:A", [("x", 0, 3, 4), ("x", 1, 3, 3), ("x", 2, 3, 2)]),
    ],
)
def test_after_match(after_match: str, expected: list[tuple[Any, ...]]) -> None:
    define = {"A": is_("b") | is_("a"), "B": is_("b"), "C": is_("c")}
    assert match("A B* C", define, [events("a b b c")], after_match=after_match) == expected


def test_skip_to_last_lands_inside_the_match() -> None:
    # rows: a b a b c ; pattern A B A? B? C ... skip to the last A (row 2) starts "a b c"
    define = {"A": is_("a"), "B": is_("b"), "C": is_("c")}
    rows = match("A B (A B)? C", define, [events("a b a b c")], after_match="skip_to_last:A")
    assert rows == [("x", 0, 4, 5), ("x", 2, 4, 3)]


def test_within_bounds_a_match() -> None:
    # a at 0s, b at 1..4s, c at 5s: the whole match spans 5s
    batches = [events("a b b b b c")]
    assert match("A B+ C", ABC, batches, within="6s") == [("x", 0, 5, 6)]
    assert match("A B+ C", ABC, batches, within="5s") == []  # strictly less than within
    # a later a starts a shorter match
    batches = [events("a b a b b c")]
    assert match("A B+ C", ABC, batches, within="4s") == [("x", 2, 5, 4)]


def test_navigation_and_aggregates_in_define_and_measures() -> None:
    # a rising run: each B above the previous row, C falls below the first B
    define = {
        "B": pl.col("v") > mp.prev("v"),
        "C": pl.col("v") < mp.first("B.v"),
    }
    measures = {
        "start": mp.first("A.v"),
        "top": mp.last("B.v"),
        "rises": mp.count("B"),
        "total": mp.sum("B.v"),
        "mean": mp.avg("B.v"),
        "low": mp.min("v"),
        "high": mp.max("B.v"),
        "before_last": mp.prev("v"),
        "end": pl.col("v"),
    }
    batch = events("x x x x x x x", values=[5, 1, 3, 4, 9, 2, 0])
    rows = match("A B+ C", define, [batch], measures=measures)
    assert rows == [("x", 1, 9, 3, 16, 16 / 3, 1, 9, 9, 2)]


def test_aggregate_conditions_depend_on_the_rows_mapped_so_far() -> None:
    # B takes rows while the running sum of B stays <= 10; then C is any row
    define = {"B": mp.sum("B.v") <= 10}
    measures = {"bs": mp.count("B"), "sum_b": mp.sum("B.v"), "c": mp.last("C.v")}
    batch = events("x x x x x x", values=[0, 4, 5, 2, 7, 1])
    assert match("A B+ C", define, [batch], measures=measures) == [("x", 2, 9, 2)]
    # last(A.v) in B's condition: each B equals the A before it plus its count of Bs
    define = {"B": pl.col("v") == mp.last("A.v") + mp.count("B")}
    batch = events("x x x x x", values=[10, 11, 12, 14, 15])
    # 10 11 12 | 14 15: the second match ends at the stream's end (the flush decides it)
    assert match("A B+", define, [batch], measures={"bs": mp.count("B")}) == [("x", 2), ("x", 1)]


def test_prev_reads_rows_before_the_match_across_batches() -> None:
    # the match starts at a row whose previous row arrived (and was final) batches ago
    define = {"A": (pl.col("v") > mp.prev("v", 2)) & is_("a"), "B": is_("b")}
    batches = [events("z z", values=[1, 5]), events("z a b", start=2, values=[0, 3, 0])]
    measures = {"a": mp.first("A.v"), "two_before": mp.prev("A.v", 2)}
    # PREV(v, 2) of the a (v=3) is the second z (v=5): 3 > 5 is false, no match...
    assert match("A B", define, batches, measures=measures) == []
    batches = [events("z z", values=[1, 2]), events("z a b", start=2, values=[9, 3, 0])]
    assert match("A B", define, batches, measures=measures) == [("x", 3, 2)]


def test_partitions_are_matched_apart_and_nulls_are_a_partition() -> None:
    a = events("a b", k="x")
    b = events("a c b", k="y").with_columns(pl.col("k").replace("y", None))
    rows = match("A B", of("A", "B"), [pl.concat([a, b])])
    assert rows == [("x", 0, 1, 2)]
    rows = match("A C? B", ABC, [pl.concat([a, b])])
    assert sorted(rows, key=str) == sorted([("x", 0, 1, 2), (None, 0, 2, 3)], key=str)


def test_a_match_is_emitted_once_decided() -> None:
    # A B+ at the end of the pattern: greedy, so the match stays open while b rows come
    run = Run(
        lambda f: f.match_recognize(
            partition_by="k",
            order_by="ts",
            pattern="A B+",
            define=of("A", "B"),
            measures=SPAN,
        ),
        [events("a b"), events("b b", start=2), events("c", start=4), events("a", start=5)],
    )
    # with no delay, a row is final once a later row arrived; the c at 4s decides the match
    m = ("x", 0, 3, 4)
    assert run.steps == [[], [], [m], [m]]
    assert run.rows() == [m]  # the last a never completes: the flush ends it


def test_all_rows_per_match_classifier_and_match_number() -> None:
    # rows: 0:a 1:b 2:b 3:c 4:a 5:b 6:c; A B+ C, one row per matched row, running measures
    run = Run(
        lambda f: f.match_recognize(
            partition_by="k",
            order_by="ts",
            pattern="A B+ C",
            define=of("A", "B", "C"),
            measures={
                "cls": mp.classifier(),
                "num": mp.match_number(),
                "n": mp.count(),
                "nb": mp.count("B"),
                "total": mp.sum("v"),
                "first_v": mp.first("v"),
            },
            rows_per_match="all",
        ),
        [events("a b b"), events("c a", start=3), events("b c", start=5)],
        restart_after=1,  # the match count survives a restart
    )
    frame = run.per_batch[0]
    assert frame.columns == ["k", "ts", "cls", "num", "n", "nb", "total", "first_v", "e", "v"]
    assert run.rows() == [
        ("x", at(0), "A", 1, 1, 0, 0, 0, "a", 0),
        ("x", at(1), "B", 1, 2, 1, 1, 0, "b", 1),
        ("x", at(2), "B", 1, 3, 2, 3, 0, "b", 2),
        ("x", at(3), "C", 1, 4, 2, 6, 0, "c", 3),
        ("x", at(4), "A", 2, 1, 0, 4, 4, "a", 4),
        ("x", at(5), "B", 2, 2, 1, 9, 4, "b", 5),
        ("x", at(6), "C", 2, 3, 1, 15, 4, "c", 6),
    ]
    # ONE ROW PER MATCH: the last row's variable, the final values
    one = match(
        "A B+ C",
        of("A", "B", "C"),
        [events("a b b c a b c")],
        measures={"cls": mp.classifier(), "num": mp.match_number(), "n": mp.count()},
    )
    assert one == [("x", "C", 1, 4), ("x", "C", 2, 3)]


def test_next_in_define_waits_for_the_next_row() -> None:
    # a row whose next row rises: it can be tried only once the next row is final
    run = Run(
        lambda f: f.match_recognize(
            partition_by="k",
            order_by="ts",
            pattern="A",
            define={"A": pl.col("v") < mp.next("v")},
            measures={"v": pl.col("v"), "after": mp.last("ts")},
            after_match="skip_to_next_row",
        ),
        [
            events("p p", values=[1, 3]),  # 1 < 3: decided; 3 waits for its next row
            events("p", start=2, values=[5]),  # 3 < 5: decided; 5 waits
            events("p", start=3, values=[4]),  # 5 > 4: no match; 4 waits until the flush
        ],
    )
    both = [("x", 1, at(0)), ("x", 3, at(1))]
    assert run.steps == [[("x", 1, at(0))], both, both]
    assert run.rows() == [("x", 1, at(0)), ("x", 3, at(1))]  # after the flush: next(4) is null


def test_rows_wait_for_the_watermark() -> None:
    # the b arrives before the a it follows in event time; with 10s of delay it is in time
    batches = [events("b", start=1), events("a", start=0), events("c", start=30)]
    run = Run(
        lambda f: f.match_recognize(
            partition_by="k", order_by="ts", pattern="A B", define=of("A", "B"), measures=SPAN
        ),
        batches,
        delay="10s",
        flush=False,
    )
    # the c at 30s moves the watermark to 20s: only then are a (0s) and b (1s) final
    assert run.steps == [[], [], [("x", 0, 1, 2)]]


def test_late_rows_are_dropped_counted_and_routed() -> None:
    batches = [events("a", start=0), events("b", start=20), events("c", start=1)]
    run = Run(
        lambda f: f.match_recognize(
            partition_by="k", order_by="ts", pattern="A C", define=of("A", "C"), measures=SPAN
        ),
        batches,
        delay="5s",
    )
    # the c at 1s arrives when the watermark is 15s: late
    assert run.rows() == []
    late = run.late()
    assert late.select("e", "v", "reason", "operator").rows() == [("c", 1, "late", "op0")]
    assert sum(op.num_rows_dropped_late for p in run.progress for op in p.state_operators) == 1


def test_restart_from_the_checkpoint_gives_the_same_rows() -> None:
    batches = [events("a b b", start=0), events("b c a", start=3), events("b c", start=6)]
    build: Callable[[ms.StreamFrame], ms.StreamFrame] = lambda f: f.match_recognize(  # noqa: E731
        partition_by="k",
        order_by="ts",
        pattern="A B+ C",
        define=ABC,
        measures=SPAN,
        within="1m",
    )
    whole = Run(build, batches, delay="2s").rows()
    for after in (0, 1):
        assert Run(build, batches, delay="2s", restart_after=after).rows() == whole
    assert whole == [("x", 0, 4, 5), ("x", 5, 7, 3)]


@pytest.mark.parametrize(("within", "kept"), [(None, 11), ("3s", 0)])
def test_state_is_bounded_by_within(within: str | None, kept: int) -> None:
    # b rows after an a, no c: without within the a's match stays open and keeps every row;
    # with within it fails once the watermark is 3s past the a, and the rows leave
    batches = [events("a " + "b " * 5, start=0), events("b " * 5, start=6)]
    run = Run(
        lambda f: f.match_recognize(
            partition_by="k",
            order_by="ts",
            pattern="A B+ C",
            define=ABC,
            measures=SPAN,
            within=within,
        ),
        batches,
        flush=False,
    )
    assert run.progress[-1].state_operators[0].num_rows_total == kept
    assert run.rows() == []


def test_prev_keeps_rows_per_key_and_warns() -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "1s")
    built = frame.match_recognize(
        partition_by="k",
        order_by="ts",
        pattern="A B",
        define={"A": is_("a"), "B": pl.col("v") > mp.prev("v", 2)},
        measures=SPAN,
        within="1m",
    )
    with pytest.warns(ms.UnboundedStateWarning, match="last 2 row"):
        built.sink_memory(f"warn_{uuid.uuid4().hex[:6]}").stop()


def test_unbounded_quantifier_without_within_warns() -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "1s")
    built = frame.match_recognize(
        partition_by="k", order_by="ts", pattern="A B+", define=of("A", "B"), measures=SPAN
    )
    with pytest.warns(ms.UnboundedStateWarning, match="within"):
        built.sink_memory(f"warn_{uuid.uuid4().hex[:6]}").stop()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "A B) C"}, "unexpected ')' at position 3"),
        ({"pattern": "^A B"}, "anchors"),
        ({"pattern": "A*"}, "can match no rows"),
        ({"pattern": "(A? B?)+ C"}, "without end"),
        ({"pattern": "A B{3,2}"}, "lower bound is above"),
        ({"pattern": "PERMUTE(A, B)"}, "PERMUTE"),
        ({"pattern": "A+* B"}, "after a quantifier"),
        ({"pattern": "A+?? B"}, "after a quantifier"),
        ({"define": {"Z": is_("a")}}, "does not use"),
        ({"define": {"A": pl.col("v")}}, "must be a boolean"),
        ({"define": {"A": pl.col("v") > pl.col("v").mean()}}, "row by row"),
        ({"define": {"A": pl.col("w") > 1}}, "does not have"),
        ({"measures": {"x": mp.first("Q.v")}}, "does not have"),
        ({"measures": {"k": mp.first("v")}}, "partition_by"),
        ({"measures": {"x": mp.sum("A.e")}}, "numeric"),
        ({"after_match": "skip_to_last:Q"}, "does not use"),
        ({"after_match": "skip"}, "after_match must be"),
        ({"order_by": "v"}, "needs with_watermark('v'"),
        ({"within": "0s"}, "positive"),
        ({"define": {"A": mp.classifier() == "A"}}, "reads classifier(), which only MEASURES"),
        ({"define": {"A": mp.match_number() > 1}}, "reads match_number(), which only"),
        ({"define": {"A": pl.col("v") < mp.next("B.v")}}, "next reads the rows after the"),
        ({"measures": {"x": mp.next("v")}}, "next(...) is for DEFINE"),
        ({"rows_per_match": "some"}, "rows_per_match must be 'one' or 'all'; got 'some'"),
        ({"rows_per_match": "all", "measures": {"v": mp.first("v")}}, "names of input columns"),
    ],
)
def test_refusals(kwargs: dict[str, Any], message: str) -> None:
    frame = ms.MemoryStream(SCHEMA).lazy().with_watermark("ts", "1s")
    call: dict[str, Any] = {
        "partition_by": "k",
        "order_by": "ts",
        "pattern": "A B",
        "define": of("A", "B"),
        "measures": SPAN,
    }
    call.update(kwargs)
    with pytest.raises(ms.PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        frame.match_recognize(**call)


def test_update_and_complete_modes_are_refused() -> None:
    frame = (
        ms.MemoryStream(SCHEMA)
        .lazy()
        .with_watermark("ts", "1s")
        .match_recognize(
            partition_by="k", order_by="ts", pattern="A B", define=of("A", "B"), measures=SPAN
        )
    )
    for mode in ("update", "complete"):
        with pytest.raises(ms.PlanError, match="output_mode='append'"):
            frame.sink_memory(f"modes_{mode}", output_mode=mode)  # type: ignore[arg-type]


def test_explain_and_fingerprint_name_the_pattern() -> None:
    frame = (
        ms.MemoryStream(SCHEMA)
        .lazy()
        .with_watermark("ts", "1s")
        .match_recognize(
            partition_by="k",
            order_by="ts",
            pattern="A  B+?",
            define={"A": is_("a"), "B": pl.col("v") > mp.first("A.v")},
            measures=SPAN,
            within="1m",
        )
    )
    node = frame.plan
    lines = node.explain_lines()
    assert "pattern='A B+?'" in lines[0] and "within=1m" in lines[0]
    assert "(per row, vectorised)" in lines[1] and "(per candidate mapping)" in lines[2]
    assert node.fingerprint()["pattern"] == "A B+?"  # type: ignore[attr-defined]
    assert frame.collect_schema() == pl.Schema(
        {"k": pl.String, "first_v": pl.Int64, "last_v": pl.Int64, "n": pl.Int64}
    )


def test_pattern_text_round_trips() -> None:
    for text in ["A B+? (C | D){2,3}", "(A B)* C", "A | B C | D", "A{2,} B{,3}? C{4}", "(A+?)+ B"]:
        tree = parse_pattern(text)
        assert parse_pattern(str(tree)) == tree
