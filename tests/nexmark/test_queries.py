"""Every Nexmark query, streamed over the quick data set, equals its one-shot Polars query."""

from __future__ import annotations

from pathlib import Path

import pytest
from nexmark.query import QUERIES, assert_same_result, load, run_batch, run_stream


@pytest.mark.parametrize("max_files", [1, 5])
@pytest.mark.parametrize("name", QUERIES)
def test_stream_equals_batch(name: str, max_files: int, nexmark_root: Path, tmp_path: Path) -> None:
    module = load(name)
    _, expected = run_batch(module, nexmark_root)
    assert expected.height > 0, f"{name}: the quick data set gives the oracle no rows"
    run = run_stream(
        module, nexmark_root, max_files_per_trigger=max_files, checkpoint_root=str(tmp_path)
    )
    assert run.dropped_late == 0
    assert run.batches >= 12 // max_files
    assert_same_result(module, run.result, expected)
