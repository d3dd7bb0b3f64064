"""A real PostgreSQL for the tests, from Debian's package: `initdb` and `pg_ctl` (as the `postgres` user, which
the package makes) in a temp dir, listening on a unix socket there only (no TCP port), fsync off; stopped and
removed after. `PgServer.database()` makes a fresh database and returns its conninfo."""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def pg_bin(tool: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(Path(p).parts[4]))
    return found[-1] if found else None


@dataclass
class PgServer:
    root: Path
    socket_dir: Path

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} user=postgres dbname={dbname}"

    def database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.conninfo(name)


@contextmanager
def postgres() -> Iterator[PgServer]:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("PostgreSQL is not installed: bash scripts/setup.sh --dev installs Debian's postgresql")
    root = Path(tempfile.mkdtemp(prefix="sandboxd-test-pg-"))
    root.chmod(0o755)
    data, run = root / "data", root / "run"
    for d in (data, run):
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
    pg = ["-D", str(data)]
    try:
        subprocess.run(
            [initdb, *pg, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"],
            user="postgres",
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-k {run} -c listen_addresses='' -c fsync=off -c full_page_writes=off -c synchronous_commit=off"
        subprocess.run(
            [pg_ctl, *pg, "-o", options, "-l", str(run / "postgres.log"), "-w", "-t", "60", "start"],
            user="postgres",
            check=True,
            capture_output=True,
            timeout=90,
        )
        try:
            yield PgServer(root, run)
        finally:
            subprocess.run(
                [pg_ctl, *pg, "-m", "immediate", "-w", "stop"], user="postgres", capture_output=True, timeout=60
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
