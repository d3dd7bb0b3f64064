"""Teams' limits (core/quotas.py) on a server of its own: a team's key is held to its sandboxes at once and its
creates per minute (429 with Retry-After and which limit, before any work), each team's own limits through the
operator's API, the operator's key never limited; bodies that are not two small whole numbers are refused."""

from __future__ import annotations

from pathlib import Path

import httpx

from conftest import start_server, team_key


def test_a_team_is_held_to_its_limits(tmp_path: Path) -> None:
    srv = start_server(
        tmp_path / "data", "--pool-size", "0", "--team-max-sandboxes", "2", "--team-creates-per-minute", "3"
    )
    try:
        key = team_key(srv, "limited")
        team = httpx.Client(base_url=srv.url, headers={"X-API-KEY": key}, timeout=60)
        new = {"templateID": "base", "timeout": 60}
        first = [team.post("/sandboxes", json=new) for _ in range(2)]
        assert [r.status_code for r in first] == [201, 201]
        r = team.post("/sandboxes", json=new)
        assert r.status_code == 429 and "limit of 2 sandboxes at once" in r.json()["message"], r.text
        assert int(r.headers["retry-after"]) >= 1
        assert team.delete(f"/sandboxes/{first[0].json()['sandboxID']}").status_code == 204
        third = team.post("/sandboxes", json=new)  # (one ended: room again; the 3rd create of the minute)
        assert third.status_code == 201, third.text
        assert team.delete(f"/sandboxes/{third.json()['sandboxID']}").status_code == 204
        r = team.post("/sandboxes", json=new)
        assert r.status_code == 429 and "3 creates per minute" in r.json()["message"], r.text
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert srv.api().post("/sandboxes", json=new).status_code == 201  # (the operator: never limited)

        # its own limits, set by the operator only
        api = srv.api()
        assert team.put("/admin/teams/limited/limits", json={"maxSandboxes": 9}).status_code == 403
        for bad in ({"maxSandboxes": -1}, {"maxSandboxes": True}, {"createsPerMinute": 1.5}, {"other": 1}):
            assert api.put("/admin/teams/limited/limits", json=bad).status_code == 400, bad
        r = api.put("/admin/teams/limited/limits", json={"maxSandboxes": 10, "createsPerMinute": 100})
        assert r.json() == {"teamID": "limited", "maxSandboxes": 10, "createsPerMinute": 100, "custom": True}
        assert team.post("/sandboxes", json=new).status_code == 201
        r = api.delete("/admin/teams/limited/limits")
        assert r.json() == {"teamID": "limited", "maxSandboxes": 2, "createsPerMinute": 3, "custom": False}
        assert team.post("/sandboxes", json=new).status_code == 429
    finally:
        srv.stop()
