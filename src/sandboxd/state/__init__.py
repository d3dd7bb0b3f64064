"""The server's state behind one interface (sql.py): SQLite in the data dir (db.py, the default) or PostgreSQL
(postgres.py, `--database postgresql://...`); the schema's migrations (migrations.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

from sandboxd.state.db import StateDB
from sandboxd.state.records import SandboxRecord
from sandboxd.state.sql import State

__all__ = ["SandboxRecord", "State", "StateDB", "node_id", "open_state"]

NODE_ID_FILE = "node-id"


def open_state(data_dir: Path, database: str | None = None, create: bool = True) -> State:
    """The state: `database` (a PostgreSQL URL or conninfo) when given, else data_dir/state.db. On PostgreSQL,
    which other servers may share, this server's sandboxes are recorded as its node's (the data dir's node ID)."""
    if not database:
        return StateDB(data_dir / "state.db", create=create)
    from sandboxd.state.postgres import PostgresState

    state = PostgresState(database)
    state.node = node_id(data_dir)
    return state


def node_id(data_dir: Path) -> str:
    """This data dir's node ID, made on first use (its sandboxes' records say it)."""
    path = data_dir / NODE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        made = "node-" + uuid.uuid4().hex[:12]
        path.write_text(made + "\n")
        return made
