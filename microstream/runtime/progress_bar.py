"""A progress bar for a query working through a backlog, in a terminal or a notebook.

The bar is a query listener: every progress event of the query it follows
updates it. How much is done comes from the sources' lag: each batch reports
how far it moved every source (``SourceProgress.num_input_units``) and how
much is left (``SourceProgress.lag``), in the source's own units (Kafka
offsets, files, Delta files), so ``done / (done + left)`` is the share of the
backlog read; with several sources the bar shows the mean of their shares. A
source without a lag gives a bar without a percentage (counts only).

In a terminal the bar redraws one line on stderr; in a Jupyter notebook it
updates one HTML output (no widget library needed); elsewhere (logs, CI) it
prints a line at most every few seconds and a last one at the end.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from microstream.api.session import Session, default_session

if TYPE_CHECKING:
    from types import TracebackType

    from microstream.api.query import StreamingQuery
    from microstream.runtime.progress import QueryProgress, QueryProgressEvent, QueryTerminatedEvent

__all__ = ["ProgressBar", "in_notebook"]

BAR_WIDTH = 24
"""Characters of the bar itself in text form."""

LOG_INTERVAL_S = 5.0
"""Where the output is no terminal: at most one line this often."""


class ProgressBar:
    """Show how far a query is through its backlog, batch after batch.

    Use it around a query started with ``Trigger.available_now()`` (the
    scheduled-job mode, a backfill, a replay): it subscribes to the query's
    progress events, redraws on every batch, and draws a last line when the
    query terminates or the bar is closed. :func:`microstream.replay` shows one
    by default.

    Parameters
    ----------
    query
        The query to follow (its batches before the bar was created count too).
    label
        Text before the bar (default: the query's name or id).
    file
        Where text goes (default: ``sys.stderr``).
    notebook
        Draw as an HTML output in a Jupyter notebook (default: when running
        in one).
    session
        The session whose events the query posts (default: the default one).

    Examples
    --------
    >>> import io
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"x": pl.Int64})
    >>> for i in range(4):
    ...     _ = stream.add_data({"x": [i, i]})
    >>> query = stream.lazy().sink_memory("doc_bar", trigger=ms.Trigger.available_now())
    >>> out = io.StringIO()
    >>> with ms.ProgressBar(query, label="backfill", file=out, notebook=False) as bar:
    ...     _ = query.await_termination()
    >>> bar.fraction
    1.0
    >>> print(out.getvalue().strip())  # doctest: +ELLIPSIS
    backfill [########################] 100.0% done · 1 batch · 8 rows in · 8 out · lag 0 · ...
    """

    def __init__(
        self,
        query: StreamingQuery,
        *,
        label: str | None = None,
        file: TextIO | None = None,
        notebook: bool | None = None,
        session: Session | None = None,
    ) -> None:
        self.query = query
        self.label = label or query.name or query.id[:8]
        self._file = file if file is not None else sys.stderr
        self._session = session or default_session
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._done_units: list[int | None] = []
        self._lag: list[int | None] = []
        self._batches = 0
        self._rows_in = 0
        self._rows_out = 0
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._closed = False
        self._status = "running"
        self._is_tty = bool(getattr(self._file, "isatty", lambda: False)())
        self._display: Any = _notebook_display() if notebook is not False else None
        if notebook and self._display is None:
            self._display = _notebook_display(force=True)
        self._session.add_listener(self)
        with self._lock:
            for progress in query.recent_progress:  # batches that ran before the bar existed
                self._add(progress)
        self._draw(force=True)
        if not query.is_active:
            self.close()

    # -- what the bar knows -------------------------------------------------------------

    @property
    def fraction(self) -> float | None:
        """Share of the backlog read (0 to 1), or None if a source reports no lag."""
        with self._lock:
            return self._fraction()

    def _fraction(self) -> float | None:
        if not self._lag or any(x is None for x in (*self._lag, *self._done_units)):
            return None
        shares = []
        for done, left in zip(self._done_units, self._lag):
            assert done is not None and left is not None
            total = done + left
            shares.append(1.0 if total == 0 else done / total)
        return sum(shares) / len(shares)

    def text(self) -> str:
        """The bar as one line of text."""
        with self._lock:
            return self._text()

    def _text(self) -> str:
        fraction = self._fraction()
        elapsed = time.monotonic() - self._started
        if fraction is None:
            bar, pct = "?" * BAR_WIDTH, "    ?%"
        else:
            filled = round(fraction * BAR_WIDTH)
            bar, pct = "#" * filled + "-" * (BAR_WIDTH - filled), f"{fraction * 100:5.1f}%"
        lags = [x for x in self._lag if x is not None]
        lag = f"{sum(lags):,}" if self._lag and len(lags) == len(self._lag) else "?"
        batches = f"{self._batches:,} batch{'es' if self._batches != 1 else ''}"
        parts = [
            f"{self.label} [{bar}] {pct} {self._status}",
            batches,
            f"{self._rows_in:,} rows in",
            f"{self._rows_out:,} out",
            f"lag {lag}",
            f"{self._rows_in / elapsed if elapsed > 0 else 0:,.0f} rows/s",
            f"{elapsed:.1f}s",
        ]
        if self._status == "running" and fraction is not None and 0 < fraction < 1:
            parts.append(f"eta {elapsed * (1 - fraction) / fraction:.0f}s")
        return " · ".join(parts)

    def _add(self, progress: QueryProgress) -> bool:
        if progress.run_id != self.query.run_id or progress.batch_id in self._seen:
            return False
        self._seen.add(progress.batch_id)
        if len(self._done_units) != len(progress.sources):
            self._done_units = [0] * len(progress.sources)
        for i, source in enumerate(progress.sources):
            done = self._done_units[i]
            units = source.num_input_units
            self._done_units[i] = None if done is None or units is None else done + units
        self._lag = [s.lag for s in progress.sources]
        self._batches += 1
        self._rows_in += progress.num_input_rows
        self._rows_out += progress.num_output_rows
        return True

    # -- listener callbacks ------------------------------------------------------------------

    def on_query_progress(self, event: QueryProgressEvent) -> None:
        """Count the batch and redraw (called on the query's thread)."""
        with self._lock:
            added = not self._closed and self._add(event.progress)
        if added:
            self._draw()

    def on_query_terminated(self, event: QueryTerminatedEvent) -> None:
        """Draw the last state and stop listening."""
        if event.run_id == self.query.run_id:
            self.close(failed=event.exception is not None)

    # -- drawing -----------------------------------------------------------------------------

    def _draw(self, *, force: bool = False, final: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            interval = 0.1 if (self._display is not None or self._is_tty) else LOG_INTERVAL_S
            if not (force or final) and now - self._last_draw < interval:
                return
            self._last_draw = now
            line = self._text()
            fraction = self._fraction()
        if self._display is not None:
            self._display.show(line, fraction)
        elif self._is_tty:
            self._file.write("\r" + line + ("\n" if final else "\x1b[K"))
            self._file.flush()
        elif final or not force:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self, *, failed: bool | None = None) -> None:
        """Draw the final line and stop listening (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for progress in self.query.recent_progress:  # events that raced the subscription
                self._add(progress)
            if failed is None:
                failed = self.query.exception() is not None
            self._status = "failed" if failed else "done" if not self.query.is_active else "stopped"
        self._session.remove_listener(self)
        self._draw(final=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=True if exc is not None else None)


class _NotebookDisplay:
    """One HTML output in a Jupyter notebook, replaced on every update."""

    def __init__(self) -> None:
        from IPython.display import display

        self._handle: Any = display(_Rendered("", None), display_id=True)

    def show(self, line: str, fraction: float | None) -> None:
        self._handle.update(_Rendered(line, fraction))


class _Rendered:
    """The bar as HTML (``<progress>``) with its text line as the plain-text form."""

    def __init__(self, line: str, fraction: float | None) -> None:
        self.line = line
        self.fraction = fraction

    def _repr_html_(self) -> str:
        import html

        value = "" if self.fraction is None else f' value="{self.fraction:.4f}"'
        return (
            f'<div><progress max="1"{value} style="width: 24em"></progress> '
            f"<code>{html.escape(self.line)}</code></div>"
        )

    def __repr__(self) -> str:
        return self.line


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (which can show HTML outputs).

    Examples
    --------
    >>> in_notebook()
    False
    """
    shell = _ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _ipython() -> Any:
    if "IPython" not in sys.modules:  # not imported: no IPython is running
        return None
    from IPython import get_ipython

    return get_ipython()


def _notebook_display(*, force: bool = False) -> _NotebookDisplay | None:
    """A display in the running Jupyter kernel (any IPython with ``force``), or None."""
    if in_notebook() or (force and _ipython() is not None):
        return _NotebookDisplay()
    return None
