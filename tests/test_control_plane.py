"""Control plane (E2B REST), driven by the official e2b SDK (sync and async) and, for the raw wire, httpx."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException, SandboxException

from conftest import Server, host_pids_of


def test_create_with_metadata_envs_timeout(server: Server) -> None:
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(template="base", timeout=90, metadata={"run": tag, "k": "v w"}, envs={"GREETING": "hi"})
    try:
        assert sbx.sandbox_id.isalnum() and sbx.sandbox_id.islower()
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"run": tag, "k": "v w"}
        assert info.state == SandboxState.RUNNING
        assert timedelta(seconds=85) <= info.end_at - info.started_at <= timedelta(seconds=95)
        assert sbx.commands.run("echo $GREETING").stdout == "hi\n"
        assert sbx.is_running()
    finally:
        assert sbx.kill() is True


def test_default_timeout_is_300s(sandbox: Sandbox, server: Server) -> None:
    with server.api() as api:
        r = api.post("/sandboxes", json={"templateID": "base"})  # v1 path, no timeout: server default
        assert r.status_code == 201, r.text
        body = r.json()
        try:
            detail = api.get(f"/sandboxes/{body['sandboxID']}").json()
            started = datetime.fromisoformat(detail["startedAt"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(detail["endAt"].replace("Z", "+00:00"))
            assert abs((end - started).total_seconds() - 300) < 2
            assert body["envdAccessToken"] and body["envdVersion"]
        finally:
            assert api.delete(f"/sandboxes/{body['sandboxID']}").status_code == 204


def test_kill_existing_and_unknown(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    pids = host_pids_of(server, sbx.sandbox_id)
    assert pids, "a running sandbox has processes in its cgroup"
    assert Sandbox.kill(sbx.sandbox_id) is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert Sandbox.kill("doesnotexist0000000") is False
    assert not sbx.is_running()
    # Every process of the sandbox is gone, and so are its cgroup and state directory.
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().split()[2] == "Z"
        except FileNotFoundError:
            pass
    assert not (server.data_dir / "sandboxes" / sbx.sandbox_id).exists()
    assert not host_pids_of(server, sbx.sandbox_id)


def test_get_info_unknown(server: Server) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.get_info("nosuchsandbox000000")


def test_unknown_template_names_it_and_lists_available(server: Server) -> None:
    with pytest.raises(SandboxException) as exc:
        Sandbox.create(template="no-such-template")
    msg = str(exc.value)
    assert "no-such-template" in msg and "base" in msg


def test_api_key_required(server: Server) -> None:
    r = httpx.post(server.url + "/v2/sandboxes", json={"templateID": "base"})
    assert r.status_code == 401 and r.json()["code"] == 401 and "X-API-KEY" in r.json()["message"]
    r = httpx.get(server.url + "/v2/sandboxes", headers={"X-API-KEY": "e2b_" + "0" * 40})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 204


def test_bad_requests_have_clear_messages(server: Server) -> None:
    with server.api() as api:
        r = api.post("/v2/sandboxes", content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["message"]
        r = api.post("/v2/sandboxes", json={"timeout": 5})
        assert r.status_code == 400 and "templateID" in r.json()["message"]
        r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": -1})
        assert r.status_code == 400
        r = api.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"a": 1}})
        assert r.status_code == 400 and "metadata" in r.json()["message"]
        r = api.get("/v2/sandboxes", params={"limit": 0})
        assert r.status_code == 400 and "limit" in r.json()["message"]
        r = api.get("/v2/sandboxes", params={"state": "sleeping"})
        assert r.status_code == 400


def test_timeout_expiry_kills(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=2)
    assert sbx.is_running()
    deadline = time.monotonic() + 15
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    assert not (server.data_dir / "sandboxes" / sbx.sandbox_id).exists()


def test_auto_pause_at_end_time(server: Server) -> None:
    with server.api() as api:
        r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 1, "autoPause": True})
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
    sbx = Sandbox.connect(sid, timeout=1)
    try:
        sbx.commands.run("echo kept > /tmp/kept")
        deadline = time.monotonic() + 15
        while Sandbox.get_info(sid).state != SandboxState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.2)
        info = Sandbox.get_info(sid)
        assert info.state == SandboxState.PAUSED and info.lifecycle["on_timeout"].value == "pause"
        assert not sbx.is_running()
        resumed = Sandbox.connect(sid, timeout=60)
        assert resumed.commands.run("cat /tmp/kept").stdout == "kept\n"
    finally:
        Sandbox.kill(sid)


def test_set_timeout_extends_and_shortens(sandbox: Sandbox) -> None:
    sandbox.set_timeout(600)
    info = sandbox.get_info()
    assert info.end_at - datetime.now(UTC) > timedelta(seconds=590)
    sandbox.set_timeout(30)
    assert sandbox.get_info().end_at - datetime.now(UTC) < timedelta(seconds=31)


def test_connect_extends_but_never_shortens(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=200)
    try:
        end0 = sbx.get_info().end_at
        Sandbox.connect(sbx.sandbox_id, timeout=10)  # shorter: must not shorten
        assert sbx.get_info().end_at >= end0
        again = Sandbox.connect(sbx.sandbox_id, timeout=1000)  # longer: extends
        assert sbx.get_info().end_at - end0 > timedelta(seconds=700)
        assert again.commands.run("echo ok").stdout == "ok\n"
    finally:
        sbx.kill()


def test_connect_unknown(server: Server) -> None:
    with pytest.raises(NotFoundException):
        Sandbox.connect("nosuchsandbox000000")


def test_pause_and_resume(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        sbx.commands.run("echo state > /tmp/x")
        assert sbx.pause() is True or sbx.get_info().state == SandboxState.PAUSED
        assert sbx.get_info().state == SandboxState.PAUSED
        assert not sbx.is_running()  # envd answers 502 while paused
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.is_running()
        assert resumed.commands.run("cat /tmp/x").stdout == "state\n"
    finally:
        sbx.kill()


def test_list_filters_and_pagination(server: Server) -> None:
    run = uuid.uuid4().hex
    created = [
        Sandbox.create(template="base", timeout=120, metadata={"run": run, "i": str(i), "s": "a b&c=d"})
        for i in range(3)
    ]
    try:
        time.sleep(0.01)
        created[0].pause()
        q = SandboxQuery(metadata={"run": run})
        everything = Sandbox.list(query=q).next_items()
        assert {s.sandbox_id for s in everything} == {s.sandbox_id for s in created}
        # metadata with characters that need (double) encoding
        q2 = SandboxQuery(metadata={"run": run, "s": "a b&c=d", "i": "1"})
        assert [s.sandbox_id for s in Sandbox.list(query=q2).next_items()] == [created[1].sandbox_id]
        # state filter
        paused = Sandbox.list(query=SandboxQuery(metadata={"run": run}, state=[SandboxState.PAUSED])).next_items()
        assert [s.sandbox_id for s in paused] == [created[0].sandbox_id]
        running = Sandbox.list(query=SandboxQuery(metadata={"run": run}, state=[SandboxState.RUNNING])).next_items()
        assert {s.sandbox_id for s in running} == {created[1].sandbox_id, created[2].sandbox_id}
        # template filter
        assert len(Sandbox.list(query=SandboxQuery(metadata={"run": run}, template="base")).next_items()) == 3
        assert Sandbox.list(query=SandboxQuery(metadata={"run": run}, template="other")).next_items() == []
        # startedAfter: only the later ones
        after = Sandbox.get_info(created[1].sandbox_id).started_at
        later = Sandbox.list(query=SandboxQuery(metadata={"run": run}, started_after=after)).next_items()
        assert {s.sandbox_id for s in later} == {created[1].sandbox_id, created[2].sandbox_id}
        # order + pagination with limit=1 across running and paused
        for order, expected in (("asc", created), ("desc", created[::-1])):
            pager = Sandbox.list(query=q, limit=1, order=order)
            seen = []
            while pager.has_next:
                page = pager.next_items()
                assert len(page) <= 1
                seen += [s.sandbox_id for s in page]
                assert len(seen) <= 3
            assert seen == [s.sandbox_id for s in expected]
    finally:
        for s in created:
            s.kill()


def test_list_v1_running_only(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60, metadata={"v1": "yes"})
    try:
        with server.api() as api:
            r = api.get("/sandboxes")
            assert r.status_code == 200
            mine = [s for s in r.json() if s["sandboxID"] == sbx.sandbox_id]
            assert mine and mine[0]["state"] == "running" and mine[0]["metadata"] == {"v1": "yes"}
            # v1 connect (older SDKs) with its required timeout
            r = api.post(f"/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 60})
            assert r.status_code == 200 and r.json()["sandboxID"] == sbx.sandbox_id
    finally:
        sbx.kill()


def test_routing_unknown_sandbox_is_502(server: Server) -> None:
    r = httpx.get(server.url + "/health", headers={"E2b-Sandbox-Id": "nope", "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502 and "The sandbox was not found" in r.json()["message"]


def test_envd_requires_access_token(sandbox: Sandbox, server: Server) -> None:
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"}
    assert httpx.get(server.url + "/health", headers=headers).status_code == 204
    r = httpx.post(
        server.url + "/process.Process/List", headers={**headers, "content-type": "application/json"}, content=b"{}"
    )
    assert r.status_code == 401
    r = httpx.post(
        server.url + "/process.Process/List",
        headers={**headers, "content-type": "application/json", "X-Access-Token": "wrong"},
        content=b"{}",
    )
    assert r.status_code == 401
    r = httpx.get(server.url + "/envs", headers=headers)
    assert r.status_code == 401
    # with the token it answers; port 49999 has nothing yet
    token = Sandbox.connect(sandbox.sandbox_id)._envd_access_token
    r = httpx.get(server.url + "/envs", headers={**headers, "X-Access-Token": token})
    assert r.status_code == 200 and isinstance(r.json(), dict)
    r = httpx.get(server.url + "/health", headers={**headers, "E2b-Sandbox-Port": "8080"})
    assert r.status_code == 502 and "port is not open" in r.json()["message"]


async def test_async_lifecycle(server: Server) -> None:
    run = uuid.uuid4().hex
    sbx = await AsyncSandbox.create(template="base", timeout=60, metadata={"run": run}, envs={"A": "1"})
    try:
        info = await sbx.get_info()
        assert info.metadata == {"run": run}
        assert (await sbx.commands.run("echo $A")).stdout == "1\n"
        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"run": run})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        await sbx.set_timeout(100)
        end0 = (await sbx.get_info()).end_at
        await AsyncSandbox.connect(sbx.sandbox_id, timeout=5)
        assert (await sbx.get_info()).end_at >= end0
        assert await sbx.is_running()
    finally:
        assert await sbx.kill() is True
    assert await AsyncSandbox.kill(sbx.sandbox_id) is False
    assert not await sbx.is_running()


def test_zero_timeout_is_refused_as_e2b_does(server) -> None:  # type: ignore[no-untyped-def]
    with server.api() as api:
        for path in ("/sandboxes", "/v2/sandboxes"):
            r = api.post(path, json={"templateID": "base", "timeout": 0})
            assert r.status_code == 400 and r.json()["message"] == "Timeout must be greater than 0", r.text
    from e2b import Sandbox as _Sandbox

    with pytest.raises(Exception, match="Timeout must be greater than 0"):
        _Sandbox.create(template="base", timeout=0)


def test_metrics_honour_their_window(sandbox) -> None:  # type: ignore[no-untyped-def]
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    first = sandbox.get_metrics()
    assert first, "no metrics for a running sandbox"
    m = first[-1]
    assert m.mem_total > 0 and m.mem_used > 0 and m.cpu_count >= 1
    assert m.disk_total > 0 and 0 < m.disk_used < m.disk_total
    sandbox.commands.run("timeout 2 sh -c 'while :; do :; done'; true", timeout=30)  # 2 s of one CPU
    busy = sandbox.get_metrics()
    assert len(busy) >= 2 and busy[-1].cpu_used_pct > 20, busy  # measured between the two samples
    past = sandbox.get_metrics(start=now - dt.timedelta(hours=2), end=now - dt.timedelta(hours=1))
    assert past == [], past  # nothing outside the window
    assert sandbox.get_metrics(start=now + dt.timedelta(hours=1)) == []
    inside = sandbox.get_metrics(start=now - dt.timedelta(seconds=30), end=now + dt.timedelta(seconds=60))
    assert len(inside) >= 2 and all(s.timestamp >= now - dt.timedelta(seconds=31) for s in inside)


def test_metrics_of_many_sandboxes_at_once(server: Server, sandbox) -> None:  # type: ignore[no-untyped-def]
    """GET /sandboxes/metrics?sandbox_ids=...: the latest sample of each (the SDK's generated client sends
    the IDs comma-separated); unknown IDs are left out; a bounded list."""
    from e2b.api.client.api.sandboxes import get_sandboxes_metrics
    from e2b.api.client.client import Client

    other = Sandbox.create(template="base", timeout=60)
    try:
        client = Client(base_url=server.url, headers={"X-API-KEY": server.api_key})
        ids = [sandbox.sandbox_id, other.sandbox_id, "nosuchsandbox"]
        res = get_sandboxes_metrics.sync_detailed(client=client, sandbox_ids=ids)
        assert res.status_code == 200, res.content
        got = res.parsed.sandboxes  # type: ignore[union-attr]
        assert set(got) == {sandbox.sandbox_id, other.sandbox_id}
        assert all(m["memTotal"] > 0 and m["cpuCount"] >= 1 for m in got.values())
        headers = {"X-API-KEY": server.api_key}
        r = httpx.get(f"{server.url}/sandboxes/metrics", params={"sandbox_ids": ",".join(["x"] * 101)}, headers=headers)
        assert r.status_code == 400
        assert httpx.get(f"{server.url}/sandboxes/metrics", headers=headers).status_code == 400
    finally:
        other.kill()
