"""Connector-specific code stays in connectors: the engine asks registered hooks
(static table adapters, ``TableSinkSpec``), never a connector's types by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake

import microstream as ms
from microstream import registry
from microstream.api import outputs
from microstream.checkpoint.storage import Storage
from microstream.exceptions import OutputError, PlanError
from microstream.protocols import StaticSide, TableSinkSpec


@dataclass(frozen=True)
class Prices:
    """A third party's table object (what a user hands to ``join``)."""

    rows: dict[str, list[object]]


class PricesSide(StaticSide):
    def __init__(self, table: Prices) -> None:
        self.frame = pl.DataFrame(table.rows)
        self.schema = self.frame.schema

    def describe(self) -> str:
        return "Prices"

    def current(self) -> pl.LazyFrame:
        return self.frame.lazy()


class PricesAdapter:
    @classmethod
    def claims(cls, table: object) -> bool:
        return isinstance(table, Prices)

    @classmethod
    def from_table(cls, table: Prices) -> StaticSide:
        return PricesSide(table)


def test_a_registered_adapter_lets_join_take_its_table(monkeypatch: pytest.MonkeyPatch) -> None:
    targets = registry._targets  # as if a package declared it in microstream.static_tables

    def with_prices(group: str) -> dict[str, str]:
        extra = (
            {"prices": f"{__name__}:PricesAdapter"} if group == "microstream.static_tables" else {}
        )
        return {**targets(group), **extra}

    monkeypatch.setattr(registry, "_targets", with_prices)
    stream = ms.MemoryStream({"item": pl.String})
    prices = Prices({"item": ["a", "b"], "price": [1.5, 2.0]})
    query = stream.lazy().join(prices, on="item", how="left").sink_memory("hook_prices")
    try:
        stream.add_data({"item": ["b", "c", "a"]})
        query.process_all_available()
        assert ms.table("hook_prices").rows() == [("b", 2.0), ("c", None), ("a", 1.5)]
    finally:
        query.stop()


def test_join_refuses_a_table_no_adapter_claims() -> None:
    stream = ms.MemoryStream({"item": pl.String})
    with pytest.raises(PlanError, match=r"a table a connector adapts .*; got Prices instead"):
        stream.lazy().join(Prices({"item": ["a"]}), on="item")


def test_the_delta_adapter_claims_delta_tables_only(tmp_path: Path) -> None:
    [delta] = registry.static_table_adapters()
    write_deltalake(str(tmp_path / "t"), pl.DataFrame({"x": [1]}).to_arrow())
    table = DeltaTable(str(tmp_path / "t"))
    assert delta.claims(table)
    assert not delta.claims(pl.DataFrame({"x": [1]}))
    side = delta.from_table(table)
    assert side.current().collect().to_dicts() == [{"x": 1}]


def test_the_delta_sink_holds_versions_of_an_output(tmp_path: Path) -> None:
    spec = outputs.output_table(str(tmp_path / "v1"))
    assert isinstance(spec, TableSinkSpec)
    directory = Storage(str(tmp_path / "v1"))
    assert not spec.table_exists(directory)
    write_deltalake(str(tmp_path / "v1"), pl.DataFrame({"x": [1, 2], "y": ["a", "b"]}).to_arrow())
    assert spec.table_exists(directory)
    assert spec.read_table(["y"]).to_dicts() == [{"y": "a"}, {"y": "b"}]


def test_an_output_sink_that_is_not_a_table_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "OUTPUT_SINK", "memory_sink")
    with pytest.raises(OutputError, match=r"'memory_sink' sink .* cannot hold a version"):
        outputs.output_table("somewhere")


def test_the_registry_finds_every_connector_pyproject_declares() -> None:
    # One list of built-in connectors: pyproject.toml's entry points (no copy in the engine).
    import tomllib

    pyproject = Path(registry.__file__).resolve().parent.parent / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["entry-points"]
    for group in (registry.CONNECTORS_GROUP, registry.STATIC_TABLES_GROUP):
        assert declared[group].items() <= registry._targets(group).items()
    with pytest.raises(ms.MicrostreamError, match=r"no connector named 'nope'; installed"):
        registry.load_connector("nope")
