"""Teams (core/teams.py) as a hostile tenant meets them: a key of team B finds nothing of team A's — not its
sandboxes (listed, by ID through every route, by the official SDK, their metrics, logs, diff, snapshots, forks,
ended ones), not its snapshots or volumes — and changes none of A's templates; a team key is refused the
operator's routes (metrics of every team, pools' limits, secrets, keys); a revoked key stops at once; the
database keeps no key, only hashes; the CLI makes, lists and revokes keys."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import NotFoundException, SandboxException

from conftest import Server, builder_server, keys_cli, team_key


def as_key(srv: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"X-API-KEY": key}, timeout=60)


def test_a_team_sees_and_touches_only_its_own_sandboxes(server: Server) -> None:
    key_a, key_b = team_key(server, "team-a"), team_key(server, "team-b")
    conn = {"api_url": server.url, "sandbox_url": server.url}
    mine = Sandbox.create(template="base", timeout=120, api_key=key_a, metadata={"who": "a"}, **conn)
    theirs = Sandbox.create(template="base", timeout=120, api_key=key_b, **conn)
    try:
        sid = mine.sandbox_id
        assert mine.commands.run("echo hi").stdout == "hi\n"
        b = as_key(server, key_b)
        assert sid not in [s["sandboxID"] for s in b.get("/v2/sandboxes").json()]
        assert sid not in [s["sandboxID"] for s in b.get("/sandboxes").json()]
        assert b.get("/v2/sandboxes").headers["X-Total-Running"] == "1"  # (its own only)
        assert sid not in [s.sandbox_id for s in Sandbox.list(api_key=key_b, **conn).next_items()]
        assert b.get("/sandboxes/metrics", params={"sandbox_ids": sid}).json() == {"sandboxes": {}}
        for method, path in (
            ("GET", f"/sandboxes/{sid}"),
            ("DELETE", f"/sandboxes/{sid}"),
            ("POST", f"/sandboxes/{sid}/timeout"),
            ("POST", f"/sandboxes/{sid}/connect"),
            ("POST", f"/v2/sandboxes/{sid}/connect"),
            ("POST", f"/sandboxes/{sid}/resume"),
            ("POST", f"/sandboxes/{sid}/pause"),
            ("GET", f"/sandboxes/{sid}/metrics"),
            ("PUT", f"/sandboxes/{sid}/network"),
            ("GET", f"/sandboxes/{sid}/logs"),
            ("GET", f"/v2/sandboxes/{sid}/logs"),
            ("GET", f"/sandboxes/{sid}/diff"),
            ("POST", f"/sandboxes/{sid}/snapshots"),
            ("POST", f"/sandboxes/{sid}/fork"),
        ):
            r = b.request(method, path, json={"timeout": 30})
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.json()["message"] == f"sandbox '{sid}' not found", r.text  # (nothing about it said)
        with pytest.raises((NotFoundException, SandboxException)):
            Sandbox.connect(sid, api_key=key_b, **conn)
        assert mine.is_running() and mine.commands.run("true").exit_code == 0  # (untouched)

        # the operator sees every team's
        ids = [s["sandboxID"] for s in server.api().get("/v2/sandboxes").json()]
        assert sid in ids and theirs.sandbox_id in ids

        # ended: listed (state=killed) and explained to its team only
        assert as_key(server, key_a).delete(f"/sandboxes/{sid}").status_code == 204
        killed = [s["sandboxID"] for s in b.get("/v2/sandboxes", params={"state": "killed"}).json()]
        assert sid not in killed
        assert sid in [s["sandboxID"] for s in as_key(server, key_a).get("/v2/sandboxes?state=killed").json()]
        r = b.get(f"/sandboxes/{sid}")
        assert r.status_code == 404 and "killed" not in r.json()["message"]
        assert "was killed" in as_key(server, key_a).get(f"/sandboxes/{sid}").json()["message"]
    finally:
        for s in (mine, theirs):
            server.api().delete(f"/sandboxes/{s.sandbox_id}")


def test_a_team_key_is_refused_the_operators_routes(server: Server) -> None:
    b = as_key(server, team_key(server, "team-ops"))
    for method, path in (
        ("GET", "/metrics"),
        ("PUT", "/pools/base"),
        ("DELETE", "/pools/base"),
        ("GET", "/secrets"),
        ("POST", "/secrets"),
        ("POST", "/api-keys"),
        ("DELETE", "/api-keys/x"),
        ("POST", "/admin/teams/team-ops/api-keys"),
        ("POST", "/admin/teams/default/api-keys"),
    ):
        r = b.request(method, path, json={"min": 0, "max": 1, "name": "x"})
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert "server's own API key" in r.json()["message"]
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {b.headers['X-API-KEY']}"})
    assert r.status_code == 403
    assert b.get("/pools").status_code == 200  # (reading the pools tells no other team's sandbox)
    listed = b.get("/api-keys").json()
    assert {k["teamID"] for k in listed} == {"team-ops"} and all("key" not in k for k in listed)
    assert b.get("/teams").json() == [{"teamID": "team-ops", "name": "team-ops", "isDefault": True}]


def test_keys_are_kept_hashed_and_a_revoked_one_stops_at_once(server: Server) -> None:
    key = team_key(server, "team-revoke")
    assert as_key(server, key).get("/v2/sandboxes").status_code == 200
    raw = b"".join(p.read_bytes() for p in server.data_dir.glob("state.db*"))
    assert key.encode() not in raw and key[4:].encode() not in raw
    db = sqlite3.connect(f"file:{server.data_dir / 'state.db'}?mode=ro", uri=True)
    assert db.execute("SELECT COUNT(*) FROM api_keys WHERE team = 'team-revoke'").fetchone() == (1,)
    db.close()

    listed = keys_cli(server, "list", "--team", "team-revoke")
    assert listed.returncode == 0 and "team-revoke" in listed.stdout and key not in listed.stdout
    assert key[-4:] in listed.stdout  # (the end of the key, to tell keys apart)
    key_id = next(k["id"] for k in server.api().get("/api-keys", params={"team": "team-revoke"}).json())
    done = keys_cli(server, "revoke", key_id)
    assert done.returncode == 0, done.stderr
    r = as_key(server, key).get("/v2/sandboxes")
    assert r.status_code == 401 and r.json()["message"] == "invalid API key"
    again = keys_cli(server, "revoke", key_id)
    assert again.returncode == 1 and "not found" in again.stderr
    for bad in ("Team", "a/b", "x" * 64, "-x", ""):
        r = server.api().post(f"/admin/teams/{bad}/api-keys", json={"name": "x"})
        assert r.status_code in (400, 404, 405), (bad, r.status_code)
    assert server.api().post("/admin/teams/ok/api-keys", json={"name": "a\nb"}).status_code == 400
    assert server.api().post("/admin/teams/ok/api-keys", json={"name": "x" * 5000}).status_code == 400
    assert keys_cli(server, "create", "--team", "Bad Team").returncode == 1


def test_snapshots_volumes_and_templates_stay_with_their_team(tmp_path: Path) -> None:
    with builder_server(tmp_path, "--pool-size", "0") as srv:
        key_a, key_b = team_key(srv, "snap-a"), team_key(srv, "snap-b")
        a, b = as_key(srv, key_a), as_key(srv, key_b)
        conn = {"api_url": srv.url, "sandbox_url": srv.url}
        box = Sandbox.create(template="base", timeout=120, api_key=key_a, **conn)
        try:
            box.files.write("/home/user/secret.txt", "a's")
            r = a.post(f"/sandboxes/{box.sandbox_id}/snapshots", json={"name": "a-snap"})
            assert r.status_code == 201, r.text
            snap = r.json()["snapshotID"]
            assert snap in [s["snapshotID"] for s in a.get("/snapshots").json()]
            assert snap not in [s["snapshotID"] for s in b.get("/snapshots").json()]
            assert b.post("/sandboxes", json={"templateID": snap}).status_code == 404
            assert b.post("/sandboxes", json={"templateID": "a-snap"}).status_code == 404
            assert b.get(f"/templates/{snap}").status_code == 404
            assert b.delete(f"/templates/{snap}").status_code == 404
            assert snap not in [t["templateID"] for t in b.get("/templates").json()]
            # a snapshot of B's by A's name does not replace A's
            own = Sandbox.create(template="base", timeout=60, api_key=key_b, **conn)
            r = b.post(f"/sandboxes/{own.sandbox_id}/snapshots", json={"name": "a-snap"})
            assert r.status_code == 403, r.text
            own.kill()
            child = Sandbox.create(template=snap, timeout=60, api_key=key_a, **conn)
            assert child.files.read("/home/user/secret.txt") == "a's"
            child.kill()

            # volumes
            vol = a.post("/volumes", json={"name": "a-vol"}).json()
            assert vol["volumeID"] not in [v["volumeID"] for v in b.get("/volumes").json()]
            assert b.get(f"/volumes/{vol['volumeID']}").status_code == 404
            assert b.get("/volumes/a-vol").status_code == 404
            assert b.delete(f"/volumes/{vol['volumeID']}").status_code == 404
            mount = {"templateID": "base", "volumeMounts": [{"name": "a-vol", "path": "/mnt/v"}]}
            r = b.post("/sandboxes", json=mount)
            assert r.status_code == 404 and "volume" in r.json()["message"], r.text
            assert a.get(f"/volumes/{vol['volumeID']}").status_code == 200

            # templates: every team uses them; only the team that made one changes it
            r = a.post("/v3/templates", json={"name": "a-tpl"})
            assert r.status_code == 202, r.text
            tpl = r.json()["templateID"]
            for method, path, body in (
                ("POST", "/v3/templates", {"name": "a-tpl"}),
                ("GET", f"/templates/{tpl}/files/{'0' * 64}", None),
                ("POST", f"/v2/templates/{tpl}/builds/{r.json()['buildID']}", {"steps": []}),
                ("GET", f"/templates/{tpl}/builds/{r.json()['buildID']}/status", None),
            ):
                got = b.request(method, path, json=body)
                assert got.status_code == 403, (method, path, got.status_code, got.text)
                assert "another team" in got.json()["message"]
            assert b.post("/v3/templates", json={"name": "b-tpl"}).status_code == 202
            assert b.delete(f"/templates/{snap}").status_code == 404
            assert a.delete(f"/templates/{snap}").status_code == 204
            assert a.delete(f"/volumes/{vol['volumeID']}").status_code == 204
        finally:
            box.kill()


def test_a_team_cannot_have_the_operators_secrets_put_into_its_requests(server: Server) -> None:
    from e2b import InvalidArgumentException, SandboxException

    key = team_key(server, "team-secrets")
    conn = {"api_url": server.url, "sandbox_url": server.url, "api_key": key}
    name = f"operator-{secrets.token_hex(4)}"
    assert server.api().post("/secrets", json={"name": name, "value": "s3cret"}).status_code == 201
    try:
        rules = {"collector.example": [{"transform": {"headers": {"X-Leak": "${e2b.secrets." + name + "}"}}}]}
        network = {"allow_out": ["collector.example"], "deny_out": ["0.0.0.0/0"], "rules": rules}
        with pytest.raises((InvalidArgumentException, SandboxException)) as refused:
            Sandbox.create(template="base", timeout=30, network=network, **conn)
        assert "operator" in str(refused.value)
        own = Sandbox.create(template="base", timeout=60, **conn)
        try:
            r = as_key(server, key).put(f"/sandboxes/{own.sandbox_id}/network", json=network)
            assert r.status_code == 400 and "operator" in r.json()["message"], r.text
        finally:
            own.kill()
    finally:
        server.api().delete(f"/secrets/{name}")
