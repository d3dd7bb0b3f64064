"""The web dashboard (/dashboard) in a real browser: Debian's chromium, driven by Playwright. It refuses a wrong
key, logs in with the server's, lists a sandbox the test made (live: one made after the page opened shows up), opens
its page (details, metrics, log, file tree and a file's content), runs a command in its terminal (xterm.js over the
WebSocket to a PTY in the sandbox) and reads the output; the pools and templates pages list what the API says.
Screenshots go to tests/output/dashboard/. The terminal's WebSocket as a hostile client uses it is in
tests/security/test_dashboard_attacks.py."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from conftest import Server

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = Path(__file__).parent / "output" / "dashboard"


@pytest.fixture
def page(server: Server):
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            yield tab
            assert not errors, errors  # (no script error on any page it showed)
        finally:
            browser.close()


def test_the_dashboard_shows_a_sandbox_and_runs_a_command_in_its_terminal(server: Server, page) -> None:
    r = httpx.get(f"{server.url}/dashboard/")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{server.url}/dashboard/static/app.js").status_code == 200
    OUTPUT.mkdir(parents=True, exist_ok=True)
    sbx = Sandbox.create(template="base", timeout=300, metadata={"test": "dashboard"})
    try:
        sbx.files.write("/home/user/notes/hello.txt", "hello from the test\n")
        page.goto(f"{server.url}/dashboard/")
        page.fill("input[name=apiKey]", "e2b_" + "0" * 40)
        page.click("button[type=submit]")
        page.wait_for_selector("text=not one of this server's")
        page.fill("input[name=apiKey]", server.api_key)
        page.click("button[type=submit]")
        row = page.wait_for_selector(f"tr[data-sandbox-id='{sbx.sandbox_id}']")
        assert "test=dashboard" in row.inner_text() and "running" in row.inner_text()
        later = Sandbox.create(template="base", timeout=120)  # (live: listed without a reload)
        page.wait_for_selector(f"tr[data-sandbox-id='{later.sandbox_id}']", timeout=15_000)
        later.kill()
        page.wait_for_selector(f"tr[data-sandbox-id='{later.sandbox_id}']", state="detached", timeout=15_000)
        page.screenshot(path=str(OUTPUT / "sandboxes.png"), full_page=True)

        page.click(f"a[href='#/sandbox/{sbx.sandbox_id}']")
        page.wait_for_selector("dd[data-field=state]:has-text('running')")
        page.wait_for_selector("ol.logs li", timeout=15_000)  # (its log: at least its creation)
        # the file tree, through envd with the sandbox's access token
        page.click("li[data-path='/home'] > button")
        page.click("li[data-path='/home/user'] > button")
        page.click("li[data-path='/home/user/notes'] > button")
        page.click("li[data-path='/home/user/notes/hello.txt'] > button")
        page.wait_for_selector("pre.preview:has-text('hello from the test')")

        page.click("text=Open terminal")
        page.wait_for_selector("[data-testid=terminal][data-status=ready]", timeout=30_000)
        page.click("[data-testid=terminal]")
        page.keyboard.type("echo dash-$((6*7)) > /tmp/typed; cat /tmp/typed; whoami\n")
        deadline = time.monotonic() + 30
        while "dash-42" not in page.inner_text(".xterm-rows"):
            assert time.monotonic() < deadline, page.inner_text(".xterm-rows")
            time.sleep(0.2)
        assert sbx.files.read("/tmp/typed") == "dash-42\n"  # (typed into the sandbox itself)
        page.screenshot(path=str(OUTPUT / "terminal.png"), full_page=True)
        page.keyboard.type("exit 3\n")
        page.wait_for_selector("[data-testid=terminal][data-status=closed]", timeout=15_000)
        # (xterm.js renders what it is given on a later frame than the status is set: waited for, not read at once)
        page.wait_for_selector(".xterm-rows:has-text('exited 3')", timeout=15_000)

        page.click("text=Pools")
        page.wait_for_selector("tr[data-template='base']")
        page.click("text=Templates")
        page.wait_for_selector("tr[data-template='base']")
        page.screenshot(path=str(OUTPUT / "templates.png"), full_page=True)
    finally:
        sbx.kill()
    assert (OUTPUT / "terminal.png").stat().st_size > 10_000
