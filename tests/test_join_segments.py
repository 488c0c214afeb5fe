"""Stream-stream join, the segment buffer slice: each side's rows in time-ordered segments
(one file per batch and side), evicted by a time cut, flags and removals as marks.

The join operator runs batch by batch (``tests/data/join_before_segments``'s batches:
a full join, flags on both sides, null keys, evictions), so each test can compare every
batch's output and every committed version's buffers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.checkpoint.storage import Storage, temporary_name
from microstream.exceptions import CheckpointCorruptError
from microstream.operators.stream_join import ROW_ID, StreamJoinOperator
from microstream.plan.nodes import OperatorContext
from microstream.state.format import (
    SEGMENT_SPEC_FILE,
    SegmentVersion,
    StateVersion,
    segment_file_version,
    version_file,
)
from microstream.state.key_groups import key_groups
from microstream.state.parts import commit_parts
from microstream.state.read import read_store
from microstream.state.segment_buffer import SegmentBuffer
from tests.test_stream_join import join_outputs, write_join_files

FIXTURE = Path(__file__).parent / "data" / "join_before_segments"


def _fixture_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "join_before_segments", FIXTURE / "make_join_fixture.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixture = _fixture_module()


def canon(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


def build(storage: Storage, how: str = "full") -> StreamJoinOperator:
    """The fixture's join (``how``: of another kind, same streams and bound)."""
    node = fixture.node()
    if how != "full":
        left = ms.MemoryStream(fixture.IMPS).lazy().with_watermark("imp_time", "1m")
        right = ms.MemoryStream(fixture.CLICKS).lazy().with_watermark("click_time", "1m")
        node = left.join(right, on="ad", how=how, within=("-2m", "3m"))._plan
    op = node.build_operator("op0", storage)
    assert isinstance(op, StreamJoinOperator)
    return op


def memory() -> Storage:
    return Storage(f"memory://join-segments-{uuid.uuid4().hex}")


def buffers(op: StreamJoinOperator) -> tuple[pl.DataFrame, pl.DataFrame]:
    return canon(op.left.frame), canon(op.right.frame)


def assert_same_buffers(
    a: StreamJoinOperator, b: StreamJoinOperator, *, row_ids: bool = True
) -> None:
    """The same rows buffered; ``row_ids=False``: but for their ids (an owner numbers the
    rows of its part of a batch)."""
    for x, y in zip(buffers(a), buffers(b)):
        if row_ids:
            assert_frame_equal(x, y)
        else:
            assert_frame_equal(canon(x.drop(ROW_ID)), canon(y.drop(ROW_ID)))


def test_keyed_buffers_written_by_main_continue_with_the_same_rows(tmp_path: Path) -> None:
    """Buffers written by main's keyed stores (fixture: versions 0-12) load into segment
    buffers and continue: batches 13-18 emit exactly the rows main emitted continuing
    them, the next version is a segment version, and every version loads."""
    shutil.copytree(FIXTURE / "state", tmp_path / "state")
    storage = Storage(tmp_path / "state")
    op = build(storage)
    op.load(fixture.WRITTEN[-1])
    got = pl.concat(fixture.run(op, fixture.CONTINUED), how="vertical")
    expected = pl.read_ipc(FIXTURE / "expected.arrow")
    assert expected.height > 300
    assert_frame_equal(canon(got), canon(expected))
    # (both sides' unmatched rows among them: flags of rows main kept were read)
    assert (
        got.filter(pl.col("imp").is_null()).height and got.filter(pl.col("click").is_null()).height
    )

    whole = build(memory())
    fixture.run(whole, range(fixture.CONTINUED[-1] + 1))
    assert_same_buffers(op, whole)
    left = storage.sub("left")
    assert isinstance(left.read_model(version_file(13), SegmentVersion), SegmentVersion)
    assert isinstance(left.read_model(version_file(12), StateVersion), StateVersion)
    for version in (12, 13, 18):
        again = build(storage)
        again.load(version)
        reference = build(memory())
        fixture.run(reference, range(version + 1))
        assert_same_buffers(again, reference)


