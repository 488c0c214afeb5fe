"""The stable key hash (microstream.state.key_groups): pinned values and its properties.

The golden values below are the stability contract of checkpoint format 2: a
checkpoint's rows sit in the key group this hash gives them. If this test ever
fails, checkpoints written before the change would load rows into the wrong groups.
"""

from __future__ import annotations

import datetime as dt
import itertools
from decimal import Decimal

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microstream.exceptions import SchemaMismatchError
from microstream.state.key_groups import (
    NULL_HASH,
    check_hashable,
    key_group_ranges,
    key_groups,
    stable_hash,
)

GOLDEN_FRAME = pl.DataFrame(
    {
        "s": ["", "a", "user-42", "wörld", None],
        "i": [0, -1, 42, 2**62, None],
        "f": [0.0, -0.0, float("nan"), 1.5, None],
        "b": [True, False, None, True, False],
        "t": [
            dt.datetime(2026, 1, 1),
            None,
            dt.datetime(1970, 1, 1),
            dt.datetime(1999, 12, 31, 23),
            None,
        ],
        "d": [Decimal("1.25"), Decimal("-3.00"), None, Decimal("0.01"), Decimal("1e20")],
    },
    schema_overrides={"d": pl.Decimal(30, 2)},
)

GOLDEN_PER_COLUMN = {
    "s": [
        "0xa0281838140fbc5a",
        "0xc4bbf1f475c0f826",
        "0x7f38a74212b31406",
        "0x7f7c90f605143e85",
        "0x10e6d12c1afc059a",
    ],
    "i": [
        "0xa0281838140fbc5a",
        "0x6842d9158a7197fe",
        "0x34a173a131533eea",
        "0x5291a03a5e5fbd0f",
        "0x10e6d12c1afc059a",
    ],
    "f": [
        "0xa0281838140fbc5a",
        "0xa0281838140fbc5a",
        "0x43e35bdaad0b1bf4",
        "0xa5cca933b2a41faf",
        "0x10e6d12c1afc059a",
    ],
    "b": [
        "0x110cc9f77c2b25f8",
        "0xa0281838140fbc5a",
        "0x10e6d12c1afc059a",
        "0x110cc9f77c2b25f8",
        "0xa0281838140fbc5a",
    ],
    "t": [
        "0xe5901e7025d38c46",
        "0x10e6d12c1afc059a",
        "0xa0281838140fbc5a",
        "0x99ea79de4ca1db53",
        "0x10e6d12c1afc059a",
    ],
    "d": [
        "0x3dbed5827b8ad9a5",
        "0xf063aa80939dc58f",
        "0x10e6d12c1afc059a",
        "0x110cc9f77c2b25f8",
        "0xf5210a97ae49db23",
    ],
}
GOLDEN_ALL = [
    "0x83018edbd164fc61",
    "0x7062c6d65ef4cb05",
    "0xb5b4062b6450ea29",
    "0xb791df61d52f14ba",
    "0x11accd9fc528b7fb",
]


def _hex(values: np.ndarray) -> list[str]:
    return [f"{int(v):#018x}" for v in values]


def test_golden_values_are_pinned() -> None:
    for column, expected in GOLDEN_PER_COLUMN.items():
        assert _hex(stable_hash(GOLDEN_FRAME, [column])) == expected
    assert _hex(stable_hash(GOLDEN_FRAME, list(GOLDEN_FRAME.columns))) == GOLDEN_ALL
    assert key_groups(GOLDEN_FRAME, ["s", "i"], 128).tolist() == GOLDEN_GROUPS


GOLDEN_GROUPS = [44, 90, 121, 41, 0]


def test_nulls_hash_apart_from_zero_empty_and_false() -> None:
    frame = pl.DataFrame({"s": ["", None], "i": [0, None], "b": [False, None], "f": [0.0, None]})
    for column in frame.columns:
        h = stable_hash(frame, [column])
        assert h[0] != h[1], column
    single = stable_hash(pl.DataFrame({"x": pl.Series([None], dtype=pl.Int64)}), ["x"])
    assert single[0] != NULL_HASH  # the null word is mixed with the seed like any column


