"""A checkpoint written under another Polars version restarts when only Polars' printing changed.

Stateful fingerprints hold expression texts. Polars 2.2 prints a literal without
its dynamic type (``quantile([0.9])``) where 2.0 and 2.1 printed
``quantile([dyn float: 0.9])``; a Polars upgrade alone must not refuse the
checkpoint, while a real change of the query still must.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream.checkpoint.log import Checkpoint, CheckpointMetadata, PlanRecord
from tests.test_windows import SCHEMA, rows


def _query(
    source: ms.MemoryStream, cp: Path, out: list[tuple[Any, ...]], q: float
) -> ms.StreamingQuery:
    return (
        source.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(p=pl.col("v").quantile(q, interpolation="nearest"), n=pl.len())
        .foreach_batch(lambda df, _: out.extend(df.sort("k", "ts").rows()), checkpoint=str(cp))
    )


def _aggs(cp: Path) -> list[str]:
    meta = json.loads((cp / "metadata.json").read_text())
    return [a for op in meta["plan"]["stateful"] for a in op.get("aggs", [])]


def _render_as_other_polars(cp: Path) -> None:
    """Rewrite the recorded plan as the other Polars rendering would have printed it."""
    checkpoint = Checkpoint(str(cp))
    meta = checkpoint.read_metadata()

    def other(text: str) -> str:
        if "dyn float: " in text:
            return text.replace("dyn float: ", "")
        return re.sub(r"quantile\(\[([0-9.]+)\]", r"quantile([dyn float: \1]", text)

    stateful = [
        {**op, "aggs": [other(a) for a in op["aggs"]]} if "aggs" in op else op
        for op in meta.plan.stateful
    ]
    plan = PlanRecord(**{**meta.plan.model_dump(), "stateful": stateful})
    rewritten = CheckpointMetadata(**{**meta.model_dump(), "plan": plan})
    checkpoint.storage.write_model("metadata.json", rewritten, overwrite=True)


def test_a_plan_printed_by_another_polars_version_continues(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    source = ms.MemoryStream(SCHEMA)
    out: list[tuple[Any, ...]] = []
    first = _query(source, cp, out, 0.9)
    source.add_data(rows((1, "a", 1), (2, "a", 5), (3, "a", 9), (4, "b", 2)))
    first.process_all_available(timeout=30)
    first.stop()
    before = _aggs(cp)
    _render_as_other_polars(cp)
    assert _aggs(cp) != before  # the recorded texts now differ from this Polars' texts

    second = _query(source, cp, out, 0.9)  # not refused
    source.add_data(rows((61, "a", 7), (62, "b", 4), (130, "a", 1)))
    second.process_all_available(timeout=30)
    second.stop()
    assert second.exception() is None
    # Both minutes closed in the second run; the first minute's groups come from the
    # state the first run wrote (three values of "a": 1, 5, 9).
    first, second_minute = rows((0, "a", 0), (60, "a", 0))["ts"]
    assert out == [
        ("a", first, 9.0, 3),
        ("a", second_minute, 7.0, 1),
        ("b", first, 2.0, 1),
        ("b", second_minute, 4.0, 1),
    ]


def test_a_changed_argument_is_still_refused_across_polars_versions(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    source = ms.MemoryStream(SCHEMA)
    _query(source, cp, [], 0.9).stop()
    _render_as_other_polars(cp)
    with pytest.raises(ms.PlanChangedError, match=r"stateful operators changed"):
        _query(source, cp, [], 0.5)
