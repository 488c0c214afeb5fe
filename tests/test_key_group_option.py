"""key_groups= on sink verbs: recorded in metadata.json at creation, enforced on restart;
a format-1 checkpoint is refused, saying what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

import microstream as ms
from microstream.exceptions import CheckpointFormatError, PlanChangedError, PlanError

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")


def _run(cp: Path, data: dict[str, list[str]], **options: int) -> list[tuple[str, int]]:
    stream = ms.MemoryStream({"user": pl.String}, name="kg_src")
    stream.add_data(data)
    query = (
        stream.lazy()
        .group_by("user")
        .agg(pl.len())
        .sink_memory("kg_counts", output_mode="complete", checkpoint=str(cp), **options)
    )
    try:
        query.process_all_available()
    finally:
        query.stop()
    return sorted(ms.table("kg_counts").rows())


def test_key_groups_recorded_and_a_different_one_refused(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    assert _run(cp, {"user": ["a", "b", "a"]}, key_groups=16) == [("a", 2), ("b", 1)]
    assert json.loads((cp / "metadata.json").read_text())["key_groups"] == 16
    assert json.loads((cp / "metadata.json").read_text())["format_version"] == 2
    meta = json.loads((cp / "state/op0/partials/_metadata.json").read_text())
    assert meta["num_key_groups"] == 16
    with pytest.raises(PlanChangedError, match=r"key_groups changed from 16 .* to 32"):
        _run(cp, {"user": ["a"]}, key_groups=32)
    # without the option the recorded number is used: the state continues
    assert ms.read_state(cp).sort("user").rows() == [("a", 2), ("b", 1)]
    stream = ms.MemoryStream({"user": pl.String}, name="kg_src")
    stream.add_data({"user": ["a"]})  # batch 0: the first run's, already counted
    stream.add_data({"user": ["a", "c"]})
    query = (
        stream.lazy()
        .group_by("user")
        .agg(pl.len())
        .sink_memory("kg_counts", output_mode="complete", checkpoint=str(cp))
    )
    query.process_all_available()
    query.stop()
    assert ms.read_state(cp).sort("user").rows() == [("a", 3), ("b", 1), ("c", 1)]


def test_default_is_128_and_bad_values_refused(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    _run(cp, {"user": ["a"]})
    assert json.loads((cp / "metadata.json").read_text())["key_groups"] == 128
    with pytest.raises(PlanError, match=r"key_groups must be an integer from 1 to 65536; got 0"):
        _run(tmp_path / "other", {"user": ["a"]}, key_groups=0)


def test_a_format_1_checkpoint_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    cp = tmp_path / "cp"
    _run(cp, {"user": ["a"]})
    meta = json.loads((cp / "metadata.json").read_text())
    del meta["key_groups"], meta["crc32"]  # format 1 had neither
    (cp / "metadata.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(
        CheckpointFormatError,
        match=r"written by an older microstream in checkpoint format 1; this one reads format 2"
        rf".*Convert it in place with `microstream migrate {re.escape(str(cp))}`.*re-run the "
        r"query from the start of its input with a new checkpoint",
    ):
        _run(cp, {"user": ["a"]})
