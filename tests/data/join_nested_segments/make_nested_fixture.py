"""Write the fixture: the segment buffers of ``join_before_segments``' full join, versions
0-12, in the layout buffers had before the flat file names (a folder per version,
``segments/<v>/<lo>-<hi>.arrow``), and what that code emits when it continues (13-18).

``state/`` and ``expected.arrow`` were written by main at ``2a82adf``;
``tests/test_join_segments.py`` loads them with this checkout and continues: the same rows
must come out, the new files flat beside the old folders. Run from the repository root:
``PYTHONPATH=$PWD python tests/data/join_nested_segments/make_nested_fixture.py``.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import polars as pl

from microstream.checkpoint.storage import Storage

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location(
    "join_before_segments", HERE.parent / "join_before_segments" / "make_join_fixture.py"
)
assert _spec is not None and _spec.loader is not None
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def main() -> None:
    state = HERE / "state"
    shutil.rmtree(state, ignore_errors=True)
    base.run(base.node().build_operator("op0", Storage(state)), base.WRITTEN)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(state, Path(tmp) / "state")
        op = base.node().build_operator("op0", Storage(Path(tmp) / "state"))
        op.load(base.WRITTEN[-1])
        emitted = pl.concat(base.run(op, base.CONTINUED), how="vertical")
    emitted.write_ipc(HERE / "expected.arrow")


if __name__ == "__main__":
    main()
