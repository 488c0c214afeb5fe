"""Every Nexmark query, streamed over the quick data set, equals its one-shot Polars query."""

from __future__ import annotations

from pathlib import Path

import pytest
from nexmark.query import QUERIES, assert_same_result, load, run_batch, run_stream
from polars.testing import assert_frame_equal


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


@pytest.mark.parametrize("name", QUERIES)
def test_the_fused_scan_gives_the_rows_of_the_eager_read(
    name: str, nexmark_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every query, its sources' batches scanned lazily in the plan of the stage reading
    them (the quick data set's files are below the size that takes that path, so the
    bound is lowered): exactly the rows, in the order, of the eager read, and the oracle's."""
    from connectors import files

    module = load(name)
    monkeypatch.setattr(files, "FUSED_SCAN_MIN_BYTES", 1 << 62)
    eager = run_stream(module, nexmark_root, max_files_per_trigger=2, checkpoint_root=str(tmp_path))
    scanned: list[bool] = []
    scan = files.FileSource.scan

    def spy(self: files.FileSource, start: object, end: object) -> object:
        batch = scan(self, start, end)  # type: ignore[arg-type]
        scanned.append(batch is not None)
        return batch

    monkeypatch.setattr(files, "FUSED_SCAN_MIN_BYTES", 0)
    monkeypatch.setattr(files.FileSource, "scan", spy)
    fused = run_stream(module, nexmark_root, max_files_per_trigger=2, checkpoint_root=str(tmp_path))
    if name in ("q14", "q21", "q22"):  # one row-wise stage over the bids, calling functions
        assert scanned and all(scanned), scanned
    if name in ("q0", "q1", "q2"):  # column picks, arithmetic, comparisons: read eagerly
        assert scanned == []
    assert fused.batches == eager.batches
    assert fused.input_rows == eager.input_rows
    assert_frame_equal(fused.result, eager.result)  # exact rows and order
    _, expected = run_batch(module, nexmark_root)
    assert_same_result(module, fused.result, expected)
