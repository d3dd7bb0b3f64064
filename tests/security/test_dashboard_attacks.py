"""The dashboard as a hostile client meets it: its page and bundle are public but hold nothing (no key, no data),
its static files stay inside their directory, and its terminal's WebSocket checks the key the page sends as any
API request does — a bad first message, a wrong key, another team's sandbox or an absurd size each close it with
what was wrong, before any process starts."""

from __future__ import annotations

import json

import httpx
import pytest
from e2b import Sandbox
from security.test_teams import team_key
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import Server


def _closed(server: Server, sandbox_id: str, first: str | bytes | None) -> tuple[int, str]:
    url = server.url.replace("http://", "ws://") + f"/dashboard/terminal/{sandbox_id}"
    with connect(url, open_timeout=10, close_timeout=5) as ws:
        if first is not None:
            ws.send(first)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=20)
    frame = closed.value.rcvd
    assert frame is not None
    return frame.code, frame.reason


def test_the_terminal_socket_checks_what_the_page_sends(server: Server) -> None:
    key_a, key_b = team_key(server, "dash-a"), team_key(server, "dash-b")
    conn = {"api_url": server.url, "sandbox_url": server.url}
    mine = Sandbox.create(template="base", timeout=120, api_key=key_a, **conn)
    try:
        sid = mine.sandbox_id
        hello = {"apiKey": key_a, "cols": 80, "rows": 24}
        assert _closed(server, sid, "not json")[0] == 4400
        assert _closed(server, sid, b"\x00binary first")[0] == 4400
        assert _closed(server, sid, json.dumps({"cols": 80, "rows": 24}))[0] == 4400
        assert _closed(server, sid, json.dumps({**hello, "pad": "x" * 10_000}))[0] == 4400
        for cols, rows in ((10**9, 24), (-1, 24), (80, "24"), (80, 0)):
            assert _closed(server, sid, json.dumps({**hello, "cols": cols, "rows": rows}))[0] == 4400
        assert _closed(server, sid, json.dumps({**hello, "apiKey": "e2b_" + "1" * 40})) == (
            4401,
            "the API key was refused",
        )
        code, reason = _closed(server, sid, json.dumps({**hello, "apiKey": key_b}))
        assert code == 4404 and sid in reason  # (another team's: as if there were none)
        assert _closed(server, "nosuchsandbox", json.dumps(hello))[0] == 4404
        # no shell was started by any of these
        listed = mine.commands.list()
        assert not [p for p in listed if p.cmd.endswith("bash") or "-l" in p.args], listed
    finally:
        mine.kill()


def test_the_page_and_its_files_hold_nothing(server: Server) -> None:
    page = httpx.get(f"{server.url}/dashboard/")
    assert page.status_code == 200 and server.api_key not in page.text
    assert page.headers["x-frame-options"] == "DENY"
    bundle = httpx.get(f"{server.url}/dashboard/static/app.js")
    assert bundle.status_code == 200 and server.api_key not in bundle.text
    for path in ("../app.py", "..%2fapp.py", "%2e%2e/%2e%2e/server.py", "..%2f..%2f..%2fpyproject.toml", "/etc/passwd"):
        r = httpx.get(f"{server.url}/dashboard/static/{path}")
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert httpx.get(f"{server.url}/dashboard").status_code in (200, 308)
