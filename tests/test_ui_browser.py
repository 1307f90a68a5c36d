"""The web UI in a real browser: Playwright for Python driving Debian's Chromium against a
server on a real socket. States are created through the server's API; the page must list
them, filter them, show a state's timeline, follow new commits live, and run an action.

Screenshots of the main views go to ``test-artifacts/ui/`` (not committed). Without
``/usr/bin/chromium`` (or Playwright) the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
from flowstate.drivers.net import NetDriver
from tests import netserver
from tests.pgutil import run_sync

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"
WAIT = 30_000  # ms: generous, these wait on conditions, they do not measure time


def _missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(WAIT)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == [], f"the page raised: {errors}"


def shot(pg: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def flows() -> fs.FlowRegistry:
    registry = fs.FlowRegistry()

    @registry.flow("work")
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.commit(fs.park(ctx))

    return registry


def serve(tmp_path: Path, **options: Any) -> str:
    backing = fs.SqliteDriver(tmp_path / "ui.db")
    return netserver.serve(backing, flows=flows(), **options).url


def through_api(url: str, run: Callable[[fs.Engine], Awaitable[None]], token: str = "") -> None:
    """Run ``run`` with an engine whose store is the server (engine -> NetDriver -> server)."""

    async def main() -> None:
        driver = NetDriver(url, token=token or None)
        async with fs.Engine(driver, recovery=False, delayer=False) as engine:
            await run(engine)

    run_sync(main)  # in a thread: Playwright's sync API owns this thread's event loop


def new(state_id: str, **labels: str) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(state_id, labels=labels))


async def seed_shop(engine: fs.Engine) -> None:
    a1 = new("order-1", app="shop")
    for to in ["pay", "ship"]:
        await engine.do(fs.commit(fs.transit(a1, to)))
    await engine.do(fs.commit(fs.end(a1)))
    a2 = new("order-2", app="shop")
    await engine.do(fs.commit(fs.transit(a2, "pay")))
    b1 = new("post-1", app="blog")
    await engine.do(fs.commit(fs.transit(b1, "review")))
    await engine.do(fs.commit(fs.park(b1)))


def row_ids(pg: Any) -> list[str]:
    ids: list[str] = pg.eval_on_selector_all(
        "#states-table tbody tr[data-id]", "rows => rows.map(r => r.dataset.id)"
    )
    return ids


def wait_rows(pg: Any, ids: list[str]) -> None:
    """Wait until the table shows exactly ``ids``, in order."""
    pg.wait_for_function(
        "ids => JSON.stringify([...document.querySelectorAll('#states-table tbody tr[data-id]')]"
        ".map(r => r.dataset.id)) === JSON.stringify(ids)",
        arg=ids,
    )


def test_states_are_listed_and_filtered(page: Any, tmp_path: Path) -> None:
    url = serve(tmp_path)
    through_api(url, seed_shop)
    page.goto(url + "/")
    wait_rows(page, ["post-1", "order-2", "order-1"])
    page.wait_for_selector("svg.graph g.node")
    shot(page, "states")

    page.fill("#f-labels", "app=blog | app=nothing")
    page.click("#apply")
    wait_rows(page, ["post-1"])
    assert "labels=app%3Dblog" in page.url and "labels=app%3Dnothing" in page.url

    page.click("text=Clear")
    wait_rows(page, ["post-1", "order-2", "order-1"])
    page.click("label.toggle.s-ended")  # a status toggle applies at once
    wait_rows(page, ["order-1"])
    page.click("label.toggle.s-running")
    wait_rows(page, ["order-2", "order-1"])

    page.click("text=Clear")
    wait_rows(page, ["post-1", "order-2", "order-1"])
    page.click('svg.graph g.node[data-node="pay"]')  # a node of the graph filters by its flow
    wait_rows(page, ["order-2"])
    assert page.get_attribute('svg.graph g.node[data-node="pay"]', "class").endswith("selected")
    page.click('svg.graph g.node[data-node="pay"]')  # and a second click lifts the filter
    wait_rows(page, ["post-1", "order-2", "order-1"])

    page.click("text=All revisions")
    wait_rows(page, ["post-1", "post-1", "order-2", "order-1", "order-1", "order-1"])


def test_state_detail_shows_the_timeline_a_diff_and_data(page: Any, tmp_path: Path) -> None:
    url = serve(tmp_path)
    blob = bytes(range(256))

    async def seed(engine: fs.Engine) -> None:
        ctx = new("doc-7", app="docs")
        ctx.set_data("note", fs.Data(b"hello from the store"))
        raw = fs.Data(blob)
        raw.binary = True
        ctx.set_data("raw", raw)
        await engine.do(
            fs.commit(fs.store_data(ctx, "note"), fs.store_data(ctx, "raw"), fs.transit(ctx, "a"))
        )
        ctx.current.labels["stage"] = "2"
        await engine.do(fs.commit(fs.transit(ctx, "b", {"reason": "checked"})))
        await engine.do(fs.commit(fs.park(ctx)))

    through_api(url, seed)
    page.goto(url + "/")
    page.click("text=doc-7")
    page.wait_for_selector("#timeline li.revision")
    assert page.inner_text("#state-id") == "doc-7"
    revs = page.eval_on_selector_all("#timeline li.revision", "li => li.map(x => x.dataset.rev)")
    assert revs == ["3", "2", "1"]
    assert "reason" in page.inner_text('#timeline li[data-rev="2"]')

    page.check('#timeline li[data-rev="1"] input.pick')
    page.check('#timeline li[data-rev="3"] input.pick')
    page.click("#compare")
    page.wait_for_selector("#diff table.diff")
    diff = page.inner_text("#diff")
    assert "From rev 1 to rev 3" in diff and "stage" in diff

    page.click('button[data-alias="note"]')
    page.wait_for_selector("#data-preview pre.text")
    assert page.inner_text("#data-preview pre.text") == "hello from the store"
    page.click('button[data-alias="raw"]')
    page.wait_for_selector("#data-preview pre.hex")
    assert page.inner_text("#data-preview pre.hex").startswith("00000000  00 01 02 03")
    shot(page, "detail")
    with page.expect_download() as info:
        page.click('#data li:has(button[data-alias="raw"]) >> text=download')
    assert Path(info.value.path()).read_bytes() == blob


def test_new_commits_appear_live(page: Any, tmp_path: Path) -> None:
    url = serve(tmp_path)
    through_api(url, seed_shop)
    page.goto(url + "/")
    wait_rows(page, ["post-1", "order-2", "order-1"])
    page.wait_for_selector('#live[data-status="live"]')

    async def more(engine: fs.Engine) -> None:
        ctx = new("order-3", app="shop")
        await engine.do(fs.commit(fs.transit(ctx, "pay")))
        again = new("order-2")
        await engine.do(fs.get_state_by_id(again, "order-2"))
        await engine.do(fs.commit(fs.end(again)))

    through_api(url, more)
    wait_rows(page, ["order-2", "order-3", "post-1", "order-1"])  # no reload
    assert page.inner_text('tr[data-id="order-2"]').count("ended") == 1

    page.click("text=order-3")
    page.wait_for_selector("#timeline li.revision")

    async def next_rev(engine: fs.Engine) -> None:
        ctx = fs.StateCtx()
        await engine.do(fs.get_state_by_id(ctx, "order-3"))
        await engine.do(fs.commit(fs.transit(ctx, "ship")))

    through_api(url, next_rev)
    page.wait_for_selector('#timeline li.revision[data-rev="9"]')
    assert page.inner_text("#action-status") == "New revision 9 committed."


def test_end_and_retry_from_the_page(page: Any, tmp_path: Path) -> None:
    url = serve(tmp_path)

    async def seed(engine: fs.Engine) -> None:
        for sid in ["stuck-1", "stuck-2"]:
            ctx = new(sid, app="ops")
            await engine.do(fs.commit(fs.transit(ctx, "work")))  # committed, never executed

    through_api(url, seed)
    page.goto(url + "/#/state?id=stuck-1")
    page.wait_for_selector("#waiting li")
    assert "recovery retries it (attempt 1 of 3)" in page.inner_text("#waiting")
    shot(page, "waiting")
    page.click("#action-end")
    assert page.inner_text("#action-end").startswith("Confirm")
    page.click("#action-end")
    # a function, not an expression: Playwright evals expressions, which the page's CSP forbids
    page.wait_for_function(
        "() => document.querySelector('#action-status').textContent.includes('End')"
    )
    page.wait_for_selector("#state-rev >> text=3")
    assert "ended" in page.inner_text(".detail-head")

    async def check(engine: fs.Engine) -> None:
        ctx = fs.StateCtx()
        await engine.do(fs.get_state_by_id(ctx, "stuck-1"))
        assert fs.ended(ctx.current) and ctx.current.rev == 3

    through_api(url, check)

    page.goto(url + "/#/state?id=stuck-2")
    page.wait_for_selector("#action-retry:not([disabled])")
    page.click("#action-retry")
    page.click("#action-retry")
    # the retry commits rev 4 and the server's flow ``work`` then parks the state (rev 5)
    page.wait_for_selector('#timeline li.revision[data-rev="5"]')
    assert "flowstate.ui.action" in page.inner_text('#timeline li[data-rev="4"]')
    assert "parked" in page.inner_text(".detail-head")


def test_the_page_asks_for_the_token(page: Any, tmp_path: Path) -> None:
    url = serve(tmp_path, token="t0ken")
    through_api(url, seed_shop, token="t0ken")
    page.goto(url + "/")
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-form input[name=token]", "wrong")
    page.click("#token-form button[type=submit]")
    page.wait_for_function(
        "document.querySelector('#token-message').textContent.includes('refused')"
    )
    page.fill("#token-form input[name=token]", "t0ken")
    page.click("#token-form button[type=submit]")
    wait_rows(page, ["post-1", "order-2", "order-1"])
    page.wait_for_selector('#live[data-status="live"]')


def test_ten_thousand_states_page_by_page(page: Any, tmp_path: Path) -> None:
    url = serve(tmp_path)

    async def seed(engine: fs.Engine) -> None:
        ctxs = [new(f"bulk-{i:05}", app="bulk") for i in range(10_000)]
        for start in range(0, len(ctxs), 1000):
            batch = ctxs[start : start + 1000]
            await engine.do(fs.commit(*[fs.transit(c, "work") for c in batch]))

    through_api(url, seed)
    page.goto(url + "/")
    wait_rows(page, [f"bulk-{i:05}" for i in range(9999, 9949, -1)])
    page.wait_for_selector("svg.graph g.node")
    shot(page, "ten-thousand")
    page.click("#older")
    wait_rows(page, [f"bulk-{i:05}" for i in range(9949, 9899, -1)])
    assert re.search(r"before=9951", page.url)
    assert page.eval_on_selector_all("#states-table tbody tr", "r => r.length") == 50
