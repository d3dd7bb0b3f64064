"""The state interface's contract (state/sql.py), run on both implementations: SQLite (state/db.py, a file) and
PostgreSQL (state/postgres.py, a real server from Debian's package, tests/pg.py): what is written is read back the
same (floats to the microsecond), in the documented order; an ended sandbox leaves in one transaction; a failed
transaction leaves nothing; two connections see one another's writes and make one server key between them; node
leases end by the database's clock; migrations run once, bring an older database up with its data, and a
database a newer sandboxd migrated is refused."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from sandboxd.state.db import StateDB
from sandboxd.state.migrations import LATEST, SchemaTooNew, migrate
from sandboxd.state.records import SandboxRecord
from sandboxd.state.sql import State


@pytest.fixture(params=["sqlite", "postgres"])
def open_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], State]]:
    """Opens the same database again at each call (another connection); all closed after."""
    opened: list[State] = []
    if request.param == "sqlite":
        target = tmp_path / "state.db"

        def make() -> State:
            opened.append(StateDB(target))
            return opened[-1]
    else:
        from sandboxd.state.postgres import PostgresState

        conninfo = request.getfixturevalue("pg").database()

        def make() -> State:
            opened.append(PostgresState(conninfo))
            return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def state(open_state: Callable[[], State]) -> State:
    return open_state()


def record(sandbox_id: str, started: float, **kw: object) -> SandboxRecord:
    return SandboxRecord(
        sandbox_id=sandbox_id,
        template_id="base",
        alias="base",
        client_id="sandboxd",
        envd_token="t",
        started_at=started,
        end_at=started + 300,
        state="running",
        **kw,  # type: ignore[arg-type]
    )


def test_settings_and_the_server_key(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    assert a.get_setting("x") is None
    a.set_setting("pool:base", "1")
    a.set_setting("pool:code", "2")
    a.set_setting("pool:base", "3")  # (replaced)
    a.set_setting("other", "4")
    assert b.get_setting("pool:base") == "3"
    assert b.settings_under("pool:") == {"base": "3", "code": "2"}
    a.delete_setting("pool:code")
    assert b.settings_under("pool:") == {"base": "3"}
    key, made = a.api_key()
    again, made_again = b.api_key()  # (another connection: the same key, made once)
    assert made and not made_again and key == again and key.startswith("e2b_") and len(key) == 44


def test_sandboxes_live_and_ended(state: State) -> None:
    t = 1764553200.123456
    state.put(record("a", t, metadata={"k": "v"}), node="n1")
    state.put(record("b", t + 1), node="n2")
    state.put(record("c", t - 1))
    assert [r.sandbox_id for r in state.all(node=None)] == ["c", "a", "b"]  # (every node's, by start)
    assert [r.sandbox_id for r in state.all()] == ["c"]  # (this one's: "")
    assert [r.sandbox_id for r in state.all(node="n1")] == ["a"]
    got = state.all(node="n1")[0]
    assert got.started_at == t and got.metadata == {"k": "v"}  # (a float to the microsecond)
    assert state.node_of("b") == "n2" and state.node_of("nope") is None
    moved = record("a", t, metadata={"k": "w"})
    moved.state = "paused"
    state.put(moved, node="n2")  # (written again: replaced)
    assert [(r.sandbox_id, r.state) for r in state.all(node="n2")] == [("a", "paused"), ("b", "running")]

    state.end("a", t + 10, {"sandboxID": "a", "endReason": {"kind": "killed"}})
    assert "a" not in [r.sandbox_id for r in state.all(node=None)]
    assert state.ended("a") == {"sandboxID": "a", "endReason": {"kind": "killed"}}
    state.end("b", t + 20, {"sandboxID": "b"})
    state.end("b", t + 30, {"sandboxID": "b", "again": True})  # (ended twice: the last word kept)
    assert [e["sandboxID"] for e in state.all_ended()] == ["b", "a"]  # newest first
    assert state.ended("b") == {"sandboxID": "b", "again": True}
    assert state.forget_ended(t + 15) == 1 and state.ended("a") is None
    state.delete("c")
    assert state.all(node=None) == []
    state.node = "n2"  # (a server that is node n2: its records by default)
    state.put(record("d", t + 2))
    state.put(record("e", t + 3), node="n3")
    assert [r.sandbox_id for r in state.all()] == ["d"] and state.node_of("d") == "n2"


def test_a_failed_transaction_leaves_nothing(state: State) -> None:
    with pytest.raises(RuntimeError), state.transaction() as tx:
        tx.execute("INSERT INTO settings (key, value) VALUES (?, ?)", ("half", "done"))
        raise RuntimeError("interrupted")
    assert state.get_setting("half") is None
    with pytest.raises(Exception):  # (the database refuses: a duplicate key)  # noqa: B017
        with state.transaction() as tx:
            tx.execute("INSERT INTO settings (key, value) VALUES (?, ?)", ("dup", "1"))
            tx.execute("INSERT INTO settings (key, value) VALUES (?, ?)", ("dup", "2"))
    assert state.get_setting("dup") is None
    state.set_setting("after", "ok")  # (the connection still works)
    assert state.get_setting("after") == "ok"


def test_secrets_keys_and_volumes(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    a.secret_put(("s1", "one", 1, "v1", "{}", 10.0, 10.0))
    a.secret_put(("s2", "two", 1, "v2", '{"k":"v"}', 5.0, 5.0))
    a.secret_put(("s1", "one", 2, "v1b", "{}", 10.0, 11.0))  # (a new version)
    assert b.secret_row("one") == ("s1", "one", 2, "v1b", "{}", 10.0, 11.0) == b.secret_row("s1")
    assert [r[0] for r in b.secret_rows()] == ["s2", "s1"]
    with pytest.raises(Exception):  # (names are unique)  # noqa: B017
        a.secret_put(("s3", "one", 1, "x", "{}", 1.0, 1.0))
    assert a.secret_delete("s2") and not a.secret_delete("s2") and b.secret_row("two") is None

    a.key_put(("k1", "acme", "ci", "h1", "abcd", 2.0, None))
    a.key_put(("k2", "beta", "dev", "h2", "efgh", 1.0, None))
    with pytest.raises(Exception):  # (hashes are unique)  # noqa: B017
        a.key_put(("k3", "acme", "x", "h1", "zzzz", 3.0, None))
    a.key_used("k1", 99.5)
    assert b.key_rows() == [
        ("k2", "beta", "dev", "h2", "efgh", 1.0, None),
        ("k1", "acme", "ci", "h1", "abcd", 2.0, 99.5),
    ]
    assert a.key_delete("k2") and not a.key_delete("k2") and [r[0] for r in b.key_rows()] == ["k1"]

    for i, name in enumerate(["vol-b", "vol-a", "v3"]):
        a.put_volume({"volume_id": f"id{i}", "name": name, "token": "t", "size_mb": 16, "created_at": 100.0 + i})
    a.put_volume({"volume_id": "v9", "name": "id0", "token": "t", "size_mb": 16, "created_at": 50.0})
    assert [v["name"] for v in b.all_volumes()] == ["id0", "vol-b", "vol-a", "v3"]  # (as made)
    assert b.volume("vol-a")["volume_id"] == "id1"  # type: ignore[index]
    assert b.volume("id0")["volume_id"] == "id0"  # type: ignore[index]  # (an ID wins over a name)
    with pytest.raises(Exception):  # noqa: B017
        a.put_volume({"volume_id": "x", "name": "vol-a", "created_at": 1.0})
    a.delete_volume("id1")
    assert b.volume("vol-a") is None


def test_layer_digests_first_told_stays(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    assert b.layer("k" * 32) is None
    a.put_layer("k" * 32, "sha256:" + "a" * 64, 5 * 2**30)  # (over 32 bits)
    b.put_layer("k" * 32, "sha256:" + "b" * 64, 1)  # (the same key is the same content: not overwritten)
    assert b.layer("k" * 32) == ("sha256:" + "a" * 64, 5 * 2**30)


def test_the_template_catalog_names_once_and_tags_follow_the_last_told(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    a.node, b.node = "node-a", "node-b"
    assert a.template_named("app") is None
    assert a.name_template("app", "tid-a") == "tid-a"
    assert b.name_template("app", "tid-b") == "tid-a"  # (named first by another node: that template)
    assert b.template_named("app") == "tid-a"
    assert a.claim_setting("owner:template:tid-a", "team-a") == "team-a"
    assert b.claim_setting("owner:template:tid-a", "team-b") == "team-a"  # (one claim wins)
    assert b.template_tags("app") is None
    a.tag_template("tid-a", ["default", "v1"], "build-1")
    b.tag_template("tid-a", ["default"], "build-2")  # (a rebuild elsewhere: the default moves)
    assert a.template_tags("app") == ("tid-a", {"default": ("build-2", b.node), "v1": ("build-1", a.node)})
    assert a.template_tags("tid-a") == a.template_tags("app")  # (by its ID too)
    b.untag_template("tid-a", ["v1"])
    assert a.template_tags("app") == ("tid-a", {"default": ("build-2", b.node)})
    a.forget_template("tid-a")
    assert b.template_tags("app") is None and b.name_template("app", "tid-c") == "tid-c"


def test_node_leases_end_by_the_databases_clock(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    until = a.heartbeat("n1", "http://10.0.0.1:3000", {"memoryMB": 1024}, lease_seconds=30)
    assert until == pytest.approx(b.now() + 30, abs=5)
    b.heartbeat("n2", "http://10.0.0.2:3000", {"memoryMB": 2048}, lease_seconds=0.4)
    nodes = a.nodes()
    assert [(n.node_id, n.alive, n.capacity["memoryMB"]) for n in nodes] == [("n1", True, 1024), ("n2", True, 2048)]
    time.sleep(0.6)
    assert [(n.node_id, n.alive) for n in b.nodes()] == [("n1", True), ("n2", False)]  # (its lease ran out)
    first = a.nodes()[1].started_at
    b.heartbeat("n2", "http://10.0.0.9:3000", {"memoryMB": 4096}, lease_seconds=30)  # (back, moved)
    n2 = a.nodes()[1]
    assert n2.alive and n2.url == "http://10.0.0.9:3000" and n2.capacity == {"memoryMB": 4096}
    assert n2.started_at == first  # (registered once)
    a.put(record("on-n2", 9.0), node="n2")
    assert b.lost_nodes() == []  # (n2 alive again; n1 alive)
    a.release("n1")
    assert b.lost_nodes() == []  # (n1 is not alive, but it has no sandboxes: nothing to declare)
    a.put(record("on-n1", 9.0), node="n1")
    assert [n.node_id for n in b.lost_nodes()] == ["n1"]
    a.delete("on-n1")
    a.delete("on-n2")
    assert [n.alive for n in b.nodes()] == [False, True]
    assert b.forget_node("n1") and not b.forget_node("n1") and [n.node_id for n in a.nodes()] == ["n2"]


def test_a_beat_renews_and_learns_in_one_go(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    first = a.beat("n1", "http://n1.invalid:3000", {}, lease_seconds=30)
    assert first.lost == [] and not first.declared_lost and first.lease_until == pytest.approx(first.now + 30)
    b.heartbeat("n2", "http://n2.invalid:3000", {}, lease_seconds=0.2)
    b.put(record("on-n2", 1.0), node="n2")
    a.put(record("on-n1", 1.0), node="n1")
    time.sleep(0.4)
    seen = a.beat("n1", "http://n1.invalid:3000", {}, lease_seconds=30)
    assert [n.node_id for n in seen.lost] == ["n2"] and not seen.declared_lost
    b.lose("n1", 5.0, lambda r: {"sandboxID": r.sandbox_id, "endReason": {"kind": "lost"}})  # (n1 stalled, say)
    assert a.beat("n1", "http://n1.invalid:3000", {}, lease_seconds=30).declared_lost
    a.revive("n1")
    assert not a.beat("n1", "http://n1.invalid:3000", {}, lease_seconds=30).declared_lost


def test_a_lost_sandbox_is_claimed_by_one_node_only(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    a.node = "n1"
    a.put(record("moving", 1.0, metadata={"k": "v"}))
    b.lose("n1", 5.0, lambda r: {"sandboxID": r.sandbox_id, "endReason": {"kind": "lost"}})
    assert b.lost_record("moving").metadata == {"k": "v"}  # type: ignore[union-attr]
    claimed = b.claim_lost("moving")
    assert claimed is not None and claimed[0].sandbox_id == "moving"
    assert a.claim_lost("moving") is None and a.lost_record("moving") is None  # (one node wins)
    b.unclaim(claimed[1])  # (the move failed: lost again, for the next try)
    assert a.lost_record("moving") is not None and a.ended("moving") == {
        "sandboxID": "moving",
        "endReason": {"kind": "lost"},
    }
    assert a.claim_lost("nope") is None


def test_migrations_run_once_and_refuse_a_newer_schema(open_state: Callable[[], State]) -> None:
    a = open_state()
    assert a.query("SELECT max(version) FROM schema_version")[0][0] == LATEST
    assert migrate(a) == [] and open_state().query("SELECT count(*) FROM schema_version")[0][0] == LATEST
    a.execute("INSERT INTO schema_version (version) VALUES (?)", (LATEST + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this sandboxd knows"):
        open_state()


def test_an_older_sqlite_database_is_brought_up_with_its_data(tmp_path: Path) -> None:
    # the schema sandboxd wrote before migrations (no schema_version, no nodes, volumes without created_at)
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE sandboxes (id TEXT PRIMARY KEY, template_id TEXT NOT NULL, state TEXT NOT NULL,
            started_at REAL NOT NULL, end_at REAL NOT NULL, record TEXT NOT NULL);
        CREATE TABLE ended (id TEXT PRIMARY KEY, ended_at REAL NOT NULL, body TEXT NOT NULL);
        CREATE TABLE volumes (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, body TEXT NOT NULL);
        INSERT INTO settings VALUES ('api_key', 'e2b_old');
        INSERT INTO volumes VALUES ('late', 'b', '{"volume_id": "late", "name": "b", "created_at": 20.0}');
        INSERT INTO volumes VALUES ('early', 'a', '{"volume_id": "early", "name": "a", "created_at": 10.0}');
        """
    )
    rec = record("old", 5.0)
    conn.execute(
        "INSERT INTO sandboxes VALUES (?, ?, ?, ?, ?, ?)",
        ("old", "base", "running", 5.0, 305.0, json.dumps(asdict(rec))),
    )
    conn.commit()
    conn.close()
    state = StateDB(path)
    try:
        assert state.api_key() == ("e2b_old", False)
        assert [r.sandbox_id for r in state.all()] == ["old"] and state.node_of("old") == ""
        assert [v["volume_id"] for v in state.all_volumes()] == ["early", "late"]
        assert state.nodes() == [] and state.key_rows() == []
    finally:
        state.close()


