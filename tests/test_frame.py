"""StreamFrame verbs: exact rows through a memory stream, plan-time refusals."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from tests.helpers import run_memory

SCHEMA = {"id": pl.Int64, "user": pl.String, "amount": pl.Float64, "tags": pl.List(pl.String)}
BATCHES = [
    pl.DataFrame(
        {"id": [1, 2], "user": ["ann", "bob"], "amount": [5.0, -1.0], "tags": [["a"], []]},
        schema=SCHEMA,
    ),
    pl.DataFrame(
        {"id": [3], "user": ["cid"], "amount": [None], "tags": [["b", "c"]]}, schema=SCHEMA
    ),
    pl.DataFrame(
        {"id": [4, 5], "user": ["ann", "dan"], "amount": [2.5, 7.0], "tags": [["d"], None]},
        schema=SCHEMA,
    ),
]


def stream() -> ms.StreamFrame:
    return ms.MemoryStream(SCHEMA).lazy()


def test_filter_with_columns_select(name: str) -> None:
    frame = (
        stream()
        .filter(pl.col("amount") > 0)
        .with_columns(cents=(pl.col("amount") * 100).cast(pl.Int64))
        .select("id", "cents", shout=pl.col("user").str.to_uppercase())
    )
    out = run_memory(frame, BATCHES, name)
    expected = pl.DataFrame(
        {"id": [1, 4, 5], "cents": [500, 250, 700], "shout": ["ANN", "ANN", "DAN"]}
    )
    assert_frame_equal(out, expected)


def test_verbs_take_generators_of_expressions(name: str) -> None:
    # Polars takes an iterable of expressions; the plan applies a verb's arguments
    # for its schema and again every batch, so a generator must not be spent once.
    frame = (
        stream()
        .filter(pl.col(c).is_not_null() for c in ["amount"])
        .with_columns((pl.col(c) * 2).alias(f"{c}2") for c in ["id", "amount"])
        .select(pl.col(c) for c in ["id", "id2", "amount2"])
    )
    assert frame.columns == ["id", "id2", "amount2"]
    out = run_memory(frame, BATCHES, name)
    expected = pl.DataFrame(
        {"id": [1, 2, 4, 5], "id2": [2, 4, 8, 10], "amount2": [10.0, -2.0, 5.0, 14.0]}
    )
    assert_frame_equal(out, expected)
    totals = stream().group_by("user").agg(pl.col(c).sum() for c in ["id", "amount"])
    assert totals.collect_schema() == pl.Schema(
        {"user": pl.String, "id": pl.Int64, "amount": pl.Float64}
    )


def test_drop_rename_cast(name: str) -> None:
    frame = stream().drop("tags").rename({"user": "who"}).cast({"id": pl.Int32})
    out = run_memory(frame, BATCHES, name)
    assert out.schema == pl.Schema({"id": pl.Int32, "who": pl.String, "amount": pl.Float64})
    assert out["who"].to_list() == ["ann", "bob", "cid", "ann", "dan"]


def test_explode(name: str) -> None:
    out = run_memory(stream().select("id", "tags").explode("tags"), BATCHES, name)
    # Polars 2 drops empty lists and keeps a null list as one null row.
    assert out.rows() == [(1, "a"), (3, "b"), (3, "c"), (4, "d"), (5, None)]
    assert_frame_equal(out, pl.concat(BATCHES).select("id", "tags").explode("tags"))


def test_unnest(name: str) -> None:
    schema = {"k": pl.Int64, "s": pl.Struct({"a": pl.Int64, "b": pl.String})}
    source = ms.MemoryStream(schema)
    batch = pl.DataFrame(
        {"k": [1, 2], "s": [{"a": 10, "b": "x"}, {"a": 20, "b": "y"}]}, schema=schema
    )
    out = run_memory(source.lazy().unnest("s"), [batch], name)
    assert out.rows() == [(1, 10, "x"), (2, 20, "y")]


def test_map_batches_sees_each_batch(name: str) -> None:
    sizes: list[int] = []

    def tag(df: pl.DataFrame) -> pl.DataFrame:
        if df.height:
            sizes.append(df.height)
        return df.select("id").with_columns(batch_rows=pl.lit(df.height, pl.UInt32))

    out = run_memory(stream().map_batches(tag), BATCHES, name)
    assert sizes == [2, 1, 2]
    assert out.rows() == [(1, 2), (2, 2), (3, 1), (4, 2), (5, 2)]


STATIC = pl.DataFrame({"user": ["ann", "bob", "eve"], "country": ["NL", "FR", "DE"]})


@pytest.mark.parametrize(
    ("how", "expected_ids"),
    [("inner", [1, 2, 4]), ("left", [1, 2, 3, 4, 5]), ("semi", [1, 2, 4]), ("anti", [3, 5])],
)
def test_stream_static_join(name: str, how: str, expected_ids: list[int]) -> None:
    frame = stream().drop("tags").join(STATIC, on="user", how=how)  # type: ignore[arg-type]
    out = run_memory(frame, BATCHES, name)
    assert sorted(out["id"].to_list()) == expected_ids
    oracle = pl.concat(BATCHES).drop("tags").join(STATIC, on="user", how=how)  # type: ignore[arg-type]
    assert_frame_equal(out.sort("id"), oracle.sort("id"))


def test_join_with_lazyframe(name: str, tmp_path: pytest.TempPathFactory) -> None:
    path = f"{tmp_path}/users.parquet"
    STATIC.write_parquet(path)
    frame = stream().drop("tags").join(pl.scan_parquet(path), on="user")
    out = run_memory(frame, BATCHES, name)
    assert out.sort("id").select("id", "country").rows() == [(1, "NL"), (2, "FR"), (4, "NL")]


@pytest.mark.parametrize("how", ["right", "full"])
def test_outer_static_join_refused(how: str) -> None:
    with pytest.raises(ms.PlanError, match=f"how='{how}'"):
        stream().join(STATIC, on="user", how=how)  # type: ignore[arg-type]


def test_stream_stream_outer_join_without_time_bound_refused() -> None:
    with pytest.raises(ms.PlanError, match="left join of two streams needs a time bound"):
        stream().join(stream(), on="id", how="left")


@pytest.mark.parametrize(
    ("verb", "args", "hint"),
    [
        ("sort", ("id",), "sort inside foreach_batch"),
        ("tail", (3,), "no last rows"),
        ("with_row_index", (), "row positions"),
        ("head", (1,), "filter"),
        ("collect", (), "sink_memory"),
        ("shift", (1,), "neighbours"),
        ("rolling", ("id",), "not available in this version"),
    ],
)
def test_unbounded_verbs_refused_with_alternative(
    verb: str, args: tuple[object, ...], hint: str
) -> None:
    with pytest.raises(ms.PlanError, match=verb) as info:
        getattr(stream(), verb)(*args)
    assert hint in str(info.value)


@pytest.mark.parametrize(
    "expr",
    [
        pl.col("amount").sum(),
        pl.col("amount") - pl.col("amount").mean(),
        pl.col("amount").cum_sum(),
        pl.col("amount").rank(),
        pl.len(),
        pl.col("amount").shift(1),
        pl.col("amount").sum().over("user"),
    ],
)
def test_batch_dependent_expressions_refused(expr: pl.Expr) -> None:
    with pytest.raises(ms.PlanError, match="depend on the other rows"):
        stream().with_columns(x=expr)


def test_fill_null_strategy_refused() -> None:
    with pytest.raises(ms.PlanError, match="forward/backward"):
        stream().fill_null(strategy="forward")


def test_unknown_column_is_a_plan_error() -> None:
    with pytest.raises(ms.PlanError, match="nope"):
        stream().select("nope")


def test_verbs_return_new_frames() -> None:
    base = stream()
    derived = base.filter(pl.col("id") > 1)
    assert base.columns == list(SCHEMA)
    assert derived is not base
    assert base.plan is not derived.plan


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    source = ms.MemoryStream({"x": pl.Int64}, name="xs")
    frame = source.lazy().filter(pl.col("x") > 1).with_columns(user=pl.lit("ann"))
    frame.join(STATIC, on="user", how="left").explain()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("join(static LazyFrame, how='left'")
    assert out[1].strip() == 'with_columns(user="ann")'
    assert out[2].strip() == 'filter([(col("x")) > (dyn int: 1)])'
    assert out[3].strip() == "Scan MemoryStream[xs]"


def test_complete_mode_refused_without_aggregation(name: str) -> None:
    with pytest.raises(ms.PlanError, match="needs an aggregation"):
        stream().sink_memory(name, output_mode="complete")


def test_file_sink_refuses_complete_mode(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(ms.PlanError, match="does not support output_mode='complete'"):
        stream().sink_parquet(
            f"{tmp_path}/out", output_mode="complete", checkpoint=f"{tmp_path}/cp"
        )


def test_durable_sink_needs_a_checkpoint(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(ms.PlanError, match="needs checkpoint="):
        stream().sink_delta(f"{tmp_path}/table")
