"""The cluster's new surface as a hostile client meets it (an API replica over a node, a real PostgreSQL): a team's
key reaches only its team's sandboxes through the replica as through a node (the node checks the key the replica
passes on: the replica widens nothing); what a client sends the replica is bounded before it is read (a create's
body, page sizes, a list cursor, metrics IDs, sandbox IDs), a body cut short is never passed on as whole, and nothing
it sends picks where the replica connects (only the nodes' leases in the database do). Nodes fetching templates
from each other refuse a layer that is not what the state recorded; mutual TLS keeps others off the nodes."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from e2b import Sandbox
from pg import PgServer

from conftest import own_node, start_server, team_key


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
                # a body cut short (the client gone before its declared length) is never passed on as a whole one:
                # a raw upload of 1000 bytes of which 400 came writes no file
                token = getattr(mine, "_envd_access_token", None) or ""
                head = (
                    f"POST /files?path=/tmp/cut&username=user HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: {sid}\r\n"
                    f"X-Access-Token: {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
                )
                with socket.create_connection(("127.0.0.1", int(replica.url.rsplit(":", 1)[1]))) as raw:
                    raw.sendall(head.encode() + b"x" * 400)
                    time.sleep(0.5)
                time.sleep(0.5)
                assert not mine.files.exists("/tmp/cut"), mine.files.get_info("/tmp/cut")
                assert mine.commands.run("echo still").stdout == "still\n"
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

    from conftest import sdk_env, wait_for_holders

    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0", "--ready-timeout", "5")
    servers = []
    try:
        for name in ("n1", "n2"):
            servers.append(own_node(tmp_path, name, *node))
        n1, n2 = servers
        sdk_env(monkeypatch, n1)
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
        wait_for_holders(database, "tamper-me")  # (the other node learns from the lease who holds it)

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


def _pems(ca: Any, where: Path, name: str) -> tuple[str, ...]:
    """The three --cluster-* flags of a process with a certificate of `ca` for 127.0.0.1."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(where / f"{name}-ca.pem"))
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(where / f"{name}.pem"), append=i > 0)
    leaf.private_key_pem.write_to_path(str(where / f"{name}.key"))
    return (
        "--cluster-ca", str(where / f"{name}-ca.pem"),
        "--cluster-cert", str(where / f"{name}.pem"),
        "--cluster-key", str(where / f"{name}.key"),
    )  # fmt: skip


