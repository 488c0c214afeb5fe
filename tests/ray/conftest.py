"""Ray for the RayRuntime tests: one local Ray (2 CPUs) for the session, shut down at the end.

Ray's worker processes import what the driver pickles by reference (microstream,
the test pipelines in tests/, the Nexmark queries in benchmarks/), so their
PYTHONPATH holds the worktree, tests/ and benchmarks/.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATHS = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
for path in PATHS[1:]:
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """The ``ray`` module, connected to a local Ray started for this session."""
    ray = pytest.importorskip("ray", reason="RayRuntime tests need microstream[ray]")
    inherited = os.environ.get("PYTHONPATH", "")
    pythonpath = os.pathsep.join([*PATHS, *([inherited] if inherited else [])])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def nexmark_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Nexmark data set (as tests/nexmark's quick mode, half the size)."""
    from nexmark.generator import write_files

    root = tmp_path_factory.mktemp("nexmark-ray")
    write_files(
        root, 12_000, events_per_file=1_000, seed=7, rate=1_000, out_of_order_group_size=200
    )
    return root
