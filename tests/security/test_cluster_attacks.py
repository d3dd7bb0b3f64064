"""The cluster's new surface as a hostile client meets it (an API replica over a node, a real PostgreSQL): a team's
key reaches only its team's sandboxes through the replica as through a node (the node checks the key the replica
passes on: the replica widens nothing); what a client sends the replica is bounded before it is read (a create's
body, page sizes, a list cursor, metrics IDs, sandbox IDs), and nothing it sends picks where the replica connects
(only the nodes' leases in the database do)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from e2b import Sandbox
from pg import PgServer

from conftest import start_server, team_key


def test_a_replica_widens_nothing_and_bounds_what_it_reads(pg: PgServer, tmp_path: Path) -> None:
    database = pg.database()
    node = start_server(tmp_path / "node", "--role", "node", "--database", database, "--pool-size", "0")
    try:
        replica = start_server(tmp_path / "api", "--role", "api", "--database", database)
        try:
            key_a, key_b = team_key(replica, "cl-a"), team_key(replica, "cl-b")
            via = {"api_url": replica.url, "sandbox_url": replica.url}
            mine = Sandbox.create(template="base", timeout=120, api_key=key_a, **via)
            try:
                b = httpx.Client(base_url=replica.url, headers={"X-API-KEY": key_b}, timeout=30)
                sid = mine.sandbox_id
                assert sid not in [s["sandboxID"] for s in b.get("/v2/sandboxes").json()]
                for method, path in (("GET", f"/sandboxes/{sid}"), ("DELETE", f"/sandboxes/{sid}")):
                    r = b.request(method, path)
                    assert r.status_code == 404 and r.json()["message"] == f"sandbox '{sid}' not found", r.text
                assert b.get("/sandboxes/metrics", params={"sandbox_ids": sid}).json() == {"sandboxes": {}}
                assert b.get("/metrics").status_code == 403  # (the operator's, on the node behind)
                assert httpx.get(f"{replica.url}/v2/sandboxes").status_code == 401  # (no key: the node refuses)
                assert mine.commands.run("echo alive").stdout == "alive\n"  # (untouched)

                api = replica.api()
                r = api.post("/sandboxes", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
                assert r.status_code == 413
                deep = b"[" * 60_000 + b"]" * 60_000  # (read for its template by the replica: nested past any stack)
                r = api.post("/sandboxes", content=deep, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, r.text
                for params in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"nextToken": "%%%"}):
                    assert api.get("/v2/sandboxes", params=params).status_code == 400, params
                many = ",".join(f"id{i}" for i in range(5000))
                assert api.get("/sandboxes/metrics", params={"sandbox_ids": many}).json() == {"sandboxes": {}}
                assert api.get("/sandboxes/" + "x" * 5000).status_code in (404, 414)
                r = api.post("/process.Process/List", json={}, headers={"E2b-Sandbox-Id": "../../etc"})
                assert r.status_code == 502 and "not found" in r.text
                # a Host or a forwarding header never steers the replica: it answers from the node it knows
                r = api.get("/v2/sandboxes", headers={"Host": "169.254.169.254", "X-Forwarded-Host": "127.0.0.1:1"})
                assert r.status_code == 200
            finally:
                mine.kill()
        finally:
            replica.stop()
    finally:
        node.stop()


def test_nodes_with_a_cluster_token_serve_only_the_replicas(pg: PgServer, tmp_path: Path) -> None:
    database = pg.database()
    token = ("--cluster-token", "s3cret-of-the-cluster")
    node = start_server(tmp_path / "node", "--role", "node", "--database", database, "--pool-size", "0", *token)
    try:
        replica = start_server(tmp_path / "api", "--role", "api", "--database", database, *token)
        rogue = start_server(tmp_path / "rogue", "--role", "api", "--database", database, "--cluster-token", "guess")
        try:
            via = {"api_url": replica.url, "sandbox_url": replica.url, "api_key": replica.api_key}
            sbx = Sandbox.create(template="base", timeout=60, **via)
            try:
                assert sbx.commands.run("echo through").stdout == "through\n"
                direct = node.api()
                assert direct.get("/v2/sandboxes").status_code == 403  # (straight to the node: refused)
                r = direct.get("/v2/sandboxes", headers={"X-Sandboxd-Cluster": "guess"})
                assert r.status_code == 403 and "API replicas" in r.json()["message"]
                dp = httpx.post(
                    f"{node.url}/process.Process/List",
                    json={},
                    headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"},
                )
                assert dp.status_code == 403  # (the data plane too)
                assert httpx.get(f"{node.url}/health").status_code == 204
                assert rogue.api().get(f"/sandboxes/{sbx.sandbox_id}").status_code == 403  # (a wrong token)
            finally:
                sbx.kill()
        finally:
            rogue.stop()
            replica.stop()
    finally:
        node.stop()


def test_a_layer_whose_content_is_not_the_recorded_one_is_refused(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes without a shared disk fetch templates from each other (cluster/layers.py): a layer changed on the node
    that serves it after its digest was recorded is refused by the node fetching it (nothing of it kept), and the
    routes that serve templates to other nodes are the operator's only."""
    from e2b import Template

    from sandboxd.templates.store import TemplateStore

    from conftest import BUILTIN_TEMPLATES, TEMPLATES_DIR

    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0", "--ready-timeout", "5")
    servers = []
    try:
        for name in ("n1", "n2"):
            TemplateStore(TEMPLATES_DIR).link_into(tmp_path / f"{name}-templates", BUILTIN_TEMPLATES)
            servers.append(start_server(tmp_path / name, *node, templates_dir=tmp_path / f"{name}-templates"))
        n1, n2 = servers
        for k, v in {"E2B_API_URL": n1.url, "E2B_SANDBOX_URL": n1.url, "E2B_API_KEY": n1.api_key}.items():
            monkeypatch.setenv(k, v)
        Template.build(Template().from_template("base").run_cmd("echo sound > /tmp/made"), "tamper-me")
        top = TemplateStore(tmp_path / "n1-templates").get("tamper-me").top_layer
        assert top is not None

        key = team_key(n1, "cl-tenant")
        for path in ("/admin/cluster/templates/tamper-me", f"/admin/cluster/layers/{top}"):
            r = httpx.get(n1.url + path, headers={"X-API-KEY": key})
            assert r.status_code == 403, r.text  # (a tenant never reads templates' layers this way)
        api1 = n1.api()
        assert api1.get("/admin/cluster/layers/..%2F..%2Fetc").status_code == 404
        assert api1.get("/admin/cluster/layers/" + "0" * 32).status_code == 404
        r = api1.get("/admin/cluster/templates/tamper-me")  # (serving it records its layers' digests)
        assert r.status_code == 200 and r.json()["layers"][0]["key"] == top

        evil = tmp_path / "n1-templates" / ".layers" / top / "diff" / "tmp" / "evil"
        evil.write_text("planted after the digest was recorded\n")
        deadline = time.monotonic() + 15  # (n2 learns from n1's lease that n1 holds it)
        while True:
            with psycopg.connect(database) as db:
                told = [json.loads(c).get("templates", []) for (c,) in db.execute("SELECT capacity FROM nodes")]
            if any("tamper-me" in t for t in told):
                break
            assert time.monotonic() < deadline, told
            time.sleep(0.25)

        api2 = n2.api()
        r = api2.post("/sandboxes", json={"templateID": "tamper-me", "timeout": 60})
        assert r.status_code == 503 and "is not the one recorded" in r.json()["message"], r.text
        mine = tmp_path / "n2-templates"
        assert not (mine / ".layers" / top).exists() and list((mine / ".layers").glob(".new-*")) == []
        assert not (mine / ".names" / "tamper-me").exists()

        evil.unlink()  # (as it was: the same digest, taken)
        r = api2.post("/sandboxes", json={"templateID": "tamper-me", "timeout": 60})
        assert r.status_code == 201, r.text
        sandbox = Sandbox.connect(r.json()["sandboxID"], api_url=n2.url, sandbox_url=n2.url, api_key=n2.api_key)
        assert sandbox.files.read("/tmp/made") == "sound\n"
        assert sandbox.files.exists("/tmp/evil") is False
        sandbox.kill()
    finally:
        for srv in reversed(servers):
            srv.stop()
