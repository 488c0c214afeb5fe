"""Charts of the dashboard, drawn on the server as inline SVG.

The page loads nothing from anywhere but its own server, so there is no chart
library: a chart is a few dozen SVG elements built here from numbers, with every
label escaped (series names come from user code: source descriptions, operator
ids). The browser puts the markup in place; it runs no script of ours inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from xml.sax.saxutils import escape, quoteattr

__all__ = ["clock_label", "line_chart", "number_label", "stacked_bar_chart"]

WIDTH, HEIGHT = 460, 200
LEFT, RIGHT, TOP, BOTTOM = 64, 10, 38, 22
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")

Series = Sequence[tuple[str, Sequence[float | None]]]


def number_label(value: float) -> str:
    """A short axis label: ``1.2k``, ``35``, ``0.25``.

    Examples
    --------
    >>> number_label(1234.0), number_label(35.0), number_label(0.25), number_label(2.5e6)
    ('1.2k', '35', '0.25', '2.5M')
    """
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.1f}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.0f}k"
    if magnitude >= 1e3:
        return f"{value / 1e3:.1f}k"
    if magnitude >= 10 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2g}"


def clock_label(epoch_s: float) -> str:
    """An axis label for a time given in seconds since the epoch: ``HH:MM:SS`` (UTC).

    Examples
    --------
    >>> clock_label(3661.0)
    '01:01:01'
    """
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%H:%M:%S")


def line_chart(
    xs: Sequence[int],
    series: Series,
    *,
    title: str,
    y_format: Callable[[float], str] = number_label,
) -> str:
    """One line per series over the batch ids ``xs``; a None value breaks its line.

    Examples
    --------
    >>> svg = line_chart([0, 1, 2], [("rows/s", [1.0, 4.0, 2.0])], title="Rate")
    >>> svg.startswith("<svg") and "<polyline" in svg and "Rate" in svg
    True
    """
    values = [v for _, ys in series for v in ys if v is not None]
    parts = _frame(title, series, xs, values, y_format)
    if not values:
        return _close(parts)
    scale = _Scale(xs, values)
    for i, (_, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        for run in _runs(xs, ys):
            points = " ".join(f"{scale.x(x):.1f},{scale.y(y):.1f}" for x, y in run)
            if len(run) == 1:  # a single batch is a dot, not an invisible line
                x, y = run[0]
                parts.append(
                    f'<circle cx="{scale.x(x):.1f}" cy="{scale.y(y):.1f}" r="2.5" fill="{color}"/>'
                )
            else:
                parts.append(
                    f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.6"/>'
                )
    return _close(parts)


def stacked_bar_chart(xs: Sequence[int], series: Series, *, title: str) -> str:
    """One bar per batch id in ``xs``, stacked from the series' values (None counts as 0).

    Examples
    --------
    >>> svg = stacked_bar_chart([0, 1], [("read", [1.0, 2.0]), ("sink", [3.0, 0.5])], title="ms")
    >>> svg.count("<rect") - 3  # one per non-zero part; the others: background, 2 legend keys
    4
    """
    totals = [sum((ys[i] or 0.0) for _, ys in series) for i in range(len(xs))]
    parts = _frame(title, series, xs, [*totals, 0.0] if xs else [], number_label)
    if not xs or max(totals, default=0.0) <= 0:
        return _close(parts)
    scale = _Scale([min(xs) - 0.5, max(xs) + 0.5], [0.0, *totals])  # room for the end bars
    width = max(1.0, min(18.0, (WIDTH - LEFT - RIGHT) / len(xs) * 0.8))
    for i, x in enumerate(xs):
        bottom = 0.0
        for j, (_, ys) in enumerate(series):
            value = ys[i] or 0.0
            if value <= 0:
                continue
            top = bottom + value
            y0, y1 = scale.y(bottom), scale.y(top)
            parts.append(
                f'<rect x="{scale.x(x) - width / 2:.1f}" y="{y1:.1f}" width="{width:.1f}" '
                f'height="{max(y0 - y1, 0.5):.1f}" fill="{PALETTE[j % len(PALETTE)]}"/>'
            )
            bottom = top
    return _close(parts)


class _Scale:
    """Maps batch ids and values to pixels inside the plot area."""

    def __init__(self, xs: Sequence[float], values: Sequence[float]):
        self.x0, self.x1 = min(xs), max(xs)
        self.y0, self.y1 = _padded(min(values), max(values))

    def x(self, x: float) -> float:
        span = self.x1 - self.x0
        if span == 0:
            return (LEFT + WIDTH - RIGHT) / 2
        return LEFT + (x - self.x0) / span * (WIDTH - LEFT - RIGHT)

    def y(self, y: float) -> float:
        return HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)


def _padded(low: float, high: float) -> tuple[float, float]:
    # A flat series gets a band around it, so it is drawn mid-height, not on an edge.
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high


def _frame(
    title: str,
    series: Series,
    xs: Sequence[int],
    values: Sequence[float],
    y_format: Callable[[float], str],
) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label={quoteattr(title)}>',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="14" font-size="12" font-weight="bold" fill="#222">{escape(title)}</text>',
    ]
    legend_x = float(LEFT)  # the legend: one line under the title
    for i, (name, _) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<rect x="{legend_x:.0f}" y="20" width="9" height="9" fill="{color}"/>')
        parts.append(
            f'<text x="{legend_x + 12:.0f}" y="28" font-size="10" fill="#444">{escape(name)}</text>'
        )
        legend_x += 12 + 6.2 * len(name) + 10
    axis_y = HEIGHT - BOTTOM
    parts.append(
        f'<line x1="{LEFT}" y1="{axis_y}" x2="{WIDTH - RIGHT}" y2="{axis_y}" stroke="#999"/>'
    )
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{axis_y}" stroke="#999"/>')
    if not values:
        parts.append(
            f'<text x="{(LEFT + WIDTH) / 2:.0f}" y="{HEIGHT / 2:.0f}" font-size="11" '
            'fill="#888" text-anchor="middle">no data yet</text>'
        )
        return parts
    scale = _Scale(xs or [0], values)
    for value in (scale.y0, (scale.y0 + scale.y1) / 2, scale.y1):
        y = scale.y(value)
        parts.append(
            f'<text x="{LEFT - 4}" y="{y + 3:.1f}" font-size="10" fill="#555" '
            f'text-anchor="end">{escape(y_format(value))}</text>'
        )
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
        )
    if xs:
        for x, anchor in ((min(xs), "start"), (max(xs), "end")):
            parts.append(
                f'<text x="{scale.x(x):.1f}" y="{HEIGHT - 6}" font-size="10" fill="#555" '
                f'text-anchor="{anchor}">batch {x}</text>'
            )
    return parts


def _close(parts: list[str]) -> str:
    return "".join([*parts, "</svg>"])


def _runs(xs: Sequence[int], ys: Sequence[float | None]) -> list[list[tuple[int, float]]]:
    """The stretches of consecutive non-None values, each drawn as one line."""
    runs: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    for x, y in zip(xs, ys):
        if y is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append((x, y))
    if current:
        runs.append(current)
    return runs
