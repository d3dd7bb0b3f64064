"""Warm pools that scale themselves (core/autoscaler.py): a burst of creates grows a template's pool within its
max, and it shrinks back to its min after the cool-down, seen through the pool metrics of GET /metrics; each
template's limits through the API (`/pools`, sandboxd's extension) and the CLI (`sandboxd pool`), kept across a
restart."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from pathlib import Path

import httpx
from e2b import Sandbox
from prometheus_client.parser import text_string_to_metric_families

from conftest import SANDBOXD, Server, start_server

BURST = 10
MAX = 6


def _pool(srv: Server, template: str = "base") -> dict[str, float]:
    """The template's pool gauges and counters, from /metrics."""
    r = httpx.get(srv.url + "/metrics", headers={"X-API-KEY": srv.api_key}, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("sandboxd_pool_") and s.labels.get("template") == template:
                key = s.name.removeprefix("sandboxd_pool_") + (
                    f"_{s.labels['direction']}" if "direction" in s.labels else ""
                )
                out[key] = s.value
    return out


def _env(srv: Server) -> dict[str, str]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}


def test_a_pool_grows_under_a_burst_and_shrinks_after_its_cool_down(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", "--pool-size", "1", "--pool-max", str(MAX), "--pool-cooldown", "2")
    made: list[Sandbox] = []
    try:
        deadline = time.monotonic() + 60
        while _pool(srv).get("idle") != 1:  # (prewarmed to its min)
            assert time.monotonic() < deadline, _pool(srv)
            time.sleep(0.2)

        def create(_: int) -> Sandbox:
            return Sandbox.create(template="base", timeout=120, **_env(srv))  # type: ignore[arg-type]

        with concurrent.futures.ThreadPoolExecutor(BURST) as ex:
            made = list(ex.map(create, range(BURST)))
        after_burst = _pool(srv)
        assert after_burst["hits_total"] + after_burst["misses_total"] == BURST, after_burst
        assert after_burst["misses_total"] >= BURST - 3, after_burst  # (one was idle, a refill may come in time)

        # grows: to its max, no further, and the idle sandboxes follow the target
        peak, deadline = 0.0, time.monotonic() + 60
        while True:
            p = _pool(srv)
            assert p["target"] <= MAX and p["idle"] <= MAX, p
            peak = max(peak, p["target"])
            if p["idle"] >= 4:
                break
            assert time.monotonic() < deadline, f"the pool did not grow: {p}"
            time.sleep(0.2)
        assert peak > 1 and p["scalings_total_up"] >= 1, p
        for s in made:
            s.kill()

        # shrinks, a step per cool-down, back to its min once no create has missed for a while
        deadline = time.monotonic() + 90
        while True:
            p = _pool(srv)
            assert p["target"] <= MAX and p["idle"] <= MAX, p
            if p["target"] == 1 and p["idle"] == 1:
                break
            assert time.monotonic() < deadline, f"the pool did not shrink back: {p}"
            time.sleep(0.5)
        assert p["scalings_total_down"] >= 1 and p["min"] == 1 and p["max"] == MAX, p
    finally:
        for s in made:
            try:
                s.kill()
            except Exception:
                pass
        assert srv.stop() == 0


def _cli(srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SANDBOXD, "pool", *args, "--url", srv.url, "--api-key", srv.api_key],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_templates_pool_limits_through_the_api_and_the_cli_outlive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, "--pool-size", "1")
    try:
        api = srv.api()
        for bad in ({"min": 3, "max": 2}, {"min": -1, "max": 2}, {"min": "1", "max": 2}, {"min": 0, "max": 5000}, {}):
            r = api.put("/pools/base", json=bad)
            assert r.status_code == 400, (bad, r.status_code, r.text)
        assert api.put("/pools/no-such-template", json={"min": 0, "max": 1}).status_code == 404
        assert api.get("/pools/no-such-template").status_code == 404

        # no pool: its idle sandbox goes
        r = api.put("/pools/base", json={"min": 0, "max": 0})
        assert r.status_code == 200, r.text
        assert r.json()["min"] == 0 and r.json()["max"] == 0 and r.json()["custom"] is True
        deadline = time.monotonic() + 30
        while _pool(srv).get("idle", 0) != 0:
            assert time.monotonic() < deadline, _pool(srv)
            time.sleep(0.2)
        sbx = Sandbox.create(template="base", timeout=60, **_env(srv))  # type: ignore[arg-type]
        sbx.kill()
        assert api.get("/pools/base").json()["misses"] >= 1

        # the CLI: set (a pool of 2 fills), show (a table, and --json), errors with their exit code
        done = _cli(srv, "set", "base", "--min", "2", "--max", "3")
        assert done.returncode == 0, done.stderr
        assert "base" in done.stdout and "2" in done.stdout
        deadline = time.monotonic() + 60
        while _pool(srv).get("idle", 0) < 2:
            assert time.monotonic() < deadline, _pool(srv)
            time.sleep(0.2)
        shown = json.loads(_cli(srv, "show", "--json").stdout)
        base = next(p for p in shown if p["templateID"] == "base")
        # (its target may be 3: the create that missed a moment ago is demand the autoscaler may answer)
        assert (base["min"], base["max"]) == (2, 3) and 2 <= base["idle"] <= base["target"] <= 3, base
        refused = _cli(srv, "set", "base", "--min", "4", "--max", "3")
        assert refused.returncode == 1 and "min <= max" in refused.stderr, refused
        assert _cli(srv, "show", "nope-template").returncode == 1
    finally:
        assert srv.stop() == 0

    srv = start_server(data, "--pool-size", "1")
    try:
        base = srv.api().get("/pools/base").json()
        assert (base["min"], base["max"], base["custom"]) == (2, 3, True), base
        reset = _cli(srv, "reset", "base", "--json")
        assert reset.returncode == 0, reset.stderr
        assert json.loads(reset.stdout)["custom"] is False and json.loads(reset.stdout)["min"] == 1
    finally:
        assert srv.stop() == 0


def test_the_pools_stay_within_their_memory_budget(tmp_path: Path) -> None:
    # A budget of one base sandbox's memory (512 MiB): misses cannot grow the pool past it.
    srv = start_server(
        tmp_path / "data", "--pool-size", "1", "--pool-max", str(MAX), "--pool-memory-mb", "512", "--prewarm", "base"
    )
    try:
        made = [Sandbox.create(template="base", timeout=60, **_env(srv)) for _ in range(4)]  # type: ignore[arg-type]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            p = _pool(srv)
            assert p["target"] <= 1 and p["idle"] <= 1, p
            time.sleep(0.25)
        assert p["misses_total"] >= 2, p
        for s in made:
            s.kill()
    finally:
        assert srv.stop() == 0
