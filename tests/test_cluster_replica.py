"""A cluster on this machine: a real PostgreSQL (tests/pg.py), 2 nodes (`serve --role node`, each its own data dir)
and 2 API replicas (`serve --role api`), driven by the official SDKs through the replicas only: creates spread over
the nodes; commands, files, a PTY and run_code through either replica; the lists merged (each sandbox once); a
replica SIGKILLed while the other serves on; a node SIGKILLed: its sandboxes reported lost through the replicas,
creates go to the other node, and back it has them again. Templates fetched by nodes from each other; signed file
URLs and host routing (--domain) through a replica."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from e2b import PtySize, Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox
from pg import PgServer

from conftest import (
    SANDBOXD,
    PtyOutput,
    Server,
    node_holding,
    own_node,
    sdk_env,
    start_server,
    team_key,
    terminal_echo,
    wait_for_holders,
)


def _nodes_of(database: str) -> dict[str, str]:
    with psycopg.connect(database) as db:
        return dict(db.execute("SELECT id, node FROM sandboxes").fetchall())


def start_s3(monkeypatch: pytest.MonkeyPatch, bucket: str) -> tuple[Any, str, Any]:
    """An S3-compatible server on loopback (moto's: it takes any credentials, given in the environment) with
    `bucket` made: (the server, to stop; its URL; a boto3 client). Moto keeps its buckets for the whole process,
    whatever server made them: each test names its own."""
    import boto3
    from moto.server import ThreadedMotoServer

    from conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "sandboxd",
        "AWS_SECRET_ACCESS_KEY": "tests",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    return server, endpoint, client


def _nodes_cli(srv: Server, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [SANDBOXD, "nodes", "--url", srv.url, "--api-key", srv.api_key, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_cluster_of_two_nodes_behind_two_api_replicas(pg: PgServer, tmp_path: Path) -> None:
    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0")
    servers: list[Server] = []
    a = start_server(tmp_path / "a", *node, keep=True)
    servers.append(a)
    b = start_server(tmp_path / "b", *node)
    servers.append(b)
    port_a = int(a.url.rsplit(":", 1)[1])
    try:
        r1 = start_server(tmp_path / "r1", "--role", "api", "--database", database)
        servers.append(r1)
        r2 = start_server(tmp_path / "r2", "--role", "api", "--database", database)
        servers.append(r2)
        assert r1.api_key == r2.api_key == a.api_key
        via1 = {"api_url": r1.url, "sandbox_url": r1.url, "api_key": r1.api_key}
        via2 = {"api_url": r2.url, "sandbox_url": r2.url, "api_key": r2.api_key}

        made = [Sandbox.create(template="base", timeout=300, metadata={"i": str(i)}, **via1) for i in range(4)]
        ids = [s.sandbox_id for s in made]
        placed = _nodes_of(database)
        node_a, node_b = ((tmp_path / d / "node-id").read_text().strip() for d in ("a", "b"))
        assert {placed[i] for i in ids} == {node_a, node_b}, placed  # (spread: both nodes used)
        shown = _nodes_cli(r1)
        assert shown.returncode == 0 and node_a in shown.stdout and node_b in shown.stdout, shown
        assert "2 of 2 node(s) alive" in shown.stderr
        on_a = next(i for i in ids if placed[i] == node_a)
        on_b = next(i for i in ids if placed[i] == node_b)

        for sandbox_id in (on_a, on_b):
            s1 = Sandbox.connect(sandbox_id, **via1)
            assert s1.commands.run("echo via-$((40+2))").stdout == "via-42\n"
            s1.files.write("/home/user/f.txt", f"written through r1 to {sandbox_id}")
            s2 = Sandbox.connect(sandbox_id, **via2)  # (the other replica: the same sandbox)
            assert s2.files.read("/home/user/f.txt") == f"written through r1 to {sandbox_id}"
            pty = s2.pty.create(PtySize(rows=24, cols=80), timeout=30)
            out = PtyOutput(pty)
            s2.pty.send_stdin(pty.pid, b"echo pty-$((6*7))\n")
            out.until(b"pty-42")
            s2.pty.kill(pty.pid)
        code = CodeSandbox.create(timeout=120, **via2)
        try:
            assert code.run_code("x = 20\nx * 2 + 2").text == "42"
            assert CodeSandbox.connect(code.sandbox_id, **via1).run_code("x").text == "20"
        finally:
            code.kill()

        # the dashboard's terminal (a WebSocket) through a replica, to the sandbox's node
        terminal_echo(r2.url, r2.api_key, on_a, "ws")

        # the lists: every node's, each sandbox once, through either replica
        listed = [s.sandbox_id for s in Sandbox.list(**via2).next_items()]
        assert sorted(i for i in listed if i in ids) == sorted(ids) and len(listed) == len(set(listed))
        first = r1.api().get("/v2/sandboxes", params={"limit": 3})
        rest = r1.api().get("/v2/sandboxes", params={"limit": 100, "nextToken": first.headers["x-next-token"]})
        paged = [s["sandboxID"] for s in first.json() + rest.json()]
        assert len(first.json()) == 3 and sorted(paged) == sorted(listed)  # (every one once, across the pages)
        metrics = r1.api().get("/sandboxes/metrics", params={"sandbox_ids": ",".join(ids)}).json()
        assert set(metrics["sandboxes"]) <= set(ids)

        # a kill through one replica is seen through the other, with why
        Sandbox.kill(ids[-1], **via2)
        r = r1.api().get(f"/sandboxes/{ids[-1]}")
        assert r.status_code == 404 and "was killed" in r.json()["message"]

        # a replica dies: a stream through it fails; the command runs on and is taken up through the other replica
        streamed = Sandbox.connect(on_b, **via1)
        ticking = streamed.commands.run("for i in $(seq 1 30); do echo tick$i; sleep 0.1; done", background=True)
        time.sleep(0.5)
        r1.stop(signal.SIGKILL)
        with pytest.raises(Exception):  # noqa: B017  (the SDK's error for a cut stream)
            ticking.wait()
        again = Sandbox.connect(on_b, **via2).commands.connect(ticking.pid)
        assert "tick30" in again.wait().stdout
        assert Sandbox.connect(on_b, **via2).commands.run("echo still").stdout == "still\n"

        # a node dies: through the replica its sandboxes are lost, with why; creates go to the other node
        a.stop(signal.SIGKILL)
        killed = time.monotonic()
        while "lost" not in (r := r2.api().get(f"/sandboxes/{on_a}")).text:
            assert time.monotonic() - killed < 12, r.text
            time.sleep(0.25)
        assert r.status_code == 404 and node_a in r.json()["message"]
        seen = {n["nodeID"]: n for n in json.loads(_nodes_cli(r2, "--json").stdout)}
        assert not seen[node_a]["alive"] and seen[node_b]["alive"] and seen[node_b]["cpus"] >= 1, seen
        assert httpx.get(f"{r2.url}/admin/nodes", headers={"X-API-KEY": team_key(r2, "no-nodes")}).status_code == 403
        time.sleep(1.2)  # (the replica's view of the leases is a second old at most)
        late = Sandbox.create(template="base", timeout=60, **via2)
        assert _nodes_of(database)[late.sandbox_id] == node_b
        late.kill()

        # the node comes back: its sandboxes are its again, answering through the replicas with their files
        a = start_server(tmp_path / "a", *node, port=port_a)
        servers.append(a)
        back = Sandbox.connect(on_a, **via2)
        assert back.files.read("/home/user/f.txt") == f"written through r1 to {on_a}"
        assert back.commands.run("echo back-$((6*7))").stdout == "back-42\n"
        assert _nodes_of(database)[on_a] == node_a and r2.api().get(f"/sandboxes/{on_a}").status_code == 200
    finally:
        for srv in reversed(servers):
            if srv.proc.poll() is None:
                srv.stop()
        if servers[-1] is not a and a.proc.poll() is not None:  # (died holding sandboxes: back, they are destroyed)
            start_server(tmp_path / "a", *node, port=port_a).stop()


def test_teams_limits_hold_across_replicas_and_keys_made_anywhere_work_everywhere(pg: PgServer, tmp_path: Path) -> None:
    database = pg.database()
    node = start_server(tmp_path / "n", "--role", "node", "--database", database, "--pool-size", "0")
    replicas: list[Server] = []
    try:
        for name in ("r1", "r2"):
            replicas.append(
                start_server(tmp_path / name, "--role", "api", "--database", database, "--team-max-sandboxes", "1")
            )
        r1 = replicas[0]
        key = team_key(r1, "one-at-a-time")  # (made after both replicas started: each finds it in the state)
        t1, t2 = (httpx.Client(base_url=r.url, headers={"X-API-KEY": key}, timeout=60) for r in replicas)
        made = t1.post("/sandboxes", json={"templateID": "base", "timeout": 60})
        assert made.status_code == 201, made.text
        r = t2.post("/sandboxes", json={"templateID": "base", "timeout": 60})  # (the count is the cluster's)
        assert r.status_code == 429 and "limit of 1 sandboxes at once" in r.json()["message"], r.text
        assert t2.delete(f"/sandboxes/{made.json()['sandboxID']}").status_code == 204
        again = t2.post("/sandboxes", json={"templateID": "base", "timeout": 60})
        assert again.status_code == 201, again.text
        # revoked through one replica: refused through the other within the keys' cache time (2 s)
        key_id = next(k["id"] for k in r1.api().get("/api-keys", params={"team": "one-at-a-time"}).json())
        assert r1.api().delete(f"/api-keys/{key_id}").status_code == 204
        deadline = time.monotonic() + 5
        while t2.get("/v2/sandboxes").status_code != 401:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        node.api().delete(f"/sandboxes/{again.json()['sandboxID']}")
    finally:
        for srv in replicas:
            srv.stop()
        node.stop()


def test_three_nodes_a_template_built_through_one_replica_runs_on_the_others(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node with its own templates dir (no shared disk): the template built through one replica lands on one
    node; creates through the other replica spread over all three, the two others fetching its layers from it
    (checked against the digests the state recorded)."""
    from e2b import Template

    from sandboxd.templates.store import TemplateStore

    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0", "--ready-timeout", "5")
    servers = []
    names = ("n1", "n2", "n3")
    try:
        for name in names:  # (the built-in templates every node's setup makes: linked, not copied)
            servers.append(own_node(tmp_path, name, *node))
        r1 = start_server(tmp_path / "r1", "--role", "api", "--database", database)
        servers.append(r1)
        r2 = start_server(tmp_path / "r2", "--role", "api", "--database", database)
        servers.append(r2)
        sdk_env(monkeypatch, r1)
        Template.build(Template().from_template("base").run_cmd("echo built-$((6*7)) > /tmp/made"), "cluster-made")
        built = [n for n in names if (tmp_path / f"{n}-templates" / ".names" / "cluster-made").is_symlink()]
        assert len(built) == 1, built  # (on one node's disk only)
        top = TemplateStore(tmp_path / f"{built[0]}-templates").get("cluster-made").top_layer
        assert top is not None
        # its node tells it holds the template (its next beat) before the creates, and the replica sees that
        wait_for_holders(database, "cluster-made", holders=1)
        time.sleep(1.2)  # (the replica's view of the leases: a second old at most)
        via2 = {"api_url": r2.url, "sandbox_url": r2.url, "api_key": r2.api_key}
        made = [Sandbox.create(template="cluster-made", timeout=60, **via2) for _ in range(6)]
        try:
            for s in made:
                assert s.files.read("/tmp/made") == "built-42\n"
            placed = _nodes_of(database)
            node_ids = {(tmp_path / n / "node-id").read_text().strip() for n in names}
            assert {placed[s.sandbox_id] for s in made} == node_ids, placed  # (spread over all three)
        finally:
            for s in made:
                s.kill()
        # another build of it asked of a node that did not hold it is a build of that template, not a new one of
        # the same name (the node fetches it first: its owner is checked as anywhere)
        ident = TemplateStore(tmp_path / f"{built[0]}-templates").resolve("cluster-made")[0]
        elsewhere = next(srv for srv, n in zip(servers, names, strict=False) if n != built[0])
        (tmp_path / f"{elsewhere.data_dir.name}-templates" / ".names" / "cluster-made").unlink()  # (as if not held)
        again = elsewhere.api().post("/v3/templates", json={"name": "cluster-made", "tags": ["again"]})
        assert again.status_code == 202 and again.json()["templateID"] == ident, again.text
        with psycopg.connect(database) as db:
            (digest,) = db.execute("SELECT digest FROM layers WHERE key = %s", (top,)).fetchone() or (None,)
        assert digest and digest.startswith("sha256:")
        for n in names:  # the layer on every node's own disk now, whole, with that digest; nothing half-made
            layers = tmp_path / f"{n}-templates" / ".layers"
            assert not (layers / top).is_symlink()
            assert json.loads((layers / top / "layer.json").read_text())["digest"] == digest
            assert [p.name for p in layers.glob(".new-*")] == []
            assert (tmp_path / f"{n}-templates" / ".names" / "cluster-made").is_symlink()

        # the templates through a replica: every node's, each once; the template's own routes to a node holding it;
        # deleted through one replica, it is gone from every node
        listed = [t["templateID"] for t in r2.api().get("/templates").json()]
        ident = next(t["templateID"] for t in r2.api().get("/templates").json() if "cluster-made" in t["aliases"])
        assert listed.count(ident) == 1 and "base" in listed, listed
        assert r1.api().get(f"/templates/{ident}").json()["builds"][0]["status"] == "ready"
        assert r1.api().delete("/templates/cluster-made").status_code == 204
        for n in names:
            assert not (tmp_path / f"{n}-templates" / ".names" / "cluster-made").exists(), n
        wait_for_holders(database, "cluster-made", holders=0)
        r = r2.api().post("/sandboxes", json={"templateID": "cluster-made", "timeout": 60})
        assert r.status_code == 404, r.text
    finally:
        for srv in reversed(servers):
            srv.stop()


def test_signed_file_urls_and_host_routing_through_a_replica(pg: PgServer, tmp_path: Path) -> None:
    """Nodes that serve their replicas only (a cluster token) behind a replica with --domain: the SDK's signed
    /files URLs (no sandbox ID in them) reach the sandbox on whichever node signed them; `{port}-{id}.D` over TLS
    reaches a sandbox's port and envd, `api.D` the API."""
    from conftest import free_port

    database = pg.database()
    token = ("--cluster-token", "token-of-this-cluster")
    node = ("--role", "node", "--database", database, "--pool-size", "0", *token)
    servers = [start_server(tmp_path / n, *node) for n in ("a", "b")]
    domain, tls_port = "cluster.test", free_port()
    try:
        replica = start_server(
            tmp_path / "r", "--role", "api", "--database", database, *token, "--domain", domain, "--tls-port",
            str(tls_port),
        )  # fmt: skip
        servers.append(replica)
        via = {"api_url": replica.url, "sandbox_url": replica.url, "api_key": replica.api_key}
        made = [Sandbox.create(template="base", timeout=120, secure=True, **via) for _ in range(2)]
        try:
            assert len({_nodes_of(database)[s.sandbox_id] for s in made}) == 2  # (one on each node)
            for i, s in enumerate(made):
                s.files.write("/tmp/f", f"file of sandbox {i}")
                down = s.download_url("/tmp/f", use_signature_expiration=120)
                assert "signature=" in down and s.sandbox_id not in down
                r = httpx.get(down, timeout=30)
                assert (r.status_code, r.text) == (200, f"file of sandbox {i}"), r.text
                up = s.upload_url("/tmp/up", use_signature_expiration=120)
                r = httpx.post(up, files={"file": ("up", f"uploaded to {i}".encode())}, timeout=30)
                assert r.status_code == 200, r.text
                assert s.files.read("/tmp/up") == f"uploaded to {i}"
            r = httpx.get(f"{replica.url}/files", params={"path": "/tmp/f", "signature": "v1_forged"}, timeout=30)
            assert r.status_code == 401, r.text
            r = httpx.get(f"{servers[0].url}/files", params={"path": "/tmp/f"}, timeout=30)
            assert r.status_code == 403  # (a node serves its replicas only)

            ca = subprocess.run(
                [SANDBOXD, "ca", "export", "--data-dir", str(tmp_path / "r")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (tmp_path / "ca.pem").write_text(ca)

            def curl(host: str, *extra: str) -> tuple[int, str]:
                r = subprocess.run(
                    ["curl", "-sS", "-m", "10", "--cacert", str(tmp_path / "ca.pem"), "--resolve",
                     f"{host}:{tls_port}:127.0.0.1", "-w", "\n%{http_code}", *extra, f"https://{host}:{tls_port}/"],
                    capture_output=True, text=True,
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                body, _, code = r.stdout.rpartition("\n")
                return int(code), body

            for i, s in enumerate(made):
                s.commands.run(f"mkdir -p /tmp/site && echo 'site {i}' > /tmp/site/index.html")
                s.commands.run("python3 -m http.server 8002 --directory /tmp/site", background=True)
                for _ in range(100):
                    code, body = curl(f"8002-{s.sandbox_id}.{domain}")
                    if code == 200:
                        break
                    time.sleep(0.05)
                assert (code, body.strip()) == (200, f"site {i}"), (code, body)
                code, body = curl(f"49983-{s.sandbox_id}.{domain}")  # (envd: its token wanted)
                assert code == 401 and "X-Access-Token" in body, (code, body)
            code, body = curl(f"api.{domain}", "-H", f"X-API-KEY: {replica.api_key}")
            assert code == 404 and "no such endpoint" in body, (code, body)  # (the API: a node's answer)
            code, body = curl(f"8002-nosuchsandbox.{domain}")
            assert code == 502 and "not found" in body, (code, body)
        finally:
            for s in made:
                s.kill()
    finally:
        for srv in reversed(servers):
            srv.stop()


def test_a_template_outlives_the_node_that_built_it_in_a_bucket(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --layer-bucket (an S3-compatible server on loopback: moto's), nodes put the templates they hold in the
    bucket; when the node that built a template (or took a snapshot of a sandbox's files) is gone, another fetches it
    from there — each layer checked against the state's digest: an object changed in the bucket is refused."""
    from e2b import Template

    from sandboxd.templates.store import TemplateStore

    s3, endpoint, client = start_s3(monkeypatch, "templates")
    database = pg.database()
    bucket = ("--layer-bucket", "s3://templates/cluster", "--s3-endpoint", endpoint)
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(
                own_node(tmp_path, name, "--role", "node", "--database", database, "--pool-size", "0", *bucket)
            )
        replica = start_server(tmp_path / "r", "--role", "api", "--database", database)
        servers.append(replica)
        sdk_env(monkeypatch, replica)
        Template.build(Template().from_template("base").run_cmd("echo kept > /tmp/made"), "in-the-bucket")
        holder, other = node_holding(servers[:2], lambda n: tmp_path / f"{n.data_dir.name}-templates", "in-the-bucket")
        top = TemplateStore(tmp_path / f"{holder.data_dir.name}-templates").get("in-the-bucket").top_layer
        # a snapshot (of its files) taken on that node, straight through its own API: a template too
        api = holder.api()
        sid = api.post("/sandboxes", json={"templateID": "base", "timeout": 60}).json()["sandboxID"]
        Sandbox.connect(sid, api_url=holder.url, sandbox_url=holder.url, api_key=holder.api_key).files.write(
            "/home/user/snapped", "files of the snapshot"
        )
        r = api.post(f"/sandboxes/{sid}/snapshots", json={"name": "moved-snap", "memory": False})
        assert r.status_code in (200, 201), r.text
        api.delete(f"/sandboxes/{sid}")
        deadline = time.monotonic() + 30  # (put within a round of the node's bucket loop: 5 s)
        while True:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket="templates").get("Contents", [])]
            if {"cluster/manifests/in-the-bucket.json", "cluster/manifests/moved-snap.json"} <= set(keys):
                break
            assert time.monotonic() < deadline, keys
            time.sleep(0.5)
        assert f"cluster/layers/{top}.tar" in keys
        holder.stop()  # (gone with its disk, as far as the cluster knows)
        servers.remove(holder)

        original = client.get_object(Bucket="templates", Key=f"cluster/layers/{top}.tar")["Body"].read()
        changed = original.replace(b"kept\n", b"evil\n")
        assert changed != original
        client.put_object(Bucket="templates", Key=f"cluster/layers/{top}.tar", Body=changed)
        r = other.api().post("/sandboxes", json={"templateID": "in-the-bucket", "timeout": 60})
        assert r.status_code == 503 and "is not the one recorded" in r.json()["message"], r.text

        client.put_object(Bucket="templates", Key=f"cluster/layers/{top}.tar", Body=original)
        via = {"api_url": replica.url, "sandbox_url": replica.url, "api_key": replica.api_key}
        time.sleep(1.2)  # (the replica's view of the leases: the holder gone)
        made = Sandbox.create(template="in-the-bucket", timeout=60, **via)
        try:
            assert made.files.read("/tmp/made") == "kept\n"
        finally:
            made.kill()
        snapped = Sandbox.create(template="moved-snap", timeout=60, **via)  # (its node gone: from the bucket)
        try:
            assert snapped.files.read("/home/user/snapped") == "files of the snapshot"
        finally:
            snapped.kill()
        assert replica.api().delete("/templates/moved-snap").status_code == 204
        # the layers no manifest names go (a node's round every 10 min, for layers an hour old: here at once)
        from sandboxd.cluster.bucket import Bucket, BucketError

        bucket = Bucket("s3://templates/cluster", endpoint)

        def layers() -> set[str]:
            listed = client.list_objects_v2(Bucket="templates", Prefix="cluster/layers/").get("Contents", [])
            return {o["Key"] for o in listed}

        before = layers()
        assert bucket.collect() == []  # (all younger than an hour: maybe a manifest on its way)
        client.put_object(Bucket="templates", Key="cluster/manifests/x.json", Body=b"not json")
        with pytest.raises(BucketError, match="cannot be read"):  # (what it names unknown: nothing deleted)
            bucket.collect(grace=0)
        client.delete_object(Bucket="templates", Key="cluster/manifests/x.json")
        gone = bucket.collect(grace=0)  # (the snapshot's own layer; not the template's, still named)
        assert (
            gone
            and f"cluster/layers/{top}.tar" in layers()
            and layers() == before - {f"cluster/layers/{k}.tar" for k in gone}
        )
        # deleted (through the replica, on the node that now holds it): out of the bucket too
        assert replica.api().delete("/templates/in-the-bucket").status_code == 204
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="templates").get("Contents", [])]
        assert not [k for k in keys if k.startswith("cluster/manifests/")], keys
        assert bucket.collect(grace=0) and layers() == set()
    finally:
        for srv in reversed(servers):
            srv.stop()
        s3.stop()


def test_a_sandbox_paused_to_its_files_outlives_its_node(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a bucket, a sandbox paused to its files on a node that is then lost is taken over by another node when
    its owner connects to it through a replica: the same ID, its files, a new boot (as a resume from its files is).
    Another team's key does not move it."""

    s3, endpoint, client = start_s3(monkeypatch, "moving")
    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0", "--layer-bucket", "s3://moving",
            "--s3-endpoint", endpoint)  # fmt: skip
    nodes = {}
    for name in ("a", "b"):  # (each its own templates dir: the images of paused sandboxes are the test's)
        nodes[name] = own_node(tmp_path, name, *node)
    ports = {name: int(srv.url.rsplit(":", 1)[1]) for name, srv in nodes.items()}
    servers = list(nodes.values())
    lost_name = None
    try:
        replica = start_server(tmp_path / "r", "--role", "api", "--database", database)
        servers.append(replica)
        via = {"api_url": replica.url, "sandbox_url": replica.url, "api_key": team_key(replica, "movers")}
        sbx = Sandbox.create(template="base", timeout=120, **via)
        sid = sbx.sandbox_id
        sbx.files.write("/home/user/kept.txt", "kept across nodes")
        boot = sbx.commands.run("cut -d' ' -f22 /proc/1/stat").stdout  # (its init's start: a new boot, a new one)
        r = httpx.post(
            f"{replica.url}/sandboxes/{sid}/pause", json={"memory": False}, headers={"X-API-KEY": via["api_key"]}
        )
        assert r.status_code == 204, r.text
        deadline = time.monotonic() + 30  # (its image in the bucket: the node's next round, 5 s)
        while f"manifests/paused-{sid}.json" not in str(client.list_objects_v2(Bucket="moving").get("Contents", [])):
            assert time.monotonic() < deadline
            time.sleep(0.5)

        node_ids = {name: (tmp_path / name / "node-id").read_text().strip() for name in nodes}
        lost_name = next(name for name, n in node_ids.items() if n == _nodes_of(database)[sid])
        nodes[lost_name].stop(signal.SIGKILL)
        killed = time.monotonic()
        while "lost" not in (r := replica.api().get(f"/sandboxes/{sid}")).text:
            assert time.monotonic() - killed < 12, r.text
            time.sleep(0.25)
        time.sleep(1.2)  # (the replica's view of the leases)

        for stranger in (team_key(replica, "not-theirs"), team_key(replica, "default")):
            r = httpx.post(
                f"{replica.url}/sandboxes/{sid}/connect", json={"timeout": 60}, headers={"X-API-KEY": stranger}
            )
            assert r.status_code == 404, r.text  # (not moved for a key that does not see it)
            r = httpx.post(
                f"{replica.url}/sandboxes", json={"templateID": f"paused-{sid}"}, headers={"X-API-KEY": stranger}
            )
            assert r.status_code == 404, r.text  # (its image is its team's)
        back = Sandbox.connect(sid, timeout=120, **via)
        assert back.files.read("/home/user/kept.txt") == "kept across nodes"
        assert back.commands.run("cut -d' ' -f22 /proc/1/stat").stdout != boot  # (booted again)
        other = next(n for name, n in node_ids.items() if name != lost_name)
        assert _nodes_of(database)[sid] == other
        assert replica.api().get(f"/sandboxes/{sid}").json()["state"] == "running"
        back.kill()
    finally:
        for srv in reversed(servers):
            if srv.proc.poll() is None:
                srv.stop()
        if lost_name is not None:  # (its leftovers cleaned: back, then gone)
            own_node(tmp_path, lost_name, *node, port=ports[lost_name]).stop()
        s3.stop()


COUNTER = "import itertools, time\nfor i in itertools.count():\n    print(i, flush=True)\n    time.sleep(0.1)\n"


def _numbers(sbx: Sandbox, pid: int) -> list[int]:
    """The next numbers the command `pid` prints (connected to it; ten at most, for ten seconds at most)."""
    seen: list[str] = []
    handle = sbx.commands.connect(pid, timeout=10)
    deadline = time.monotonic() + 10
    for stdout, _, _ in handle:
        seen.append(stdout or "")
        if "".join(seen).count("\n") >= 10 or time.monotonic() > deadline:
            break
    handle.disconnect()
    return [int(line) for line in "".join(seen).split("\n")[:-1]]


@pytest.mark.parametrize("elsewhere", ["restored", "booted"])
def test_a_sandbox_on_disk_and_a_snapshot_with_memory_outlive_their_node(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elsewhere: str
) -> None:
    """With a bucket, the processes of a sandbox written to disk (and of a snapshot with memory) go there too: when
    their node is lost, the sandbox's owner connects to it through a replica and another node restores its processes
    from where they were (a command counting on from its count, connected to again); new sandboxes start from the
    snapshot's processes on the other node. The memory travels checked as a layer is: changed in the bucket, refused.
    `booted`: the other node cannot restore them (it has no CRIU): the sandbox boots there from its files."""

    bucket = f"memory-{elsewhere}"  # (moto keeps its buckets for the whole process: one per test)
    s3, endpoint, client = start_s3(monkeypatch, bucket)
    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0", "--layer-bucket", f"s3://{bucket}",
            "--s3-endpoint", endpoint, "--checkpoint-after", "0")  # fmt: skip
    nodes = {}
    for name in ("a", "b"):
        criu = ("--criu", "none") if name == "b" and elsewhere == "booted" else ()
        nodes[name] = own_node(tmp_path, name, *node, *criu)
    port_a = int(nodes["a"].url.rsplit(":", 1)[1])
    servers = list(nodes.values())
    lost = False
    try:
        replica = start_server(tmp_path / "r", "--role", "api", "--database", database)
        servers.append(replica)
        key = team_key(replica, "movers")
        via = {"api_url": replica.url, "sandbox_url": replica.url, "api_key": key}
        a = nodes["a"]  # (made there: the node that is lost)
        sid = Sandbox.create(template="base", timeout=120, api_url=a.url, sandbox_url=a.url, api_key=key).sandbox_id
        sbx = Sandbox.connect(sid, **via)
        sbx.files.write("/tmp/counter.py", COUNTER)
        counting = sbx.commands.run("python3 /tmp/counter.py", background=True)
        time.sleep(1)
        r = httpx.post(
            f"{replica.url}/sandboxes/{sid}/snapshots", json={"name": "mem-snap"}, headers={"X-API-KEY": key}
        )
        assert r.status_code in (200, 201), r.text
        if elsewhere == "restored":  # (a node asked for another straight fetches it from the node holding it)
            r = httpx.post(
                f"{replica.url}/sandboxes/{sid}/snapshots", json={"name": "peer-snap"}, headers={"X-API-KEY": key}
            )
            assert r.status_code in (200, 201), r.text
            b = nodes["b"]
            wait_for_holders(database, "peer-snap")  # (b learns who holds it from their leases)
            peer = Sandbox.create(template="peer-snap", timeout=60, api_url=b.url, sandbox_url=b.url, api_key=key)
            try:
                assert counting.pid in [p.pid for p in peer.commands.list()]
                assert _numbers(peer, counting.pid)[0] > 5
            finally:
                peer.kill()
        assert sbx.pause() is True
        deadline = time.monotonic() + 30
        while replica.api().get(f"/sandboxes/{sid}").json().get("pausedTo") != "disk":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        deadline = time.monotonic() + 60  # (its images in the bucket: the node's next round, 5 s)
        while True:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
            if {f"manifests/paused-{sid}.json", "manifests/mem-snap.json"} <= set(keys):
                break
            assert time.monotonic() < deadline, keys
            time.sleep(0.5)

        a.stop(signal.SIGKILL)
        lost = True
        killed = time.monotonic()
        while "lost" not in (r := replica.api().get(f"/sandboxes/{sid}")).text:
            assert time.monotonic() - killed < 12, r.text
            time.sleep(0.25)
        time.sleep(1.2)  # (the replica's view of the leases)

        back = Sandbox.connect(sid, timeout=120, **via)
        assert _nodes_of(database)[sid] == (tmp_path / "b" / "node-id").read_text().strip()
        running = [p.pid for p in back.commands.list()]
        if elsewhere == "booted":  # (its files; a new boot)
            assert counting.pid not in running and back.files.read("/tmp/counter.py") == COUNTER
            back.kill()
            return
        assert counting.pid in running
        counted = _numbers(back, counting.pid)
        assert counted and counted[0] > 5 and counted == list(range(counted[0], counted[0] + len(counted))), counted
        back.kill()

        told = json.loads(client.get_object(Bucket=bucket, Key="manifests/mem-snap.json")["Body"].read())
        memory = f"layers/{told['memory']['key']}.tar"
        original = client.get_object(Bucket=bucket, Key=memory)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(original)) as tar:  # (a byte of its processes' memory changed)
            at = next(m for m in tar.getmembers() if m.name.startswith("./pages-") and m.size).offset_data + 100
        changed = original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1 :]
        client.put_object(Bucket=bucket, Key=memory, Body=changed)
        r = httpx.post(f"{replica.url}/sandboxes", json={"templateID": "mem-snap"}, headers={"X-API-KEY": key})
        assert r.status_code == 503 and "is not the one recorded" in r.json()["message"], r.text
        client.put_object(Bucket=bucket, Key=memory, Body=original)
        made = Sandbox.create(template="mem-snap", timeout=60, **via)  # (from the bucket: its node is gone)
        try:
            assert counting.pid in [p.pid for p in made.commands.list()]
            counted = _numbers(made, counting.pid)
            assert counted and counted[0] > 5, counted
        finally:
            made.kill()
    finally:
        for srv in reversed(servers):
            if srv.proc.poll() is None:
                srv.stop()
        if lost:  # (its leftovers cleaned: back, then gone)
            own_node(tmp_path, "a", *node, port=port_a).stop()
        s3.stop()


