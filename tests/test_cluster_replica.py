"""A cluster on this machine: a real PostgreSQL (tests/pg.py), 2 nodes (`serve --role node`, each its own data dir)
and 2 API replicas (`serve --role api`), driven by the official SDKs through the replicas only: creates spread over
the nodes; commands, files, a PTY and run_code through either replica; the lists merged (each sandbox once); a
replica SIGKILLed while the other serves on; a node SIGKILLed: its sandboxes reported lost through the replicas,
creates go to the other node."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from e2b import PtySize, Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox
from pg import PgServer, postgres

from conftest import PtyOutput, Server, start_server


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with postgres() as server:
        yield server


def _nodes_of(database: str) -> dict[str, str]:
    with psycopg.connect(database) as db:
        return dict(db.execute("SELECT id, node FROM sandboxes").fetchall())


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

        # the lists: every node's, each sandbox once, through either replica
        listed = [s.sandbox_id for s in Sandbox.list(**via2).next_items()]
        assert sorted(i for i in listed if i in ids) == sorted(ids) and len(listed) == len(set(listed))
        page = r1.api().get("/v2/sandboxes", params={"limit": 3}).json()
        assert len(page) == 3
        metrics = r1.api().get("/sandboxes/metrics", params={"sandbox_ids": ",".join(ids)}).json()
        assert set(metrics["sandboxes"]) <= set(ids)

        # a kill through one replica is seen through the other, with why
        Sandbox.kill(ids[-1], **via2)
        r = r1.api().get(f"/sandboxes/{ids[-1]}")
        assert r.status_code == 404 and "was killed" in r.json()["message"]

        # a replica dies: the other serves on
        r1.stop(signal.SIGKILL)
        assert Sandbox.connect(on_b, **via2).commands.run("echo still").stdout == "still\n"

        # a node dies: through the replica its sandboxes are lost, with why; creates go to the other node
        a.stop(signal.SIGKILL)
        killed = time.monotonic()
        while "lost" not in (r := r2.api().get(f"/sandboxes/{on_a}")).text:
            assert time.monotonic() - killed < 12, r.text
            time.sleep(0.25)
        assert r.status_code == 404 and node_a in r.json()["message"]
        time.sleep(1.2)  # (the replica's view of the leases is a second old at most)
        late = Sandbox.create(template="base", timeout=60, **via2)
        assert _nodes_of(database)[late.sandbox_id] == node_b
        late.kill()
    finally:
        for srv in reversed(servers):
            if srv.proc.poll() is None:
                srv.stop()
        if a.proc.poll() is not None:  # (node A died holding sandboxes: it comes back, takes them, destroys them)
            start_server(tmp_path / "a", *node, port=port_a).stop()
