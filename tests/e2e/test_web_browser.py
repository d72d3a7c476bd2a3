"""The usage page in a real headless Chromium (Debian's `chromium`, driven by Playwright with
that executable; `playwright install` is never run): `tokenledger web` as its own process, a
log in with a real key, the chart's bars, the top users, a '*' key picking another tenant, and
a screenshot of the page written to the test's tmp dir (its path is printed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from tests.support import (
    TOKENLEDGER,
    ApiKey,
    Clock,
    ServerThread,
    create_key,
    free_port,
    new_id,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
"""Playwright gives each launch a fresh profile directory (--user-data-dir) of its own."""
START_TIMEOUT_S = 30
DAYS_WITH_USAGE = (6, 5, 3, 2, 0)
"""Days before today with usage: the chart has a bar for each, none for days 4 and 1."""


def _chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing and we may; else a skip."""
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True,
                       timeout=900, check=False)  # fmt: skip
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing and `apt-get install -y chromium` did not add it")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = _chromium()
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (the dev extra pins it)"
    )
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def tenants(database_url: str) -> tuple[str, str]:
    """Two tenants: the first with usage by three users on five of the last seven days, the
    second with one user today. Recorded by a ledger whose clock is moved back."""
    first, second = new_id("acme"), new_id("globex")
    clock = Clock()
    today = clock.now
    server = ServerThread(database_url, clock=clock, sweep_interval_s=3600).start()
    try:
        with server.stub() as stub:
            clock.now = today - timedelta(days=max(DAYS_WITH_USAGE))
            gpt_4o = pb.Price(
                model="gpt-4o",
                currency="USD",
                input_micros_per_mtok=2_500_000,
                output_micros_per_mtok=10_000_000,
            )  # llama-3 stays unpriced
            stub.SetPrices(pb.SetPricesRequest(idempotency_key=new_id("p"), tenant_id=first,
                                               prices=[gpt_4o]))  # fmt: skip
            for n, back in enumerate(DAYS_WITH_USAGE):
                clock.now = today - timedelta(days=back)
                for user, scale in (("alice@finance.example", 3), ("bob", 2), ("carol", 1)):
                    _record(stub, first, user, f"chat-{n}", 1_000 * scale * (n + 1))
            clock.now = today
            _record(stub, second, "dave@globex.example", "c1", 4_321)
    finally:
        server.stop()
    return first, second


def _record(stub: Any, tenant: str, user: str, conversation: str, tokens: int) -> None:
    stub.RecordUsage(pb.RecordUsageRequest(
        idempotency_key=new_id("u"), tenant_id=tenant, user_id=user,
        conversation_id=conversation, model="gpt-4o" if tokens % 3 else "llama-3",
        usage=pb.Usage(input_tokens=tokens, output_tokens=tokens // 4),
    ))  # fmt: skip


@pytest.fixture
def web_process(database_url: str, tmp_path: Path) -> Iterator[str]:
    """`tokenledger web` on a free port; yields its base URL."""
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "web.log").open("wb")
    proc = subprocess.Popen(
        [str(TOKENLEDGER), "web", "--listen", address],
        env=os.environ | {"DATABASE_URL": database_url, "TOKENLEDGER_LOG_FORMAT": "json"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://{address}"
    try:
        _wait_until_up(base + "/login", proc)
        yield base
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (tmp_path / "web.log").read_text()
        log.close()


def _wait_until_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tokenledger web exited"
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer")


def _log_in(page: Any, base: str, key: ApiKey) -> None:
    page.goto(base + "/")
    assert page.locator("h2").first.inner_text() == "Log in with an API key"
    page.fill("#key", key.token)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")


def test_the_page_in_chromium(
    browser: Any, web_process: str, tenants: tuple[str, str], database_url: str, tmp_path: Path
) -> None:
    first, second = tenants
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    _log_in(page, web_process, create_key(database_url, first, "reader"))
    bars = page.locator("#chart-1 rect.bar")
    assert bars.count() == len(DAYS_WITH_USAGE)
    heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
    assert heights == sorted(heights) and heights[0] > 0  # more tokens each day with usage
    users = page.locator("#top-users tbody tr td:first-child").all_inner_texts()
    assert users == ["alice@finance.example", "bob", "carol"]
    screenshot = tmp_path / "usage-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"\nscreenshot of the usage page: {screenshot}")

    page.click("header button")  # log out
    page.wait_for_url(web_process + "/login")
    _log_in(page, web_process, create_key(database_url, "*", "reader"))
    assert "Choose a tenant" in page.inner_text("main")
    page.select_option("#tenant", second)
    page.click("form.filters button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("#top-users tbody td:first-child").all_inner_texts() == [
        "dave@globex.example"
    ]
    assert page.locator("#chart-1 rect.bar").count() == 1
    assert second in (page.get_attribute("#csv", "href") or "")
    context.close()
