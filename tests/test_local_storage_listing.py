"""A local checkpoint directory is listed and its files deleted with one system call
each, not through fsspec's local filesystem (which builds every entry's path and
info): a state store's retention lists its directories of ~100 files every few
batches. What a listing returns is unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointStorageError
from microstream.state.retention import delete_below


def no_fsspec(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("fsspec called for a local listing or deletion")

    for name in ("ls", "rm_file", "info"):
        monkeypatch.setattr(storage.fs, name, refuse)


def test_listings_and_deletions_of_a_local_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path / "cp")
    for name in ("versions/10.json", "versions/9.json", "versions/x.json", "versions/3.tmp"):
        storage.write_bytes(name, b"{}")
    storage.write_bytes("versions/sub/1.json", b"{}")
    no_fsspec(storage, monkeypatch)
    assert storage.list_numbered("versions") == [9, 10]
    assert storage.list_numbered("versions", ".tmp") == [3]
    assert storage.list_names("versions") == ["10.json", "3.tmp", "9.json", "sub", "x.json"]
    assert storage.list_names("missing") == []
    assert storage.list_numbered("missing/deeper") == []
    assert storage.list_names("versions/9.json") == ["9.json"]  # a file lists as itself
    storage.delete("versions/9.json")
    storage.delete("versions/9.json")  # already gone: nothing
    assert storage.list_numbered("versions") == [10]
    with pytest.raises(CheckpointStorageError, match=r"cannot delete checkpoint file .*sub"):
        storage.delete("versions/sub")  # a directory is not a file


def test_retention_of_a_local_store_without_fsspec_listings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(tmp_path / "store")
    for v in range(12):
        storage.write_bytes(f"versions/{v}.json", b"{}")
        storage.write_bytes(f"deltas/{v}.arrow", b"x")
    storage.write_bytes("snapshots/4/0-128.arrow", b"x")
    storage.write_bytes("snapshots/8/0-128.arrow", b"x")
    storage.write_bytes("deltas/7/0-64.r1.0.arrow", b"x")
    monkeypatch.setattr(storage.fs, "ls", lambda *a, **k: pytest.fail("fsspec ls"))
    delete_below(storage, 8)
    assert storage.list_numbered("versions") == [8, 9, 10, 11]
    assert storage.list_names("deltas") == ["10.arrow", "11.arrow", "8.arrow", "9.arrow"]
    assert storage.list_names("snapshots") == ["8"]
