"""Deterministic input files for the differential tests against Spark.

A *profile* (seed and knobs) becomes a list of small DataFrames ``(ts, k, v)``
-- one per file -- and :func:`write_files` writes them as parquet into a
directory with strictly increasing modification times, one second apart, so
that Spark's file source (which orders new files by modification time) and
microstream's (by ``(mtime, name)``) take them in the same order, one file
per micro-batch with ``maxFilesPerTrigger=1``.

``ts`` is ``Datetime("us")`` without a time zone and means UTC; Polars writes
it as parquet ``TIMESTAMP(isAdjustedToUTC=false, MICROS)``. Generated event
times are whole milliseconds (both engines keep the watermark in whole
milliseconds); hand-written files (:func:`batch`) may hold microseconds and
null event times.

What the files contain, by construction (every row kind is tagged in
:attr:`Batch.kinds`, so a failing test can say which rows were special):

- ``normal``: event time near the file's *frontier* (which advances every
  file), up to ``jitter_s`` behind it, so rows are out of order within a file
  and across files;
- ``frontier``: one row exactly at the frontier, a multiple of ``align_s``:
  the watermark then lands exactly on window boundaries, so windows end
  exactly at the watermark (emitted, ``<=``) and rows fall in windows that
  end exactly at the previous watermark (late, ``<=``);
- ``late``: rows behind the *late watermark* of their batch (the watermark
  of the previous batch), some exactly at it, some exactly ``gap_s`` before it
  (a session that ends exactly at the watermark), some in the window that
  ends exactly at it, and some just after it (not late);
- ``boundary``: rows exactly on a window boundary ``k * align_s``, and rows
  exactly at the watermark the batch will run with;
- ``touch``: a row exactly ``gap_s`` after an earlier row of the same key, so
  the two one-event sessions touch and must merge;
- ``dup``: a copy of an earlier row's ``(ts, k)`` with another ``v`` (in the same
  file or an earlier one), or the same ``k`` a little later (a duplicate for
  ``dropDuplicatesWithinWatermark``);
- ``null``: some rows have a null key;
- quiet files: files without rows and files holding only late rows. An
  empty file is still a data batch in both engines (the source offset moves):
  it reads nothing but runs with the watermark the file before it moved, so
  it emits and evicts. While files remain, available-now never runs a no-data
  batch between them; the only no-data batch is the last one, when the last
  file moved the watermark.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

__all__ = [
    "BASE",
    "MTIME_BASE",
    "SCHEMA",
    "Batch",
    "Profile",
    "at",
    "batch",
    "generate",
    "write_files",
]

BASE = datetime(2024, 1, 1)
"""Event time 0 of every generated file (naive, meaning UTC)."""

MTIME_BASE = 1_700_000_000
"""Modification time of the first file; file ``i`` gets ``MTIME_BASE + i`` (seconds)."""

SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "k": pl.String(), "v": pl.Int64()})

Row = tuple["datetime | None", "str | None", int]


def at(seconds: float) -> datetime:
    """The event time ``seconds`` after :data:`BASE` (millisecond precision).

    Examples
    --------
    >>> at(1.5)
    datetime.datetime(2024, 1, 1, 0, 0, 1, 500000)
    """
    return BASE + timedelta(milliseconds=round(seconds * 1000))


@dataclass
class Batch:
    """The rows of one file, with the kind of each row (for messages)."""

    rows: list[Row] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def add(self, ts: datetime | None, k: str | None, v: int, kind: str) -> None:
        self.rows.append((ts, k, v))
        self.kinds.append(kind)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "ts": [r[0] for r in self.rows],
                "k": [r[1] for r in self.rows],
                "v": [r[2] for r in self.rows],
            },
            schema=SCHEMA,
        )


def batch(*rows: tuple[float | None, str | None, int]) -> Batch:
    """A hand-written file: ``(seconds after BASE, k, v)`` per row.

    Seconds are kept to the microsecond; ``None`` is a null event time.

    Examples
    --------
    >>> batch((0, "a", 1), (10.5, None, 2)).frame().rows()
    [(datetime.datetime(2024, 1, 1, 0, 0), 'a', 1), (datetime.datetime(2024, 1, 1, 0, 0, 10, 500000), None, 2)]
    """
    out = Batch()
    for seconds, k, v in rows:
        ts = None if seconds is None else BASE + timedelta(microseconds=round(seconds * 1e6))
        out.add(ts, k, v, "hand")
    return out


@dataclass(frozen=True)
class Profile:
    """Knobs of :func:`generate`; every choice is drawn from ``random.Random(seed)``.

    The ``delay_s``/``align_s``/``gap_s`` knobs should equal the query's
    watermark delay, window size (or slide) and session gap, so that boundary
    and late rows land exactly where they test something.
    """

    seed: int = 0
    n_files: int = 8
    rows_per_file: int = 8
    step_s: int = 10
    """How far the frontier (the newest event time) moves per file; a multiple of ``align_s``."""
    jitter_s: float = 14.0
    """How far behind the frontier a normal row may be."""
    delay_s: int = 10
    align_s: int = 10
    gap_s: int = 10
    late_fraction: float = 0.2
    dup_fraction: float = 0.2
    touch_fraction: float = 0.1
    null_fraction: float = 0.08
    keys: tuple[str, ...] = ("a", "b", "c")
    empty_files: tuple[int, ...] = (5,)
    """Indices of files without rows."""
    late_only_files: tuple[int, ...] = ()
    """Indices of files with only late rows (they do not move the watermark)."""


def generate(profile: Profile) -> list[Batch]:
    """The files of ``profile``, deterministically.

    Examples
    --------
    >>> files = generate(Profile(seed=3, n_files=4))
    >>> len(files), files == generate(Profile(seed=3, n_files=4))
    (4, True)
    """
    rnd = random.Random(profile.seed)
    p = profile
    out: list[Batch] = []
    seen: list[Row] = []  # every row so far, in arrival order
    maxima: list[float | None] = []  # max event time (s) of each file, None for empty
    frontier = 0.0
    v = 0

    def next_v() -> int:
        nonlocal v
        v += 1
        return v

    def key() -> str | None:
        return None if rnd.random() < p.null_fraction else rnd.choice(p.keys)

    def watermark(upto: int) -> float | None:
        """The watermark of batch ``upto`` (from files before it), None for the epoch."""
        known = [m for m in maxima[:upto] if m is not None]
        return max(known) - p.delay_s if known else None

    for i in range(p.n_files):
        b = Batch()
        if i in p.empty_files:
            out.append(b)
            maxima.append(None)
            continue
        late_wm = watermark(i - 1) if i >= 1 else None  # the batch's late-filtering watermark
        run_wm = watermark(i)  # the watermark the batch emits and evicts with
        only_late = i in p.late_only_files and late_wm is not None
        if not only_late:
            frontier += p.step_s
            b.add(at(frontier), key(), next_v(), "frontier")
        n_rows = p.rows_per_file - 1
        late_possible = late_wm is not None and late_wm > 0
        for _ in range(n_rows):
            if late_possible and (only_late or rnd.random() < p.late_fraction):
                assert late_wm is not None
                choice = rnd.randrange(5)
                if choice == 0:  # exactly at the late watermark: late for dedup, not for windows
                    ts = late_wm
                elif choice == 1:  # session ends exactly at the late watermark: late
                    ts = late_wm - p.gap_s
                elif choice == 2:  # in the window that ends exactly at the late watermark
                    ts = late_wm - rnd.choice([p.align_s, 1, 0.001, p.align_s / 2])
                elif choice == 3:  # just after the late watermark: not late
                    ts = late_wm + rnd.choice([0.001, 1])
                else:  # far behind
                    ts = max(0.0, late_wm - rnd.uniform(0, 3 * p.align_s))
                b.add(at(max(ts, 0.0)), key(), next_v(), "late")
                continue
            r = rnd.random()
            if r < p.dup_fraction and (seen or b.rows):
                pool = b.rows + seen[-3 * p.rows_per_file :]
                ts0, k0, _ = rnd.choice(pool)
                if rnd.random() < 0.7:
                    b.add(ts0, k0, next_v(), "dup")  # same (ts, k)
                else:  # same k a little later (or earlier): a within-watermark duplicate
                    shift = timedelta(seconds=rnd.choice([1, p.delay_s / 2, p.delay_s]))
                    ts1 = ts0 + shift if ts0 + shift <= at(frontier) else ts0 - shift
                    b.add(max(ts1, BASE), k0, next_v(), "dup")
                continue
            r -= p.dup_fraction
            if r < p.touch_fraction and (seen or b.rows):
                ts0, k0, _ = rnd.choice(b.rows + seen[-2 * p.rows_per_file :])
                gap = timedelta(seconds=p.gap_s)  # exactly one gap after (or before) ts0
                ts1 = ts0 + gap if ts0 + gap <= at(frontier) else ts0 - gap
                b.add(max(ts1, BASE), k0, next_v(), "touch")
                continue
            r -= p.touch_fraction
            if r < 0.15:
                if run_wm is not None and rnd.random() < 0.5:
                    b.add(at(max(run_wm, 0.0)), key(), next_v(), "boundary")
                else:
                    edge = (frontier // p.align_s - rnd.randrange(2)) * p.align_s
                    b.add(at(max(edge, 0.0)), key(), next_v(), "boundary")
                continue
            back = rnd.uniform(0, p.jitter_s)
            ts = frontier - back
            ts = round(ts) if rnd.random() < 0.6 else round(ts, 3)
            b.add(at(max(ts, 0.0)), key(), next_v(), "normal")
        order = list(range(len(b.rows)))
        rnd.shuffle(order)
        b.rows = [b.rows[j] for j in order]
        b.kinds = [b.kinds[j] for j in order]
        out.append(b)
        seen.extend(b.rows)
        maxima.append(max((r[0] - BASE).total_seconds() for r in b.rows) if b.rows else None)
    return out


def write_files(directory: str | os.PathLike[str], batches: Sequence[Batch]) -> list[Path]:
    """Write one parquet file per batch, named and timed in order; returns the paths.

    File ``i`` is ``part-<i>.parquet`` with modification time ``MTIME_BASE + i``
    seconds: strictly increasing (Spark compares modification times in
    milliseconds), and all within a few minutes of each other, far inside
    Spark's ``maxFileAge`` (7 days, measured from the newest file).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     paths = write_files(root, [batch((0, "a", 1)), batch()])
    ...     print([p.name for p in paths], [int(p.stat().st_mtime) - MTIME_BASE for p in paths])
    ...     print(pl.read_parquet(paths[1]).schema == SCHEMA)
    ['part-00000.parquet', 'part-00001.parquet'] [0, 1]
    True
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, b in enumerate(batches):
        path = root / f"part-{i:05d}.parquet"
        tmp = root / f".part-{i:05d}.parquet.tmp"
        b.frame().write_parquet(tmp)
        os.utime(tmp, (MTIME_BASE + i, MTIME_BASE + i))
        tmp.rename(path)
        paths.append(path)
    return paths
