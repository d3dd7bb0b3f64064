"""Typed end of life (core/endings.py): a sandbox that ended says why and when — to the SDK's next call on
it (the data plane's 502 message, which the SDK puts in its exception), in the control plane's 404, and
in `GET /v2/sandboxes?state=killed` — whether it was killed, timed out, lost its init, or was gone when
the server started."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

from conftest import Server, host_pids_of, start_server


def _gone(srv: Server, sandbox_id: str, seconds: float = 15) -> str:
    """The control plane's 404 message for the sandbox, once it has ended."""
    deadline = time.monotonic() + seconds
    while True:
        r = httpx.get(f"{srv.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": srv.api_key})
        if r.status_code == 404 or time.monotonic() > deadline:
            assert r.status_code == 404, r.text
            return str(r.json()["message"])
        time.sleep(0.2)


def _killed_list(srv: Server, **params: str) -> list[dict]:
    r = httpx.get(f"{srv.url}/v2/sandboxes", params={"state": "killed", **params}, headers={"X-API-KEY": srv.api_key})
    assert r.status_code == 200, r.text
    return r.json()


def _init_pid(srv: Server, sandbox_id: str) -> int:
    for pid in host_pids_of(srv, sandbox_id):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "sandbox-init":
            return pid
    raise AssertionError("no sandbox-init")


def test_a_killed_sandbox_says_it_was_killed_and_when(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60, metadata={"probe": "endings"})
    sbx.commands.run("true")
    assert sbx.kill() is True
    with pytest.raises(SandboxException) as e:
        sbx.commands.run("true")
    assert "killed by an API request" in str(e.value)
    assert "killed by an API request at 20" in _gone(server, sbx.sandbox_id)
    listed = {s["sandboxID"]: s for s in _killed_list(server, metadata="probe=endings")}
    entry = listed[sbx.sandbox_id]
    assert entry["state"] == "killed" and entry["endReason"]["kind"] == "killed"
    assert entry["lastMetrics"] is None or entry["lastMetrics"]["memTotal"] > 0
    # the SDK's own listing (running and paused) does not show it
    assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]


def test_a_sandbox_being_killed_says_why_at_once(server: Server) -> None:
    """While its processes are still going (the kill's answer not sent yet), it is gone from the control
    plane and already says why: the 404 came without a reason in that window (seen in CI)."""
    sbx = Sandbox.create(template="base", timeout=60)
    headers = {"X-API-KEY": server.api_key}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        killing = pool.submit(httpx.delete, f"{server.url}/sandboxes/{sbx.sandbox_id}", headers=headers)
        with httpx.Client(headers=headers) as client:
            deadline = time.monotonic() + 15
            while (r := client.get(f"{server.url}/sandboxes/{sbx.sandbox_id}")).status_code == 200:
                assert time.monotonic() < deadline
        assert r.status_code == 404 and "killed by an API request" in r.json()["message"], r.text
        assert killing.result().status_code == 204


def test_a_timed_out_sandbox_says_so(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=1)
    assert "reached its timeout" in _gone(server, sbx.sandbox_id)
    assert [s["endReason"]["kind"] for s in _killed_list(server) if s["sandboxID"] == sbx.sandbox_id] == ["timeout"]


def test_a_sandbox_whose_init_died_says_it_stopped_running(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    os.kill(_init_pid(server, sbx.sandbox_id), signal.SIGKILL)  # a process this test's server started
    message = _gone(server, sbx.sandbox_id)  # the reaper looks every second
    assert "its init process exited" in message


def test_sandboxes_gone_when_the_server_starts_say_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, "--pool-size", "0", keep=True)
    port = int(srv.url.rsplit(":", 1)[1])
    env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    pid = _init_pid(srv, sbx.sandbox_id)
    assert srv.stop() == 0
    os.kill(pid, signal.SIGKILL)  # as a host reboot would
    srv = start_server(data, "--pool-size", "0", port=port)
    try:
        assert "was gone when the server started" in _gone(srv, sbx.sandbox_id)
    finally:
        assert srv.stop() == 0
