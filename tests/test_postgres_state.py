"""The server with its state in PostgreSQL (`--database`, state/postgres.py) instead of its data dir's SQLite: the
official SDK works against it, a restart re-adopts its sandboxes from PostgreSQL, and two servers (nodes) sharing
one database share its key, teams and ended records but each re-adopts only its own sandboxes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
from e2b import Sandbox
from pg import PgServer

from conftest import SANDBOXD, keeping_server, start_server


def test_a_server_keeps_its_state_in_postgresql(pg: PgServer, tmp_path: Path) -> None:
    database = pg.database()
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    with keeping_server(data_a, "--database", database, "--pool-size", "0") as (srv, port):
        conn = {"api_url": srv.url, "sandbox_url": srv.url, "api_key": srv.api_key}
        sbx = Sandbox.create(template="base", timeout=300, metadata={"on": "postgres"}, **conn)
        sbx.files.write("/home/user/kept.txt", "in postgres")
        key = subprocess.run(
            [SANDBOXD, "api-key", "--data-dir", str(data_a), "--database", database],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        assert key == srv.api_key
        assert not (data_a / "state.db").exists()  # (nothing of the state in the data dir)
        with psycopg.connect(database) as db:
            rows = db.execute("SELECT id, node FROM sandboxes").fetchall()
        node = (data_a / "node-id").read_text().strip()
        assert rows == [(sbx.sandbox_id, node)]

        # a second server (another node) on the same database: the same key, not the first's sandboxes
        other = start_server(data_b, "--database", database, "--pool-size", "0")
        try:
            assert other.api_key == srv.api_key
            assert sbx.sandbox_id not in [s["sandboxID"] for s in other.api().get("/v2/sandboxes").json()]
            made = Sandbox.create(template="base", timeout=60, api_url=other.url, sandbox_url=other.url, api_key=key)
            with psycopg.connect(database) as db:
                nodes = dict(db.execute("SELECT id, node FROM sandboxes").fetchall())
            assert nodes[made.sandbox_id] == (data_b / "node-id").read_text().strip() != node
            made.kill()
        finally:
            assert other.stop() == 0

        # the first server restarted: its sandbox re-adopted from PostgreSQL, with its files
        assert srv.stop() == 0
        again = start_server(data_a, "--database", database, "--pool-size", "0", port=port, keep=True)
        try:
            back = Sandbox.connect(sbx.sandbox_id, **conn)
            assert back.files.read("/home/user/kept.txt") == "in postgres"
            assert back.get_info().metadata == {"on": "postgres"}
            back.kill()
            killed = again.api().get("/v2/sandboxes", params={"state": "killed"}).json()
            assert sbx.sandbox_id in [s["sandboxID"] for s in killed]
        finally:
            again.stop()
