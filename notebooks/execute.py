"""Execute the tutorial notebooks, writing their outputs back in place.

Usage::

    python notebooks/execute.py [--check] [NOTEBOOK ...]

Without arguments every ``notebooks/*.ipynb`` is run. ``--check`` runs them
without writing anything (exit status 1 if a cell fails).

The kernel is always ipykernel on the interpreter running this script
(``sys.executable``), never whatever ``python3`` kernelspec Jupyter would find
first, so the notebooks see the microstream installed in this venv. Each
notebook runs with a fresh temporary directory as its working directory, so
nothing it writes lands in the repository. ``tests/test_notebooks.py`` imports
:func:`execute_notebook` from here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets import default

NOTEBOOK_DIR = Path(__file__).resolve().parent
KERNEL_NAME = "python3"
CELL_TIMEOUT = 120  # seconds per cell


class ThisPythonKernelSpecManager(KernelSpecManager):
    """Resolves every kernel name to ipykernel running on ``sys.executable``."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="Python 3 (ipykernel)",
            language="python",
            resource_dir=str(NOTEBOOK_DIR),
            metadata={},
            env={},
        )


class ThisPythonKernelManager(KernelManager):
    """A KernelManager whose kernel is ipykernel on this very interpreter."""

    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self) -> KernelSpecManager:
        return ThisPythonKernelSpecManager()


def execute_notebook(
    path: str | Path, *, timeout: int = CELL_TIMEOUT, cwd: str | Path | None = None
) -> Any:
    """Run every cell of the notebook at ``path``; return the executed notebook.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    ``cwd`` is the kernel's working directory (a fresh temporary one by default).
    """
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    with tempfile.TemporaryDirectory(prefix="microstream-nb-") as scratch:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name=KERNEL_NAME,
            kernel_manager_class=ThisPythonKernelManager,
            resources={"metadata": {"path": str(cwd or scratch)}},
            record_timing=False,  # no per-cell timestamps: keeps the committed diff quiet
            coalesce_streams=True,  # one stdout output per cell, however it was flushed
        )
        client.execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the notebooks run; write nothing"
    )
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    failed = 0
    for path in paths:
        started = time.perf_counter()
        try:
            nb = execute_notebook(path)
        except CellExecutionError as exc:
            failed += 1
            print(f"FAIL {path}\n{exc}", file=sys.stderr)
            continue
        elapsed = time.perf_counter() - started
        if args.check:
            print(f"ok   {path} ({elapsed:.1f}s)")
        else:
            nbformat.validate(nb)
            nbformat.write(nb, path)
            print(f"wrote {path} ({elapsed:.1f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