def test_a_keyed_version_loads_as_the_rows_of_a_segment_run(tmp_path: Path) -> None:
    """Any retained version main wrote (a snapshot and deltas back to it) loads as the
    buffers this checkout builds for the same batches; also for an owner of a range."""
    shutil.copytree(FIXTURE / "state", tmp_path / "state")
    storage = Storage(tmp_path / "state")
    for version in (4, 10, 12):
        op = build(storage)
        op.load(version)
        reference = build(memory())
        fixture.run(reference, range(version + 1))
        assert op.left.rows and op.right.rows
        assert_same_buffers(op, reference)
    owner = build(storage)
    owner.load(12, key_groups=range(0, 64))
    left = reference.left.frame
    mine = left.filter(pl.Series(key_groups(left, ["ad"], 128) < 64))
    assert 0 < owner.left.rows == mine.height < left.height
    assert_frame_equal(canon(owner.left.frame), canon(mine))


def run_thinned(op: StreamJoinOperator, versions: range) -> list[pl.DataFrame]:
    """:func:`fixture.run` with even-keyed clicks left out of even batches: those batches'
    even-keyed impressions wait in the buffer and match a click of the next batch (a
    first match of a kept row: a mark)."""
    out = []
    for b in versions:
        left, right, context = fixture.batch(b)
        if b % 2 == 0:
            right = right.filter(pl.col("ad") % 2 == 1)
        rows = op.process((left, right), context).rows
        op.commit(b)
        out.append(rows.with_columns(pl.lit(b, pl.Int64).alias("batch")))
    return out


@pytest.mark.parametrize("how", ["full", "semi", "anti", "inner"])
def test_every_version_loads_and_a_segment_without_its_manifest_is_never_read(how: str) -> None:
    """Versions 0-9 each load as the buffers the run had then (flags and a semi or anti
    join's matched rows leaving as marks); batch 10's files written without its
    manifests (a process killed before them) are not read by a load of 9, and the
    re-run batch emits the same rows and commits the same buffers."""
    storage = memory()
    op = build(storage, how)
    seen = {}
    outputs = []
    for b in range(10):
        outputs += run_thinned(op, range(b, b + 1))
        seen[b] = buffers(op)
    first_ten = run_thinned(op, range(10, 11))[0]
    after_ten = buffers(op)
    for side in ("left", "right"):  # the manifests of 10 never landed, its files did
        assert "10.0-128.arrow" in storage.sub(side).list_names("segments")
        storage.sub(side).delete(version_file(10))
    for b in (0, 3, 9):
        again = build(storage, how)
        again.load(b)
        for x, y in zip(buffers(again), seen[b]):
            assert_frame_equal(x, y)
    again = build(storage, how)
    again.load(9)
    rerun = run_thinned(again, range(10, 11))[0]
    assert_frame_equal(canon(rerun), canon(first_ten))
    for x, y in zip(buffers(again), after_ten):
        assert_frame_equal(x, y)
    loaded = build(storage, how)
    loaded.load(10)
    assert_same_buffers(loaded, again)
    assert sum(o.height for o in outputs) > 0
    # (a kept left row's first match: a flag (full) or its leaving (semi, anti) as a mark)
    assert bool(storage.sub("left").list_names("marks")) == (how != "inner")


def test_owners_of_key_group_ranges_write_parts_that_load_whole() -> None:
    """Two owners (key groups 0-63 and 64-127) load a version written whole, each
    processes its keys' rows and writes its part; the committed version loads whole as
    the buffers of one operator that ran every batch, and the owners continue from it."""
    storage = memory()
    whole = build(storage)
    fixture.run(whole, range(6))
    reference = build(memory())
    fixture.run(reference, range(6))
    ranges = [range(0, 64), range(64, 128)]

    def owner_batch(b: int) -> None:
        left, right, context = fixture.batch(b)
        owners = []
        for i, groups in enumerate(ranges):
            owner = build(storage)
            owner.load(b - 1, key_groups=groups)

            def mine(frame: pl.DataFrame, groups: range = groups) -> pl.DataFrame:
                g = pl.Series(key_groups(frame, ["ad"], 128))
                return frame.filter((g >= groups.start) & (g < groups.stop))

            owner.process((mine(left), mine(right)), context)
            owners.append(owner.write_parts(b, leader=i == 0))
        for store in ("op0/left", "op0/right"):
            entry = commit_parts(
                storage.sub(store.split("/")[1]), [parts[store] for parts in owners], 128
            )
            assert isinstance(entry, SegmentVersion)

    for b in (6, 7):
        owner_batch(b)
        fixture.run(reference, range(b, b + 1))
        loaded = build(storage)
        loaded.load(b)
        assert_same_buffers(loaded, reference, row_ids=False)
    # and a whole run continues from the owners' version, with the same output
    got = fixture.run(loaded, range(8, 10))
    want = fixture.run(reference, range(8, 10))
    for a, b in zip(got, want, strict=True):
        assert_frame_equal(canon(a), canon(b))
    assert sum(a.height for a in got) > 0
    assert_same_buffers(loaded, reference, row_ids=False)


