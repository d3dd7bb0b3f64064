"""The state interface, in SQL both databases speak: settings (the server's key, pools' limits, owners), live
sandboxes, ended ones, secrets, volumes, teams' API keys and cluster nodes with their leases. `State` holds every
query; an implementation gives it a connection (state/db.py: SQLite, embedded, the default; state/postgres.py:
PostgreSQL, for a cluster's API replicas and nodes) and its schema comes from state/migrations.py. Both run the
same contract tests (tests/test_state_contract.py).

Statements use `?` for parameters (PostgreSQL's implementation turns them into its own) and only what SQLite 3.24+
and PostgreSQL 12+ both do (`INSERT ... ON CONFLICT ... DO UPDATE`, no `INSERT OR REPLACE`, no rowid).
"""

from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

from sandboxd.state.records import SandboxRecord

Params = Sequence[Any]
LOST = "lost"  # the end of a lost node's sandboxes (core/endings.py's kind)


@dataclass(frozen=True)
class Node:
    """A cluster node as its lease says: where it serves, what it has, until when it is alive."""

    node_id: str
    url: str
    capacity: dict[str, Any]
    started_at: float
    lease_until: float
    alive: bool  # its lease runs (by the database's clock)


@dataclass(frozen=True)
class Beat:
    """What a node's beat learns (State.beat)."""

    now: float  # the database's clock
    lease_until: float
    lost: list[Node]  # other nodes whose lease ran out, with sandboxes left
    declared_lost: bool  # this node's sandboxes were declared lost (it stalled): revive them


class Tx(ABC):
    """Statements run in one transaction (State.transaction())."""

    @abstractmethod
    def execute(self, sql: str, params: Params = ()) -> int: ...

    @abstractmethod
    def query(self, sql: str, params: Params = ()) -> list[tuple]: ...


