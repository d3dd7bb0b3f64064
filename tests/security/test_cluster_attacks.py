"""The cluster's new surface as a hostile client meets it (an API replica over a node, a real PostgreSQL): a team's
key reaches only its team's sandboxes through the replica as through a node (the node checks the key the replica
passes on: the replica widens nothing); what a client sends the replica is bounded before it is read (a create's
body, page sizes, a list cursor, metrics IDs, sandbox IDs), and nothing it sends picks where the replica connects
(only the nodes' leases in the database do)."""

from __future__ import annotations

from pathlib import Path

import httpx
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
