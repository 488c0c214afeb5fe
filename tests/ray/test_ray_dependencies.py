"""RayRuntime's extra declares what its code relies on: Polars pickles a Python function
inside an expression (``map_elements``) with the ``cloudpickle`` package, which Ray does
not install (it vendors its own), and RayRuntime pickles such stages to send them to the
workers (an operator's owners run the row-wise stages after it)."""

from __future__ import annotations

import pickle
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]


def parity(n: int) -> int:
    return n % 2


def _names(requirements: list[str]) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in requirements}


def test_the_ray_extra_and_dev_declare_cloudpickle() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"ray", "cloudpickle"} <= _names(extras["ray"])
    assert "cloudpickle" in _names(extras["dev"])


def test_a_stage_with_a_python_function_in_an_expression_pickles() -> None:
    # What RayRuntime sends to the workers: a lazy plan with a Python UDF in it.
    frame = pl.LazyFrame({"n": [1, 2, 3]}).with_columns(
        m=pl.col("n").map_elements(parity, return_dtype=pl.Int64)
    )
    back = pickle.loads(pickle.dumps(frame))
    assert back.collect()["m"].to_list() == [1, 0, 1]
