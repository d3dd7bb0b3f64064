"""The cluster's state at scale, simulated against a real PostgreSQL (tests/pg.py): N nodes (10, 100, 1000) holding
100 sandboxes each (up to 100,000), their heartbeats at the real cadence (every node every 2 s: a lease renewed and
the leases read, as cluster/membership.py does), and creates at a steady rate through the state as an API replica
and a node make them (a team's admission, the record written) — for a few seconds each, from a pool of worker
threads (each its own connection, as each real process has). Printed per size: the beats per second needed and
done, a beat's p50/p95, a create's p50/p95 in the state, and PostgreSQL's transactions and rows read per second;
then the first bottleneck, named from what was measured. docs/scale.md reads these numbers. (The simulated nodes'
addresses are names under .invalid: nothing is ever sent to them.)

    /opt/sandboxd/venv/bin/python bench/scale.py [--seconds 5] [--creates 100] [--workers 8]   # as root; ~1 min
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import statistics
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg import postgres

from sandboxd.cluster.membership import BEAT_SECONDS, LEASE_SECONDS
from sandboxd.state.postgres import PostgresState
from sandboxd.state.records import SandboxRecord

SIZES = (10, 100, 1000)
PER_NODE = 100


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else float("nan")


def record(sandbox_id: str, team: str) -> SandboxRecord:
    now = time.time()
    return SandboxRecord(
        sandbox_id=sandbox_id,
        template_id="base",
        alias="base",
        client_id="sandboxd",
        envd_token=uuid.uuid4().hex,
        started_at=now,
        end_at=now + 300,
        state="running",
        team=team,
    )


def populate(conninfo: str, nodes: int) -> None:
    """N nodes' leases and PER_NODE sandboxes each, written in bulk."""
    now = time.time()
    with psycopg.connect(conninfo) as db, db.cursor() as cur:
        cur.executemany(
            "INSERT INTO nodes (id, url, capacity, started_at, lease_until) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO NOTHING",
            [
                (f"node-{i}", f"http://10.0.{i // 250}.{i % 250}:3000", '{"sandboxes": 100}', now, now + 30)
                for i in range(nodes)
            ],
        )
        rows = []
        for i in range(nodes):
            for j in range(PER_NODE):
                sid = f"s{i}x{j}"
                rec = record(sid, f"team-{j % 20}")
                rows.append(
                    (sid, "base", "running", rec.started_at, rec.end_at, json.dumps(asdict(rec)), f"node-{i}", rec.team)
                )
        cur.executemany(
            "INSERT INTO sandboxes (id, template_id, state, started_at, end_at, record, node, team) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            rows,
        )


