"""Take the README's screenshots of the web UI (docs/img/ui-*.png).

Starts a server with the demo workflow on a fresh SQLite store, adds a few states an operator
would look at (one stuck in a flow, one waiting for a delay, one with data attached), lets the
demo run for a while and photographs the main views in Debian's Chromium::

    .venv/bin/python scripts/ui_screenshots.py
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from playwright.sync_api import sync_playwright

import flowstate as fs
from flowstate.server import run_server
from flowstate.server.run import listen

OUT = Path(__file__).resolve().parent.parent / "docs" / "img"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip


def serve(db: Path, ready: threading.Event, stop_box: list[object]) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        stop_box[:] = [asyncio.get_running_loop(), stop]
        sock = listen("127.0.0.1", 0)
        stop_box.append(sock.getsockname()[1])
        ready.set()
        await run_server(fs.SqliteDriver(db), sock, http_host="http://127.0.0.1", demo=True,
                         stop=stop)  # fmt: skip

    asyncio.run(main())


async def operator_states(db: Path) -> None:
    async with fs.Engine(fs.SqliteDriver(db), recovery=False, delayer=False) as engine:
        stuck = fs.StateCtx(current=fs.State("invoice-2291", labels={"app": "billing"}))
        stuck.current.annotations["customer"] = "acme"
        await engine.do(fs.commit(fs.transit(stuck, "billing.charge")))
        remind = fs.StateCtx(current=fs.State("reminder-88", labels={"app": "billing"}))
        await engine.do(fs.commit(fs.park(remind)))
        await engine.do(fs.delay(remind, "billing.remind", timedelta(hours=6)))
        report = fs.StateCtx(current=fs.State("report-2026-11", labels={"app": "reports"}))
        report.set_data("summary", fs.Data(b'{"orders": 1204, "revenue": "48210.50 EUR"}\n'))
        pdf = fs.Data(b"%PDF-1.7\n" + bytes(range(200)))
        pdf.binary = True
        report.set_data("pdf", pdf)
        await engine.do(fs.commit(fs.store_data(report, "summary"), fs.store_data(report, "pdf"),
                                  fs.transit(report, "reports.render")))  # fmt: skip
        report.current.labels["stage"] = "rendered"
        await engine.do(fs.commit(fs.transit(report, "reports.send", {"to": "finance"})))
        await engine.do(fs.commit(fs.end(report)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "screens.db"
        ready, box = threading.Event(), []
        thread = threading.Thread(target=serve, args=(db, ready, box), daemon=True)
        thread.start()
        ready.wait(30)
        url = f"http://127.0.0.1:{box[2]}"
        asyncio.run(operator_states(db))
        time.sleep(25)  # let the demo produce a few orders
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url + "/")
            page.wait_for_selector("#states-table tbody tr[data-id]")
            page.wait_for_selector("svg.graph g.node")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT / "ui-states.png"))
            page.click('svg.graph g.node[data-node="billing.charge"]')
            page.click("text=invoice-2291")
            page.wait_for_selector("#waiting li")
            page.screenshot(path=str(OUT / "ui-waiting.png"))
            page.goto(url + "/#/state?id=report-2026-11")
            page.wait_for_selector("#timeline li.revision")
            page.check("#timeline li[data-rev] >> nth=0 >> input.pick")
            page.check("#timeline li[data-rev] >> nth=2 >> input.pick")
            page.click("#compare")
            page.wait_for_selector("#diff table.diff")
            page.click('button[data-alias="summary"]')
            page.wait_for_selector("#data-preview pre")
            page.screenshot(path=str(OUT / "ui-detail.png"), full_page=True)
            browser.close()
        loop, stop = box[0], box[1]
        loop.call_soon_threadsafe(stop.set)  # type: ignore[attr-defined]
        thread.join(60)


if __name__ == "__main__":
    main()
