"""The API reference: which objects each page documents, and the pages themselves.

Run by mkdocs-gen-files at every build (``mkdocs.yml``). The pages hold nothing but
mkdocstrings directives (``::: microstream.scan_files``): every word of the reference
comes from the docstrings. :data:`PAGES` is the one list of what is documented where;
a name of ``microstream.__all__`` that no page documents fails the build
(:func:`check_every_public_name`), and ``tests/docs/test_reference.py`` checks the same.

This file also puts on the site what lives outside ``docs/``: the executed notebooks
(rendered by mkdocs-jupyter, never executed by the build), the checkpoint format
(``checkpoints/README.md``, the one copy of it) and the Nexmark table of
``benchmarks/README.md`` on the benchmarks page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Entry:
    """One documented object: its import path, and the options its directive needs."""

    path: str
    options: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    """One page of the reference."""

    slug: str
    title: str
    intro: str
    entries: tuple[Entry, ...]


def _e(*paths: str, **options: object) -> tuple[Entry, ...]:
    return tuple(Entry(p, dict(options)) for p in paths)


_ERRORS = (
    "MicrostreamError",
    "PlanError",
    "PlanChangedError",
    "EventTimeError",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointConflictError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointStorageError",
    "SourceError",
    "DataLossError",
    "OffsetError",
    "SchemaMismatchError",
    "SinkError",
    "OutputError",
    "ReplayError",
    "QueryTerminatedError",
    "MissingDependencyError",
    "UnboundedStateWarning",
)

PAGES: tuple[Page, ...] = (
    Page(
        "sources",
        "Sources",
        "The `scan_*` functions start a stream from a connector; their options are the "
        "connector spec's (the same text as `help(ms.scan_files)`). `MemoryStream` feeds "
        "a stream from the test or notebook itself; `concat` unions streams.",
        _e(
            "microstream.scan_files",
            "microstream.scan_delta",
            "microstream.scan_kafka",
            "microstream.scan_kinesis",
            "microstream.scan_postgres_cdc",
            "microstream.scan_pubsub",
            "microstream.scan_rabbitmq_stream",
            "microstream.scan_rate",
            "microstream.scan_socket",
            "connectors.memory.MemoryStream",
            "microstream.concat",
        ),
    ),
    Page(
        "streamframe",
        "StreamFrame",
        "A `StreamFrame` is a query over a stream, built with Polars' verbs. What "
        "`group_by`, `group_by_dynamic` and `group_by_session` return is on "
        "[Grouping and windows](windows.md); the sink verbs that start a query are on "
        "[Sinks](sinks.md).",
        (
            Entry(
                "microstream.StreamFrame",
                {"inherited_members": ["join", "join_asof", "join_where", "match_recognize"]},
            ),
        ),
    ),
    Page(
        "windows",
        "Grouping and windows",
        "The objects `group_by` (global and event-time-key aggregations, Top-N, stateful "
        "functions), `group_by_dynamic` (tumbling, sliding and cumulative windows) and "
        "`group_by_session` (session windows) return; their `agg` gives a `StreamFrame`.",
        _e(
            "microstream.api.groupby.StreamGroupBy",
            "microstream.api.groupby.StreamDynamicGroupBy",
            "microstream.api.groupby.StreamSessionGroupBy",
        ),
    ),
    Page(
        "sinks",
        "Sinks",
        "Every sink verb of a `StreamFrame` starts the query and returns its "
        "[StreamingQuery](queries.md). `sink(spec)` takes any sink spec, a third party's "
        "included. The functions after the verbs read and maintain what the sinks wrote.",
        (
            Entry(
                "microstream.api.sinks.SinkVerbs",
                {"show_root_heading": True, "show_bases": False},
            ),
            Entry("microstream.api.message_sinks.MessageSinkVerbs", {"show_bases": False}),
            *_e(
                "microstream.table",
                "microstream.read_file_sink",
                "microstream.optimize_delta",
                "microstream.vacuum_delta",
            ),
        ),
    ),
    Page(
        "connectors",
        "Connector specs",
        "Each connector declares its options once, as its spec's parameters: the "
        "`scan_*` functions and `sink_*` verbs call these. Pass a source spec to "
        "`StreamFrame.from_source` and a sink spec to `frame.sink(spec)` to use a "
        "connector directly, or your own one written to the protocols at the end "
        "(`connectors/README.md` in the repository is the contract).",
        (
            *_e(
                "connectors.files.FileSourceSpec",
                "connectors.delta_source.DeltaSourceSpec",
                "connectors.rate.RateSourceSpec",
                "connectors.kafka.KafkaSourceSpec",
                "connectors.kinesis.KinesisSourceSpec",
                "connectors.postgres.PostgresCdcSourceSpec",
                "connectors.rabbitmq.RabbitMQStreamSourceSpec",
                "connectors.pubsub.PubSubSourceSpec",
                "connectors.socket_source.SocketSourceSpec",
                "connectors.file_sink.FileSinkSpec",
                "connectors.delta.DeltaSinkSpec",
                "connectors.memory.MemorySinkSpec",
                "connectors.console.ConsoleSinkSpec",
                "connectors.foreach_batch.ForeachBatchSinkSpec",
                "connectors.kafka.KafkaSinkSpec",
                "connectors.kinesis.KinesisSinkSpec",
                "connectors.postgres.PostgresSinkSpec",
                "connectors.rabbitmq.RabbitMQStreamSinkSpec",
                "connectors.pubsub.PubSubSinkSpec",
                "connectors.http.HttpSinkSpec",
                show_bases=False,
            ),
            *_e(
                "microstream.protocols.SourceSpec",
                "microstream.protocols.Source",
                "microstream.protocols.SinkSpec",
                "microstream.protocols.Sink",
                "microstream.protocols.Offset",
            ),
        ),
    ),
    Page(
        "triggers",
        "Triggers",
        "When a micro-batch starts: as fast as possible (the default), at an interval, "
        "once, or everything available now and then stop.",
        _e("microstream.Trigger"),
    ),
    Page(
        "queries",
        "Queries",
        "A running query, the session that tracks the queries of this process and the "
        "listeners it calls (with the events of [progress](progress.md)).",
        _e(
            "microstream.StreamingQuery",
            "microstream.QueryStatus",
            "microstream.active",
            "microstream.add_listener",
            "microstream.remove_listener",
            "microstream.StreamingQueryListener",
            "microstream.Session",
            "microstream.ProgressBar",
        ),
    ),
    Page(
        "progress",
        "Progress records",
        "What every batch reports: pydantic models, in `query.last_progress` and "
        "`recent_progress`, one JSON line per batch in the checkpoint's `progress/`, "
        "and the events listeners receive.",
        (
            *_e("microstream.QueryProgress"),
            *_e(
                "microstream.runtime.progress.BatchDurations",
                "microstream.runtime.progress.SourceProgress",
                "microstream.runtime.progress.StateOperatorProgress",
                "microstream.runtime.progress.SinkProgress",
                "microstream.runtime.progress.QueryStartedEvent",
                "microstream.runtime.progress.QueryProgressEvent",
                "microstream.runtime.progress.QueryIdleEvent",
                "microstream.runtime.progress.QueryTerminatedEvent",
            ),
        ),
    ),
    Page(
        "state",
        "State and stateful functions",
        "What `map_groups_with_state` and `map_batches_with_state` hand to your function, "
        "and how to read an operator's state or a checkpoint from outside the query.",
        _e(
            "microstream.GroupState",
            "microstream.StateContext",
            "microstream.read_state",
            "microstream.Checkpoint",
        ),
    ),
    Page(
        "sql",
        "SQL and pattern matching",
        "Flink SQL over streams and frames (`pip install 'microstream[sql]'`), and the "
        "helpers of `StreamFrame.match_recognize` in DEFINE and MEASURES.",
        (
            *_e("microstream.sql.sql", "microstream.sql.context.SQLContext"),
            Entry("microstream.pattern", {"show_submodules": False}),
            *_e("microstream.match_recognize_static"),
        ),
    ),
    Page(
        "runtimes",
        "Runtimes",
        "Where a query's stages run: this process (`LocalRuntime`, the default) or a Ray "
        "cluster (`RayRuntime`, `pip install 'microstream[ray]'`). Pass one as `runtime=` "
        "to any sink verb.",
        _e("microstream.Runtime", "microstream.LocalRuntime", "microstream.RayRuntime"),
    ),
    Page(
        "replay",
        "Replay and versioned outputs",
        "Kappa-style reprocessing: run a query again over its sources' history into a "
        "new version of its output, and switch readers over atomically.",
        _e(
            "microstream.replay",
            "microstream.ReplayResult",
            "microstream.current_output",
            "microstream.read_output",
            "microstream.switch_output",
            "microstream.OutputPointer",
        ),
    ),
    Page(
        "operating",
        "Metrics and dashboard",
        "Exporting every query's progress as Prometheus or OpenTelemetry metrics, and the "
        "read-only web dashboard.",
        _e(
            "microstream.start_metrics_server",
            "microstream.MetricsServer",
            "microstream.OpenTelemetryListener",
            "microstream.start_ui",
            "microstream.Dashboard",
        ),
    ),
    Page(
        "testing",
        "Testing helpers",
        "`microstream.testing` starts, for a test, the services a pipeline talks to: each "
        "on a free port of 127.0.0.1, each a context manager.",
        (
            Entry("microstream.testing", {"show_submodules": False, "members": False}),
            *_e(
                "microstream.testing.tansu.TansuBroker",
                "microstream.testing.moto_s3.MotoS3Server",
                "microstream.testing.moto_s3.S3Bucket",
                "microstream.testing.postgres.PostgresServer",
                "microstream.testing.rabbitmq.RabbitMQServer",
                "microstream.testing.pubsub.PubSubEmulator",
                "microstream.testing.http_server.RecordingHttpServer",
                "microstream.testing.http_server.Reply",
                "microstream.testing.line_server.LineServer",
                "microstream.testing.tcp_proxy.TcpProxy",
            ),
        ),
    ),
    Page(
        "errors",
        "Errors and warnings",
        "Every error microstream raises subclasses `MicrostreamError`; its message names "
        "what was wrong, where, and what to do.",
        _e(*(f"microstream.{name}" for name in _ERRORS), show_bases=True),
    ),
)

ALIASES = {
    "MemoryStream": "connectors.memory.MemoryStream",
    "SQLContext": "microstream.sql.context.SQLContext",
    "sql": "microstream.sql.sql",
}
"""Public names documented where they are defined (``microstream`` loads them lazily)."""


def documented_public_names() -> set[str]:
    """The names of ``microstream.__all__`` that a reference page documents."""
    import importlib.util

    targets = {entry.path for page in PAGES for entry in page.entries}
    names = {
        p.removeprefix("microstream.")
        for p in targets
        # a subpackage (microstream.testing) is documented too, but is no name of __all__
        if p.startswith("microstream.")
        and p.count(".") == 1
        and importlib.util.find_spec(p) is None
    }
    names |= {name for name, path in ALIASES.items() if path in targets}
    return names


def check_every_public_name() -> None:
    """Fail when a public name is in no page, or a page names one that is not public."""
    import microstream

    missing = sorted(set(microstream.__all__) - documented_public_names())
    if missing:
        msg = (
            f"docs/_tools/reference.py: {missing} in microstream.__all__ but on no page of "
            "the API reference: add each to a Page of PAGES"
        )
        raise SystemExit(msg)


def _directive(entry: Entry) -> str:
    lines = [f"::: {entry.path}"]
    if entry.options:
        lines.append("    options:")
        for key, value in entry.options.items():
            rendered = str(value).lower() if isinstance(value, bool) else value
            if isinstance(value, list):
                rendered = "[" + ", ".join(str(v) for v in value) + "]"
            lines.append(f"      {key}: {rendered}")
    return "\n".join(lines)


def page_markdown(page: Page) -> str:
    """The markdown of one reference page: its title, its intro, its directives."""
    body = "\n\n".join(_directive(entry) for entry in page.entries)
    return f"# {page.title}\n\n{page.intro}\n\n{body}\n"


def index_markdown() -> str:
    rows = "\n".join(
        f"- [{page.title}]({page.slug}.md): "
        + ", ".join(f"`{e.path.rsplit('.', 1)[1]}`" for e in page.entries)
        for page in PAGES
    )
    return (
        "# API reference\n\n"
        "Generated from the docstrings of the installed code at every build (numpy "
        "style, with the examples that the test suite runs as doctests). `import "
        "microstream as ms` gives every name below that is not in a submodule.\n\n"
        f"{rows}\n\n"
        "The on-disk [checkpoint format](checkpoint-format.md) is part of the contract "
        "too: a change to it is a new format version.\n"
    )


_BARE_FENCE = re.compile(r"^```\s*$")


def checkpoint_format_markdown() -> str:
    """``checkpoints/README.md`` for the site: its untyped fences marked as text."""
    out: list[str] = []
    inside = False
    for line in (ROOT / "checkpoints" / "README.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("```"):
            out.append(line)
            continue
        out.append("```text" if not inside and _BARE_FENCE.match(line) else line)
        inside = not inside
    return "\n".join(out) + "\n"


NOTEBOOKS = ROOT / "notebooks"

_NEXMARK = ("<!-- nexmark-table:start -->", "<!-- nexmark-table:end -->")
_NEXMARK_PLACEHOLDER = re.compile(r"^<!-- nexmark-table:.*-->$", re.MULTILINE)


def benchmarks_markdown() -> str:
    """``docs/benchmarks.md`` with the Nexmark table of ``benchmarks/README.md`` in place.

    ``make bench`` rewrites that table (``benchmarks/nexmark/report.py``); the page takes
    it from there, so the two never disagree.
    """
    readme = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(_NEXMARK[0]) + len(_NEXMARK[0]), readme.index(_NEXMARK[1])
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    table = readme[start:end].strip()
    out, count = _NEXMARK_PLACEHOLDER.subn(lambda _: table, page)
    if count != 1:
        msg = "docs/benchmarks.md: expected one <!-- nexmark-table: ... --> line"
        raise SystemExit(msg)
    return out


def generate() -> None:
    """Write the generated pages into the build's virtual ``docs/`` (mkdocs-gen-files)."""
    import mkdocs_gen_files

    check_every_public_name()
    for page in PAGES:
        with mkdocs_gen_files.open(f"reference/{page.slug}.md", "w") as f:
            f.write(page_markdown(page))
    with mkdocs_gen_files.open("reference/index.md", "w") as f:
        f.write(index_markdown())
    with mkdocs_gen_files.open("reference/checkpoint-format.md", "w") as f:
        f.write(checkpoint_format_markdown())
    with mkdocs_gen_files.open("benchmarks.md", "w") as f:
        f.write(benchmarks_markdown())
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        with mkdocs_gen_files.open(f"notebooks/{notebook.name}", "wb") as f:
            f.write(notebook.read_bytes())


if __name__ in {"__main__", "<run_path>"}:
    generate()
