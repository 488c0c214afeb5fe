"""Nexmark quick mode: a small generated data set shared by the query and peer tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

# Small enough for the suite, large enough for many windows and sessions: 24k events at
# 1000 events/s of event time are 24 s, over 12 files (micro-batches); out-of-order
# groups of 200 events (0.2 s) stay inside the 4 s watermark delay, so no row is late.
QUICK = {"events": 24_000, "events_per_file": 2_000, "rate": 1_000, "out_of_order_group_size": 200}


@pytest.fixture(scope="session")
def nexmark_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nexmark.generator import write_files

    root = tmp_path_factory.mktemp("nexmark")
    write_files(
        root,
        QUICK["events"],
        events_per_file=QUICK["events_per_file"],
        seed=7,
        rate=QUICK["rate"],
        out_of_order_group_size=QUICK["out_of_order_group_size"],
    )
    return root
