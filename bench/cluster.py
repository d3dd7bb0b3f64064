"""Cluster suite (issue 13): a real PostgreSQL (tests/pg.py), 3 nodes (`serve --role node`) and 2 API replicas
(`serve --role api`) on this machine, beside the single-process server (SQLite) in the same run. All with the
default warm pool of 2 per server and commitment limits that let a whole burst live at once.

- create burst: BURST creates at CONCURRENCY (`Sandbox.create`, each timed), through the single server, through
  one replica, through two replicas (creates alternate between them); all alive until the burst ends, then killed.
  p50, p95 of the create call and creates per second (BURST / the burst's wall time), each beside the single
  server's, with the ratio;
- the replica's hop on the data plane: `commands.run("true")` on one sandbox, N times through its node directly and
  N times through a replica (interleaved), p50 and p95, and the p50 added by the hop (aim: <= 1 ms).

    /opt/sandboxd/venv/bin/python bench/cluster.py [--burst 200] [--n 200]   # as root; about 2 minutes

The nodes and replicas share one machine's 2 cores here: this measures what the cluster's layers cost, not what
more machines would add.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import Server  # (bench/run.py's: a `sandboxd serve` of the bench's own, a /24 of its own)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pg import postgres

CONCURRENCY = 20
AIM_HOP_MS = 1.0
COMMON = ["--destroy-on-exit", "--max-memory-mb", "400000", "--pids", "64", "--prewarm", "base"]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def burst(urls: list[str], key: str, count: int) -> dict[str, Any]:
    from e2b import Sandbox

    made: list[tuple[str, str]] = []

    def one(i: int) -> float:
        url = urls[i % len(urls)]
        t0 = time.monotonic()
        s = Sandbox.create(template="base", timeout=300, api_url=url, sandbox_url=url, api_key=key)
        ms = (time.monotonic() - t0) * 1000
        made.append((url, s.sandbox_id))
        return ms

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as ex:
        times = list(ex.map(one, range(count)))
    wall = time.monotonic() - t0

    def kill(item: tuple[str, str]) -> None:
        url, sandbox_id = item
        Sandbox.kill(sandbox_id, api_url=url, sandbox_url=url, api_key=key)

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(kill, made))
    return {"p50": statistics.median(times), "p95": pct(times, 95), "rate": count / wall, "n": count}


def hop(node_url: str, replica_url: str, key: str, n: int) -> dict[str, Any]:
    from e2b import Sandbox

    direct = Sandbox.create(template="base", timeout=300, api_url=node_url, sandbox_url=node_url, api_key=key)
    try:
        sbx = Sandbox.connect(direct.sandbox_id, api_url=replica_url, sandbox_url=replica_url, api_key=key)
        for s in (sbx, direct):
            for _ in range(5):
                s.commands.run("true")
        via_node: list[float] = []
        via_replica: list[float] = []
        for _ in range(n):
            for s, into in ((direct, via_node), (sbx, via_replica)):
                t0 = time.monotonic()
                s.commands.run("true")
                into.append((time.monotonic() - t0) * 1000)
        return {
            "node": (statistics.median(via_node), pct(via_node, 95)),
            "replica": (statistics.median(via_replica), pct(via_replica, 95)),
        }
    finally:
        direct.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-cluster-") as tmp, postgres() as pg:
        work = Path(tmp)
        database = pg.database()
        try:
            single = Server(work / "single", COMMON)
            servers.append(single)
            single.start()
            nodes = [Server(work / f"node{i}", ["--role", "node", "--database", database, *COMMON]) for i in range(3)]
            replicas = [Server(work / f"api{i}", ["--role", "api", "--database", database]) for i in range(2)]
            for s in (*nodes, *replicas):
                servers.append(s)
                s.start()
            time.sleep(3)  # (the pools of 2 made, the nodes' leases current)
            key = replicas[0].api_key
            rows = {
                "single server": burst([single.url], single.api_key, args.burst),
                "1 replica, 3 nodes": burst([replicas[0].url], key, args.burst),
                "2 replicas, 3 nodes": burst([r.url for r in replicas], key, args.burst),
            }
            dp = hop(nodes[0].url, replicas[0].url, key, args.n)
        finally:
            for s in reversed(servers):
                s.stop()
    base = rows["single server"]
    print(f"\ncreate burst: {args.burst} creates at concurrency {CONCURRENCY} (ms; ratio = row / single server)")
    print(f"{'':24} {'p50':>8} {'p95':>8} {'creates/s':>10} {'p50 ratio':>10} {'rate ratio':>11}")
    for name, r in rows.items():
        print(
            f"{name:24} {r['p50']:8.1f} {r['p95']:8.1f} {r['rate']:10.1f} {r['p50'] / base['p50']:10.2f}"
            f" {r['rate'] / base['rate']:11.2f}"
        )
    added = dp["replica"][0] - dp["node"][0]
    print(f"\ndata plane: commands.run('true'), {args.n} each, interleaved (ms)")
    print(f"{'':24} {'p50':>8} {'p95':>8}")
    print(f"{'through its node':24} {dp['node'][0]:8.2f} {dp['node'][1]:8.2f}")
    print(f"{'through a replica':24} {dp['replica'][0]:8.2f} {dp['replica'][1]:8.2f}")
    verdict = "met" if added <= AIM_HOP_MS else "missed"
    print(f"the replica's hop adds {added:.2f} ms at p50 (aim <= {AIM_HOP_MS:g} ms: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
