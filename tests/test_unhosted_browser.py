"""The page shows a banner for each flow whose due states wait because no process hosts it
(in a real Chromium, as tests/test_ui_browser.py; skipped without one, failed under CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flowstate as fs
from tests import netserver
from tests.test_ui_browser import browser, page, shot  # noqa: F401  (fixtures)
from tests.test_unhosted_report import FakeStats


def test_the_page_names_each_unhosted_flow(page: Any, tmp_path: Path) -> None:  # noqa: F811
    # A real delayer (it runs in the server's loop once the page's first query starts the
    # engine) whose report names two flows.
    engine = fs.Engine(fs.SqliteDriver(tmp_path / "ui.db"), recovery=False, delayer=True)
    assert engine.delayer is not None
    report = FakeStats({"billing": 3, "mail": 1})
    engine.delayer.stats = lambda: report  # type: ignore[assignment, method-assign, return-value]
    url = netserver.serve(engine.driver, engine=engine).url
    page.goto(url + "/")
    banner = page.wait_for_selector("#unhosted:not([hidden])")
    text = " ".join(banner.inner_text().split())
    assert "no process hosts flow billing (3 states waiting)" in text
    assert "no process hosts flow mail (1 state waiting)" in text
    page.wait_for_selector("#states-table")
    assert "error" not in page.inner_text("#main").lower()
    shot(page, "unhosted")


def test_no_banner_when_every_flow_is_hosted(page: Any, tmp_path: Path) -> None:  # noqa: F811
    url = netserver.serve(fs.SqliteDriver(tmp_path / "ui.db")).url
    page.goto(url + "/")
    page.wait_for_selector("#states-table")
    assert page.is_hidden("#unhosted")