def test_a_segment_deleted_is_refused_naming_it() -> None:
    storage = memory()
    fixture.run(build(storage), range(4))
    entry = storage.sub("left").read_model(version_file(3), SegmentVersion)
    segment = next(f for f in entry.files if f.kind == "segment")
    storage.sub("left").delete(segment.name)
    with pytest.raises(CheckpointCorruptError, match=segment.name.replace("/", ".")):
        build(storage).load(3)


def test_read_state_reads_a_segment_buffer() -> None:
    storage = memory()
    op = build(storage)
    fixture.run(op, range(5))
    for side, frame in zip(("left", "right"), buffers(op)):
        assert frame.height
        assert_frame_equal(canon(read_store(storage.sub(side))), frame)
        assert_frame_equal(canon(read_store(storage.sub(side), version=4)), frame)


def test_read_state_without_the_segment_spec_is_refused_naming_it() -> None:
    storage = memory()
    fixture.run(build(storage), range(3))
    storage.sub("left").delete(SEGMENT_SPEC_FILE)
    with pytest.raises(CheckpointCorruptError, match=r"_segments\.json is missing"):
        read_store(storage.sub("left"))
    assert read_store(storage.sub("right")).height  # (the other side still reads)


def _buffer(storage: Storage, retain: int) -> SegmentBuffer:
    return SegmentBuffer(
        storage,
        operator="b",
        key_columns=["k", "id"],
        hash_columns=["k"],
        schema={"k": pl.Int64(), "t": pl.Datetime("us"), "id": pl.Int64(), "m": pl.Boolean()},
        time_column="t",
        row_id_column="id",
        flag_column="m",
        num_key_groups=8,
        min_versions_to_retain=retain,
    )


def test_segments_no_retained_version_lists_are_deleted() -> None:
    """A segment's file goes once no retained version lists it (its rows evicted);
    the retained versions still load."""
    storage = memory()
    buffer = _buffer(storage, retain=3)
    buffer.load(None)
    frames = {}
    for v in range(12):
        rows = pl.DataFrame(
            {"k": [v, v + 1], "t": [v * 1_000_000, v * 1_000_000 + 1], "id": [2 * v, 2 * v + 1]},
            schema={"k": pl.Int64, "t": pl.Int64, "id": pl.Int64},
        ).with_columns(pl.col("t").cast(pl.Datetime("us")), pl.lit(False).alias("m"))
        buffer.insert(rows)
        if v % 3 == 0:
            buffer.mark(pl.Series([2 * v - 1]))  # a row of the previous segment matched
        buffer.evict_through((v - 2) * 1_000_000 + 1)  # (two versions of rows kept)
        buffer.commit(v)
        frames[v] = canon(buffer.frame)
    # version 9, the oldest retained, lists the segments of 8 and 9: older files go
    assert storage.list_names("segments") == [f"{v}.0-8.arrow" for v in (10, 11, 8, 9)]
    assert storage.list_names("marks") == ["9.0-8.arrow"]
    assert storage.list_numbered("versions") == [8, 9, 10, 11]
    for v in (9, 10, 11):
        again = _buffer(storage, retain=3)
        again.load(v)
        assert_frame_equal(canon(again.frame), frames[v])
    assert frames[11].get_column("id").to_list() == [20, 21, 22, 23]
    assert frames[9].filter(pl.col("m")).get_column("id").to_list() == [17]  # (from marks/9)


