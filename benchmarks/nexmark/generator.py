"""The Nexmark event generator: Person, Auction and Bid streams, vectorised and reproducible.

A re-implementation of the rules of the Nexmark generators of Apache Beam
(``sdks/java/testing/nexmark/.../sources/generator``) and of nexmark/nexmark's
Flink port (``nexmark-flink/.../generator``), with the Flink defaults
(``NexmarkConfiguration``): event kind by ``id mod 50`` (1 person, 3 auctions,
46 bids), hot auctions w.p. 1/2, hot sellers and hot bidders w.p. 3/4, 1000
active people, 100 auctions in flight, log-uniform prices, 4 hot channels w.p.
1/2 among 10 000, padding to 200 B / 500 B / 100 B.

Events are generated a whole range of event ids at a time with numpy, never
one event at a time in Python, and every random draw is a counter-based hash
(splitmix64's finaliser) of ``(seed, event id, field)``: the content of event
``n`` does not depend on which other events are generated with it, so
``generate(0..N)`` equals the concatenation of ``generate`` over any split of
``0..N`` and files can be generated in any order. Strings are built without
per-row Python: names, cities, states, channels and URLs are gathered from
small seeded pools, and the random strings (item names, descriptions, e-mail
parts, ``extra``) are Arrow string views into a few pre-built random buffers, as
Flink slices its ``extra`` from one reusable 1 MiB string.

Where this differs from Beam/Flink (and why):

- **Out-of-order groups.** Flink emits, at position ``n``, the event whose id and
  event time are those of ``adj(n) = n // k * k + (953 * n) % k``. Here event
  ``n`` keeps its id, kind and content and only its event time is that of
  ``adj(n)`` (``expires`` counts from that time too, as in Flink). The rows of a
  stream stay in id order, so file ``i`` holds exactly the ids of micro-batch
  ``i`` and a bid follows the auctions it can name (but for the 10 ids of lead
  the rules allow); the disorder is in ``date_time``, which is what a watermark
  sees. Within each group of ``k`` ids the event times are a permutation of the
  in-order ones (for ``k`` not a multiple of 953), at most the group's span apart.
- **Randomness.** Beam seeds ``Random(eventId)`` per event and Flink uses one
  unseeded generator; here each field has its own hash of ``(seed, id)``. The
  distributions are the same, the values are not.
- **Random strings** are drawn as slices of seeded 1 MiB buffers (letters with a
  space one time in 13 for item names, descriptions and e-mail parts, as
  ``nextString``), trimmed like Java's ``String.trim``; credit cards are four
  random groups of four digits; URLs and channels come from a seeded cache of
  10 000 (Flink's ``CHANNEL_URL_CACHE``) plus 4 hot ones.
- **Bidder id**: Flink's ``BidGenerator`` adds ``FIRST_PERSON_ID`` twice (bidders
  2000 above the persons); Beam and this generator add it once, so bids join
  persons.
- **Sizes** follow Flink's accounting: ``extra`` pads the fields Beam counts
  (8 B per number, string lengths; not ``date_time`` for a person) to 200 B /
  500 B / 100 B on average. Flink's bid ``channel`` and ``url`` (~72 B) are not
  counted, as in Flink, so with every column (8 B per number or time) a person
  is ~208 B, an auction ~507 B and a bid ~172 B, as Flink's.
- **Event time** is computed in integers, ``base + n * 1e6 // rate // 1000`` ms,
  where Flink goes through a double (identical whenever ``1e6 / rate`` is exact).

Run as a script to write the three streams as parquet files::

    python benchmarks/nexmark/generator.py --events 10000000 --events-per-file 1000000 \\
        --out /tmp/nexmark [--rate 1000000] [--seed 0] [--ooo 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script: make ``nexmark`` importable from benchmarks/.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import polars as pl
import pyarrow as pa

from nexmark.schema import SCHEMAS

# -- The Nexmark configuration (Flink's defaults) ----------------------------------------------

PERSON_PROPORTION = 1
AUCTION_PROPORTION = 3
BID_PROPORTION = 46
TOTAL_PROPORTION = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION

FIRST_PERSON_ID = 1000
FIRST_AUCTION_ID = 1000
FIRST_CATEGORY_ID = 10
NUM_CATEGORIES = 5

#: A bid is for the hot auction unless ``U[0, ratio) == 0``: w.p. 1 - 1/ratio.
HOT_AUCTION_RATIO = 2
HOT_SELLERS_RATIO = 4
HOT_BIDDERS_RATIO = 4
#: The hot auction/seller/bidder is the first (bidder: second) of the last block of 100.
HOT_BLOCK = 100

NUM_ACTIVE_PEOPLE = 1000
NUM_IN_FLIGHT_AUCTIONS = 100
PERSON_ID_LEAD = 10
AUCTION_ID_LEAD = 10

AVG_PERSON_BYTES = 200
AVG_AUCTION_BYTES = 500
AVG_BID_BYTES = 100

HOT_CHANNELS = ("Google", "Facebook", "Baidu", "Apple")
NUM_CHANNELS = 10_000

US_STATES = ("AZ", "CA", "ID", "OR", "WA", "WY")
US_CITIES = (
    "Phoenix", "Los Angeles", "San Francisco", "Boise", "Portland",
    "Bend", "Redmond", "Seattle", "Kent", "Cheyenne",
)  # fmt: skip
FIRST_NAMES = (
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
)  # fmt: skip
LAST_NAMES = (
    "Shultz",
    "Abrams",
    "Spencer",
    "White",
    "Bartels",
    "Walton",
    "Smith",
    "Jones",
    "Noris",
)

#: The out-of-order permutation's multiplier (a prime: a permutation unless k is a multiple).
OUT_OF_ORDER_MULTIPLIER = 953
#: Auctions generated during an auction's mean lifetime: ``expires`` spans 2x their event time.
EVENTS_FOR_IN_FLIGHT_AUCTIONS = NUM_IN_FLIGHT_AUCTIONS * TOTAL_PROPORTION // AUCTION_PROPORTION

BUFFER_BYTES = 1 << 20
MIN_STRING_LENGTH = 3

STREAMS = ("person", "auction", "bid")


# -- Counter-based randomness ------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_MASK64 = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on one Python int (for keys)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _hash(ids: np.ndarray, seed: int, field: int) -> np.ndarray:
    """64 random bits per event id: splitmix64's finaliser of ``id * golden + key(seed, field)``.

    A bijection of ``id`` for each ``(seed, field)``, independent of the other ids
    in the array: the draw of an event never depends on how a range is chunked.
    """
    key = np.uint64(_mix_int(_mix_int(seed * 0x2545F4914F6CDD1D + 0x4E58) + field))
    z = ids.astype(np.uint64) * _GOLDEN
    z += key
    tmp = z >> _S30
    z ^= tmp
    z *= _MIX1
    np.right_shift(z, _S27, out=tmp)
    z ^= tmp
    z *= _MIX2
    np.right_shift(z, _S31, out=tmp)
    z ^= tmp
    return z


def _low(h: np.ndarray) -> np.ndarray:
    """The low 32 bits of ``h`` (as uint64)."""
    return h & _LOW32


def _high(h: np.ndarray) -> np.ndarray:
    """The high 32 bits of ``h`` (as uint64)."""
    return h >> _S32


def _below(bits32: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """``U[0, n)`` from 32 random bits, by multiply-shift (``0 <= n < 2**32``); int64."""
    factor = n.astype(np.uint64, copy=False) if isinstance(n, np.ndarray) else np.uint64(n)
    product = bits32 * factor
    product >>= _S32
    return product.view(np.int64)


def _bits(h: np.ndarray, shift: int, width: int) -> np.ndarray:
    """``width`` bits of ``h`` from bit ``shift`` (uint64)."""
    return (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)


def _unit(bits32: np.ndarray) -> np.ndarray:
    """A float in ``[0, 1)`` from 32 random bits."""
    return bits32.astype(np.float64) * (1.0 / 4294967296.0)


# Fields: one hash each; sub-fields are disjoint bit ranges of one hash.
_F_PERSON_EMAIL, _F_PERSON_CARD, _F_PERSON_EXTRA, _F_PERSON_SMALL = 1, 2, 3, 4
_F_AUCTION_SELLER, _F_AUCTION_PRICE, _F_AUCTION_NAME, _F_AUCTION_DESC = 11, 12, 13, 14
_F_AUCTION_EXTRA, _F_AUCTION_EXPIRES = 15, 16
_F_BID_PARTIES, _F_BID_CHANNEL, _F_BID_PRICE = 21, 22, 23


# -- Seeded string material --------------------------------------------------------------------


@dataclass(frozen=True)
class _Buffer:
    """Random bytes that rows slice as Arrow string views (zero copy).

    ``data`` is followed by 16 zero bytes, so 12-byte reads past any slice stay
    inside; ``words[i]`` is the little-endian int32 of ``data[i:i+4]`` (a view's
    prefix and inline bytes).
    """

    data: np.ndarray
    words: np.ndarray

    @classmethod
    def of(cls, data: np.ndarray) -> _Buffer:
        """The buffer of ``data`` (uint8), padded, with its words."""
        padded = np.concatenate([data.astype(np.uint8), np.zeros(16, np.uint8)])
        b = padded.astype(np.uint32)
        words = (b[:-3] | (b[1:-2] << 8) | (b[2:-1] << 16) | (b[3:] << 24)).view(np.int32)
        return cls(padded, words)


@dataclass(frozen=True)
class _Text:
    """A buffer of ``nextString`` text and where each position's trimmed slice starts/ends."""

    buffer: _Buffer
    next_start: np.ndarray  # first non-space position >= i
    prev_end: np.ndarray  # 1 + last non-space position < i (0 if none)


