"""Each sandbox's log (core/sandbox_logs.py) at E2B's `GET /sandboxes/{id}/logs` (v1) and
`GET /v2/sandboxes/{id}/logs` (v2): what happened to it and what was done in it through envd, in order, with
levels, filters and cursors; kept a while after it ended; bounded and checked input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from e2b import Sandbox
from e2b.sandbox.commands.command_handle import CommandExitException

from conftest import Server, start_server


def _v2(srv: Server, sandbox_id: str, **params: str | int) -> list[dict]:
    r = srv.api().get(f"/v2/sandboxes/{sandbox_id}/logs", params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["logs"])


def test_a_sandboxs_log_tells_its_life_and_what_was_done_in_it(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    sbx.commands.run("echo hi")
    try:
        sbx.commands.run("exit 3")
    except CommandExitException:
        pass
    sbx.files.write("/home/user/notes.txt", "hello")
    sbx.pause()
    Sandbox.connect(sbx.sandbox_id)
    time.sleep(0.01)  # (the cursor is in ms: the resume's line must fall in a millisecond before it)
    started = time.time()
    sbx.kill()

    messages = [e["message"] for e in _v2(server, sbx.sandbox_id)]  # (after its end: kept a while)
    expected = [
        "created from template base",
        "started as user: /bin/bash -l -c 'echo hi'",
        "ended: exit status 0",
        "started as user: /bin/bash -l -c 'exit 3'",
        "ended: exit status 3",
        "file written by user: /home/user/notes.txt",
        "paused (in memory)",
        "resumed (in memory)",
        "ended: it was killed by an API request",
    ]
    at = 0
    for want in expected:  # each in this order (other lines may come between)
        at = next((i for i in range(at, len(messages)) if want in messages[i]), -1) + 1
        assert at, f"{want!r} not found in order in {messages}"

    entries = _v2(server, sbx.sandbox_id)
    assert all(e["level"] in ("debug", "info", "warn", "error") and e["timestamp"].endswith("Z") for e in entries)
    failed = next(e for e in entries if "exit status 3" in e["message"])
    assert failed["level"] == "warn" and failed["fields"]["exitCode"] == "3", failed
    # filters: level, search (case-insensitive), direction and limit, cursor (ms)
    assert [e["message"] for e in _v2(server, sbx.sandbox_id, level="warn")] == [failed["message"]]
    assert all("NOTES" in e["message"].upper() for e in _v2(server, sbx.sandbox_id, search="NOTES.TXT"))
    newest = _v2(server, sbx.sandbox_id, direction="backward", limit=1)
    assert len(newest) == 1 and "killed by an API request" in newest[0]["message"], newest
    after = _v2(server, sbx.sandbox_id, cursor=int(started * 1000))
    assert [e["message"] for e in after] == [newest[0]["message"]], after
    assert _v2(server, sbx.sandbox_id, cursor=int(time.time() * 1000) + 60_000) == []

    # v1: lines and entries
    r = server.api().get(f"/sandboxes/{sbx.sandbox_id}/logs", params={"limit": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [line["line"] for line in body["logs"]] == [e["message"] for e in body["logEntries"]] == messages[:2]


def test_logs_refuse_bad_queries_and_unknown_sandboxes(server: Server, sandbox: Sandbox) -> None:
    api = server.api()
    assert api.get("/v2/sandboxes/nope-nope/logs").status_code == 404
    assert api.get("/sandboxes/nope-nope/logs").status_code == 404
    path = f"/v2/sandboxes/{sandbox.sandbox_id}/logs"
    for bad in ({"direction": "sideways"}, {"level": "loud"}, {"cursor": "x"}, {"cursor": -1}, {"search": "x" * 300}):
        r = api.get(path, params=bad)
        assert r.status_code == 400, (bad, r.text)
    assert httpx.get(server.url + path).status_code == 401
    # a command line of any size or content is one entry, cut to size
    sandbox.commands.run("true marker-7f3a " + "x" * 5000 + "\n true injected")
    entries = api.get(path, params={"search": "marker-7f3a"}).json()["logs"]
    assert len(entries) == 1 and len(entries[0]["message"]) <= 1000, entries


def test_the_server_logs_one_json_line_per_request_with_its_sandbox(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", "--pool-size", "0", "--log-format", "json")
    try:
        sbx = Sandbox.create(template="base", timeout=60, api_key=srv.api_key, api_url=srv.url, sandbox_url=srv.url)
        sbx.commands.run("true")
        sbx.kill()
        assert srv.api().get("/sandboxes/not-there").status_code == 404
        assert srv.api().get("/sandboxes/forged%0A2026-01-01 sandboxd.access fake").status_code == 404
    finally:
        assert srv.stop() == 0
    records = [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    access = [r for r in records if r["logger"] == "sandboxd.access"]
    started = [r for r in access if r["route"] == "/process.Process/Start"]
    assert started and started[0]["sandbox_id"] == sbx.sandbox_id and started[0]["status"] == 200, started
    assert started[0]["api"] == "envd" and started[0]["ms"] >= 0
    made = [r for r in access if r["method"] == "POST" and r["route"] == "/v2/sandboxes"]
    assert made and made[0]["sandbox_id"] == sbx.sandbox_id and made[0]["status"] == 201, made
    killed = [r for r in access if r["method"] == "DELETE" and r["route"] == "/sandboxes/{sandbox_id}"]
    assert killed and killed[0]["sandbox_id"] == sbx.sandbox_id and killed[0]["status"] == 204, killed
    assert any(r["status"] == 404 and r["sandbox_id"] == "not-there" for r in access)
    # what a client sends as a sandbox ID is no line of the log's own
    assert all("\n" not in r["sandbox_id"] and len(r["sandbox_id"]) <= 64 for r in access)
