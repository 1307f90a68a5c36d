"""Cross-site requests from a real browser (headless Chromium through Playwright, as
tests/test_ui_browser.py; skipped without one, failed under CI): a page of another origin
cannot commit into a server without a token, a page that reaches the server under a foreign
host name (DNS rebinding) is refused, while the server's own UI, its UI under an allowed host
name and a page of an allowed origin keep working (issue 14, item 2)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
from tests import netserver
from tests.test_server import GO_COMMIT_TRANSIT
from tests.test_ui_browser import ARGS, CHROMIUM, WAIT, browser, page  # noqa: F401  (fixtures)

COMMIT_PATH = "/flowstate.v1.Driver/Commit"
#: What an attacking page runs: a binary Commit without Content-Type, in no-cors mode (the
#: page cannot read the answer, but the request is sent).
NO_CORS_COMMIT = """async ([url, bytes]) => {
    try {
        await fetch(url, {method: "POST", mode: "no-cors", body: new Uint8Array(bytes)});
        return "sent";
    } catch (e) {
        return "failed: " + e;
    }
}"""
#: A same-origin (to the page) binary Commit whose answer the page reads.
SAME_ORIGIN_COMMIT = """async ([path, bytes]) => {
    const r = await fetch(path, {method: "POST", body: new Uint8Array(bytes)});
    return [r.status, await r.text()];
}"""
GET_STATUS = """async (path) => {
    const r = await fetch(path);
    return [r.status, await r.text()];
}"""
CORS_GET_STATES = """async (url) => {
    try {
        const r = await fetch(url, {
            method: "POST",
            headers: {"content-type": "application/json"},
            body: JSON.stringify({getStates: {limit: "10"}}),
        });
        return [r.status, await r.json()];
    } catch (e) {
        return ["failed", String(e)];
    }
}"""


@pytest.fixture
def other_origin() -> Iterator[str]:
    """An origin other than the server's: a blank page on another port."""

    class Blank(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>elsewhere</title><p>elsewhere</p>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def rebinding_browser(browser: Any) -> Iterator[Any]:  # noqa: F811
    """A page of a Chromium that resolves evil.test and flow.test to 127.0.0.1, as DNS
    rebinding would (launched by the Playwright that runs ``browser``)."""
    rules = "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP flow.test 127.0.0.1"
    chromium = browser.browser_type.launch(
        executable_path=CHROMIUM, headless=True, args=[*ARGS, rules]
    )
    context = chromium.new_context()
    context.set_default_timeout(WAIT)
    yield context.new_page()
    context.close()
    chromium.close()


def stored(store: fs.MemoryDriver) -> list[str]:
    return sorted(store._latest)


def test_a_page_of_another_origin_cannot_commit(page: Any, other_origin: str) -> None:  # noqa: F811
    store = fs.MemoryDriver()
    url = netserver.serve(store).url  # no token: what a developer runs on 127.0.0.1
    page.goto(other_origin + "/")
    sent = page.evaluate(NO_CORS_COMMIT, [url + COMMIT_PATH, list(GO_COMMIT_TRANSIT)])
    assert sent == "sent"  # the browser did send it (an opaque answer)
    assert stored(store) == [], "the cross-origin commit was stored"
    # the same bytes from the server's own origin do land: the refusal was the origin's
    page.goto(url + "/health")
    status, _ = page.evaluate(SAME_ORIGIN_COMMIT, [COMMIT_PATH, list(GO_COMMIT_TRANSIT)])
    assert status == 200
    assert stored(store) == ["aTID"]


def test_a_rebound_host_name_is_refused(rebinding_browser: Any) -> None:
    store = fs.MemoryDriver()
    url = netserver.serve(store).url
    port = url.rsplit(":", 1)[1]
    evil = f"http://evil.test:{port}"
    answer = rebinding_browser.goto(evil + "/")  # the page itself
    assert answer.status == 421
    # the page's origin is now evil.test: to the browser, the server is same-origin
    status, body = rebinding_browser.evaluate(GET_STATUS, "/ui/api/states")
    assert status == 421 and "evil.test" in body
    status, body = rebinding_browser.evaluate(
        SAME_ORIGIN_COMMIT, [COMMIT_PATH, list(GO_COMMIT_TRANSIT)]
    )
    assert status == 421
    assert stored(store) == []


def test_the_ui_works_under_an_allowed_host_name(rebinding_browser: Any, tmp_path: Path) -> None:
    store = fs.MemoryDriver()
    url = netserver.serve(store, allowed_hosts=["flow.test"]).url
    port = url.rsplit(":", 1)[1]
    ui = rebinding_browser
    csp_errors: list[str] = []
    ui.on("console", lambda m: csp_errors.append(m.text) if "Content Security" in m.text else 0)
    assert ui.goto(f"http://flow.test:{port}/").status == 200
    ui.wait_for_selector("#states-table")
    status, _ = ui.evaluate(SAME_ORIGIN_COMMIT, [COMMIT_PATH, list(GO_COMMIT_TRANSIT)])
    assert status == 200  # same-origin POST (the browser sends Origin) goes through
    ui.wait_for_selector("#states-table tbody tr[data-id='aTID']")
    assert csp_errors == []
    assert ui.evaluate(GET_STATUS, "/ui/api/info")[0] == 200


def test_a_page_of_an_allowed_origin_reads_through_cors(
    page: Any,  # noqa: F811
    other_origin: str,
) -> None:
    allowed = netserver.serve(fs.MemoryDriver(), cors_origins=[other_origin]).url
    closed = netserver.serve(fs.MemoryDriver()).url
    page.goto(other_origin + "/")
    status, body = page.evaluate(CORS_GET_STATES, allowed + "/flowstate.v1.Driver/GetStates")
    assert status == 200 and "getStates" in body
    status, _ = page.evaluate(CORS_GET_STATES, closed + "/flowstate.v1.Driver/GetStates")
    assert status == "failed"  # refused (403, no CORS headers): the page learns nothing