def pg_counters(conninfo: str) -> tuple[int, int]:
    with psycopg.connect(conninfo) as db:
        row = db.execute(
            "SELECT xact_commit, tup_returned + tup_fetched FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def run_size(conninfo: str, nodes: int, seconds: float, creates_per_s: int, workers: int) -> dict[str, float]:
    populate(conninfo, nodes)
    states = [PostgresState(conninfo) for _ in range(workers)]
    local = threading.local()
    pool_ids = iter(range(10**9))
    lock = threading.Lock()

    def state() -> PostgresState:
        if not hasattr(local, "state"):
            with lock:
                local.state = states[next(pool_ids) % workers]
        return local.state

    beat_ms: list[float] = []
    create_ms: list[float] = []
    stop = time.monotonic() + seconds

    def beat(i: int) -> None:
        s = state()
        t0 = time.monotonic()
        # (as cluster/membership.py's beat: the lease, the lost nodes with sandboxes left, its own declared lost?)
        s.beat(f"node-{i}", f"http://sim-{i}.invalid:3000", {"sandboxes": PER_NODE}, LEASE_SECONDS)
        beat_ms.append((time.monotonic() - t0) * 1000)

    def create(n: int) -> None:
        s = state()
        t0 = time.monotonic()
        team = f"team-{n % 20}"
        s.admit_create(team, 10**6, 10**6)  # (the replica: a team's admission, counted)
        s.node = f"node-{n % nodes}"
        s.put(record(f"new{nodes}-{n}", team))  # (the node: its record)
        create_ms.append((time.monotonic() - t0) * 1000)

    before = pg_counters(conninfo)
    t_start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        futures = []
        beats_due = nodes / BEAT_SECONDS
        next_beat = next_create = t_start
        b = c = 0
        while time.monotonic() < stop:
            now = time.monotonic()
            while next_beat <= now:
                futures.append(ex.submit(beat, b % nodes))
                b += 1
                next_beat += 1 / beats_due
            while next_create <= now:
                futures.append(ex.submit(create, c))
                c += 1
                next_create += 1 / creates_per_s
            time.sleep(0.002)
        for f in futures:
            f.result()
    wall = time.monotonic() - t_start
    after = pg_counters(conninfo)
    for s in states:
        s.close()
    return {
        "nodes": nodes,
        "sandboxes": nodes * PER_NODE,
        "beats_needed": nodes / BEAT_SECONDS,
        "beats_done": len(beat_ms) / wall,
        "beat_p50": statistics.median(beat_ms),
        "beat_p95": pct(beat_ms, 95),
        "creates_needed": creates_per_s,
        "creates_done": len(create_ms) / wall,
        "create_p50": statistics.median(create_ms),
        "create_p95": pct(create_ms, 95),
        "commits_s": (after[0] - before[0]) / wall,
        "rows_s": (after[1] - before[1]) / wall,
        "wall": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--creates", type=int, default=100, help="creates per second, at every size")
    ap.add_argument("--workers", type=int, default=8, help="worker threads (each its own connection)")
    args = ap.parse_args()
    rows = []
    with postgres() as pg:
        for nodes in SIZES:
            conninfo = pg.database()
            PostgresState(conninfo).close()  # (the schema)
            rows.append(run_size(conninfo, nodes, args.seconds, args.creates, args.workers))
    print(f"\nthe cluster's state in PostgreSQL, simulated ({args.seconds:g} s per size, {args.workers} connections)")
    head = ("nodes", "sandboxes", "beats/s need", "done", "beat p50", "p95", "creates/s", "create p50", "p95")
    print(" ".join(f"{h:>12}" for h in (*head, "commits/s", "rows read/s")))
    for r in rows:
        cells = (
            f"{r['nodes']:>12}",
            f"{r['sandboxes']:>12}",
            f"{r['beats_needed']:>12.0f}",
            f"{r['beats_done']:>12.0f}",
            f"{r['beat_p50']:>12.2f}",
            f"{r['beat_p95']:>12.2f}",
            f"{r['creates_done']:>12.0f}",
            f"{r['create_p50']:>12.2f}",
            f"{r['create_p95']:>12.2f}",
            f"{r['commits_s']:>12.0f}",
            f"{r['rows_s']:>12.0f}",
        )
        print(" ".join(cells))
    small, worst = rows[0], rows[-1]
    beats_late = worst["beats_done"] < 0.95 * worst["beats_needed"]
    beat_growth = worst["beat_p95"] / small["beat_p95"]
    create_growth = worst["create_p50"] / small["create_p50"]
    if beats_late or worst["beat_p95"] > 1000 * (LEASE_SECONDS - BEAT_SECONDS):
        print(
            f"first bottleneck: the heartbeats at {worst['nodes']} nodes ({worst['beats_done']:.0f} of "
            f"{worst['beats_needed']:.0f}/s done, p95 {worst['beat_p95']:.0f} ms)"
        )
    elif create_growth >= 2 and create_growth >= beat_growth:
        print(
            f"first bottleneck: a create's admission (a team's live sandboxes and recent creates read): its p50 grows "
            f"{create_growth:.1f}x from {small['sandboxes']} to {worst['sandboxes']} sandboxes; the beats stay flat "
            f"(p95 x{beat_growth:.1f})"
        )
    elif beat_growth >= 2:
        print(
            f"first bottleneck: the heartbeats (p95 grows {beat_growth:.1f}x to {worst['beat_p95']:.1f} ms at "
            f"{worst['nodes']} nodes, {worst['commits_s']:.0f} commits/s); the creates grow {create_growth:.1f}x"
        )
    else:
        beats_share = worst["beats_done"] / worst["commits_s"]
        print(
            f"first bottleneck: the primary's commit rate — beats and creates stay flat (p50 x{create_growth:.1f} and "
            f"p95 x{beat_growth:.1f} from {small['nodes']} to {worst['nodes']} nodes) while the commits grow with the "
            f"nodes: {worst['commits_s']:.0f}/s at {worst['nodes']} nodes, {100 * beats_share:.0f} % of them the "
            f"heartbeats (one transaction per beat); then the connections (one per process: a pooler)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
