"""The benchmarks page: its charts come from the committed results, its Nexmark table
from ``benchmarks/README.md``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_chart_is_drawn_from_its_results_file_and_committed(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    charts = _load(ROOT / "benchmarks" / "docs_charts.py", "microstream_docs_charts")
    for source in charts.SOURCES.values():
        assert (charts.RESULTS / source).is_file(), source
    first = charts.main(["--out", str(tmp_path / "a")])
    again = charts.main(["--out", str(tmp_path / "b")])
    assert [p.name for p in first] == [
        "nexmark-throughput.svg",
        "nexmark-vs-batch.svg",
        "latency.svg",
        "ray-scaling.svg",
        "state-scaling.svg",
    ]
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    for a, b in zip(first, again):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"
        assert (ROOT / "docs" / "images" / "benchmarks" / a.name).is_file(), a.name
        assert f"(images/benchmarks/{a.name})" in page, a.name
    throughput = first[0].read_text()
    assert "q22" in throughput and "Bytewax" in throughput


def test_the_page_takes_the_nexmark_table_of_the_benchmarks_readme() -> None:
    reference = _load(ROOT / "docs" / "_tools" / "reference.py", "microstream_docs_ref_b")
    page = reference.benchmarks_markdown()
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    generated = readme[readme.index("<!-- nexmark-table:start -->") :]
    table = next(line for line in generated.splitlines() if line.startswith("| q5 |"))
    assert table in page
    assert "<!-- nexmark-table" not in page
