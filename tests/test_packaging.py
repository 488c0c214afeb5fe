"""Packaging facts a user relies on: one version, typed, a changelog that names the
checkpoint format this code writes. (Building and installing each extra from the
wheel is CI's `make extras`; see .ci/check_extras.py.)"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import tomllib

import microstream
from microstream.checkpoint.log import FORMAT_VERSION
from microstream.state.format import STATE_FORMAT_VERSION

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_has_one_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project, "pyproject.toml repeats the version"
    assert "version" in project["dynamic"]
    assert version("microstream") == microstream.__version__


def test_both_packages_are_marked_typed() -> None:
    for package in ("microstream", "connectors"):
        assert (ROOT / package / "py.typed").is_file(), package


def test_the_changelog_names_the_checkpoint_format_this_code_writes() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog")
    assert "## [Unreleased]" in changelog
    formats = {int(n) for n in re.findall(r"Checkpoint format (\d+)", changelog)}
    assert FORMAT_VERSION in formats, (
        f"CHANGELOG.md has no entry for checkpoint format {FORMAT_VERSION}"
    )
    assert STATE_FORMAT_VERSION in formats


def test_every_extra_the_ci_checks_exists() -> None:
    """`make extras` checks each extra by name; an extra dropped from pyproject.toml, or a
    new one without a check, fails here before it fails in CI."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_extras", ROOT / ".ci" / "check_extras.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    user_facing = extras - {"dev", "bench", "docs", "notebook", "spark", "test"}
    assert set(module.PROMISES) - {""} == user_facing
