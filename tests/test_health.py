"""The health monitor (core/health.py): a template's probe (`probeCmd`, sandboxd's extension of a template
build) runs in its sandboxes; one whose probe fails is marked unhealthy with the reason (get/list, /metrics),
never replaced, and healthy again once it passes; an idle pooled sandbox killed behind the server's back is
replaced silently."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from conftest import Server, builder_server, host_pids_of

PROBE = "test -f /tmp/ok"


@pytest.fixture(scope="module")
def hserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with builder_server(tmp_path_factory.mktemp("health"), "--health-interval", "0.5", "--pool-size", "0") as srv:
        yield srv


def _build(srv: Server, body: dict) -> str:
    headers = {"X-API-KEY": srv.api_key}
    created = httpx.post(f"{srv.url}/v3/templates", json={"name": f"probed-{secrets.token_hex(3)}"}, headers=headers)
    assert created.status_code == 202, created.text
    tid, build = created.json()["templateID"], created.json()["buildID"]
    r = httpx.post(f"{srv.url}/v2/templates/{tid}/builds/{build}", json=body, headers=headers)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 120
    while True:
        st = httpx.get(f"{srv.url}/templates/{tid}/builds/{build}/status", headers=headers).json()
        if st["status"] in ("ready", "error"):
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    assert st["status"] == "ready", st
    return str(tid)


def _health(srv: Server, sandbox_id: str) -> dict:
    return dict(srv.api().get(f"/sandboxes/{sandbox_id}").json().get("health", {}))


def _until(srv: Server, sandbox_id: str, status: str, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while (h := _health(srv, sandbox_id)).get("status") != status:
        assert time.monotonic() < deadline, f"not {status} within {seconds} s: {h}"
        time.sleep(0.2)
    listed = next(s for s in srv.api().get("/v2/sandboxes").json() if s["sandboxID"] == sandbox_id)
    assert listed["health"]["status"] == status, listed  # (the list says it too; stable: 2 probes make a change)
    return h


def _unhealthy_gauge(srv: Server, template: str) -> float:
    text = httpx.get(srv.url + "/metrics", headers={"X-API-KEY": srv.api_key}).text
    prefix = f'sandboxd_sandboxes_unhealthy{{template="{template}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), -1.0)


def test_a_failing_probe_marks_a_sandbox_unhealthy_and_never_replaces_it(hserver: Server) -> None:
    start = "touch /tmp/ok; exec sleep infinity"
    tid = _build(hserver, {"fromTemplate": "base", "startCmd": start, "readyCmd": PROBE, "probeCmd": PROBE})
    sbx = Sandbox.create(template=tid, timeout=120)
    try:
        assert _until(hserver, sbx.sandbox_id, "healthy")["since"] > 0
        assert _unhealthy_gauge(hserver, tid) == 0
        sbx.commands.run("rm /tmp/ok", user="root")
        h = _until(hserver, sbx.sandbox_id, "unhealthy")
        assert "test -f /tmp/ok" in h["reason"] and "exited with status 1" in h["reason"], h
        assert _unhealthy_gauge(hserver, tid) == 1
        # never replaced: the same sandbox, running, its files and processes as they were
        assert sbx.is_running() and sbx.commands.run("echo still here").stdout == "still here\n"
        assert hserver.api().get(f"/sandboxes/{sbx.sandbox_id}").json()["state"] == "running"
        sbx.commands.run("touch /tmp/ok", user="root")
        _until(hserver, sbx.sandbox_id, "healthy")
        assert _unhealthy_gauge(hserver, tid) == 0
    finally:
        sbx.kill()


def test_a_probe_that_hangs_times_out(hserver: Server) -> None:
    probe = "test -f /tmp/ok || sleep 30"
    body = {"fromTemplate": "base", "startCmd": "touch /tmp/ok; exec sleep infinity", "readyCmd": PROBE}
    tid = _build(hserver, {**body, "probeCmd": probe, "probeTimeout": 1})
    sbx = Sandbox.create(template=tid, timeout=120)
    try:
        _until(hserver, sbx.sandbox_id, "healthy")
        sbx.commands.run("rm /tmp/ok", user="root")
        h = _until(hserver, sbx.sandbox_id, "unhealthy")
        assert "did not end within 1 s" in h["reason"], h
    finally:
        sbx.kill()


def test_a_template_without_a_probe_reports_no_health(hserver: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    try:
        time.sleep(1.5)  # (three rounds of the monitor)
        assert "health" not in hserver.api().get(f"/sandboxes/{sbx.sandbox_id}").json()
    finally:
        sbx.kill()


def test_a_bad_probe_is_refused_at_build(hserver: Server) -> None:
    headers = {"X-API-KEY": hserver.api_key}
    created = httpx.post(f"{hserver.url}/v3/templates", json={"name": f"bad-{secrets.token_hex(3)}"}, headers=headers)
    tid, build = created.json()["templateID"], created.json()["buildID"]
    for bad in ({"probeCmd": 5}, {"probeCmd": "true", "probeTimeout": 61}, {"probeCmd": "true", "probeTimeout": "1"}):
        r = httpx.post(f"{hserver.url}/v2/templates/{tid}/builds/{build}", json=bad, headers=headers)
        assert r.status_code == 400 and "probe" in r.json()["message"], (bad, r.text)


def test_a_pooled_sandbox_killed_behind_the_servers_back_is_replaced(tmp_path: Path) -> None:
    from conftest import start_server

    srv = start_server(tmp_path / "data", "--pool-size", "1", "--health-interval", "0.5", "--prewarm", "base")
    try:
        deadline = time.monotonic() + 60
        while (pool := srv.api().get("/pools/base").json())["idle"] != 1:
            assert time.monotonic() < deadline, pool
            time.sleep(0.2)
        states = srv.data_dir / "sandboxes"  # (its only sandbox is the pooled one)
        pooled = [p.name for p in states.iterdir()]
        assert len(pooled) == 1, pooled
        victim = pooled[0]
        for pid in host_pids_of(srv, victim):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            pool = srv.api().get("/pools/base").json()
            now = [p.name for p in states.iterdir()]
            if pool["idle"] == 1 and victim not in now and len(now) == 1:
                break
            assert time.monotonic() < deadline, (pool, now)
            time.sleep(0.2)
        text = httpx.get(srv.url + "/metrics", headers={"X-API-KEY": srv.api_key}).text
        assert 'sandboxd_pool_replaced_total{template="base"} 1.0' in text
        # the new one serves a create at once
        sbx = Sandbox.create(template="base", timeout=60, api_key=srv.api_key, api_url=srv.url, sandbox_url=srv.url)
        assert sbx.commands.run("echo ok").stdout == "ok\n"
        assert srv.api().get("/pools/base").json()["hits"] == 1
        sbx.kill()
    finally:
        assert srv.stop() == 0