class State(ABC):
    dialect: str = ""
    node: str = ""  # the node whose sandboxes put() records, and all() returns by default ("": the only one)

    # -- what an implementation gives ---------------------------------------------------------------
    @abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """A transaction (committed at the end of the block, rolled back on an exception)."""

    @abstractmethod
    def now(self) -> float:
        """The database's time (seconds since the epoch): what leases are measured by."""

    @abstractmethod
    def close(self) -> None: ...

    def execute(self, sql: str, params: Params = ()) -> int:
        with self.transaction() as tx:
            return tx.execute(sql, params)

    def query(self, sql: str, params: Params = ()) -> list[tuple]:
        with self.transaction() as tx:
            return tx.query(sql, params)

    def _one(self, sql: str, params: Params = ()) -> tuple | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    # -- settings ---------------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        self.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def settings_under(self, prefix: str) -> dict[str, str]:
        """The settings whose key starts with `prefix` (the prefix taken off)."""
        rows = self.query("SELECT key, value FROM settings WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))
        return {key[len(prefix) :]: value for key, value in rows}

    def claim_setting(self, key: str, value: str) -> str:
        """`value` under `key` unless a value is there already (one statement: of two at once, one wins); the value
        there after."""
        with self.transaction() as tx:
            tx.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
            return str(tx.query("SELECT value FROM settings WHERE key = ?", (key,))[0][0])

    def delete_setting(self, key: str) -> None:
        self.execute("DELETE FROM settings WHERE key = ?", (key,))

    def api_key(self) -> tuple[str, bool]:
        """The server's API key, creating it on first use (once, whoever asks at the same time). Returns (key,
        created)."""
        # e2b_ + 40 hex: accepted by every SDK version, including those that validate the format.
        fresh = "e2b_" + secrets.token_hex(20)
        with self.transaction() as tx:
            made = tx.execute(
                "INSERT INTO settings (key, value) VALUES ('api_key', ?) ON CONFLICT (key) DO NOTHING", (fresh,)
            )
            key = tx.query("SELECT value FROM settings WHERE key = 'api_key'")[0][0]
        return key, made > 0

    # -- API keys of teams (core/teams.py) ---------------------------------------------------------
    KEY_COLUMNS = "id, team, name, hash, mask, created_at, last_used"

    def key_put(self, row: tuple) -> None:
        self.execute(f"INSERT INTO api_keys ({self.KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def key_rows(self) -> list[tuple]:
        return self.query(f"SELECT {self.KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")

    def key_by_hash(self, digest: str) -> tuple[str, str] | None:
        """(ID, team) of the key with this hash."""
        row = self._one("SELECT id, team FROM api_keys WHERE hash = ?", (digest,))
        return (row[0], row[1]) if row else None

    def key_delete(self, key_id: str) -> bool:
        return self.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)) > 0

    def key_used(self, key_id: str, when: float) -> None:
        self.execute("UPDATE api_keys SET last_used = ? WHERE id = ?", (when, key_id))

    # -- secrets (values are written, and read only by the egress proxy: core/secrets.py) -------------
    SECRET_COLUMNS = "id, name, version, value, metadata, created_at, updated_at"

    def secret_row(self, key: str) -> tuple | None:
        """(id, name, version, value, metadata JSON, created_at, updated_at) by ID or name."""
        return self._one(f"SELECT {self.SECRET_COLUMNS} FROM secrets WHERE id = ? OR name = ?", (key, key))

    def secret_rows(self) -> list[tuple]:
        return self.query(f"SELECT {self.SECRET_COLUMNS} FROM secrets ORDER BY created_at, id")

    def secret_put(self, row: tuple) -> None:
        self.execute(
            f"INSERT INTO secrets ({self.SECRET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET name = excluded.name, version = excluded.version, value = excluded.value, "
            "metadata = excluded.metadata, created_at = excluded.created_at, updated_at = excluded.updated_at",
            row,
        )

    def secret_delete(self, secret_id: str) -> bool:
        return self.execute("DELETE FROM secrets WHERE id = ?", (secret_id,)) > 0

    # -- volumes ----------------------------------------------------------------------------------
    def put_volume(self, body: dict) -> None:
        self.execute(
            "INSERT INTO volumes (id, name, body, created_at) VALUES (?, ?, ?, ?)",
            (body["volume_id"], body["name"], json.dumps(body), float(body.get("created_at") or self.now())),
        )

    def delete_volume(self, volume_id: str) -> None:
        self.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))

    def volume(self, ref: str) -> dict | None:
        """A volume by its ID or its name (an ID wins over a name that spells another volume's ID)."""
        row = self._one(
            "SELECT body FROM volumes WHERE id = ? OR name = ? ORDER BY CASE WHEN id = ? THEN 0 ELSE 1 END LIMIT 1",
            (ref, ref, ref),
        )
        return json.loads(row[0]) if row else None

    def all_volumes(self) -> list[dict]:
        """Oldest first."""
        return [json.loads(r[0]) for r in self.query("SELECT body FROM volumes ORDER BY created_at, id")]

    # -- sandboxes --------------------------------------------------------------------------------
    def put(self, rec: SandboxRecord, node: str | None = None) -> None:
        self.execute(
            "INSERT INTO sandboxes (id, template_id, state, started_at, end_at, record, node, team) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET template_id = excluded.template_id, "
            "state = excluded.state, started_at = excluded.started_at, end_at = excluded.end_at, "
            "record = excluded.record, node = excluded.node, team = excluded.team",
            (
                rec.sandbox_id,
                rec.template_id,
                rec.state,
                rec.started_at,
                rec.end_at,
                json.dumps(asdict(rec)),
                self.node if node is None else node,
                rec.team,
            ),
        )

    def delete(self, sandbox_id: str) -> None:
        self.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def end(self, sandbox_id: str, ended_at: float, body: dict) -> None:
        """The sandbox is gone: its record goes and what ended it is kept, in one transaction."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
            self._ended_row(tx, sandbox_id, ended_at, body, self.node, None)

    @staticmethod
    def _ended_row(tx: Tx, sandbox_id: str, ended_at: float, body: dict, node: str, record: str | None) -> None:
        reason = str((body.get("endReason") or {}).get("kind") or "")
        tx.execute(
            "INSERT INTO ended (id, ended_at, body, node, reason, record) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET ended_at = excluded.ended_at, body = excluded.body, "
            "node = excluded.node, reason = excluded.reason, record = excluded.record",
            (sandbox_id, ended_at, json.dumps(body), node, reason, record),
        )

    def lose(self, node: str, ended_at: float, body_of: Callable[[SandboxRecord], dict]) -> list[str]:
        """The node is lost: each of its live sandboxes ends (`body_of` says how: reason `lost`), its record kept
        with it to be revived if the node comes back (revive()). One transaction; the IDs lost."""
        with self.transaction() as tx:
            rows = tx.query("SELECT id, record FROM sandboxes WHERE node = ?", (node,))
            for sandbox_id, record in rows:
                body = body_of(SandboxRecord(**json.loads(record)))
                tx.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
                self._ended_row(tx, sandbox_id, ended_at, body, node, record)
        return [r[0] for r in rows]

    def revive(self, node: str) -> list[SandboxRecord]:
        """The node is back: its sandboxes that lose() ended are live records again (the node re-adopts those whose
        processes still run). One transaction."""
        with self.transaction() as tx:
            rows = tx.query(
                "SELECT id, record FROM ended WHERE node = ? AND reason = ? AND record IS NOT NULL", (node, LOST)
            )
            for sandbox_id, record in rows:
                rec = SandboxRecord(**json.loads(record))
                tx.execute("DELETE FROM ended WHERE id = ?", (sandbox_id,))
                tx.execute(
                    "INSERT INTO sandboxes (id, template_id, state, started_at, end_at, record, node, team) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (rec.sandbox_id, rec.template_id, rec.state, rec.started_at, rec.end_at, record, node, rec.team),
                )
        return [SandboxRecord(**json.loads(r[1])) for r in rows]

    def lost_record(self, sandbox_id: str) -> SandboxRecord | None:
        """The record of a sandbox its lost node took with it (lose()), while no node has taken it back."""
        row = self._one(
            "SELECT record FROM ended WHERE id = ? AND reason = ? AND record IS NOT NULL", (sandbox_id, LOST)
        )
        return SandboxRecord(**json.loads(row[0])) if row else None

    def claim_lost(self, sandbox_id: str) -> tuple[SandboxRecord, tuple] | None:
        """A lost sandbox taken by another node (cluster/moving.py): its ended row gone in one statement, so one
        node wins; (its record, what unclaim() puts back if the move fails), or None (not lost, or taken)."""
        with self.transaction() as tx:
            rows = tx.query(
                "DELETE FROM ended WHERE id = ? AND reason = ? AND record IS NOT NULL "
                "RETURNING ended_at, body, node, record",
                (sandbox_id, LOST),
            )
        if not rows:
            return None
        ended_at, body, node, record = rows[0]
        return SandboxRecord(**json.loads(record)), (sandbox_id, ended_at, json.loads(body), node, record)

    def unclaim(self, kept: tuple) -> None:
        sandbox_id, ended_at, body, node, record = kept
        with self.transaction() as tx:
            self._ended_row(tx, sandbox_id, ended_at, body, node, record)

    def ended(self, sandbox_id: str) -> dict | None:
        row = self._one("SELECT body FROM ended WHERE id = ?", (sandbox_id,))
        return json.loads(row[0]) if row else None

    def all_ended(self) -> list[dict]:
        """Newest first."""
        return [json.loads(r[0]) for r in self.query("SELECT body FROM ended ORDER BY ended_at DESC, id")]

    def forget_ended(self, before: float) -> int:
        return self.execute("DELETE FROM ended WHERE ended_at < ?", (before,))

    def all(self, node: str | None = "") -> list[SandboxRecord]:
        """The live sandboxes of a node (by default this one's: `node`; None: every node's)."""
        node = self.node if node == "" else node
        if node is None:
            rows = self.query("SELECT record FROM sandboxes ORDER BY started_at, id")
        else:
            rows = self.query("SELECT record FROM sandboxes WHERE node = ? ORDER BY started_at, id", (node,))
        return [SandboxRecord(**json.loads(r[0])) for r in rows]

    def node_of(self, sandbox_id: str) -> str | None:
        row = self._one("SELECT node FROM sandboxes WHERE id = ?", (sandbox_id,))
        return row[0] if row else None

    # -- teams' limits (core/quotas.py) -----------------------------------------------------------
    RATE_WINDOW = 60.0  # s: a team's creates per minute

    def admit_create(self, team: str, max_live: int, per_minute: int) -> tuple[str, float] | None:
        """One more create of `team`, if its live sandboxes stay within `max_live` and its creates of the last
        minute within `per_minute` (0: no limit): counted (None), or refused: ("sandboxes" or "rate", in how many
        seconds to try again). Atomic per team across every process sharing the state."""
        with self.transaction() as tx:
            self._lock_team(tx, team)
            now = self._now_in(tx)
            if max_live > 0:
                rows = tx.query("SELECT live FROM team_live WHERE team = ?", (team,))  # (kept by triggers)
                live = rows[0][0] if rows else 0
                if live >= max_live:
                    return "sandboxes", 5.0  # (until one of its sandboxes ends: no time can be told)
            if per_minute > 0:
                recent = tx.query(
                    "SELECT at FROM team_creates WHERE team = ? AND at > ? ORDER BY at",
                    (team, now - self.RATE_WINDOW),
                )
                if len(recent) >= per_minute:
                    return "rate", max(0.1, recent[-per_minute][0] + self.RATE_WINDOW - now)
            tx.execute("INSERT INTO team_creates (team, at) VALUES (?, ?)", (team, now))
            tx.execute("DELETE FROM team_creates WHERE at < ?", (now - self.RATE_WINDOW,))
        return None

    def _lock_team(self, tx: Tx, team: str) -> None:  # noqa: B027  (none needed on SQLite)
        """Serializes admissions of one team (SQLite's transactions are serialized already)."""

    # -- template layers' digests (cluster/layers.py) ---------------------------------------------
    def put_layer(self, key: str, digest: str, size_bytes: int) -> None:
        """What the layer `key` holds (its content digest, templates/transfer.py), told by the node that made it
        (the same key is the same content: the first told stays)."""
        self.execute(
            "INSERT INTO layers (key, digest, size_bytes, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
            (key, digest, size_bytes, self.now()),
        )

    def layer(self, key: str) -> tuple[str, int] | None:
        """The layer's (digest, size in bytes), if a node told them."""
        row = self._one("SELECT digest, size_bytes FROM layers WHERE key = ?", (key,))
        return (row[0], int(row[1])) if row else None

    # -- the cluster's catalog of templates (cluster/catalog.py) ---------------------------------
    def name_template(self, name: str, template_id: str) -> str:
        """The template `name` means in the cluster: `template_id`, unless a node named another first."""
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO template_names (name, template_id) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, template_id),
            )
            return str(tx.query("SELECT template_id FROM template_names WHERE name = ?", (name,))[0][0])

    def tag_template(self, template_id: str, tags: list[str], build: str) -> None:
        """The template's `tags` mean `build` from now on (told by this node, which holds it)."""
        with self.transaction() as tx:
            for tag in tags:
                tx.execute(
                    "INSERT INTO template_tags (template_id, tag, build, node, at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (template_id, tag) DO UPDATE SET build = excluded.build, node = excluded.node, "
                    "at = excluded.at",
                    (template_id, tag, build, self.node, self.now()),
                )

    def untag_template(self, template_id: str, tags: list[str]) -> None:
        with self.transaction() as tx:
            for tag in tags:
                tx.execute("DELETE FROM template_tags WHERE template_id = ? AND tag = ?", (template_id, tag))

    def template_tags(self, name: str) -> tuple[str, dict[str, tuple[str, str]]] | None:
        """(the template `name` means in the cluster, tag -> (build, the node that told it)), if a node told (`name`: a
        name or an ID)."""
        rows = self.query(
            "SELECT template_id, tag, build, node FROM template_tags WHERE template_id = "
            "COALESCE((SELECT n.template_id FROM template_names n WHERE n.name = ?), ?)",
            (name, name),
        )
        return (str(rows[0][0]), {str(t): (str(b), str(n)) for _, t, b, n in rows}) if rows else None

    def template_named(self, name: str) -> str | None:
        """The template a name means in the cluster, if a node named it."""
        row = self._one("SELECT template_id FROM template_names WHERE name = ?", (name,))
        return str(row[0]) if row else None

    def forget_template(self, template_id: str) -> None:
        """The template was deleted: its names and tags go."""
        with self.transaction() as tx:
            tx.execute("DELETE FROM template_names WHERE template_id = ?", (template_id,))
            tx.execute("DELETE FROM template_tags WHERE template_id = ?", (template_id,))

    # -- cluster nodes and their leases -----------------------------------------------------------
    def heartbeat(self, node_id: str, url: str, capacity: dict[str, Any], lease_seconds: float) -> float:
        """The node is alive for `lease_seconds` more (by the database's clock): its lease renewed, its address
        and capacity updated (registered on its first beat). Returns when the lease ends."""
        with self.transaction() as tx:
            return self._renew(tx, node_id, url, capacity, lease_seconds)[1]

    def beat(self, node_id: str, url: str, capacity: dict[str, Any], lease_seconds: float) -> Beat:
        """A node's beat in one transaction (cluster/membership.py): its lease renewed, the other nodes whose lease
        ran out with sandboxes left, and whether this node's own sandboxes were declared lost (it stalled past its
        lease)."""
        with self.transaction() as tx:
            now, until = self._renew(tx, node_id, url, capacity, lease_seconds)
            lost = self._lost_in(tx, now)
            mine = tx.query(
                "SELECT 1 FROM ended WHERE node = ? AND reason = ? AND record IS NOT NULL LIMIT 1", (node_id, LOST)
            )
        return Beat(now, until, [n for n in lost if n.node_id != node_id], bool(mine))

    def _renew(
        self, tx: Tx, node_id: str, url: str, capacity: dict[str, Any], lease_seconds: float
    ) -> tuple[float, float]:
        now = self._now_in(tx)
        until = now + lease_seconds
        tx.execute(
            "INSERT INTO nodes (id, url, capacity, started_at, lease_until) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET url = excluded.url, capacity = excluded.capacity, "
            "lease_until = excluded.lease_until",
            (node_id, url, json.dumps(capacity), now, until),
        )
        return now, until

    def nodes(self) -> list[Node]:
        """Every node registered, alive or not (by the database's clock), by ID."""
        with self.transaction() as tx:
            now = self._now_in(tx)
            rows = tx.query("SELECT id, url, capacity, started_at, lease_until FROM nodes ORDER BY id")
        return [Node(r[0], r[1], json.loads(r[2]), r[3], r[4], r[4] > now) for r in rows]

    def lost_nodes(self) -> list[Node]:
        """The nodes whose lease ran out (by the database's clock) and that still have live sandboxes: what a beat
        looks for, without reading every lease."""
        with self.transaction() as tx:
            return self._lost_in(tx, self._now_in(tx))

    @staticmethod
    def _lost_in(tx: Tx, now: float) -> list[Node]:
        rows = tx.query(
            "SELECT n.id, n.url, n.capacity, n.started_at, n.lease_until FROM nodes n WHERE n.lease_until <= ? "
            "AND EXISTS (SELECT 1 FROM sandboxes s WHERE s.node = n.id) ORDER BY n.id",
            (now,),
        )
        return [Node(r[0], r[1], json.loads(r[2]), r[3], r[4], False) for r in rows]

    def release(self, node_id: str) -> None:
        """The node leaves (a clean stop): its lease ends now."""
        with self.transaction() as tx:
            tx.execute("UPDATE nodes SET lease_until = ? WHERE id = ?", (self._now_in(tx), node_id))

    def forget_node(self, node_id: str) -> bool:
        return self.execute("DELETE FROM nodes WHERE id = ?", (node_id,)) > 0

    def _now_in(self, tx: Tx) -> float:
        return self.now()
