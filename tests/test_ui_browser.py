"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright.

``make test`` installs ``/usr/bin/chromium`` with apt before pytest runs; the
test is skipped only when that binary is absent. Playwright is used with that
executable (never ``playwright install``, which downloads a browser). The page
is loaded while a query runs; the numbers it shows are compared with
``last_progress``, value for value, from the ``data-value`` attributes the
page's script fills; a batch that runs later must appear without a reload; the
state table must be ``ms.read_state``'s. It takes a screenshot; with
``MICROSTREAM_UPDATE_SCREENSHOT=1`` that becomes the one the README shows
(``docs/images/dashboard.png``), so a plain test run leaves the tree unchanged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pytest

import microstream as ms

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "dashboard.png"
SCHEMA = {"ts": pl.Datetime("us"), "user": pl.String, "amount": pl.Int64}
USERS = ["ana", "bo", "chen", "dara"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"headless Chromium is not installed at {CHROMIUM}: `make test` installs it "
            "(apt-get install chromium), or install it by hand to run the browser test"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1300, "height": 900},
        )
        yield context
        context.close()


def batch(start: datetime, n: int, *, late: int = 0) -> pl.DataFrame:
    """``n`` purchases 7 s apart from ``start``, and ``late`` rows ten minutes earlier."""
    times = [start + timedelta(seconds=7 * i) for i in range(n)]
    times += [start - timedelta(minutes=10)] * late
    return pl.DataFrame(
        {
            "ts": times,
            "user": [USERS[i % len(USERS)] for i in range(len(times))],
            "amount": [(i * 37) % 100 for i in range(len(times))],
        },
        schema=SCHEMA,
    )


def shown(page: Page) -> dict[str, str]:
    """Every ``data-value`` on the page, by element id, read in one go (one render)."""
    values: dict[str, str] = page.evaluate(
        "() => Object.fromEntries(Array.from(document.querySelectorAll('[id][data-value]'),"
        " (el) => [el.id, el.dataset.value]))"
    )
    return values


def check_numbers(page: Page, last: ms.QueryProgress) -> None:
    """The page shows exactly ``last`` (one batch's progress)."""
    values = shown(page)
    assert int(values["batch-id"]) == last.batch_id
    assert int(values["input-rows"]) == last.num_input_rows
    assert int(values["output-rows"]) == last.num_output_rows
    assert float(values["input-rate"]) == last.input_rows_per_second
    assert float(values["processed-rate"]) == last.processed_rows_per_second
    for phase, ms_spent in last.durations_ms.model_dump().items():
        assert float(values[f"duration-{phase}"]) == ms_spent, phase
    assert int(values["late-rows"]) == sum(op.num_rows_dropped_late for op in last.state_operators)
    assert last.watermark is not None
    watermark = datetime.fromisoformat(values["watermark"].replace("Z", "+00:00"))
    assert watermark == last.watermark
    wall_clock = datetime.fromisoformat(values["wall-clock"])
    assert float(values["watermark-lag"]) == (wall_clock - last.watermark).total_seconds()
    [operator] = last.state_operators
    cells = page.eval_on_selector_all(
        f'#state-operators tr[data-operator="{operator.operator_id}"] td[data-field]',
        "(tds) => Object.fromEntries(tds.map((td) => [td.dataset.field, td.dataset.value]))",
    )
    assert cells == {
        "kind": operator.kind,
        "num_rows_total": str(operator.num_rows_total),
        "memory_bytes": str(operator.memory_bytes),
        "num_rows_updated": str(operator.num_rows_updated),
        "num_rows_removed": str(operator.num_rows_removed),
        "num_rows_dropped_late": str(operator.num_rows_dropped_late),
    }
    [source] = last.sources
    assert page.get_attribute('#sources tr[data-source="0"] td[data-field="lag"]', "data-value") == str(source.lag)  # fmt: skip
    assert page.text_content('#sources tr[data-source="0"] td[data-field="description"]') == source.description  # fmt: skip


def state_table(page: Page) -> tuple[list[str], list[tuple[str, ...]]]:
    table: dict[str, Any] = page.evaluate(
        "() => { const t = document.getElementById('state-table');"
        " return { head: Array.from(t.tHead.rows[0].cells, (c) => c.textContent),"
        " rows: Array.from(t.tBodies[0].rows, (r) => Array.from(r.cells, (c) => c.textContent)) }; }"
    )
    return table["head"], [tuple(row) for row in table["rows"]]


def test_dashboard_in_chromium(browser: BrowserContext, tmp_path: Path) -> None:
    session = ms.Session()  # its own memory tables too: the name below is free
    name = "spend_per_user_minute"
    stream = ms.MemoryStream(SCHEMA)
    query = (
        stream.lazy()
        .with_watermark("ts", "30s")
        .group_by_dynamic("ts", every="1m", group_by="user")
        .agg(pl.col("amount").sum().alias("spent"), pl.len().alias("purchases"))
        .sink_memory(name, checkpoint=str(tmp_path / "cp"), session=session)
    )
    # Event times a few minutes behind the wall clock, so the watermark chart means something.
    start = datetime.now(timezone.utc).replace(tzinfo=None, second=0, microsecond=0)
    start -= timedelta(minutes=25)
    for i, n in enumerate([12, 30, 18, 44, 25, 36]):  # each batch after the one before
        stream.add_data(batch(start, n, late=2 if i == 3 else 0))
        start += timedelta(seconds=7 * n)
        query.process_all_available()
    requests: list[str] = []
    navigations: list[str] = []
    with ms.start_ui(port=0, session=session) as ui:
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(ui.url)
        link = page.locator(f'#queries tr[data-key="run-{query.run_id}"] a')
        assert link.text_content() == name
        link.click()
        page.wait_for_url(f"{ui.url}query/run-{query.run_id}")
        page.on("framenavigated", lambda frame: navigations.append(frame.url))

        last = query.last_progress
        assert last is not None
        page.wait_for_selector(f'#batch-id[data-value="{last.batch_id}"]', timeout=10_000)
        check_numbers(page, last)
        assert int(shown(page)["late-rows-recent"]) == 2
        assert page.text_content("#plan") == query.explain_text()
        assert (page.text_content("#error"), shown(page)["error"]) == ("none", "")
        assert page.locator("#chart-rates svg polyline").count() == 2
        assert page.locator("#chart-durations svg rect").count() > 6 * 3

        # A new batch appears without a reload: the page's own state survives.
        page.evaluate("() => { window.sameDocument = 'yes'; }")
        stream.add_data(batch(start, 20))
        query.process_all_available()
        newer = query.last_progress
        assert newer is not None and newer.batch_id > last.batch_id
        page.wait_for_selector(f'#batch-id[data-value="{newer.batch_id}"]', timeout=10_000)
        check_numbers(page, newer)
        assert page.evaluate("() => window.sameDocument") == "yes"
        assert navigations == []

        # The state table is what ms.read_state reads from the checkpoint.
        page.wait_for_selector(f'#state-table[data-batch-id="{newer.batch_id}"]', timeout=10_000)
        head, rows = state_table(page)
        expected = ms.read_state(tmp_path / "cp", operator="op0")
        assert head == expected.columns
        assert sorted(rows) == sorted(tuple(str(v) for v in row) for row in expected.rows())
        assert len(rows) == expected.height > 0
        assert query.last_progress.batch_id == newer.batch_id  # nothing ran meanwhile

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        page.close()
    query.stop()
    assert requests and all(url.startswith(ui.url) for url in requests), requests
    assert shot.stat().st_size > 10_000
    if os.environ.get("MICROSTREAM_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
