"""The state's schema, as numbered migrations run in order, each once, in a transaction of its own, recorded in
`schema_version` (a plain versioned-SQL runner: two dialects and a handful of tables do not need an ORM's
migration tool; a migration is the SQL both databases run, with the few types each spells its own way).

A server that finds the database at a version newer than it knows refuses to start (an older sandboxd must not
write a schema it does not understand). On PostgreSQL the runner holds an advisory lock, so that API replicas
and nodes starting together migrate once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandboxd.state.sql import State, Tx


class SchemaTooNew(Exception):
    """The database was migrated by a newer sandboxd."""


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    # each: SQL both run ({real}: the type of a float, SQLite's REAL, PostgreSQL's DOUBLE PRECISION), or each's own
    statements: tuple[str | dict[str, str], ...]


MIGRATIONS = (
    Migration(
        1,
        "settings, sandboxes, ended sandboxes, secrets, volumes, teams' API keys",
        (
            "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, template_id TEXT NOT NULL, "
            "state TEXT NOT NULL, started_at {real} NOT NULL, end_at {real} NOT NULL, record TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS ended (id TEXT PRIMARY KEY, ended_at {real} NOT NULL, body TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS secrets (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
            "version INTEGER NOT NULL, value TEXT NOT NULL, metadata TEXT NOT NULL, created_at {real} NOT NULL, "
            "updated_at {real} NOT NULL)",
            "CREATE TABLE IF NOT EXISTS volumes (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, body TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, team TEXT NOT NULL, name TEXT NOT NULL, "
            "hash TEXT NOT NULL UNIQUE, mask TEXT NOT NULL, created_at {real} NOT NULL, last_used {real})",
        ),
    ),
    Migration(
        2,
        "cluster nodes and their leases; the node of each sandbox; volumes in the order they were made",
        (
            "CREATE TABLE nodes (id TEXT PRIMARY KEY, url TEXT NOT NULL, capacity TEXT NOT NULL, "
            "started_at {real} NOT NULL, lease_until {real} NOT NULL)",
            "ALTER TABLE sandboxes ADD COLUMN node TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX sandboxes_node ON sandboxes (node)",
            "ALTER TABLE volumes ADD COLUMN created_at {real} NOT NULL DEFAULT 0",
            {  # (volumes made before: their order kept)
                "sqlite": "UPDATE volumes SET created_at = coalesce(json_extract(body, '$.created_at'), 0)",
                "postgres": "UPDATE volumes SET created_at = coalesce((body::json->>'created_at')::float8, 0)",
            },
            "CREATE INDEX ended_at ON ended (ended_at)",
        ),
    ),
    Migration(
        3,
        "an ended sandbox's node, why it ended, and (a lost node's) its record, to revive it when the node is back",
        (
            "ALTER TABLE ended ADD COLUMN node TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE ended ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE ended ADD COLUMN record TEXT",
            "CREATE INDEX ended_node ON ended (node, reason)",
        ),
    ),
    Migration(
        4,
        "each live sandbox's team; the creates of each team, for its rate limit",
        (
            "ALTER TABLE sandboxes ADD COLUMN team TEXT NOT NULL DEFAULT 'default'",
            {
                "sqlite": "UPDATE sandboxes SET team = coalesce(json_extract(record, '$.team'), 'default')",
                "postgres": "UPDATE sandboxes SET team = coalesce(record::json->>'team', 'default')",
            },
            "CREATE INDEX sandboxes_team ON sandboxes (team)",
            "CREATE TABLE team_creates (team TEXT NOT NULL, at {real} NOT NULL)",
            "CREATE INDEX team_creates_at ON team_creates (team, at)",
        ),
    ),
    Migration(
        5,
        "the leases by their end (a beat looks for the lost ones)",
        ("CREATE INDEX nodes_lease ON nodes (lease_until)",),
    ),
    Migration(
        6,
        "the content digest of each template layer (a node fetching a layer from another checks it against this)",
        (
            "CREATE TABLE layers (key TEXT PRIMARY KEY, digest TEXT NOT NULL, size_bytes BIGINT NOT NULL, "
            "created_at {real} NOT NULL)",
        ),
    ),
    Migration(
        7,
        "each team's live sandboxes counted by the database as rows come and go (a create's admission reads one row)",
        (
            "CREATE TABLE team_live (team TEXT PRIMARY KEY, live BIGINT NOT NULL)",
            "INSERT INTO team_live (team, live) SELECT team, count(*) FROM sandboxes GROUP BY team",
            {
                "sqlite": "CREATE TRIGGER team_live_add AFTER INSERT ON sandboxes BEGIN "
                "INSERT INTO team_live (team, live) VALUES (NEW.team, 1) "
                "ON CONFLICT (team) DO UPDATE SET live = live + 1; END",
                "postgres": "CREATE FUNCTION team_live_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF TG_OP <> 'INSERT' THEN UPDATE team_live SET live = live - 1 WHERE team = OLD.team; END IF; "
                "IF TG_OP <> 'DELETE' THEN INSERT INTO team_live (team, live) VALUES (NEW.team, 1) "
                "ON CONFLICT (team) DO UPDATE SET live = team_live.live + 1; END IF; RETURN NULL; END $$",
            },
            {
                "sqlite": "CREATE TRIGGER team_live_drop AFTER DELETE ON sandboxes BEGIN "
                "UPDATE team_live SET live = live - 1 WHERE team = OLD.team; END",
                "postgres": "CREATE TRIGGER team_live_rows AFTER INSERT OR DELETE ON sandboxes "
                "FOR EACH ROW EXECUTE FUNCTION team_live_count()",
            },
            {
                "sqlite": "CREATE TRIGGER team_live_move AFTER UPDATE OF team ON sandboxes "
                "WHEN OLD.team <> NEW.team BEGIN "
                "UPDATE team_live SET live = live - 1 WHERE team = OLD.team; "
                "INSERT INTO team_live (team, live) VALUES (NEW.team, 1) "
                "ON CONFLICT (team) DO UPDATE SET live = live + 1; END",
                "postgres": "CREATE TRIGGER team_live_move AFTER UPDATE OF team ON sandboxes FOR EACH ROW "
                "WHEN (OLD.team IS DISTINCT FROM NEW.team) EXECUTE FUNCTION team_live_count()",
            },
        ),
    ),
    Migration(
        8,
        "the cluster's catalog of templates: which template a name means and which build each of its tags means "
        "(the node that builds or retags one tells, and holds that build; the others follow it)",
        (
            "CREATE TABLE template_names (name TEXT PRIMARY KEY, template_id TEXT NOT NULL)",
            "CREATE INDEX template_names_id ON template_names (template_id)",
            "CREATE TABLE template_tags (template_id TEXT NOT NULL, tag TEXT NOT NULL, build TEXT NOT NULL, "
            "node TEXT NOT NULL, at {real} NOT NULL, PRIMARY KEY (template_id, tag))",
        ),
    ),
)
LATEST = MIGRATIONS[-1].version
TYPES = {"sqlite": {"real": "REAL"}, "postgres": {"real": "DOUBLE PRECISION"}}


def version(tx: Tx) -> int:
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    rows = tx.query("SELECT max(version) FROM schema_version")
    return int(rows[0][0] or 0)


def migrate(state: State, lock: str | None = None) -> list[int]:
    """Bring the schema to LATEST; the versions applied. `lock`: a statement that serializes migrators
    (PostgreSQL's advisory lock), run first in each transaction."""
    applied = []
    for m in MIGRATIONS:
        with state.transaction() as tx:
            if lock:
                tx.query(lock)
            current = version(tx)
            if current > LATEST:
                raise SchemaTooNew(
                    f"the state database is at schema version {current}, newer than this sandboxd knows "
                    f"({LATEST}): run the sandboxd that migrated it, or a newer one"
                )
            if m.version <= current:
                continue
            for statement in m.statements:
                sql = statement[state.dialect] if isinstance(statement, dict) else statement
                tx.execute(sql.format(**TYPES[state.dialect]))
            tx.execute("INSERT INTO schema_version (version) VALUES (?)", (m.version,))
            applied.append(m.version)
    return applied