def test_mutual_tls_between_replicas_and_nodes(pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --cluster-ca/-cert/-key, nodes serve the cluster on --cluster-port over TLS to clients whose certificate
    the cluster's CA signed: the official SDK works through a replica (commands, files, the dashboard's terminal over
    wss), a node fetches a template from another over it, and a client without a certificate, with one of another
    CA, or a replica that trusts another CA gets nothing from a node."""
    import trustme
    from e2b import Template

    from conftest import (
        free_port,
        node_holding,
        sdk_env,
        terminal_echo,
        wait_for_holders,
    )

    database = pg.database()
    ca, other_ca = trustme.CA(), trustme.CA()
    ports = [free_port(), free_port()]
    servers = []
    try:
        for name, port in zip(("a", "b"), ports, strict=True):
            flags = ("--cluster-port", str(port), *_pems(ca, tmp_path, name))
            node = ("--role", "node", "--database", database, "--pool-size", "0", *flags)
            servers.append(own_node(tmp_path, name, *node))  # (its own templates: what a build makes is the test's)
        replica = start_server(tmp_path / "r", "--role", "api", "--database", database, *_pems(ca, tmp_path, "r"))
        servers.append(replica)
        with psycopg.connect(database) as db:
            urls = sorted(u for (u,) in db.execute("SELECT url FROM nodes"))
        assert urls == sorted(f"https://127.0.0.1:{p}" for p in ports)

        via = {"api_url": replica.url, "sandbox_url": replica.url, "api_key": replica.api_key}
        made = [Sandbox.create(template="base", timeout=120, **via) for _ in range(2)]
        try:
            for i, s in enumerate(made):
                assert s.commands.run(f"echo tls-{i}").stdout == f"tls-{i}\n"
                s.files.write("/tmp/t", f"over mutual TLS {i}")
                assert Sandbox.connect(s.sandbox_id, **via).files.read("/tmp/t") == f"over mutual TLS {i}"
            terminal_echo(replica.url, replica.api_key, made[0].sandbox_id, "wss")  # (wss from the replica on)
        finally:
            for s in made:
                s.kill()

        # node to node: a template built on one, created on the other (asked on its own local port), fetched over TLS
        sdk_env(monkeypatch, replica)
        Template.build(Template().from_template("base").run_cmd("echo tls-made > /tmp/made"), "over-tls")
        _, other = node_holding(servers[:2], lambda n: tmp_path / f"{n.data_dir.name}-templates", "over-tls")
        wait_for_holders(database, "over-tls")  # (the other node learns from the lease who holds it)
        r = other.api().post("/sandboxes", json={"templateID": "over-tls", "timeout": 60})
        assert r.status_code == 201, r.text
        fetched = Sandbox.connect(r.json()["sandboxID"], **via)
        assert fetched.files.read("/tmp/made") == "tls-made\n"
        fetched.kill()

        # what a node's cluster port refuses
        node_url = f"https://127.0.0.1:{ports[0]}/health"
        with pytest.raises(httpx.TransportError):  # (no client certificate)
            httpx.get(node_url, verify=ssl.create_default_context(cafile=str(tmp_path / "r-ca.pem")), timeout=10)
        stranger = _pems(other_ca, tmp_path, "stranger")
        with pytest.raises(httpx.TransportError):  # (a certificate of another CA)
            ctx = ssl.create_default_context(cafile=str(tmp_path / "r-ca.pem"))
            ctx.load_cert_chain(stranger[3], stranger[5])
            httpx.get(node_url, verify=ctx, timeout=10)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "r-ca.pem"))
        ctx.load_cert_chain(str(tmp_path / "r.pem"), str(tmp_path / "r.key"))
        assert httpx.get(node_url, verify=ctx, timeout=10).status_code == 204  # (the cluster's: served)
        for rogue_flags in ((), stranger):  # a replica without certificates, and one of another CA
            rogue = start_server(tmp_path / f"rogue{len(rogue_flags)}", "--role", "api", "--database", database,
                                 *rogue_flags)  # fmt: skip
            try:
                r = rogue.api().post("/sandboxes", json={"templateID": "base", "timeout": 30})
                assert r.status_code == 503 and "no node could take" in r.json()["message"], r.text
            finally:
                rogue.stop()
    finally:
        for srv in reversed(servers):
            srv.stop()


def test_a_hostile_manifest_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """What another node or the bucket says a template is (its manifest) is checked before any of it is used: IDs
    and builds are names, not paths; the layers a chain ending in the build's top (no parent pointing elsewhere on
    the host); the root filesystem inside the templates dir; a layer only with the digest the state recorded; a
    fetched template never a built-in one, nor a snapshot with memory."""
    import contextlib
    import io
    import subprocess
    import tarfile
    from collections.abc import Iterator

    from sandboxd.cluster.layers import FetchFailed, LayerShare
    from sandboxd.state.db import StateDB
    from sandboxd.templates.store import TemplateStore
    from sandboxd.templates.transfer import tree_digest

    state = StateDB(tmp_path / "state.db")
    store = TemplateStore(tmp_path / "templates")
    share = LayerShare(store, state, "e2b_key", None)
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc" / "motd").write_text("fetched\n")
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        t.add(content, arcname=".")

    class Hostile:
        where = "a hostile node"

        def __init__(self, manifest: dict[str, Any]) -> None:
            self.value = manifest

        def manifest(self, name: str, build: str | None = None) -> dict[str, Any] | None:
            return self.value

        @contextlib.contextmanager
        def layer(self, key: str) -> Iterator[Iterator[bytes]]:
            yield iter([tar.getvalue()])

    key = "ab" * 16

    def manifest(**over: Any) -> dict[str, Any]:
        good = {
            "templateID": "fetchedone",
            "build": "b1",
            "meta": {"templateID": "fetchedone", "names": ["fetched-one"], "builtin": True},
            "version": {"top": key, "start_cmd": "", "memory": {"uid_base": 1}},
            "base": ".empty-root",
            "layers": [{"key": key, "parent": None, "step": "s", "size_bytes": 4096, "created": 1.0}],
        }
        return {**good, **over}

    for bad, says in (
        (manifest(templateID="../../etc"), "not allowed"),
        (manifest(build="../x"), "not allowed"),
        (manifest(layers=[{"key": key, "parent": "../../../../etc"}]), "not a chain"),
        (manifest(layers=[{"key": "../../etc", "parent": None}]), "not a chain"),
        (manifest(layers=[]), "no layers"),
        (manifest(version={"top": "cd" * 16}), "top layer"),
        (manifest(base="../../../../etc"), "not allowed"),
        (manifest(base="/etc"), "not allowed"),
        (manifest(), "no digest"),  # (the state never heard of the layer)
    ):
        with pytest.raises(FetchFailed, match=says):
            share._fetch(Hostile(bad), "fetched-one")
        assert store.resolve("fetched-one")[0] is None and store.layers.keys() == []

    state.put_layer(key, "sha256:" + "0" * 64, 4096)  # (recorded, but not this content)
    with pytest.raises(FetchFailed, match="not the one recorded"):
        share._fetch(Hostile(manifest()), "fetched-one")
    assert store.layers.keys() == [] and list((store.dir / ".layers").glob(".new-*")) == []

    other = StateDB(tmp_path / "other.db")  # (the same content, its digest recorded: taken)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-x", "-C", str(unpacked)], input=tar.getvalue(), check=True)
    other.put_layer(key, tree_digest(unpacked), 4096)
    share = LayerShare(store, other, "e2b_key", None)
    with pytest.raises(FetchFailed, match="asked for build"):  # (the catalog's build asked for, another sent)
        share._fetch(Hostile(manifest()), "fetched-one", "b2")
    assert share._fetch(Hostile(manifest()), "fetched-one")
    fetched = store.get("fetched-one")
    assert fetched.memory_images is None and not store.is_builtin(fetched.name)  # (what only a node writes: not)
    assert (store.layers.get(key).diff / "etc" / "motd").read_text() == "fetched\n"  # type: ignore[union-attr]


def test_a_snapshots_memory_from_elsewhere_is_taken_only_as_its_node_told_it(tmp_path: Path) -> None:
    """A snapshot's processes (CRIU's images) travel with their restore config — the uid range their images name and
    what the server's parts carry — under a key that hashes the template, its build and that config: a hostile node
    or bucket that changes the config (a uid range of its choosing, volumes) without the key is refused, one that
    changes the key finds no digest for it in the state, and images other than those recorded are refused."""
    import contextlib
    import io
    import tarfile
    from collections.abc import Iterator

    from sandboxd.cluster.layers import FetchFailed, LayerShare, memory_key
    from sandboxd.state.db import StateDB
    from sandboxd.templates.store import TemplateStore
    from sandboxd.templates.transfer import tree_digest

    def tar_of(root: Path) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as t:
            t.add(root, arcname=".")
        return out.getvalue()

    files, images = tmp_path / "files", tmp_path / "images"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "motd").write_text("files\n")
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"\x01" * 4096)
    trees = {"layer": tar_of(files), "memory": tar_of(images)}
    layer_key = "ab" * 16
    config = {"uid_base": 200000, "parts": {"Kept": {"commands": []}}, "volume_mounts": []}
    key = memory_key("snapped", "b1", config)

    class Hostile:
        where = "a hostile node"

        def __init__(self, manifest: dict[str, Any], memory: bytes | None = None) -> None:
            self.value, self.memory = manifest, memory or trees["memory"]

        def manifest(self, name: str, build: str | None = None) -> dict[str, Any] | None:
            return self.value

        @contextlib.contextmanager
        def layer(self, asked: str) -> Iterator[Iterator[bytes]]:
            yield iter([trees["layer"] if asked == layer_key else self.memory])

    def manifest(**memory: Any) -> dict[str, Any]:
        return {
            "templateID": "snapped",
            "build": "b1",
            "meta": {"templateID": "snapped", "names": ["snapped"]},
            "version": {"top": layer_key, "start_cmd": ""},
            "base": ".empty-root",
            "layers": [{"key": layer_key, "parent": None, "step": "s", "size_bytes": 4096, "created": 1.0}],
            "memory": {"key": key, "size_bytes": 4096, "config": config, **memory},
        }

    state = StateDB(tmp_path / "state.db")
    store = TemplateStore(tmp_path / "templates")
    share = LayerShare(store, state, "e2b_key", None)
    state.put_layer(layer_key, tree_digest(files), 4096)
    state.put_layer(key, tree_digest(images), 4096)
    theirs = {**config, "uid_base": 0}  # (the host's root, say)
    for bad, says in (
        (manifest(config=theirs), "is not its config's"),
        (manifest(config={**config, "parts": {"Kept": {"commands": [{"pid": 1}]}}}), "is not its config's"),
        (manifest(config={**config, "volume_mounts": [{"volumeID": "v", "path": "/x"}]}), "has volumes"),
        (manifest(config={**config, "uid_base": True}), "no uid range"),
        (manifest(config="x"), "not an object"),
        (manifest(key=memory_key("snapped", "b1", theirs), config=theirs), "no digest"),
    ):
        with pytest.raises(FetchFailed, match=says):
            share._fetch(Hostile(bad), "snapped")
        assert store.resolve("snapped")[0] is None
    (images / "pages-1.img").write_bytes(b"\x02" * 4096)  # (other pages than those recorded)
    with pytest.raises(FetchFailed, match="not the one recorded"):
        share._fetch(Hostile(manifest(), tar_of(images)), "snapped")
    assert store.resolve("snapped")[0] is None and list((store.dir / ".layers").glob(".new-*")) == []

    assert share._fetch(Hostile(manifest()), "snapped")  # (as its node told it: taken, memory and all)
    fetched = store.get("snapped")
    assert fetched.memory_uid_base == 200000 and fetched.memory_parts == config["parts"]
    assert fetched.memory_images is not None
    assert (fetched.memory_images / "pages-1.img").read_bytes() == b"\x01" * 4096


def test_a_template_or_snapshot_name_of_another_team_on_another_node_is_not_taken(pg: PgServer, tmp_path: Path) -> None:
    """A team's new template or snapshot name, taken on one node: another team building it, or snapshotting over it, on
    another node is refused. A team's named snapshot on one node: another team snapshotting a sandbox of its own
    under that name on another node (which did not hold the snapshot) is refused as it is on the snapshot's own node
    (it made a second template of that name, its own, which creates of the name could then be placed on); the owning
    team's snapshot of that name taken on the other node is a new version of the same template, which every node
    then starts."""
    from sandboxd.templates.store import TemplateStore

    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0")
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(own_node(tmp_path, name, *node))
        a, b = servers
        owner, other = team_key(a, "owners"), team_key(a, "others")

        def sandbox_on(srv: Any, key: str, text: str) -> str:
            sbx = Sandbox.create(template="base", timeout=60, api_url=srv.url, sandbox_url=srv.url, api_key=key)
            sbx.files.write("/home/user/which", text)
            return sbx.sandbox_id

        def snapshot(srv: Any, key: str, sandbox_id: str) -> httpx.Response:
            return httpx.post(
                f"{srv.url}/sandboxes/{sandbox_id}/snapshots",
                json={"name": "prod-snap", "memory": False},
                headers={"X-API-KEY": key},
                timeout=60,
            )

        # a team's new template, requested on one node (named in the cluster, its build not even started): another
        # team asking for a build, or taking a snapshot, of that name on another node is refused (it took it over:
        # a build request's new template was given to the caller's team)
        r = httpx.post(f"{a.url}/v3/templates", json={"name": "first-named"}, headers={"X-API-KEY": owner})
        assert r.status_code == 202, r.text
        r = httpx.post(f"{b.url}/v3/templates", json={"name": "first-named"}, headers={"X-API-KEY": other})
        assert r.status_code == 403, r.text
        r = httpx.post(
            f"{b.url}/sandboxes/{sandbox_on(b, other, 'x')}/snapshots",
            json={"name": "first-named", "memory": False},
            headers={"X-API-KEY": other},
            timeout=60,
        )
        assert r.status_code == 403, r.text
        r = httpx.post(f"{b.url}/v3/templates", json={"name": "first-named"}, headers={"X-API-KEY": owner})
        assert r.status_code == 202, r.text  # (its own team: another build of it, anywhere)

        for srv in servers:  # (a build asked of a node's cluster routes is a build's ID, not a path)
            r = httpx.get(f"{srv.url}/admin/cluster/templates/base?build=../../etc", headers={"X-API-KEY": srv.api_key})
            assert r.status_code == 400, r.text
        assert snapshot(a, owner, sandbox_on(a, owner, "first")).status_code == 201
        time.sleep(2.5)  # (a's lease tells it holds the snapshot)
        r = snapshot(b, other, sandbox_on(b, other, "evil"))
        assert r.status_code == 403 and "another team's" in r.json()["message"], r.text
        r = snapshot(b, owner, sandbox_on(b, owner, "second"))
        assert r.status_code == 201, r.text
        idents = {TemplateStore(tmp_path / f"{n}-templates").resolve("prod-snap")[0] for n in ("a", "b")}
        assert len(idents) == 1, idents
        time.sleep(1.1)  # (a reads what the name means once a second at most)
        for srv in servers:
            made = Sandbox.create(template="prod-snap", timeout=30, api_url=srv.url, sandbox_url=srv.url, api_key=owner)
            assert made.files.read("/home/user/which") == "second"
            made.kill()
    finally:
        for srv in servers:
            srv.stop()


def test_a_replica_tells_where_a_volume_is_only_to_its_team(pg: PgServer, tmp_path: Path) -> None:
    """Volumes are one node's (its disk) and a team's: a replica places a create mounting them, and routes their
    content API, by their node — which another team must not learn, nor that they exist. A create naming two teams'
    volumes on two nodes said "kept on different nodes (… on node N)", and calls on a lost node's volume named it and
    its node: an oracle. Another team gets the node's own answer (404 / 401), without a node's name."""
    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0")
    servers = [start_server(tmp_path / name, *node) for name in ("a", "b")]
    holder = None
    try:
        replica = start_server(tmp_path / "r", "--role", "api", "--database", database)
        servers.append(replica)
        owner = {"X-API-KEY": team_key(replica, "owners")}
        stranger = {"X-API-KEY": team_key(replica, "strangers")}
        r = httpx.post(f"{replica.url}/volumes", json={"name": "secret-a"}, headers=owner)
        assert r.status_code == 201, r.text
        vol = r.json()
        with psycopg.connect(database) as db:
            (body,) = db.execute("SELECT body FROM volumes WHERE id = %s", (vol["volumeID"],)).fetchone()
        home = json.loads(body)["node"]
        holder = next(s for s in servers[:2] if (s.data_dir / "node-id").read_text().strip() == home)
        other = next(s for s in servers[:2] if s is not holder)
        r = httpx.post(f"{other.url}/volumes", json={"name": "secret-b"}, headers=owner)
        assert r.status_code == 201, r.text
        mounts = [{"name": "secret-a", "path": "/a"}, {"name": "secret-b", "path": "/b"}]
        r = httpx.post(f"{replica.url}/sandboxes", json={"templateID": "base", "volumeMounts": mounts}, headers=owner)
        assert r.status_code == 400 and "different nodes" in r.text, r.text  # (its own team is told)
        r = httpx.post(
            f"{replica.url}/sandboxes", json={"templateID": "base", "volumeMounts": mounts}, headers=stranger
        )
        assert r.status_code == 404 and "node" not in r.text, r.text

        holder.stop(signal.SIGKILL)
        content = f"{replica.url}/volumecontent/{vol['volumeID']}/file?path=/x"
        deadline = time.monotonic() + 15
        while "was lost" not in (r := httpx.get(content, headers={"Authorization": f"Bearer {vol['token']}"})).text:
            assert time.monotonic() < deadline, r.text  # (its token's holder is told, once its lease ran out)
            time.sleep(0.25)
        for method, url, headers in (
            ("GET", content, {"Authorization": "Bearer not-its-token"}),
            ("GET", content, stranger),
            ("DELETE", f"{replica.url}/volumes/secret-a", stranger),
        ):
            r = httpx.request(method, url, headers=headers)
            assert r.status_code in (401, 404) and "node" not in r.text, (method, url, r.text)
        r = httpx.post(
            f"{replica.url}/sandboxes", json={"templateID": "base", "volumeMounts": mounts[:1]}, headers=stranger
        )
        assert r.status_code == 404 and "node" not in r.text, r.text
    finally:
        for srv in reversed(servers):
            if srv.proc.poll() is None:
                srv.stop()
        if holder is not None and holder.proc.poll() is not None:  # (its volume unmounted: back, then gone)
            start_server(holder.data_dir, *node, port=int(holder.url.rsplit(":", 1)[1])).stop()
