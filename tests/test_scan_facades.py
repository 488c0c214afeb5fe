"""The ``scan_*`` functions (and Delta maintenance, ``read_file_sink``) declare no option of
their own: signature and "Parameters" come from the connector, so they cannot drift."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pytest

import microstream as ms
from microstream import registry
from microstream.api.facade import parameters_section, source_facade
from microstream.protocols import SourceContext

FACADES = {
    "scan_files": "files",
    "scan_kafka": "kafka",
    "scan_delta": "delta_source",
    "scan_rate": "rate",
    "read_file_sink": "read_file_sink",
    "optimize_delta": "optimize_delta",
    "vacuum_delta": "vacuum_delta",
}


def documented(doc: str) -> set[str]:
    """Names a numpy "Parameters" section documents (``topic, topics, pattern`` is three)."""
    names: set[str] = set()
    for line in parameters_section(doc).splitlines():
        if line and not line[0].isspace():
            names.update(n.strip() for n in line.split(":")[0].split(","))
    return names


@pytest.mark.parametrize(("facade", "connector"), sorted(FACADES.items()))
def test_a_facade_has_exactly_its_connectors_options(facade: str, connector: str) -> None:
    function = getattr(ms, facade)
    target = registry.load_connector(connector)
    ours = inspect.signature(function).parameters
    theirs = inspect.signature(target).parameters
    assert list(ours) == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name
        assert ours[name].annotation == parameter.annotation, name
    # every option is documented in the facade's own docstring (help(), IPython)
    assert documented(function.__doc__) == set(theirs)
    assert parameters_section(function.__doc__) == parameters_section(target.__doc__)


def test_scan_facades_return_a_stream_frame_in_their_signature() -> None:
    for facade in ("scan_files", "scan_kafka", "scan_delta", "scan_rate"):
        assert inspect.signature(getattr(ms, facade)).return_annotation == "StreamFrame"
    assert inspect.signature(ms.optimize_delta).return_annotation == "dict[str, Any]"


def test_help_shows_the_options_with_types_and_defaults() -> None:
    import pydoc

    text = pydoc.render_doc(ms.scan_files, renderer=pydoc.plaintext)
    assert "scan_files(path: 'str | os.PathLike[str]', *, format: 'FileFormat' = 'parquet'" in text
    assert "max_files_per_trigger: 'int | None' = None" in text
    assert re.search(r"^    Parameters\n    -+\n    path\n", text, re.MULTILINE)
    assert ">>> frame = ms.scan_files(" in text  # the facade's own examples stay


@dataclass(frozen=True)
class ToySpec:
    """A toy source.

    Parameters
    ----------
    rows
        How many rows.
    """

    kind: ClassVar[str] = "toy"
    rows: int

    @property
    def schema(self) -> pl.Schema:
        return pl.Schema({"x": pl.Int64})

    def identity(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def describe(self) -> str:
        return f"Toy[{self.rows}]"

    def build(self, context: SourceContext) -> Any:
        raise AssertionError("not run in this test")


@dataclass(frozen=True)
class ToySpecWithAnOption(ToySpec):
    """A toy source, grown an option.

    Parameters
    ----------
    rows
        How many rows.
    label
        A new option, declared only here.
    """

    label: str = "none"


def register(monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> None:
    """As if an installed package declared ``name = target`` in microstream.connectors."""
    targets = registry._targets

    def with_it(group: str) -> dict[str, str]:
        extra = {name: target} if group == registry.CONNECTORS_GROUP else {}
        return {**targets(group), **extra}

    monkeypatch.setattr(registry, "_targets", with_it)


def test_a_new_spec_option_reaches_the_facade_with_no_other_edit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register(monkeypatch, "toy", f"{__name__}:ToySpec")
    scan_toy = source_facade(
        registry.Connector("toy"),
        name="scan_toy",
        module=__name__,
        doc="Toy rows.\n\nExamples\n--------\n>>> 1\n1\n",
    )
    assert list(inspect.signature(scan_toy).parameters) == ["rows"]
    assert "label" not in scan_toy.__doc__
    with pytest.raises(
        TypeError, match=r"scan_toy\(\): got an unexpected keyword argument 'label'"
    ):
        scan_toy(3, label="x")

    # The connector grows an option; the facade object is not touched.
    register(monkeypatch, "toy", f"{__name__}:ToySpecWithAnOption")
    assert list(inspect.signature(scan_toy).parameters) == ["rows", "label"]
    assert inspect.signature(scan_toy).parameters["label"].default == "none"
    doc = scan_toy.__doc__
    assert doc.index("Parameters") < doc.index("label\n    A new option") < doc.index("Examples")
    frame = scan_toy(3, label="x")
    assert frame.plan.source == ToySpecWithAnOption(3, "x")  # type: ignore[attr-defined]


def test_a_wrong_argument_names_the_facade() -> None:
    with pytest.raises(
        TypeError, match=r"^scan_rate\(\): got an unexpected keyword argument 'rate'"
    ):
        ms.scan_rate(10, rate=3)
    with pytest.raises(TypeError, match=r"^scan_files\(\): missing a required argument: 'path'"):
        ms.scan_files()
    with pytest.raises(ValueError, match="rows_per_second must be a positive int; got 0"):
        ms.scan_rate(0)  # the spec's own checks run as before


def test_importing_microstream_imports_no_connector() -> None:
    code = (
        "import sys, inspect, microstream as ms\n"
        "before = sorted(m for m in sys.modules if m.split('.')[0] == 'connectors')\n"
        "inspect.signature(ms.scan_rate)\n"
        "after = sorted(m for m in sys.modules if m.split('.')[0] == 'connectors')\n"
        "print(before, after)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[] ['connectors', 'connectors.rate']"


def test_type_checkers_see_the_connectors_options(tmp_path: Any) -> None:
    # From the source tree (MYPYPATH): the installed package has no py.typed marker yet.
    pytest.importorskip("mypy")
    root = Path(ms.__file__).parent.parent
    (tmp_path / "use.py").write_text(
        "import microstream as ms\n"
        "ms.scan_rate(10, num_partitions=2)\n"
        "ms.scan_rate(10, num_partitions='2')\n"
        "ms.scan_files('in', formt='csv')\n"
        "reveal_type(ms.optimize_delta('t'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", "use.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MYPYPATH": str(root)},
    )
    lines = [
        line.split(": ", 1)[1] for line in run.stdout.splitlines() if line.startswith("use.py")
    ]
    assert lines == [
        'error: Argument "num_partitions" to "__call__" of "ConnectorFacade" has incompatible '
        'type "str"; expected "int"  [arg-type]',
        'error: Unexpected keyword argument "formt" for "__call__" of "ConnectorFacade"; did you '
        'mean "format"?  [call-arg]',
        'note: "__call__" defined in "microstream.api.facade"',
        'note: Revealed type is "dict[str, Any]"',
    ]
