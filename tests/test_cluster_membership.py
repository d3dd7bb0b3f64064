"""Servers sharing their state in PostgreSQL are nodes of one cluster (cluster/membership.py), with a real
PostgreSQL (tests/pg.py) and real servers: each holds a lease; a node SIGKILLed is declared lost within its lease
and a beat (about 8 s), and any other node then answers a call about its sandboxes with why (`lost`, the node named)
through the API and the official SDK, and lists them as ended; when the node comes back it takes its sandboxes back
(running again, with their files and processes) and they are no longer ended anywhere."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import psycopg
from e2b import Sandbox
from pg import PgServer

from conftest import SANDBOXD, keeping_server, start_server


def test_a_lost_node_is_reported_and_takes_its_sandboxes_back(pg: PgServer, tmp_path: Path) -> None:
    database = pg.database()
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    short = ("--lease", "3", "--heartbeat", "1")  # (node A's own: a node's lease is its own to choose)
    with keeping_server(data_a, "--database", database, "--pool-size", "0", *short) as (a, port):
        conn_a = {"api_url": a.url, "sandbox_url": a.url, "api_key": a.api_key}
        sbx = Sandbox.create(template="base", timeout=600, **conn_a)
        sbx.files.write("/home/user/kept.txt", "still here")
        sleeper = sbx.commands.run("sleep 600", background=True)
        b = start_server(data_b, "--database", database, "--pool-size", "0")
        try:
            node_a = (data_a / "node-id").read_text().strip()
            with psycopg.connect(database) as db:
                nodes = db.execute("SELECT id, url FROM nodes ORDER BY id").fetchall()
            assert (node_a, a.url.replace("localhost", "127.0.0.1")) in nodes and len(nodes) == 2
            with psycopg.connect(database) as db:
                (left,) = db.execute(
                    "SELECT lease_until - extract(epoch FROM clock_timestamp()) FROM nodes WHERE id = %s", (node_a,)
                ).fetchone() or (None,)
            assert left is not None and 0 < left <= 3.0, left  # (its lease: 3 s)

            a.stop(signal.SIGKILL)
            killed_at = time.monotonic()
            path = f"/sandboxes/{sbx.sandbox_id}"
            while "lost" not in (r := b.api().get(path)).text:
                assert r.status_code == 404, r.text
                assert time.monotonic() - killed_at < 12, r.text  # (a 3 s lease, B's 2 s beat: lost by 5 s)
                time.sleep(0.25)
            message = r.json()["message"]
            assert f"its node {node_a} stopped answering" in message, message
            # the data plane (what the SDK's commands and files calls show in their errors) says it too
            dp = httpx.post(
                f"{b.url}/process.Process/List",
                json={},
                headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"},
                timeout=30,
            )
            assert dp.status_code == 502 and "lost" in dp.text, dp.text
            ended = b.api().get("/v2/sandboxes", params={"state": "killed"}).json()
            mine = [s for s in ended if s["sandboxID"] == sbx.sandbox_id]
            assert mine and mine[0]["endReason"]["kind"] == "lost", ended

            # the node comes back: its sandbox is its own again, running, with its files and its process
            again = start_server(data_a, "--database", database, "--pool-size", "0", *short, port=port, keep=True)
            try:
                back = Sandbox.connect(sbx.sandbox_id, **conn_a)
                assert back.files.read("/home/user/kept.txt") == "still here"
                assert sleeper.pid in [p.pid for p in back.commands.list()]
                ended = b.api().get("/v2/sandboxes", params={"state": "killed"}).json()
                assert sbx.sandbox_id not in [s["sandboxID"] for s in ended]
                assert b.api().get(path).status_code == 404  # (B does not run it: A does)
                assert a.api().get(path).status_code == 200
                back.kill()
            finally:
                again.stop()
        finally:
            b.stop()


def test_a_lease_must_outlast_its_heartbeats(pg: PgServer) -> None:
    for lease, beat in (("2", "1"), ("6", "0"), ("7200", "2")):
        done = subprocess.run(
            [SANDBOXD, "serve", "--database", pg.database(), "--lease", lease, "--heartbeat", beat, "--port", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and "renewed at least three times" in done.stderr, (lease, beat, done.stderr)
