"""Fleet suite of the benchmark: a burst of creates against a warm pool the autoscaler sized (core/autoscaler.py),
beside the same burst against a fixed pool of 2, in the same run.

For each server: a training burst (TRAIN creates at CONCURRENCY, then all killed) shows the autoscaler the
demand; once the pool's idle sandboxes have reached its target (GET /metrics; bounded wait), the measured
burst: BURST creates at CONCURRENCY (`Sandbox.create` until it returned, each timed), all alive until the
burst ends (the servers run with commitment limits that allow it), then killed. Reported: p50 and p95 of the
create call, creates per second over the burst (BURST / its wall time), and the pool's hits and misses during
it. Aims (issue 12): >= 200 creates/s at c=20 on 2 cores, p95 <= 100 ms.

Called by run.py; see bench/README.md.
"""

from __future__ import annotations

import concurrent.futures
import math
import statistics
import time
from typing import Any

BURST = 200
TRAIN = BURST
CONCURRENCY = 20
POOL_MAX = 250
AIM_RATE, AIM_P95 = 200.0, 100.0
# Each server: its pools' limits, a /22 of addresses (BURST sandboxes alive and a pool of up to POOL_MAX), and
# commitment limits (memory, PIDs) that let them all live at once.
AUTOSCALED_ARGS = ["--pool-size", "2", "--pool-max", str(POOL_MAX), "--pool-cooldown", "300"]
AUTOSCALED_ARGS += ["--pool-memory-mb", "400000", "--network-cidr", "10.215.0.0/22"]
FIXED_ARGS = ["--pool-size", "2", "--pool-max", "2", "--network-cidr", "10.215.4.0/22"]
COMMON_ARGS = ["--max-memory-mb", "400000", "--pids", "64", "--prewarm", "base"]


def _pool(client: Any) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(client.server.url + "/metrics", headers={"X-API-KEY": client.server.api_key}, timeout=30)
    r.raise_for_status()
    return {
        s.name.removeprefix("sandboxd_pool_"): s.value
        for f in text_string_to_metric_families(r.text)
        for s in f.samples
        if s.name.startswith("sandboxd_pool_") and s.labels.get("template") == "base" and "direction" not in s.labels
    }


def _burst(client: Any, dl: Any, count: int) -> tuple[list[float], float]:
    """(each create's ms, the burst's wall time in s); the sandboxes stay alive (the caller kills them)."""

    def one(_: int) -> float:
        dl.check()
        t0 = time.monotonic()
        client.create(dl)
        return (time.monotonic() - t0) * 1000

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as ex:
        times = list(ex.map(one, range(count)))
    return times, time.monotonic() - t0


def _kill_all(client: Any) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        return [e for errs in ex.map(lambda s: _kill(client, s), list(client.live.values())) for e in errs]


def _kill(client: Any, s: Any) -> list[str]:
    try:
        client.kill(s)
        return []
    except Exception as e:
        return [f"killing {s.sandbox_id}: {e!r}"]


def run_fleet(client: Any, dl: Any, trained: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": []}
    deadline = time.monotonic() + 60
    while _pool(client).get("idle", 0) < 2 and time.monotonic() < deadline:  # (prewarmed)
        time.sleep(0.2)
    if trained:
        _burst(client, dl, TRAIN)
        out["errors"] += _kill_all(client)
        # until the target has settled (the window's demand is still seen for a while) and the pool is full
        deadline, last, since = time.monotonic() + 120, -1.0, time.monotonic()
        while time.monotonic() < deadline:
            p = _pool(client)
            if p.get("target", 0) != last:
                last, since = p.get("target", 0), time.monotonic()
            elif time.monotonic() - since >= 3 and p.get("idle", 0) >= last:
                break
            time.sleep(0.2)
        out["sized"] = {"target": p.get("target"), "idle": p.get("idle")}
    before = _pool(client)
    times, wall = _burst(client, dl, BURST)
    after = _pool(client)
    out["errors"] += _kill_all(client)
    out["create_ms"] = times
    out["rate"] = BURST / wall
    out["hits"] = after.get("hits_total", 0) - before.get("hits_total", 0)
    out["misses"] = after.get("misses_total", 0) - before.get("misses_total", 0)
    return out


def _p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def print_report(r: dict[str, Any]) -> None:
    print(
        f"\nfleet: a burst of {BURST} creates at concurrency {CONCURRENCY} (create call, ms; creates/s over the burst)"
    )
    fixed = r.get("fixed") or {}
    for key, label in (("autoscaled", "pool sized by the autoscaler"), ("fixed", "fixed pool of 2 (floor)")):
        d = r.get(key)
        if not d or not d.get("create_ms"):
            continue
        p50, p95 = statistics.median(d["create_ms"]), _p95(d["create_ms"])
        line = f"  {label:32} p50 {p50:7.1f}  p95 {p95:7.1f}  {d['rate']:6.1f}/s"
        line += f"  hits {d['hits']:.0f} misses {d['misses']:.0f}"
        if key == "autoscaled":
            if fixed.get("create_ms"):
                ratio = p50 / statistics.median(fixed["create_ms"])
                line += f"   x{ratio:.2f} of fixed p50, x{d['rate'] / fixed['rate']:.2f} of its rate"
            ok = d["rate"] >= AIM_RATE and p95 <= AIM_P95
            line += f"   aim >= {AIM_RATE:.0f}/s, p95 <= {AIM_P95:.0f}: {'PASS' if ok else 'MISS'}"
            if d.get("sized"):
                line += f"   (sized: target {d['sized']['target']:.0f}, idle {d['sized']['idle']:.0f})"
        print(line)
