"""Install the built wheel with each extra alone, in a fresh venv, and use what it promises.

Run by ``make extras`` after ``make package`` (CI runs both): for every extra below,
``uv venv`` + ``uv pip install 'dist/microstream-*.whl[extra]'``, then a snippet that
exercises the extra's feature runs in that venv from an empty directory, so nothing
of the checkout is importable and only the wheel's contents count. uv's cache makes
the second and later venvs cheap.

Usage: ``python .ci/check_extras.py [EXTRA ...]`` (default: all of them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CORE = """
import tempfile, pathlib, polars as pl, microstream as ms
d = pathlib.Path(tempfile.mkdtemp())
(d / "in").mkdir()
pl.DataFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]}).write_parquet(d / "in" / "0.parquet")
seen = []
q = (
    ms.scan_files(d / "in", format="parquet", schema={"k": pl.String, "v": pl.Int64})
    .group_by("k").agg(pl.col("v").sum())
    .foreach_batch(lambda df, b: seen.append(df.sort("k")), checkpoint=d / "cp",
                   output_mode="complete", trigger=ms.Trigger.available_now())
)
q.await_termination()
assert seen[-1].rows() == [("a", 4), ("b", 2)], seen
from importlib.metadata import entry_points
names = {ep.name for ep in entry_points(group="microstream.connectors")}
assert {"files", "delta", "kafka", "memory"} <= names, names
"""

PROMISES: dict[str, str] = {
    "": CORE,
    "delta": """
import tempfile, polars as pl, microstream as ms
d = tempfile.mkdtemp()
s = ms.MemoryStream({"x": pl.Int64})
q = s.lazy().sink_delta(d + "/t", checkpoint=d + "/cp")
s.add_data({"x": [1, 2]}); q.process_all_available(); q.stop()
assert sorted(pl.read_delta(d + "/t")["x"].to_list()) == [1, 2]
""",
    "kafka": """
import confluent_kafka, fastavro
from connectors.kafka import KafkaSourceSpec, KafkaSinkSpec
import microstream as ms
assert callable(ms.scan_kafka)
""",
    "s3": """
import fsspec, s3fs
assert type(fsspec.filesystem("s3", anon=True)).__name__ == "S3FileSystem"
""",
    "postgres": """
import psycopg
from connectors.postgres import PostgresCdcSourceSpec, PostgresSinkSpec
""",
    "kinesis": """
import boto3
from connectors.kinesis import KinesisSinkSpec, KinesisSourceSpec
import microstream as ms
assert callable(ms.scan_kinesis)
""",
    "protobuf": """
from google.protobuf import wrappers_pb2
from connectors._protobuf_codec import ProtobufDecoder
decoder = ProtobufDecoder(wrappers_pb2.Int64Value)
out = decoder.decode([wrappers_pb2.Int64Value(value=7).SerializeToString()])
assert out.frame["value"].to_list() == [7], out.frame
""",
    "rabbitmq": """
import rstream
from connectors.rabbitmq import RabbitMQStreamSinkSpec, RabbitMQStreamSourceSpec
import microstream as ms
assert callable(ms.scan_rabbitmq_stream)
""",
    "pubsub": """
from google.cloud import pubsub_v1
from connectors.pubsub import PubSubSinkSpec, PubSubSourceSpec
import microstream as ms
try:
    ms.scan_pubsub("my-subscription")
except ValueError as exc:
    assert "projects/<project>/subscriptions/<name>" in str(exc), exc
else:
    raise AssertionError("a malformed subscription name was accepted")
""",
    "metrics": """
import urllib.request, microstream as ms
with ms.start_metrics_server(0) as server:
    page = urllib.request.urlopen(server.url).read().decode()
assert "# TYPE microstream_input_rows_total counter" in page, page[:300]
""",
    "otel": """
from opentelemetry.sdk.metrics import MeterProvider
import microstream.metrics.otel
""",
    "ray": CORE.replace(
        "trigger=ms.Trigger.available_now()",
        "trigger=ms.Trigger.available_now(), runtime=ms.RayRuntime(num_workers=1)",
    ).replace(
        "import tempfile,",
        "import ray; ray.init(num_cpus=1, include_dashboard=False)\nimport tempfile,",
    ),
    "sql": """
import polars as pl, microstream as ms
prices = pl.DataFrame({"item": ["a", "b"], "price": [3, 7]})
assert ms.sql("SELECT item FROM prices WHERE price > 5").collect().rows() == [("b",)]
""",
    "ui": """
import urllib.request, json, microstream as ms
with ms.start_ui(port=0) as ui:
    body = json.loads(urllib.request.urlopen(ui.url + "api/queries").read())
assert isinstance(body, (list, dict)), body
""",
}
PROMISES["all"] = "\n".join(PROMISES[extra] for extra in PROMISES if extra)


def wheel() -> Path:
    wheels = sorted((ROOT / "dist").glob("microstream-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"check_extras: expected one wheel in dist/ (run `make package`), found {wheels}")
    return wheels[0]


def check(extra: str, uv: str, python: str) -> float:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"extra-{extra or 'core'}-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([uv, "venv", "-q", "-p", python, str(venv)], check=True)
        requirement = f"{wheel()}[{extra}]" if extra else str(wheel())
        subprocess.run(
            [uv, "pip", "install", "-q", "-p", str(venv / "bin" / "python"), requirement],
            check=True,
        )
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-c", PROMISES[extra]],
            cwd=tmp,
            capture_output=True,
            check=False,
            text=True,
        )
        if result.returncode != 0:
            sys.exit(
                f"check_extras: {requirement} does not work on its own:\n{result.stderr[-3000:]}"
            )
    return time.perf_counter() - started


def main(argv: list[str]) -> None:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    extras = argv or list(PROMISES)
    unknown = [e for e in extras if e not in PROMISES]
    if unknown:
        sys.exit(f"check_extras: no check for extras {unknown}; known: {list(PROMISES)}")
    for extra in extras:
        seconds = check(extra, uv, sys.executable)
        name = f"microstream[{extra}]" if extra else "microstream"
        print(f"{name}: installs alone and works ({seconds:.1f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
