"""What an owner does when an operator is opened on it, besides loading its state: it
imports the modules the batch path would import on first use
(:data:`~microstream.runtime.ray.worker.LAZY_MODULES`), so a fresh actor's first batch
does not pay for them (``numpy.ma``: 8-13 ms on this project's test machine, in every
first batch of a query on Ray)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys
    import polars as pl
    import microstream as ms
    from microstream.checkpoint.storage import Storage
    from microstream.runtime.ray.worker import LAZY_MODULES, OperatorWorker

    before = [name for name in LAZY_MODULES if name in sys.modules]
    worker = OperatorWorker(Storage("memory://test-worker-start/state"))
    node = ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"]).plan
    worker.open("op0", node, num_key_groups=4, key_groups=(0, 4), version=None)
    after = [name for name in LAZY_MODULES if name in sys.modules]
    print(before, after, "numpy.ma" in sys.modules)
    """
)


def test_opening_an_operator_imports_what_the_first_batch_would() -> None:
    # A fresh interpreter, as a Ray worker process is: importing microstream and building
    # the operator do not import numpy.ma; opening it on the worker does.
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.stdout.split("\n")[0] == "[] ['numpy.ma'] True"
