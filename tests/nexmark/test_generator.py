"""The Nexmark generator: the rules of Beam/Flink's generator, determinism, and the file layout."""

from __future__ import annotations

import doctest
import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nexmark import generator
from nexmark.generator import generate, write_files
from nexmark.schema import SCHEMAS
from polars.testing import assert_frame_equal

if TYPE_CHECKING:
    from microstream.testing.tansu import TansuBroker

KINDS = {"person": (0, 1), "auction": (1, 4), "bid": (4, 50)}


def kind_ids(lo: int, hi: int, stream: str) -> np.ndarray:
    """The event ids of ``stream`` in ``[lo, hi)``, by brute force on ``id % 50``."""
    ids = np.arange(lo, hi)
    first, stop = KINDS[stream]
    return ids[(ids % 50 >= first) & (ids % 50 < stop)]


def last_person(ids: np.ndarray) -> np.ndarray:
    return ids // 50


def last_auction(ids: np.ndarray) -> np.ndarray:
    """Last auction id (base 0) generated at or before event ``id``."""
    epoch, offset = ids // 50, ids % 50
    return np.where(offset == 0, epoch * 3 - 1, epoch * 3 + np.minimum(offset, 3) - 1)


@pytest.fixture(scope="module")
def big() -> dict[str, pl.DataFrame]:
    """200k events: enough for the ratios to be within ~1 % of their expectation."""
    return generate(200_000, seed=11, rate=10_000)


def test_schemas_are_exact() -> None:
    out = generate(5_000, first_event_id=123, seed=1)
    assert list(out) == ["person", "auction", "bid"]
    for stream, frame in out.items():
        assert frame.schema == SCHEMAS[stream], stream
        assert frame.null_count().sum_horizontal().item() == 0


@given(first=st.integers(0, 10_000), events=st.integers(0, 700))
@settings(max_examples=40, deadline=None)
def test_kind_split_follows_id_mod_50(first: int, events: int) -> None:
    out = generate(events, first_event_id=first)
    for stream, frame in out.items():
        assert frame.height == len(kind_ids(first, first + events, stream)), stream
        assert frame.height == generator.count_of_kind(
            stream, first + events
        ) - generator.count_of_kind(stream, first)


def test_proportions_are_1_3_46() -> None:
    out = generate(50 * 300)
    assert {s: f.height for s, f in out.items()} == {"person": 300, "auction": 900, "bid": 13_800}


