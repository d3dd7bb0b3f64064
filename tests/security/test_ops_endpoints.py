"""The operations endpoints this server added (/pools, the sandbox logs, /openapi.json, a template's probeCmd)
as a hostile client uses them: nothing it sends changes more than it may, reaches outside what it names, or costs
the server more than a bounded answer; the one public document tells nothing secret."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
from e2b import Sandbox

from conftest import Server, builder_server


def test_pool_limits_refuse_what_is_not_two_small_whole_numbers(server: Server) -> None:
    api = server.api()
    before = api.get("/pools/base").json()
    for bad in (
        {"min": 10**9, "max": 10**9},  # (a pool of a billion sandboxes)
        {"min": 1.5, "max": 2},
        {"min": True, "max": 2},
        {"min": [1], "max": 2},
        {"min": 0, "max": -1},
    ):
        r = api.put("/pools/base", json=bad)
        assert r.status_code == 400, (bad, r.status_code, r.text)
    deep = "[" * 10_000 + "]" * 10_000
    r = api.put("/pools/base", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    for name in ("..%2Fbase", "%2e%2e", "base%00", "x" * 5000):
        assert api.put(f"/pools/{name}", json={"min": 0, "max": 1}).status_code in (404, 414), name
    after = api.get("/pools/base").json()  # (its idle count and target move with demand: its limits must not)
    assert [after[k] for k in ("min", "max", "custom")] == [before[k] for k in ("min", "max", "custom")]
    assert httpx.put(f"{server.url}/pools/base", json={"min": 0, "max": 0}).status_code == 401


def test_logs_answer_bounded_and_only_for_sandboxes_that_exist(server: Server, sandbox: Sandbox) -> None:
    api = server.api()
    path = f"/v2/sandboxes/{sandbox.sandbox_id}/logs"
    for _ in range(3):
        sandbox.commands.run("true")
    big = api.get(path, params={"limit": 10**9, "cursor": 0}).json()["logs"]
    assert len(big) <= 1000
    assert api.get(path, params={"cursor": 10**30}).json()["logs"] == []  # (a cursor past any time)
    assert api.get(path, params={"search": ".*" * 100}).json()["logs"] == []  # (a substring, never a pattern)
    other = "zz" + secrets.token_hex(8)
    assert api.get(f"/v2/sandboxes/{other}/logs").status_code == 404
    assert api.get("/v2/sandboxes/..%2F..%2Fetc/logs").status_code == 404


def test_the_openapi_document_tells_nothing_secret(server: Server, sandbox: Sandbox) -> None:
    text = httpx.get(server.url + "/openapi.json").text
    assert server.api_key not in text and sandbox.sandbox_id not in text
    assert 'envdAccessToken": "' not in text


def test_a_probe_command_is_checked_before_a_build_starts(tmp_path: Path) -> None:
    # (a server with a templates dir of its own: a probe let through would start a build, never in the shared one)
    with builder_server(tmp_path) as srv:
        headers = {"X-API-KEY": srv.api_key}
        made = httpx.post(f"{srv.url}/v3/templates", json={"name": f"p-{secrets.token_hex(3)}"}, headers=headers)
        tid, build = made.json()["templateID"], made.json()["buildID"]
        too_long = "x" * (256 * 1024 + 1)  # (recipe.py's MAX_ARG, as startCmd's)
        for bad in ({"probeCmd": "true\0rm -rf /"}, {"probeCmd": too_long}, {"probeCmd": ["sh", "-c", "x"]}):
            r = httpx.post(f"{srv.url}/v2/templates/{tid}/builds/{build}", json=bad, headers=headers)
            assert r.status_code in (400, 413), (str(bad)[:60], r.status_code, r.text[:200])
