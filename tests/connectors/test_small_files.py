from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from connectors._small_files import SMALL_FILE_BYTES, local_source

FRAME = pl.DataFrame(
    {
        "ts": [datetime(2024, 1, 1), None],
        "s": ["a", None],
        "c": pl.Series(["x", "y"], dtype=pl.Categorical),
        "l": [[1, 2], []],
        "d": pl.Series([1.5, None], dtype=pl.Decimal(10, 2)),
    }
)


@pytest.mark.parametrize("fmt", ["parquet", "ipc"])
def test_small_files_are_read_from_memory_large_ones_by_path(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / f"f.{fmt}")
    getattr(FRAME, f"write_{fmt}")(path)
    small = local_source(path, 100, fmt)
    assert isinstance(small, io.BytesIO)
    assert_frame_equal(getattr(pl, f"read_{fmt}")(small), FRAME)
    assert local_source(path, SMALL_FILE_BYTES + 1, fmt) == path
    assert local_source(path, 100, "csv") == path


def test_file_source_reads_small_files_as_before(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    FRAME.write_parquet(src / "a.parquet")
    FRAME.head(1).write_parquet(src / "b.parquet")
    query = ms.scan_files(str(src), format="parquet", schema=FRAME.schema).sink_memory(
        "small_files_out"
    )
    query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None
    got = ms.table("small_files_out")
    assert_frame_equal(got, pl.concat([FRAME, FRAME.head(1)]), check_row_order=False)


def test_a_small_file_gone_before_its_read_is_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.parquet"
    with pytest.raises(FileNotFoundError):
        local_source(str(path), 10, "parquet")