def test_temporaries_a_killed_writer_left_of_old_versions_are_deleted(tmp_path: Path) -> None:
    """A write killed between its temporary and the rename leaves ``.<name>.<hex>.tmp`` in
    the flat folders; retention deletes those of versions no retained manifest needs, and
    never one of a version a running commit may still rename."""
    storage = Storage(tmp_path / "buffer")
    buffer = _buffer(storage, retain=3)
    buffer.load(None)
    old = [
        f"segments/{temporary_name('1.0-8.arrow')}",
        f"marks/{temporary_name('2.0-8.arrow')}",
        f"versions/{temporary_name('0.json')}",
    ]
    current = [
        f"segments/{temporary_name('12.0-8.arrow')}",
        f"marks/{temporary_name('11.0-8.arrow')}",
    ]
    for name in old + current:
        storage.write_bytes(name, b"half")
    for v in range(12):
        rows = pl.DataFrame(
            {"k": [v], "t": [v * 1_000_000], "id": [v]},
            schema={"k": pl.Int64, "t": pl.Int64, "id": pl.Int64},
        ).with_columns(pl.col("t").cast(pl.Datetime("us")), pl.lit(False).alias("m"))
        buffer.insert(rows)
        buffer.mark(pl.Series([v]))
        buffer.evict_through((v - 2) * 1_000_000)
        buffer.commit(v)
    files = set(storage.files())
    assert not files & set(old)
    assert set(current) <= files
    assert storage.read_bytes(current[0]) == b"half"
    assert "segments/0.0-8.arrow" not in files  # (retention ran)
    assert {f"segments/{v}.0-8.arrow" for v in (9, 10, 11)} <= files
    again = _buffer(storage, retain=3)
    again.load(11)
    assert_frame_equal(canon(again.frame), canon(buffer.frame))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.booleans()), max_size=12))
def test_rows_per_key_group_follow_every_change(steps: list[tuple[int, int, bool]]) -> None:
    """The rows per key group a manifest records (counted once per segment, kept until its
    rows change) are those of the rows held, after inserts, marks, removals and evictions,
    and every version loads with them (load checks them against the rows)."""
    storage = memory()
    buffer = _buffer(storage, retain=100)
    buffer.load(None)
    next_id = 0
    for v, (rows, marked, removed) in enumerate(steps):
        ids = list(range(next_id, next_id + rows))
        next_id += rows
        frame = pl.DataFrame(
            {"k": [i % 5 for i in ids], "t": [v * 1_000_000 + i for i in ids], "id": ids},
            schema={"k": pl.Int64, "t": pl.Int64, "id": pl.Int64},
        ).with_columns(pl.col("t").cast(pl.Datetime("us")), pl.lit(False).alias("m"))
        buffer.insert(frame)
        held = buffer.frame.get_column("id").to_list()
        buffer.mark(pl.Series(held[::2][:marked]), removed=removed)
        if v % 3 == 2:
            buffer.drop_through((v - 2) * 1_000_000 + 2)
        buffer.commit(v)
        expected = [0] * buffer.num_key_groups
        for g in key_groups(buffer.frame, ["k"], buffer.num_key_groups):
            expected[g] += 1
        assert buffer.rows_per_key_group() == expected
        assert storage.read_model(version_file(v), SegmentVersion).rows_per_key_group == expected
    for v in range(len(steps)):
        _buffer(storage, retain=100).load(v)  # (raises on counts that do not match)


# -- SIGKILL at the buffers' commit points --------------------------------------------------

KILLER = Path(__file__).parent / "join_segments_kill.py"