def test_a_lost_nodes_sandboxes_end_and_come_back_with_it(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()
    a.node = "n1"
    a.put(record("x", 1.0, metadata={"k": "v"}))
    a.put(record("y", 2.0))
    b.put(record("z", 3.0), node="n2")

    def body(rec: SandboxRecord) -> dict:
        return {"sandboxID": rec.sandbox_id, "endReason": {"kind": "lost", "by": "n1"}}

    assert sorted(b.lose("n1", 50.0, body)) == ["x", "y"]
    assert [r.sandbox_id for r in b.all(node=None)] == ["z"]
    assert b.ended("x") == {"sandboxID": "x", "endReason": {"kind": "lost", "by": "n1"}}
    assert b.lose("n1", 51.0, body) == []  # (declared twice: nothing more)
    b.end("z", 60.0, {"sandboxID": "z", "endReason": {"kind": "killed"}})
    back = a.revive("n1")
    assert sorted(r.sandbox_id for r in back) == ["x", "y"]
    assert [(r.sandbox_id, r.metadata) for r in a.all()] == [("x", {"k": "v"}), ("y", {})]
    assert a.ended("x") is None and a.ended("z") is not None  # (only the lost come back)
    assert a.revive("n1") == [] and b.revive("n2") == []


def test_each_teams_live_sandboxes_are_counted_as_rows_come_and_go(open_state: Callable[[], State]) -> None:
    a, b = open_state(), open_state()

    def live() -> dict[str, int]:
        counted = dict(b.query("SELECT team, live FROM team_live WHERE live <> 0"))
        assert counted == dict(b.query("SELECT team, count(*) FROM sandboxes GROUP BY team"))  # (the truth)
        return {team: int(n) for team, n in counted.items()}

    def rec(sandbox_id: str, team: str) -> SandboxRecord:
        r = record(sandbox_id, 1.0)
        r.team = team
        return r

    a.node = "n1"
    for i in range(3):
        a.put(rec(f"t{i}", "acme"))
    a.put(rec("u0", "beta"))
    assert live() == {"acme": 3, "beta": 1}
    a.put(rec("t0", "acme"))  # (written again: not a new one)
    a.put(rec("t1", "beta"))  # (its team changed)
    assert live() == {"acme": 2, "beta": 2}
    a.delete("t2")
    a.end("u0", 5.0, {"sandboxID": "u0"})
    assert live() == {"acme": 1, "beta": 1}
    assert a.admit_create("acme", 2, 0) is None and a.admit_create("acme", 1, 0) == ("sandboxes", 5.0)
    b.lose("n1", 9.0, lambda r: {"sandboxID": r.sandbox_id, "endReason": {"kind": "lost"}})
    assert live() == {} and a.admit_create("acme", 1, 0) is None
    a.revive("n1")
    assert live() == {"acme": 1, "beta": 1}