@dataclass(frozen=True)
class _Material:
    """Everything one seed's strings are drawn from."""

    letters: _Buffer  # a-z: ``extra``
    text: _Text  # a-z with a space one time in 13: names, descriptions, e-mails
    names: pl.Series  # first x last
    cities: pl.Series
    states: pl.Series
    channels: pl.Series  # 4 hot, then channel-0 ... channel-9999
    urls: pl.Series  # the URL of each channel


def _base_urls(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` of Flink's channel URLs: three ``nextString(5, '_')`` path parts each."""
    chars = rng.integers(ord("a"), ord("z") + 1, (n, 3, 4), dtype=np.uint8)
    chars[rng.integers(0, 13, (n, 3, 4)) == 0] = ord("_")
    lengths = MIN_STRING_LENGTH + rng.integers(0, 5 - MIN_STRING_LENGTH, (n, 3))
    return [
        "https://www.nexmark.com/"
        + "/".join(part[:length].decode() for part, length in zip(row, row_lengths))
        + "/item.htm?query=1"
        for row, row_lengths in zip((list(map(bytes, r)) for r in chars), lengths.tolist())
    ]


def _reverse_bits32_abs(i: np.ndarray) -> np.ndarray:
    """Java's ``Math.abs(Integer.reverse(i))`` (Integer.MIN_VALUE stays negative)."""
    x: np.ndarray = i.astype(np.uint32)
    x = ((x >> 1) & 0x55555555) | ((x & 0x55555555) << 1)
    x = ((x >> 2) & 0x33333333) | ((x & 0x33333333) << 2)
    x = ((x >> 4) & 0x0F0F0F0F) | ((x & 0x0F0F0F0F) << 4)
    x = ((x >> 8) & 0x00FF00FF) | ((x & 0x00FF00FF) << 8)
    x = (x >> 16) | (x << 16)
    return np.abs(x.astype(np.uint32).view(np.int32))


@functools.lru_cache(maxsize=4)
def _material(seed: int) -> _Material:
    """The seed's buffers and pools (built once per seed, ~0.1 s)."""
    rng = np.random.default_rng([seed, 0x4E45584D41524B])
    letters = rng.integers(ord("a"), ord("z") + 1, BUFFER_BYTES, dtype=np.uint8)
    text = rng.integers(ord("a"), ord("z") + 1, BUFFER_BYTES, dtype=np.uint8)
    text[rng.integers(0, 13, BUFFER_BYTES) == 0] = ord(" ")
    solid = text != ord(" ")
    positions = np.arange(BUFFER_BYTES + 1)
    # next_start[i]: first solid position >= i (BUFFER_BYTES if none).
    marks = np.where(np.append(solid, True), positions, BUFFER_BYTES)
    next_start = np.minimum.accumulate(marks[::-1])[::-1]
    # prev_end[i]: 1 + last solid position < i (0 if none).
    ends = np.concatenate([[0], np.where(solid, positions[:-1] + 1, 0)])
    prev_end = np.maximum.accumulate(ends)

    rng_urls = np.random.default_rng([seed, 0x55524C])
    base_urls = _base_urls(rng_urls, len(HOT_CHANNELS) + NUM_CHANNELS)
    channel_ids = _reverse_bits32_abs(np.arange(NUM_CHANNELS)).tolist()
    with_id = (rng_urls.integers(0, 10, NUM_CHANNELS) > 0).tolist()
    urls = [
        *base_urls[: len(HOT_CHANNELS)],
        *(
            url + (f"&channel_id={channel_id}" if flag else "")
            for url, channel_id, flag in zip(base_urls[len(HOT_CHANNELS) :], channel_ids, with_id)
        ),
    ]
    return _Material(
        letters=_Buffer.of(letters),
        text=_Text(_Buffer.of(text), next_start, prev_end),
        names=pl.Series("name", [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]),
        cities=pl.Series("city", US_CITIES),
        states=pl.Series("state", US_STATES),
        channels=pl.Series(
            "channel", [*HOT_CHANNELS, *(f"channel-{i}" for i in range(NUM_CHANNELS))]
        ),
        urls=pl.Series("url", urls),
    )


_INLINE_MASKS = np.array(
    [
        [int.from_bytes(bytes([0xFF] * max(0, min(4, n - 4 * w)) + [0] * 4)[:4], "little")
         for w in range(3)]
        for n in range(13)
    ],
    dtype=np.uint32,
).view(np.int32)  # fmt: skip


def _views(name: str, buffer: _Buffer, start: np.ndarray, length: np.ndarray) -> pl.Series:
    """``buffer[start:start+length]`` per row, as a Polars String Series of views (no copy).

    Arrow string views: 16 bytes per row, ``(length, 12 inline bytes)`` when
    ``length <= 12``, else ``(length, 4-byte prefix, buffer 0, offset)``.
    """
    n = len(start)
    start = start.astype(np.int64, copy=False)
    length = length.astype(np.int32, copy=False)
    views = np.empty((n, 4), np.int32)
    views[:, 0] = length
    views[:, 1] = buffer.words[start]
    views[:, 2] = 0
    views[:, 3] = start
    short = length <= 12
    if short.any():
        idx = np.flatnonzero(short)
        s, ln = start[idx], length[idx]
        masks = _INLINE_MASKS[ln]
        views[idx, 1] &= masks[:, 0]
        views[idx, 2] = buffer.words[s + 4] & masks[:, 1]
        views[idx, 3] = buffer.words[s + 8] & masks[:, 2]
    array = pa.Array.from_buffers(
        pa.string_view(), n, [None, pa.py_buffer(views), pa.py_buffer(buffer.data)]
    )
    return pl.Series(name, array)


def _text(
    name: str, text: _Text, bits32: np.ndarray, max_length: int, len_bits: np.ndarray
) -> tuple[pl.Series, np.ndarray]:
    """``nextString(max_length)``: a trimmed slice of the text buffer; with its lengths."""
    length = MIN_STRING_LENGTH + _below(len_bits, max_length - MIN_STRING_LENGTH)
    offset = _below(bits32, BUFFER_BYTES - max_length)
    start = text.next_start[offset]
    end = text.prev_end[offset + length]
    trimmed = np.maximum(end - start, 0)
    start = np.where(trimmed > 0, start, offset)
    return _views(name, text.buffer, start, trimmed), trimmed


def _extra(
    letters: _Buffer,
    current: np.ndarray,
    average: int,
    len_bits: np.ndarray,
    offset_bits: np.ndarray,
) -> pl.Series:
    """Flink's ``nextExtra``: ``average - current`` letters on average, +-20 %."""
    desired = average - current
    delta = np.floor(desired * 0.2 + 0.5).astype(np.int64)
    length = desired - delta + np.where(delta > 0, _below(len_bits, np.maximum(2 * delta, 1)), 0)
    length = np.where(current > average, 0, length)
    offset = _below(offset_bits, BUFFER_BYTES - length)
    return _views("extra", letters, offset, length)


# -- Ids and event time ------------------------------------------------------------------------


def _ids_of_kind(lo: int, hi: int, first: int, count: int) -> np.ndarray:
    """The event ids in ``[lo, hi)`` whose ``id % 50`` is in ``[first, first + count)``."""
    if hi <= lo:
        return np.empty(0, np.int64)
    epochs = np.arange(lo // TOTAL_PROPORTION, (hi - 1) // TOTAL_PROPORTION + 1, dtype=np.int64)
    ids = (epochs[:, None] * TOTAL_PROPORTION + np.arange(first, first + count)).ravel()
    return ids[(ids >= lo) & (ids < hi)]


def count_of_kind(stream: str, hi: int) -> int:
    """How many events of ``stream`` have an id below ``hi``.

    Examples
    --------
    >>> count_of_kind("person", 51), count_of_kind("auction", 51), count_of_kind("bid", 51)
    (2, 3, 46)
    """
    first, count = _KIND_SLOTS[stream]
    epochs, rest = divmod(max(hi, 0), TOTAL_PROPORTION)
    return epochs * count + min(max(rest - first, 0), count)


_KIND_SLOTS = {
    "person": (0, PERSON_PROPORTION),
    "auction": (PERSON_PROPORTION, AUCTION_PROPORTION),
    "bid": (PERSON_PROPORTION + AUCTION_PROPORTION, BID_PROPORTION),
}


def _last_person(ids: np.ndarray) -> np.ndarray:
    """The last person id (base 0) generated up to event ``id`` (inclusive)."""
    return ids // TOTAL_PROPORTION


def _last_auction(ids: np.ndarray) -> np.ndarray:
    """The last auction id (base 0) generated up to event ``id`` (inclusive; -1 if none)."""
    epoch, offset = np.divmod(ids, TOTAL_PROPORTION)
    return epoch * AUCTION_PROPORTION + np.clip(
        offset - PERSON_PROPORTION, -1, AUCTION_PROPORTION - 1
    )


def _random_person(ids: np.ndarray, bits32: np.ndarray) -> np.ndarray:
    """A random active person (base 0), up to ``PERSON_ID_LEAD`` ahead of the last one."""
    people = _last_person(ids) + 1
    active = np.minimum(people, NUM_ACTIVE_PEOPLE)
    return people - active + _below(bits32, active + PERSON_ID_LEAD)


def _timestamp_ms(numbers: np.ndarray, rate: int, base_time_ms: int) -> np.ndarray:
    """Event time of event number ``n``: ``base + n * (1e6 / rate) us``, in ms."""
    return base_time_ms + (numbers * 1_000_000 // rate) // 1000


def _adjusted(ids: np.ndarray, group: int) -> np.ndarray:
    """The out-of-order event number: ``n // k * k + (953 * n) % k``."""
    if group == 1:
        return ids
    return ids // group * group + (OUT_OF_ORDER_MULTIPLIER * ids) % group


def _price(bits32: np.ndarray) -> np.ndarray:
    """Log-uniform prices in ``[100, 1e8]``: ``round(10 ** (6 U) * 100)``."""
    return np.floor(np.exp(_unit(bits32) * (6.0 * np.log(10.0))) * 100.0 + 0.5).astype(np.int64)


def _datetime(name: str, ms: np.ndarray) -> pl.Series:
    return pl.Series(name, ms, dtype=pl.Int64).cast(pl.Datetime("ms"))


# -- The three streams -------------------------------------------------------------------------


def _persons(ids: np.ndarray, m: _Material, seed: int, times: np.ndarray) -> pl.DataFrame:
    email_bits = _hash(ids, seed, _F_PERSON_EMAIL)
    card_bits = _hash(ids, seed, _F_PERSON_CARD)
    extra_bits = _hash(ids, seed, _F_PERSON_EXTRA)
    small = _hash(ids, seed, _F_PERSON_SMALL)

    name_idx = _below(_bits(small, 0, 16) << np.uint64(16), len(FIRST_NAMES) * len(LAST_NAMES))
    city_idx = _below(_bits(small, 16, 16) << np.uint64(16), len(US_CITIES))
    state_idx = _below(_bits(small, 32, 16) << np.uint64(16), len(US_STATES))
    names = m.names.gather(name_idx)
    cities = m.cities.gather(city_idx)
    states = m.states.gather(state_idx)

    user, user_len = _text(
        "user", m.text, _low(email_bits), 7, _bits(small, 48, 8) << np.uint64(24)
    )
    host, host_len = _text(
        "host", m.text, _high(email_bits), 5, _bits(small, 56, 8) << np.uint64(24)
    )
    email = pl.select(pl.concat_str(user, pl.lit("@"), host, pl.lit(".com"))).to_series()

    # Four groups of four digits: "dddd dddd dddd dddd".
    groups = np.stack(
        [_below(_bits(card_bits, 16 * g, 16) << np.uint64(16), 10_000) for g in range(4)], axis=1
    )
    digits = (groups[:, :, None] // np.array([1000, 100, 10, 1])) % 10 + ord("0")
    card = np.full((len(ids), 4, 5), ord(" "), np.uint8)
    card[:, :, :4] = digits
    card_buffer = _Buffer.of(card.ravel())
    credit_card = _views(
        "credit_card", card_buffer, np.arange(len(ids)) * 20, np.full(len(ids), 19)
    )

    current = (
        8
        + names.str.len_bytes().to_numpy()
        + user_len + host_len + 5
        + 19
        + cities.str.len_bytes().to_numpy()
        + 2
    )  # fmt: skip
    extra = _extra(m.letters, current, AVG_PERSON_BYTES, _low(extra_bits), _high(extra_bits))
    return pl.DataFrame(
        [
            pl.Series("id", FIRST_PERSON_ID + _last_person(ids)),
            names.alias("name"),
            email.alias("email_address"),
            credit_card,
            cities.alias("city"),
            states.alias("state"),
            _datetime("date_time", times),
            extra,
        ],
        schema=SCHEMAS["person"],
    )


def _auctions(
    ids: np.ndarray, m: _Material, seed: int, times: np.ndarray, horizon: np.ndarray
) -> pl.DataFrame:
    seller_bits = _hash(ids, seed, _F_AUCTION_SELLER)
    price_bits = _hash(ids, seed, _F_AUCTION_PRICE)
    name_bits = _hash(ids, seed, _F_AUCTION_NAME)
    desc_bits = _hash(ids, seed, _F_AUCTION_DESC)
    extra_bits = _hash(ids, seed, _F_AUCTION_EXTRA)
    expires_bits = _hash(ids, seed, _F_AUCTION_EXPIRES)

    hot = _bits(seller_bits, 32, 16) << np.uint64(16)
    hot_seller = _last_person(ids) // HOT_BLOCK * HOT_BLOCK
    seller = np.where(
        _below(hot, HOT_SELLERS_RATIO) > 0, hot_seller, _random_person(ids, _low(seller_bits))
    )
    category = FIRST_CATEGORY_ID + _below(
        _bits(seller_bits, 48, 16) << np.uint64(16), NUM_CATEGORIES
    )
    initial_bid = _price(_low(price_bits))
    reserve = initial_bid + _price(_high(price_bits))
    expires = times + 1 + _below(_low(expires_bits), np.maximum(2 * horizon, 1))

    item_name, name_len = _text("item_name", m.text, _low(name_bits), 20, _high(name_bits))
    description, desc_len = _text("description", m.text, _low(desc_bits), 100, _high(desc_bits))
    current = 8 + name_len + desc_len + 8 * 5
    extra = _extra(m.letters, current, AVG_AUCTION_BYTES, _low(extra_bits), _high(extra_bits))
    return pl.DataFrame(
        [
            pl.Series("id", FIRST_AUCTION_ID + _last_auction(ids)),
            item_name,
            description,
            pl.Series("initial_bid", initial_bid),
            pl.Series("reserve", reserve),
            _datetime("date_time", times),
            _datetime("expires", expires),
            pl.Series("seller", FIRST_PERSON_ID + seller),
            pl.Series("category", category),
            extra,
        ],
        schema=SCHEMAS["auction"],
    )


def _bids(ids: np.ndarray, m: _Material, seed: int, times: np.ndarray) -> pl.DataFrame:
    parties = _hash(ids, seed, _F_BID_PARTIES)
    channel_bits = _hash(ids, seed, _F_BID_CHANNEL)
    price_bits = _hash(ids, seed, _F_BID_PRICE)
    coins = _high(channel_bits)

    # nextInt(2) > 0: the hot auction w.p. 1/2, else one of the last 100 (+ 10 ahead).
    epoch = ids // TOTAL_PROPORTION
    last_auction = epoch * AUCTION_PROPORTION + (AUCTION_PROPORTION - 1)
    low_auction = np.maximum(last_auction - NUM_IN_FLIGHT_AUCTIONS, 0)
    auction = low_auction + _below(_low(parties), last_auction - low_auction + 1 + AUCTION_ID_LEAD)
    hot = _bits(coins, 0, 1) > 0
    auction[hot] = (last_auction[hot] // HOT_BLOCK) * HOT_BLOCK
    auction += FIRST_AUCTION_ID

    # nextInt(4) > 0: the hot bidder w.p. 3/4, else an active person (+ 10 ahead).
    active = np.minimum(epoch + 1, NUM_ACTIVE_PEOPLE)
    bidder = epoch + 1 - active + _below(_high(parties), active + PERSON_ID_LEAD)
    hot = _bits(coins, 1, 2) > 0
    bidder[hot] = (epoch[hot] // HOT_BLOCK) * HOT_BLOCK + 1
    bidder += FIRST_PERSON_ID

    # nextInt(2) > 0: one of the 4 hot channels w.p. 1/2, else one of 10 000.
    channel = len(HOT_CHANNELS) + _below(_low(channel_bits), NUM_CHANNELS)
    hot = _bits(coins, 3, 1) > 0
    channel[hot] = _bits(coins[hot], 4, 2).view(np.int64)

    # nextExtra(32, 100): 54 to 81 letters.
    desired = AVG_BID_BYTES - 8 * 4
    delta = int(np.floor(desired * 0.2 + 0.5))
    length = desired - delta + _below(_bits(coins, 6, 26) << np.uint64(6), 2 * delta)
    offset = _below(_high(price_bits), BUFFER_BYTES - length)
    return pl.DataFrame(
        [
            pl.Series("auction", auction),
            pl.Series("bidder", bidder),
            pl.Series("price", _price(_low(price_bits))),
            m.channels.gather(channel),
            m.urls.gather(channel),
            _datetime("date_time", times),
            _views("extra", m.letters, offset, length),
        ],
        schema=SCHEMAS["bid"],
    )


# -- Public API --------------------------------------------------------------------------------


def _check(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}; got {value!r} instead"
        raise ValueError(msg)


def generate(
    events: int,
    *,
    first_event_id: int = 0,
    seed: int = 0,
    rate: int = 1_000_000,
    out_of_order_group_size: int = 1,
    base_time_ms: int = 1_700_000_000_000,
) -> dict[str, pl.DataFrame]:
    """Generate the Nexmark events of ids ``[first_event_id, first_event_id + events)``.

    Parameters
    ----------
    events
        How many events (of all three kinds) to generate.
    first_event_id
        The id of the first event. Event ``n`` is a person if ``n % 50 == 0``,
        an auction if ``n % 50`` is 1 to 3, else a bid.
    seed
        Seeds every random draw. The content of event ``n`` depends only on
        ``(seed, n)`` and the other parameters, not on the range it is
        generated with.
    rate
        Events per second of event time: event ``n`` is at
        ``base_time_ms + n * 1000 / rate`` ms (rounded down).
    out_of_order_group_size
        ``k``: event ``n`` takes the event time of ``n // k * k + (953 * n) % k``,
        a permutation of the times within each group of ``k`` ids (1: in order).
    base_time_ms
        Event time of event 0, in ms since the epoch.

    Returns
    -------
    dict[str, polars.DataFrame]
        ``"person"``, ``"auction"`` and ``"bid"``, with the schemas of
        ``nexmark.schema.SCHEMAS``, each in event id order.

    Raises
    ------
    ValueError
        If ``events`` or ``first_event_id`` is negative, ``rate`` or
        ``out_of_order_group_size`` below 1.

    Examples
    --------
    >>> out = generate(100, seed=1)
    >>> {name: frame.height for name, frame in out.items()}
    {'person': 2, 'auction': 6, 'bid': 92}
    >>> out["person"]["id"].to_list()
    [1000, 1001]
    """
    _check("events", events, 0)
    _check("first_event_id", first_event_id, 0)
    _check("rate", rate, 1)
    _check("out_of_order_group_size", out_of_order_group_size, 1)
    lo, hi = int(first_event_id), int(first_event_id) + int(events)
    m = _material(seed)

    def times(ids: np.ndarray) -> np.ndarray:
        return _timestamp_ms(_adjusted(ids, out_of_order_group_size), rate, base_time_ms)

    person_ids = _ids_of_kind(lo, hi, *_KIND_SLOTS["person"])
    auction_ids = _ids_of_kind(lo, hi, *_KIND_SLOTS["auction"])
    bid_ids = _ids_of_kind(lo, hi, *_KIND_SLOTS["bid"])

    auction_numbers = _adjusted(auction_ids, out_of_order_group_size)
    auction_times = _timestamp_ms(auction_numbers, rate, base_time_ms)
    horizon = (
        _timestamp_ms(auction_numbers + EVENTS_FOR_IN_FLIGHT_AUCTIONS, rate, base_time_ms)
        - auction_times
    )
    return {
        "person": _persons(person_ids, m, seed, times(person_ids)),
        "auction": _auctions(auction_ids, m, seed, auction_times, horizon),
        "bid": _bids(bid_ids, m, seed, times(bid_ids)),
    }


#: Events generated at once by ``write_files`` (bounded memory, amortised overhead).
CHUNK_EVENTS = 2_000_000
#: ``part-{i:05d}`` names sort in batch order up to this many files.
MAX_FILES = 100_000


def write_files(
    root: Path,
    events: int,
    *,
    events_per_file: int,
    seed: int = 0,
    rate: int = 1_000_000,
    out_of_order_group_size: int = 1,
    base_time_ms: int = 1_700_000_000_000,
) -> dict[str, int]:
    """Write events ``[0, events)`` as parquet files, one file per micro-batch.

    File ``i`` of every stream, ``<root>/<stream>/part-{i:05d}.parquet``, holds the
    events of ids ``[i * events_per_file, (i + 1) * events_per_file)`` of that
    stream (an empty file with the schema when there are none), so the files
    numbered ``i`` are one micro-batch of the three streams. Events are
    generated ``CHUNK_EVENTS`` (rounded to whole files) at a time, so memory
    stays bounded however many events. Files are lz4-compressed (the fastest
    to read here). Existing ``part-*.parquet`` files are overwritten, and those
    beyond the last file (from a larger run) removed.

    Parameters
    ----------
    root
        Directory to write ``person/``, ``auction/`` and ``bid/`` into (created).
    events
        Number of events.
    events_per_file
        Events (of all kinds) per micro-batch.
    seed, rate, out_of_order_group_size, base_time_ms
        As for :func:`generate`.

    Returns
    -------
    dict[str, int]
        Rows written per stream.

    Raises
    ------
    ValueError
        If ``events`` is negative, ``events_per_file`` below 1, or they make
        more than ``MAX_FILES`` files.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     write_files(Path(tmp), 250, events_per_file=100)
    {'person': 5, 'auction': 15, 'bid': 230}
    """
    _check("events", events, 0)
    _check("events_per_file", events_per_file, 1)
    files = -(-events // events_per_file)
    if files > MAX_FILES:
        msg = (
            f"events_per_file={events_per_file} makes {files} files for {events} events; "
            f"at most {MAX_FILES} keep part-NNNNN names in order: use a larger events_per_file"
        )
        raise ValueError(msg)
    root = Path(root)
    for stream in STREAMS:
        (root / stream).mkdir(parents=True, exist_ok=True)
        for stale in (root / stream).glob("part-*.parquet"):
            if not stale.stem[len("part-") :].isdigit() or int(stale.stem[len("part-") :]) >= files:
                stale.unlink()  # left over from a larger run: it would be read as a batch
    files_per_chunk = max(1, CHUNK_EVENTS // events_per_file)
    rows = dict.fromkeys(STREAMS, 0)
    for first_file in range(0, files, files_per_chunk):
        last_file = min(first_file + files_per_chunk, files)
        lo, hi = first_file * events_per_file, min(last_file * events_per_file, events)
        frames = generate(
            hi - lo,
            first_event_id=lo,
            seed=seed,
            rate=rate,
            out_of_order_group_size=out_of_order_group_size,
            base_time_ms=base_time_ms,
        )
        for stream, frame in frames.items():
            before = count_of_kind(stream, lo)  # rows of this stream before the chunk
            for i in range(first_file, last_file):
                start = count_of_kind(stream, i * events_per_file) - before
                stop = count_of_kind(stream, min((i + 1) * events_per_file, events)) - before
                frame.slice(start, stop - start).write_parquet(
                    root / stream / f"part-{i:05d}.parquet", compression="lz4", statistics=True
                )
            rows[stream] += frame.height
    return rows


def iter_json(
    events: int, *, chunk_events: int = 200_000, **options: Any
) -> Iterator[tuple[str, list[bytes]]]:
    """Events ``[0, events)`` as JSON records, chunk by chunk.

    Parameters
    ----------
    events
        Number of events.
    chunk_events
        Events generated at once.
    **options
        ``seed``, ``rate``, ``out_of_order_group_size``, ``base_time_ms`` as for
        :func:`generate`.

    Yields
    ------
    tuple[str, list[bytes]]
        The stream and its records of one chunk, in event id order: one JSON
        object per row, times as ``"2023-11-14 22:13:20.001"`` (Polars'
        ``write_ndjson``; ``pl.read_ndjson(..., schema=SCHEMAS[stream])`` reads
        them back exactly).

    Examples
    --------
    >>> [(stream, len(records)) for stream, records in iter_json(100)]
    [('person', 2), ('auction', 6), ('bid', 92)]
    """
    for lo in range(0, events, chunk_events):
        frames = generate(min(chunk_events, events - lo), first_event_id=lo, **options)
        for stream, frame in frames.items():
            if frame.height:
                yield stream, frame.write_ndjson().encode().splitlines()


def produce_kafka(
    bootstrap_servers: str,
    events: int,
    *,
    topic_prefix: str = "nexmark",
    seed: int = 0,
    rate: int = 1_000_000,
    out_of_order_group_size: int = 1,
    base_time_ms: int = 1_700_000_000_000,
    producer_config: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Produce events ``[0, events)`` as JSON records to ``<topic_prefix>-<stream>``.

    One record per event, no key, in event id order, encoded as by
    :func:`iter_json`. The topics must exist or be auto-created.

    Parameters
    ----------
    bootstrap_servers
        Kafka's ``bootstrap.servers``.
    events
        Number of events.
    topic_prefix
        Topics are ``<topic_prefix>-person``, ``-auction`` and ``-bid``.
    seed, rate, out_of_order_group_size, base_time_ms
        As for :func:`generate`.
    producer_config
        Extra confluent-kafka producer settings.

    Returns
    -------
    dict[str, int]
        Records produced per stream.
    """
    from confluent_kafka import Producer

    producer = Producer(
        {"bootstrap.servers": bootstrap_servers, "linger.ms": 20, **(producer_config or {})}
    )
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    counts = dict.fromkeys(STREAMS, 0)
    for stream, records in iter_json(
        events,
        seed=seed,
        rate=rate,
        out_of_order_group_size=out_of_order_group_size,
        base_time_ms=base_time_ms,
    ):
        topic = f"{topic_prefix}-{stream}"
        for record in records:
            while True:
                try:
                    producer.produce(topic, record, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        counts[stream] += len(records)
    if producer.flush(60) or errors:
        msg = f"producing to {bootstrap_servers!r} failed: {errors[:3] or 'flush timed out'}"
        raise RuntimeError(msg)
    return counts


def main(argv: list[str] | None = None) -> None:
    """The command line: write the files and print the generation rate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--events-per-file", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rate", type=int, default=1_000_000, help="events/s of event time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ooo", type=int, default=1, help="out-of-order group size")
    args = parser.parse_args(argv)
    options = {"seed": args.seed, "rate": args.rate, "out_of_order_group_size": args.ooo}

    _material(args.seed)  # seeded pools: built once, not part of the rate
    sample = min(args.events, 2_000_000)
    generate(sample, **options)  # warm up (page faults, pools)
    wall, cpu = [], []
    for repeat in range(3):
        w0, c0 = time.perf_counter(), time.process_time()
        generate(sample, first_event_id=repeat * sample, **options)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    w0, c0 = time.perf_counter(), time.process_time()
    rows = write_files(args.out, args.events, events_per_file=args.events_per_file, **options)
    write_wall, write_cpu = time.perf_counter() - w0, time.process_time() - c0
    threads = os.environ.get("POLARS_MAX_THREADS", f"unset ({pl.thread_pool_size()} threads)")
    print(json.dumps(rows))
    print(
        f"generate: {sample / min(cpu):,.0f} events per CPU-second, "
        f"{sample / min(wall):,.0f} events/s wall (best of 3 x {sample:,} events; "
        f"median wall {sample / sorted(wall)[1]:,.0f} events/s)"
    )
    print(
        f"generate + write parquet: {args.events / write_cpu:,.0f} events per CPU-second, "
        f"{args.events / write_wall:,.0f} events/s wall ({args.events:,} events in "
        f"{write_wall:.1f} s; POLARS_MAX_THREADS={threads})"
    )


if __name__ == "__main__":
    main()