def _volume_nodes(database: str) -> dict[str, str]:
    with psycopg.connect(database) as db:
        return {json.loads(b)["name"]: json.loads(b).get("node", "") for (b,) in db.execute("SELECT body FROM volumes")}


def test_a_volume_is_kept_on_one_node_and_the_sandboxes_that_mount_it_go_there(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume's files are one node's (its image on that node's disk): made through a replica, its content API and
    every sandbox that mounts it go to that node, whatever the placement policy says (three sandboxes mounting it
    under spread land there and share its files, while sandboxes without it spread to the other node); a sandbox
    cannot mount volumes of two nodes (400, saying so); a volume whose node is lost says so (503). (What another team
    learns of them: tests/security/test_cluster_attacks.py.)"""
    from e2b import Volume
    from e2b.exceptions import SandboxException, ServiceBusyException, VolumeException

    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0")
    nodes = [start_server(tmp_path / name, *node) for name in ("a", "b")]
    servers = list(nodes)
    holder = None
    try:
        replica = start_server(tmp_path / "r", "--role", "api", "--database", database)
        servers.append(replica)
        sdk_env(monkeypatch, replica)
        vol = Volume.create("kept-here")
        vol.write_file("/hello.txt", "from the API\n")
        kept_on = _volume_nodes(database)["kept-here"]
        holder = next(srv for srv in nodes if (srv.data_dir / "node-id").read_text().strip() == kept_on)
        other = next(srv for srv in nodes if srv is not holder)
        other_id = (other.data_dir / "node-id").read_text().strip()

        mounting = [Sandbox.create(template="base", timeout=120, volume_mounts={"/data": vol}) for _ in range(3)]
        plain = [Sandbox.create(template="base", timeout=120) for _ in range(2)]
        where = _nodes_of(database)
        assert {where[s.sandbox_id] for s in mounting} == {kept_on}
        assert {where[s.sandbox_id] for s in plain} == {other_id}  # (spread: the other was emptier)
        mounting[0].files.write("/data/from-a-sandbox.txt", "written inside\n")
        for sbx in mounting:
            assert sbx.files.read("/data/hello.txt") == "from the API\n"
            assert sbx.files.read("/data/from-a-sandbox.txt") == "written inside\n"
        for _ in range(3):
            assert Volume.connect(vol.volume_id).read_file("/from-a-sandbox.txt") == "written inside\n"

        r = httpx.post(f"{other.url}/volumes", json={"name": "kept-there"}, headers={"X-API-KEY": other.api_key})
        assert r.status_code == 201, r.text
        with pytest.raises(SandboxException, match="different nodes"):
            Sandbox.create(template="base", timeout=30, volume_mounts={"/a": vol, "/b": "kept-there"})
        for sbx in [*mounting, *plain]:
            sbx.kill()

        holder.stop(signal.SIGKILL)
        killed = time.monotonic()
        while True:  # (until its lease runs out: then the replicas say so)
            with pytest.raises((VolumeException, ServiceBusyException)) as failed:
                vol.read_file("/hello.txt")
            if "was lost" in str(failed.value):
                break
            assert time.monotonic() - killed < 15, failed.value
            time.sleep(0.25)
        with pytest.raises((SandboxException, ServiceBusyException), match="was lost"):
            Sandbox.create(template="base", timeout=30, volume_mounts={"/data": vol})
        assert Volume.get_info(vol.volume_id).name == "kept-here"  # (its record is the cluster's)
    finally:
        for srv in reversed(servers):
            if srv.proc.poll() is None:
                srv.stop()
        if holder is not None and holder.proc.poll() is not None:  # (its volume unmounted: back, then gone)
            start_server(holder.data_dir, *node, port=int(holder.url.rsplit(":", 1)[1])).stop()


def test_the_catalog_a_rebuild_or_a_tag_on_one_node_holds_on_every_node(
    pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's catalog of templates (cluster/catalog.py): a template rebuilt through a replica (on one node) is
    that build on a node that fetched the old one; a tag assigned or removed through a replica holds on every node; two
    nodes building the same new name at the same moment make one template (the later build its default on both)."""
    import threading

    from e2b import Template

    from sandboxd.templates.store import TemplateStore

    database = pg.database()
    node = ("--role", "node", "--database", database, "--pool-size", "0", "--ready-timeout", "5")
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(own_node(tmp_path, name, *node))
        nodes = list(servers)
        replica = start_server(tmp_path / "r", "--role", "api", "--database", database)
        servers.append(replica)
        sdk_env(monkeypatch, replica)

        def made_on(srv: Server, name: str) -> str:
            sbx = Sandbox.create(template=name, timeout=30, api_url=srv.url, sandbox_url=srv.url, api_key=srv.api_key)
            try:
                return sbx.files.read("/tmp/v")
            finally:
                sbx.kill()

        Template.build(Template().from_template("base").run_cmd("echo one > /tmp/v"), "cat-tpl")
        wait_for_holders(database, "cat-tpl")
        for n in nodes:  # (a build asked of a node by name only: not a path)
            r = httpx.get(f"{n.url}/admin/cluster/templates/cat-tpl?build=../../etc", headers={"X-API-KEY": n.api_key})
            assert r.status_code == 400, r.text
        assert [made_on(n, "cat-tpl") for n in nodes] == ["one\n", "one\n"]  # (the other fetched it)
        r = replica.api().post("/templates/tags", json={"target": "cat-tpl", "tags": ["stable"]})
        assert r.status_code == 201, r.text
        Template.build(Template().from_template("base").run_cmd("echo two > /tmp/v"), "cat-tpl")  # (on one of them)
        time.sleep(1.1)  # (a node reads what a name means once a second at most)
        assert [made_on(n, "cat-tpl") for n in nodes] == ["two\n", "two\n"]
        assert [made_on(n, "cat-tpl:stable") for n in nodes] == ["one\n", "one\n"]
        r = replica.api().request("DELETE", "/templates/tags", json={"name": "cat-tpl", "tags": ["stable"]})
        assert r.status_code == 204, r.text
        time.sleep(1.1)
        for n in nodes:
            r = n.api().post("/sandboxes", json={"templateID": "cat-tpl:stable", "timeout": 30})
            assert r.status_code == 404 and "no tag 'stable'" in r.text, r.text

        raced = Template().from_template("base").run_cmd("echo raced > /tmp/v")
        failed: list[BaseException] = []

        def build(srv: Server) -> None:
            try:
                Template.build(raced, "raced", api_url=srv.url, api_key=srv.api_key)
            except BaseException as e:  # (said below)
                failed.append(e)

        threads = [threading.Thread(target=build, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not failed, failed
        idents = {TemplateStore(tmp_path / f"{n}-templates").resolve("raced")[0] for n in ("a", "b")}
        assert len(idents) == 1, idents  # (one template, two builds of it)
        listed = [t for t in replica.api().get("/templates").json() if "raced" in (t.get("aliases") or [])]
        assert len(listed) == 1, listed
        time.sleep(1.1)
        assert [made_on(n, "raced") for n in nodes] == ["raced\n", "raced\n"]
        (ident,) = idents
        with psycopg.connect(database) as db:
            (told,) = db.execute("SELECT build FROM template_tags WHERE template_id = %s AND tag = 'default'", (ident,))
        defaults = {TemplateStore(tmp_path / f"{n}-templates").tags(ident)["default"] for n in ("a", "b")}
        assert defaults == {told[0]}  # (the same build, the catalog's default, on both)
    finally:
        for srv in reversed(servers):
            srv.stop()