def test_float_normalisation_and_integer_widths() -> None:
    floats = pl.DataFrame({"f": [0.0, -0.0, float("nan"), -float("nan")]})
    h = stable_hash(floats, ["f"])
    assert h[0] == h[1] and h[2] == h[3] and h[0] != h[2]
    as_float32 = stable_hash(floats.cast(pl.Float32), ["f"])
    assert (as_float32 == h).all()
    values = [5, -7, 0]
    reference = stable_hash(pl.DataFrame({"k": values}), ["k"])
    for dtype in (pl.Int8, pl.Int16, pl.Int32, pl.Int128, pl.Decimal(20, 0)):
        frame = pl.DataFrame({"k": pl.Series(values).cast(dtype)})
        assert (stable_hash(frame, ["k"]) == reference).all(), dtype


def test_column_order_matters_and_nested_types_hash() -> None:
    frame = pl.DataFrame({"a": [1, 2], "b": [2, 1]})
    assert (stable_hash(frame, ["a", "b"]) != stable_hash(frame, ["b", "a"])).all()
    nested = pl.DataFrame(
        {
            "l": [[1, 2], [2, 1], [], None],
            "st": [{"x": 1, "y": "a"}, {"x": 1, "y": "b"}, None, None],
        }
    )
    hl = stable_hash(nested, ["l"])
    assert len(set(hl.tolist())) == 4
    hs = stable_hash(nested, ["st"])
    assert hs[0] != hs[1] and hs[2] == hs[3]
    as_array = nested.select(
        pl.col("l").filter(pl.col("l").list.len() == 2).cast(pl.Array(pl.Int64, 2))
    )
    assert (stable_hash(as_array, ["l"]) == hl[:2]).all()


def test_unhashable_dtype_refused_with_its_column() -> None:
    with pytest.raises(SchemaMismatchError, match="key column 'k' of operator 'op0' is Object"):
        check_hashable(pl.Schema({"k": pl.Object}), ["k"], "operator 'op0'")
    check_hashable(pl.Schema({"k": pl.List(pl.String), "d": pl.Date}), ["k", "d"], "operator 'op0'")


def test_key_group_ranges_cover_every_group_once() -> None:
    for groups in (1, 7, 128, 1000):
        for parts in (1, 3, 8, 2000):
            ranges = key_group_ranges(groups, parts)
            assert ranges[0][0] == 0 and ranges[-1][1] == groups
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(ranges))


keys = st.lists(
    st.tuples(
        st.one_of(st.none(), st.text(max_size=12)),
        st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(rows=keys, cut=st.integers(0, 60), offset=st.integers(0, 59))
def test_chunking_slicing_and_categorical_do_not_change_the_hash(
    rows: list[tuple[str | None, int | None]], cut: int, offset: int
) -> None:
    frame = pl.DataFrame(rows, schema={"s": pl.String, "i": pl.Int64}, orient="row")
    whole = stable_hash(frame, ["s", "i"])
    cut = min(cut, frame.height)
    chunked = pl.concat([frame.slice(0, cut), frame.slice(cut)], rechunk=False)
    assert (stable_hash(chunked, ["s", "i"]) == whole).all()
    assert (stable_hash(chunked.rechunk(), ["s", "i"]) == whole).all()
    offset = min(offset, frame.height - 1)
    assert (stable_hash(frame.slice(offset), ["s", "i"]) == whole[offset:]).all()
    categorical = frame.with_columns(pl.col("s").cast(pl.Categorical))
    assert (stable_hash(categorical, ["s", "i"]) == whole).all()
    groups = key_groups(frame, ["s", "i"], 128)
    by_key: dict[tuple[str | None, int | None], int] = {}
    for row, group in zip(rows, groups.tolist()):
        assert by_key.setdefault(row, group) == group  # equal keys -> equal groups


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), string_keys=st.booleans())
def test_groups_spread_evenly(seed: int, string_keys: bool) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**40, 64_000)
    column = pl.Series("k", values).cast(pl.String) if string_keys else pl.Series("k", values)
    counts = np.bincount(key_groups(pl.DataFrame([column]), ["k"], 128), minlength=128)
    # 500 expected per group; a binomial's sd is ~22: 6 sd either side
    assert counts.min() > 360 and counts.max() < 640, counts
    sequential = pl.DataFrame({"k": np.arange(64_000)})
    counts = np.bincount(key_groups(sequential, ["k"], 128), minlength=128)
    assert counts.min() > 360 and counts.max() < 640
