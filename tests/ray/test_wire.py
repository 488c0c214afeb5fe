"""Frames between Ray processes (:class:`~microstream.runtime.ray.wire.Wire`): Arrow IPC
bytes sent out of band, so Ray copies them into its object store once and the receiver
gets a view of it; the frame read back owns its memory and equals the one sent, every
dtype as it was."""

from __future__ import annotations

import datetime as dt
import decimal
import pickle
from typing import Any

import polars as pl

from microstream.runtime.ray.wire import Wire

FRAME = pl.DataFrame(
    {
        "s": ["a", None, "a longer string than a view's inline twelve bytes"],
        "i": [1, 2, None],
        "f": [1.0, None, 2.5],
        "b": [True, False, None],
        "bin": [b"x", None, b"yy"],
        "d": [dt.date(2020, 1, 1)] * 3,
        "utc": [dt.datetime(2020, 1, 1, tzinfo=dt.UTC)] * 3,
        "ns": pl.Series([dt.datetime(2020, 1, 1)] * 3, dtype=pl.Datetime("ns")),
        "du": [dt.timedelta(seconds=1)] * 3,
        "tm": [dt.time(1, 2, 3)] * 3,
        "l": [[1, 2], None, []],
        "st": [{"a": 1, "b": "x"}, None, {"a": 2, "b": None}],
        "e": pl.Series(["x", "y", "x"], dtype=pl.Enum(["x", "y"])),
        "c": pl.Series(["p", "q", None], dtype=pl.Categorical),
        "dec": pl.Series(
            [decimal.Decimal("1.23"), None, decimal.Decimal("4.56")], dtype=pl.Decimal(10, 2)
        ),
        "arr": pl.Series([[1, 2], [3, 4], [5, 6]], dtype=pl.Array(pl.Int32, 2)),
        "nul": [None, None, None],
        "u8": pl.Series([1, 2, 3], dtype=pl.UInt8),
    }
)


def test_every_dtype_comes_back_as_it_was() -> None:
    for frame in (FRAME, FRAME.clear(), pl.DataFrame()):
        for protocol in (4, 5):
            back = pickle.loads(pickle.dumps(Wire.of(frame), protocol=protocol)).frame()
            assert back.schema == frame.schema
            assert back.equals(frame)


def test_a_task_s_wire_comes_out_of_band_and_the_frame_owns_its_rows(ray_cluster: Any) -> None:
    def make() -> Wire:
        return Wire.of(pl.concat([FRAME] * 20_000))  # ~2 MB: Ray's object store, not inline

    wire = ray_cluster.get(ray_cluster.remote(make).options(num_cpus=0).remote(), timeout=60)
    assert not isinstance(wire.data, bytes)  # a view of Ray's object store, no copy
    assert memoryview(wire.data).readonly
    frame = wire.frame()
    assert frame.equals(pl.concat([FRAME] * 20_000))
    del wire  # the rows stay readable without the Ray object
    assert frame.slice(20_000 * 3 - 1)["s"].to_list() == [FRAME["s"][2]]


def test_a_frame_without_rows_travels_as_its_schema_only() -> None:
    # Most batches of a windowed query emit no rows: no IPC file is written or read for
    # them, and every dtype still comes back as it was.
    for frame in (FRAME.clear(), FRAME.head(0).select("e", "dec", "arr", "st"), pl.DataFrame()):
        wire = Wire.of(frame)
        assert memoryview(wire.data).nbytes == 0
        for protocol in (4, 5):
            buffers: list[pickle.PickleBuffer] = []
            callback = buffers.append if protocol >= 5 else None  # out of band, as Ray does
            stream = pickle.dumps(wire, protocol=protocol, buffer_callback=callback)
            back = pickle.loads(stream, buffers=buffers).frame()
            assert back.schema == frame.schema
            assert back.equals(frame)
            assert back.height == 0


def test_a_frame_with_rows_still_travels_as_its_ipc_file() -> None:
    wire = Wire.of(FRAME.head(1))
    assert memoryview(wire.data).nbytes > 0
    assert wire.frame().equals(FRAME.head(1))
