"""PostgreSQL state (a cluster's: API replicas and nodes share it), psycopg 3: the same interface and queries as
SQLite's (state/sql.py), `?` parameters turned into psycopg's, leases measured by the database's clock. A
connection per process, its statements serialized (the state's calls are short); a lost connection is opened again
on the next call. `postgresql://user@host/db` or a libpq keyword string (`host=/run/pg dbname=sandboxd`)."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

import psycopg

from sandboxd.state.migrations import migrate
from sandboxd.state.sql import Params, State, Tx

PARAM = re.compile(r"\?")
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(727170001)"  # (an arbitrary number: sandboxd's migrations)
CONNECT_TIMEOUT = 10


def _sql(sql: str) -> str:
    # (no statement of state/sql.py has a ? or a % inside a literal)
    return PARAM.sub("%s", sql)


class _PgTx(Tx):
    def __init__(self, cur: psycopg.Cursor) -> None:
        self.cur = cur

    def execute(self, sql: str, params: Params = ()) -> int:
        self.cur.execute(_sql(sql), tuple(params))
        return self.cur.rowcount

    def query(self, sql: str, params: Params = ()) -> list[tuple]:
        self.cur.execute(_sql(sql), tuple(params))
        return list(self.cur.fetchall())


class PostgresState(State):
    dialect = "postgres"

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._lock = threading.RLock()
        self._conn: psycopg.Connection | None = None
        migrate(self, lock=MIGRATION_LOCK)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.conninfo, autocommit=False, connect_timeout=CONNECT_TIMEOUT)
        return self._conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cur:
                    yield _PgTx(cur)
                conn.commit()
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
                raise

    def _lock_team(self, tx: Tx, team: str) -> None:
        tx.query("SELECT pg_advisory_xact_lock(727170002, hashtext(?))", (team,))

    def now(self) -> float:
        return float(self.query("SELECT extract(epoch from clock_timestamp())")[0][0])

    def _now_in(self, tx: Tx) -> float:
        return float(tx.query("SELECT extract(epoch from clock_timestamp())")[0][0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