def run_killed(root: Path, inputs: tuple[Path, Path], kill: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MICROSTREAM_FAULTS"}
    if kill is not None:
        env["JOIN_SEGMENTS_KILL"] = kill
    args = ["--imps", str(inputs[0]), "--clicks", str(inputs[1])]
    args += ["--output", str(root / "out"), "--checkpoint", str(root / "cp")]
    done = subprocess.run(
        [sys.executable, str(KILLER), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.returncode


@pytest.mark.integration
def test_sigkill_between_a_buffers_files_and_manifests_then_restart(tmp_path: Path) -> None:
    """SIGKILL after a buffer wrote its segment and marks files but before its manifest,
    and after the left buffer's manifest but before the right one's (the buffers' commit
    points the engine's fault points do not reach): the restart emits exactly the clean
    run's batches and ends with the clean run's buffers."""
    inputs = write_join_files(tmp_path / "in")
    clean = tmp_path / "clean"
    assert run_killed(clean, inputs, None) == 0
    expected = join_outputs(clean)
    state = Storage(clean / "cp" / "state" / "op0")
    last = state.sub("left").list_numbered("versions")[-1]
    assert isinstance(
        state.sub("left").read_model(version_file(last), SegmentVersion), SegmentVersion
    )
    # (files:right: past the left manifest of its version, as manifest:left, and more)
    for kill in ("files:left@3", "files:right@2", "files:left@2,manifest:left@1"):
        root = tmp_path / kill.replace("@", "-").replace(",", "+").replace(":", "_")
        first, _, second = kill.partition(",")
        assert run_killed(root, inputs, first) == -signal.SIGKILL, kill
        if second:  # killed again while recovering
            assert run_killed(root, inputs, second) == -signal.SIGKILL, kill
        assert run_killed(root, inputs, None) == 0, kill
        got = join_outputs(root)
        assert got.keys() == expected.keys(), kill
        for batch_id, frame in expected.items():
            assert got[batch_id].equals(frame), (kill, batch_id)
        mine = Storage(root / "cp" / "state" / "op0")
        for side in ("left", "right"):
            assert mine.sub(side).list_numbered("versions") == state.sub(side).list_numbered(
                "versions"
            )
            assert_frame_equal(
                canon(read_store(mine.sub(side), version=last)),
                canon(read_store(state.sub(side), version=last)),
            )
    assert any(f.height for f in expected.values())


@pytest.mark.parametrize("time_column", ["t", None])
def test_many_small_segments_are_merged_and_every_version_loads(time_column: str | None) -> None:
    """40 versions of two rows each and no eviction (a long bound, or none): past 32 live
    segments a commit merges the oldest into one file (flags as they are then), so a
    manifest lists at most 33 segments; every version loads as the buffer had it."""
    storage = memory()
    schema = {"k": pl.Int64(), "t": pl.Datetime("us"), "id": pl.Int64(), "m": pl.Boolean()}

    def make() -> SegmentBuffer:
        return SegmentBuffer(
            storage,
            operator="b",
            key_columns=["k", "id"],
            hash_columns=["k"],
            schema=schema,
            time_column=time_column,
            row_id_column="id",
            flag_column="m",
            num_key_groups=8,
        )

    buffer = make()
    buffer.load(None)
    frames = {}
    for v in range(40):
        buffer.insert(
            pl.DataFrame(
                {"k": [v % 5, v % 3], "t": [1000 - v, 2000 + v], "id": [2 * v, 2 * v + 1]},
                schema={"k": pl.Int64, "t": pl.Int64, "id": pl.Int64},
            ).with_columns(pl.col("t").cast(pl.Datetime("us")), pl.lit(False).alias("m"))
        )
        buffer.mark(pl.Series([2 * v - 9]))  # a row four versions old matched
        buffer.commit(v)
        frames[v] = canon(buffer.frame)
        entry = storage.read_model(version_file(v), SegmentVersion)
        assert sum(f.kind == "segment" for f in entry.files) <= 33
    assert "segments/32.0-8.older.arrow" in [f.name for f in entry.files]  # (33 live at 32)
    assert frames[39].height == 80
    assert sorted(frames[39].filter(pl.col("m")).get_column("id")) == list(range(1, 70, 2))
    for v in (5, 31, 32, 33, 39):
        again = make()
        again.load(v)
        assert_frame_equal(canon(again.frame), frames[v])


def test_read_state_of_a_query_reads_its_join_buffers(tmp_path: Path) -> None:
    """``ms.read_state`` (and ``query.state``) of a running join read the segment buffers
    as of the last committed batch, with the flags the marks set."""
    import microstream as ms

    imps, clicks = ms.MemoryStream(fixture.IMPS), ms.MemoryStream(fixture.CLICKS)
    query = (
        imps.lazy()
        .with_watermark("imp_time", "1m")
        .join(clicks.lazy().with_watermark("click_time", "1m"), on="ad", how="left", within="5m")
        .sink_memory(f"segments_{uuid.uuid4().hex[:8]}", checkpoint=str(tmp_path / "cp"))
    )
    left, right, _ = fixture.batch(0)
    imps.add_data(left)
    query.process_all_available()
    clicks.add_data(right)
    query.process_all_available()
    buffered = ms.read_state(tmp_path / "cp", operator="op0", store="left")
    query.stop()
    assert sorted(buffered.get_column("imp").to_list()) == sorted(left.get_column("imp"))
    matched = buffered.filter(pl.col("__matched")).get_column("imp").to_list()
    assert (
        set(matched) == set(left.join(right, on="ad", how="semi").get_column("imp").to_list())
        and matched
    )
    right_rows = ms.read_state(tmp_path / "cp", operator="op0", store="right")
    assert sorted(right_rows.get_column("click").to_list()) == sorted(right.get_column("click"))


# -- flat file names (a folder per version before) -------------------------------------------

NESTED = Path(__file__).parent / "data" / "join_nested_segments"


def test_buffers_with_a_folder_per_version_continue_with_the_same_rows(tmp_path: Path) -> None:
    """Segment buffers written by main at 2a82adf (fixture: versions 0-12, a folder per
    version) load and continue: batches 13-18 emit exactly the rows main emitted, the new
    files are flat (``segments/<v>.<lo>-<hi>.arrow``, no folder), every version loads, and
    retention deletes the old folders and the new files alike."""
    shutil.copytree(NESTED / "state", tmp_path / "state")
    storage = Storage(tmp_path / "state")
    left = storage.sub("left")
    assert "3" in left.list_names("segments")  # (the fixture's layout: a folder per version)
    op = build(storage)
    op.load(fixture.WRITTEN[-1])
    got = pl.concat(fixture.run(op, fixture.CONTINUED), how="vertical")
    expected = pl.read_ipc(NESTED / "expected.arrow")
    assert expected.height > 300
    assert_frame_equal(canon(got), canon(expected))

    entry = left.read_model(version_file(18), SegmentVersion)
    names = [f.name for f in entry.files]
    assert "segments/18.0-128.arrow" in names
    assert all("/" not in n.split("/", 1)[1] for n in names if segment_file_version(n) >= 13)
    for version in (12, 13, 18):
        again = build(storage)
        again.load(version)
        reference = build(memory())
        fixture.run(reference, range(version + 1))
        assert_same_buffers(again, reference)

    # Retention: with 2 versions kept, the files version 18 lists stay, older files and
    # folders go.
    op.left.min_versions_to_retain = op.right.min_versions_to_retain = 2
    fixture.run(op, range(19, 20))
    needs = min(
        segment_file_version(f.name) or 0
        for f in left.read_model(version_file(18), SegmentVersion).files
    )
    assert needs > 12
    versions = [segment_file_version(n) for n in left.list_names("segments")]
    assert sorted(v for v in versions if v is not None) == list(range(needs, 20))
    assert not [n for n in left.list_names("segments") if n.isdigit()]  # (old folders gone)
    again = build(storage)
    again.load(19)
    reference = build(memory())
    fixture.run(reference, range(20))
    assert_same_buffers(again, reference)


@pytest.mark.parametrize(
    ("earliest", "latest", "ids"),
    [
        (0, 100_000_000, list(range(12))),  # (everything: the frame itself)
        (5_000_000, 5_000_000, [5]),  # (one row of a segment the range cuts)
        (3_000_000, 4_000_000, [3, 4]),  # (two segments cut: 0-3, 4-7)
        (4_000_000, 7_000_000, [4, 5, 6, 7]),  # (a segment wholly inside, as it is)
        (12_000_000, 20_000_000, []),  # (past every segment)
        (-5, -1, []),
    ],
)
def test_rows_between_are_the_rows_in_the_time_range_or_all(
    earliest: int, latest: int, ids: list[int]
) -> None:
    """``rows_between``: the rows whose time lies in the range (segments outside skipped,
    those inside whole, the rest filtered), or every row when most are in it."""
    buffer = _buffer(memory(), retain=3)
    buffer.load(None)
    for v in range(3):  # (segments of 4 rows, 1 s apart, in time order but for one)
        times = [v * 4 + i for i in (1, 0, 2, 3)]
        rows = pl.DataFrame(
            {"k": times, "t": [t * 1_000_000 for t in times], "id": times},
            schema={"k": pl.Int64, "t": pl.Int64, "id": pl.Int64},
        ).with_columns(pl.col("t").cast(pl.Datetime("us")), pl.lit(False).alias("m"))
        buffer.insert(rows)
        buffer.commit(v)
    got = buffer.rows_between(earliest, latest)
    assert got.columns == ["k", "t", "id", "m"]
    assert sorted(got.get_column("id").to_list()) == ids
    # A range holding most rows gives them all (a superset: no copy of most of the buffer).
    assert buffer.rows_between(1_000_000, 11_000_000).height == 12


def test_a_short_bound_pairs_against_a_sliver_of_the_buffer() -> None:
    """With a bound much shorter than a batch's span, a batch's new rows reach only the
    newest buffered rows: the join takes those (not the whole buffer) and emits exactly
    the pairs of a join of everything (oracle: Polars over all rows)."""
    imps = {"ad": pl.Int64, "imp_time": pl.Datetime("us")}
    clicks = {"ad": pl.Int64, "click_time": pl.Datetime("us")}
    left = ms.MemoryStream(imps).lazy().with_watermark("imp_time", "0s")
    right = ms.MemoryStream(clicks).lazy().with_watermark("click_time", "0s")
    node = left.join(right, on="ad", how="inner", within=("0s", "1m"))._plan
    op = node.build_operator("op0", memory())
    assert isinstance(op, StreamJoinOperator)
    op.load(None)
    seen: list[int] = []
    original = op._candidates

    def candidates(side: int, other: pl.DataFrame) -> pl.DataFrame:
        rows = original(side, other)
        seen.append(rows.height)
        return rows

    op._candidates = candidates  # type: ignore[method-assign]
    all_imps, all_clicks, out = [], [], []
    for b in range(6):  # (batches of 60 rows a side over an hour, keys repeating)
        at = [fixture.T0 + fixture.timedelta(minutes=b * 60 + i) for i in range(60)]
        l_rows = pl.DataFrame({"ad": [i % 7 for i in range(60)], "imp_time": at}, schema=imps)
        r_rows = pl.DataFrame({"ad": [i % 5 for i in range(60)], "click_time": at}, schema=clicks)
        wm = fixture.us(b * 60 - 1) if b else fixture.us(-10_000)
        ctx = OperatorContext(
            batch_id=b, late_watermark_us=fixture.us(-10_000), watermark_us=wm, output_mode="append"
        )
        out.append(op.process((l_rows, r_rows), ctx).rows)
        op.commit(b)
        all_imps.append(l_rows)
        all_clicks.append(r_rows)
    everything = pl.concat(all_imps).join(pl.concat(all_clicks), on="ad")
    gap = pl.col("click_time") - pl.col("imp_time")
    expected = everything.filter(gap.is_between(fixture.timedelta(0), fixture.timedelta(minutes=1)))
    got = pl.concat(out, how="vertical")
    assert expected.height > 100
    assert_frame_equal(canon(got), canon(expected.select(got.columns)))
    # (a batch's rows reach back 1 minute: at most ~2 buffered rows of 60 are candidates)
    assert max(seen[2:]) <= 3 and max(seen) > 0


@pytest.mark.parametrize("cut_s", [-1, 1, 5, 7, 20])
def test_drop_through_removes_what_evict_through_returns(cut_s: int) -> None:
    """``drop_through`` (the rows a join does not emit when they leave) removes exactly the
    rows ``evict_through`` returns, counts them, and commits the same version."""
    a, b = _buffer(memory(), retain=3), _buffer(memory(), retain=3)
    for buffer in (a, b):
        buffer.load(None)
        for v in range(3):
            times = [v * 4 + i for i in (1, 0, 3, 2)]
            rows = pl.DataFrame(
                {"k": times, "t": [t * 1_000_000 for t in times], "id": times},
                schema={"k": pl.Int64, "t": pl.Int64, "id": pl.Int64},
            ).with_columns(pl.col("t").cast(pl.Datetime("us")), pl.lit(False).alias("m"))
            buffer.insert(rows)
            buffer.commit(v)
    gone = a.evict_through(cut_s * 1_000_000)
    assert b.drop_through(cut_s * 1_000_000) == gone.height == min(max(cut_s + 1, 0), 12)
    assert_frame_equal(canon(a.frame), canon(b.frame))
    a.commit(3)
    b.commit(3)
    for buffer in (a, b):
        buffer.load(3)
    assert_frame_equal(canon(a.frame), canon(b.frame))