def test_ids_are_contiguous_counters() -> None:
    out = generate(10_000, first_event_id=2_525)
    persons = kind_ids(2_525, 12_525, "person")
    auctions = kind_ids(2_525, 12_525, "auction")
    assert out["person"]["id"].to_list() == (1000 + persons // 50).tolist()
    auction_ids = out["auction"]["id"].to_numpy()
    assert auction_ids.tolist() == (1000 + last_auction(auctions)).tolist()
    assert (np.diff(auction_ids) == 1).all()
    assert (np.diff(out["person"]["id"].to_numpy()) == 1).all()
    # From event 0: ids start at 1000.
    first = generate(100)
    assert first["person"]["id"].to_list() == [1000, 1001]
    assert first["auction"]["id"].to_list() == list(range(1000, 1006))


def test_same_seed_same_events_other_seed_other_events() -> None:
    a = generate(3_000, seed=5, out_of_order_group_size=7)
    b = generate(3_000, seed=5, out_of_order_group_size=7)
    c = generate(3_000, seed=6, out_of_order_group_size=7)
    for stream in a:
        assert_frame_equal(a[stream], b[stream])
        assert not a[stream].equals(c[stream])
    assert not a["bid"]["price"].equals(c["bid"]["price"])
    assert not a["auction"]["description"].equals(c["auction"]["description"])


@given(
    cuts=st.lists(st.integers(0, 4_000), max_size=6),
    first=st.integers(0, 100_000),
    seed=st.integers(0, 2**31),
    group=st.sampled_from([1, 3, 50, 200]),
)
@settings(max_examples=20, deadline=None)
def test_chunking_does_not_change_events(
    cuts: list[int], first: int, seed: int, group: int
) -> None:
    options = {"seed": seed, "rate": 3_000, "out_of_order_group_size": group}
    whole = generate(4_000, first_event_id=first, **options)
    bounds = [0, *sorted(cuts), 4_000]
    parts = [
        generate(hi - lo, first_event_id=first + lo, **options)
        for lo, hi in itertools.pairwise(bounds)
    ]
    for stream, frame in whole.items():
        assert_frame_equal(pl.concat([p[stream] for p in parts]), frame)


def test_hot_auctions_bidders_sellers_and_channels(big: dict[str, pl.DataFrame]) -> None:
    bid_ids = kind_ids(0, 200_000, "bid")
    bids = big["bid"]
    hot_auction = 1000 + last_auction(bid_ids) // 100 * 100
    hot_bidder = 1000 + last_person(bid_ids) // 100 * 100 + 1
    # Hot w.p. 1/2 and 3/4, plus the uniform draws that land on the hot one (~1 %, ~0.1 %).
    assert 0.49 < (bids["auction"].to_numpy() == hot_auction).mean() < 0.52
    assert 0.74 < (bids["bidder"].to_numpy() == hot_bidder).mean() < 0.765
    hot_channels = bids["channel"].is_in(["Google", "Facebook", "Baidu", "Apple"])
    assert 0.49 < hot_channels.mean() < 0.51
    per_hot = bids.filter(hot_channels)["channel"].value_counts(normalize=True)
    assert per_hot.height == 4
    assert per_hot["proportion"].is_between(0.24, 0.26).all()
    others = bids.filter(~hot_channels)
    assert others["channel"].str.contains(r"^channel-\d{1,4}$").all()
    assert others["channel"].n_unique() > 9_000
    # A channel always has the same URL; hot channels without a channel id.
    assert bids.group_by("channel").agg(pl.col("url").n_unique())["url"].max() == 1
    assert bids["url"].str.starts_with("https://www.nexmark.com/").all()
    assert bids.filter(hot_channels)["url"].str.ends_with("/item.htm?query=1").all()

    auction_ids = kind_ids(0, 200_000, "auction")
    hot_seller = 1000 + last_person(auction_ids) // 100 * 100
    assert 0.73 < (big["auction"]["seller"].to_numpy() == hot_seller).mean() < 0.77
    categories = big["auction"]["category"].value_counts(normalize=True)
    assert sorted(categories["category"].to_list()) == [10, 11, 12, 13, 14]
    assert categories["proportion"].is_between(0.18, 0.22).all()


def test_prices_are_log_uniform_from_100_to_1e8(big: dict[str, pl.DataFrame]) -> None:
    price = big["bid"]["price"]
    assert price.min() >= 100
    assert price.max() <= 100_000_000
    log = np.log10(price.to_numpy())
    assert abs(np.median(log) - 5.0) < 0.03
    # Each decade from 10^2 to 10^8 holds ~1/6 of the prices.
    decades = np.histogram(log, bins=[2, 3, 4, 5, 6, 7, 8.01])[0] / len(log)
    assert np.allclose(decades, 1 / 6, atol=0.01)
    auctions = big["auction"]
    assert auctions["initial_bid"].is_between(100, 100_000_000).all()
    assert (auctions["reserve"] - auctions["initial_bid"]).is_between(100, 100_000_000).all()


def test_event_time_follows_the_rate() -> None:
    out = generate(10_000, rate=2_000, base_time_ms=1_000)
    assert out["person"]["date_time"].dt.epoch("ms").to_list() == [
        1_000 + n * 1_000 // 2_000 for n in kind_ids(0, 10_000, "person")
    ]
    bid_ids = kind_ids(0, 10_000, "bid")
    assert (out["bid"]["date_time"].dt.epoch("ms").to_numpy() == 1_000 + bid_ids // 2).all()


def event_times(out: dict[str, pl.DataFrame], lo: int, hi: int) -> np.ndarray:
    """Event time (ms) of every event id in ``[lo, hi)``, from the three streams."""
    times = np.empty(hi - lo, np.int64)
    for stream, frame in out.items():
        times[kind_ids(lo, hi, stream) - lo] = frame["date_time"].dt.epoch("ms").to_numpy()
    return times


@pytest.mark.parametrize("group", [10, 200, 1_000])
def test_out_of_order_groups_permute_event_times(group: int) -> None:
    n = 20 * group
    in_order = event_times(generate(n, rate=1_000), 0, n)
    shuffled = event_times(generate(n, rate=1_000, out_of_order_group_size=group), 0, n)
    assert (np.diff(in_order) >= 0).all()
    assert (np.diff(shuffled) < 0).sum() > n // 10  # really out of order
    for start in range(0, n, group):
        block = slice(start, start + group)
        assert sorted(shuffled[block]) == sorted(in_order[block])
        span = in_order[start + group - 1] - in_order[start]
        assert np.abs(shuffled[block] - in_order[block]).max() <= span
    # Expiry is measured from the (shuffled) event time.
    auctions = generate(n, rate=1_000, out_of_order_group_size=group)["auction"]
    assert (auctions["expires"] > auctions["date_time"]).all()


def test_bids_and_auctions_reference_existing_ids(big: dict[str, pl.DataFrame]) -> None:
    bid_ids = kind_ids(0, 200_000, "bid")
    auction = big["bid"]["auction"].to_numpy() - 1000
    bidder = big["bid"]["bidder"].to_numpy() - 1000
    assert (auction >= 0).all()
    assert (auction <= last_auction(bid_ids) + 10).all()
    assert (auction >= last_auction(bid_ids) - 100).all()
    assert (bidder >= 0).all()
    assert (bidder <= last_person(bid_ids) + 10).all()
    # The uniform draws cover the whole allowed window, leads included.
    assert (auction == last_auction(bid_ids) + 10).any()
    assert (bidder == last_person(bid_ids) + 10).any()

    auction_ids = kind_ids(0, 200_000, "auction")
    seller = big["auction"]["seller"].to_numpy() - 1000
    assert (seller >= 0).all()
    assert (seller <= last_person(auction_ids) + 10).all()
    assert (seller >= last_person(auction_ids) + 1 - 1000).all()  # among the 1000 active


def test_expires_spans_twice_the_time_of_100_auctions(big: dict[str, pl.DataFrame]) -> None:
    auctions = big["auction"]
    length = (auctions["expires"] - auctions["date_time"]).dt.total_milliseconds().to_numpy()
    horizon = 100 * 50 // 3 * 1000 // 10_000  # 1666 events at 10k events/s: 166 ms
    assert length.min() >= 1
    assert length.max() <= 2 * horizon
    assert abs(length.mean() - horizon) < 0.05 * horizon


def test_person_fields(big: dict[str, pl.DataFrame]) -> None:
    persons = big["person"]
    first, last = persons["name"].str.split_exact(" ", 1).struct.unnest().get_columns()
    assert set(first) == set(generator.FIRST_NAMES)
    assert set(last) == set(generator.LAST_NAMES)
    assert set(persons["city"]) == set(generator.US_CITIES)
    assert set(persons["state"]) == set(generator.US_STATES)
    assert persons["credit_card"].str.contains(r"^\d{4} \d{4} \d{4} \d{4}$").all()
    assert persons["credit_card"].n_unique() == persons.height
    assert (
        persons["email_address"]
        .str.contains(r"^([a-z]([a-z ]*[a-z])?)?@([a-z]([a-z ]*[a-z])?)?\.com$")
        .all()
    )
    states = persons["state"].value_counts(normalize=True)["proportion"]
    assert states.is_between(1 / 6 - 0.02, 1 / 6 + 0.02).all()


def test_random_strings_are_trimmed_next_strings(big: dict[str, pl.DataFrame]) -> None:
    auctions = big["auction"]
    for column, longest in [("item_name", 19), ("description", 99)]:
        text = auctions[column]
        assert text.str.len_bytes().max() <= longest
        assert (text.str.strip_chars() == text).all()
        assert text.str.contains(r"^[a-z ]*$").all()
        assert text.n_unique() > 0.99 * auctions.height
    assert abs(auctions["description"].str.len_bytes().mean() - 49) < 2
    for frame in big.values():
        assert frame["extra"].str.contains(r"^[a-z]*$").all()


def test_record_sizes_are_the_standard_ones(big: dict[str, pl.DataFrame]) -> None:
    """Flink's accounting: 8 B per number, the string lengths, padded by ``extra``."""

    def length(frame: pl.DataFrame, *columns: str) -> pl.Expr:
        return pl.sum_horizontal(pl.col(c).str.len_bytes() for c in columns)

    persons = big["person"].select(
        8 + length(big["person"], "name", "email_address", "credit_card", "city", "state", "extra")
    )
    auctions = big["auction"].select(
        8 * 6 + length(big["auction"], "item_name", "description", "extra")
    )
    bids = big["bid"].select(8 * 4 + length(big["bid"], "extra"))
    assert abs(persons.to_series().mean() - 200) < 2
    assert abs(auctions.to_series().mean() - 500) < 3
    assert abs(bids.to_series().mean() - 100) < 1
    # +-20 % around the average.
    assert bids.to_series().is_between(85, 115).all()
    assert auctions.to_series().is_between(400, 600).all()


def test_write_files_layout(tmp_path: Path) -> None:
    events, per_file = 1_234, 30
    options = {"seed": 3, "rate": 500, "out_of_order_group_size": 20}
    rows = write_files(tmp_path, events, events_per_file=per_file, **options)
    expected = generate(events, **options)
    assert rows == {stream: frame.height for stream, frame in expected.items()}
    files = -(-events // per_file)
    for stream in ("person", "auction", "bid"):
        names = sorted(p.name for p in (tmp_path / stream).iterdir())
        assert names == [f"part-{i:05d}.parquet" for i in range(files)]
    empty = 0
    for i in range(files):
        lo, hi = i * per_file, min((i + 1) * per_file, events)
        batch = generate(hi - lo, first_event_id=lo, **options)
        for stream, frame in batch.items():
            written = pl.read_parquet(tmp_path / stream / f"part-{i:05d}.parquet")
            assert written.schema == SCHEMAS[stream]
            assert_frame_equal(written, frame)
            empty += written.height == 0
    assert empty > 0  # files 2, 4, 7, ... of person hold no row: written empty, with the schema
    everything = pl.read_parquet(tmp_path / "bid" / "*.parquet")
    assert_frame_equal(everything, expected["bid"])


def test_write_files_replaces_a_larger_run(tmp_path: Path) -> None:
    write_files(tmp_path, 1_000, events_per_file=100)
    rows = write_files(tmp_path, 300, events_per_file=100, seed=1)
    assert rows == {"person": 6, "auction": 18, "bid": 276}
    for stream, frame in generate(300, seed=1).items():
        assert len(list((tmp_path / stream).iterdir())) == 3
        assert_frame_equal(pl.read_parquet(tmp_path / stream / "*.parquet"), frame)
    with pytest.raises(ValueError, match="events_per_file"):
        write_files(tmp_path, 10**9, events_per_file=1_000)


def test_write_files_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator, "CHUNK_EVENTS", 250)
    write_files(tmp_path, 1_000, events_per_file=100, seed=2)
    expected = generate(1_000, seed=2)
    for stream, frame in expected.items():
        assert_frame_equal(pl.read_parquet(tmp_path / stream / "*.parquet"), frame)
        assert len(list((tmp_path / stream).iterdir())) == 10


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"events": -1}, "events"),
        ({"events": 10, "rate": 0}, "rate"),
        ({"events": 10, "out_of_order_group_size": 0}, "out_of_order_group_size"),
        ({"events": 10, "first_event_id": -5}, "first_event_id"),
    ],
)
def test_invalid_arguments_are_refused_by_name(kwargs: dict[str, int], name: str) -> None:
    events = kwargs.pop("events")
    with pytest.raises(ValueError, match=re.escape(name)):
        generate(events, **kwargs)


def test_docstring_examples() -> None:
    result = doctest.testmod(generator, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.integration
def test_produce_kafka(kafka_broker: TansuBroker) -> None:
    prefix = f"nx-{np.random.default_rng().integers(1 << 30)}"
    for stream in ("person", "auction", "bid"):
        kafka_broker.create_topic(f"{prefix}-{stream}", partitions=1)
    counts = generator.produce_kafka(kafka_broker.bootstrap_servers, 200, topic_prefix=prefix)
    assert counts == {"person": 4, "auction": 12, "bid": 184}
    messages = kafka_broker.consume(f"{prefix}-person", 4)
    received = pl.read_ndjson(b"\n".join(m.value() for m in messages), schema=SCHEMAS["person"])
    assert_frame_equal(received, generate(200)["person"])
