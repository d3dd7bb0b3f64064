"""Templates suite of the benchmark: a cold build of a small template (Debian base + one apt package + one
pip package + one copied file), a cached rebuild after changing only the copied file, and create latency
of a template whose start command becomes ready after 1 s (warm pool and no pool). Each beside its floor,
measured in the same run:

- cold build: the same work done as commands in one plain sandbox (what the steps cost without a builder);
- cached rebuild: one sandbox made and one file put in it (the least a rebuild of one COPY step does);
- create with a start command: a create of the base template (no start command) on the same server.

The apt repository and the Python package index are in the tests' lab namespace (tests/netlab.py,
served from its /files/): nothing leaves the machine. The servers get a templates directory of their
own, so the cold build is cold. Called by run.py; see bench/README.md.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netlab import WEB
from packages import APT_SOURCES, PIP_ENV, prepare_repos

COLD_RUNS = 3
REBUILDS = 5
START_DELAY = 1.0  # s the template's server takes before it listens
PACE = 3.0  # s between pooled creates: the pool has refilled (a started-and-ready sandbox) by then
SOURCES = APT_SOURCES


def _template(ctx: Path) -> Any:
    from e2b import Template

    return (
        Template(file_context_path=str(ctx))
        .from_base_image()
        .run_cmd(SOURCES, user="root")
        .apt_install("sbx-hello")
        .set_envs(PIP_ENV)
        .pip_install("sbxdemo")
        .copy("app.txt", "/app/")
    )


def _floor_cold(create: Callable[..., Any], kill: Callable[[Any], None]) -> float:
    """The template's work as commands in one plain sandbox, create to done, in s."""
    started = time.monotonic()
    s = create()
    try:
        s.commands.run(SOURCES, user="root", timeout=300)
        s.commands.run(
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y sbx-hello", user="root", timeout=300
        )
        s.commands.run(
            f"PIP_INDEX_URL=http://{WEB}/files/simple/ PIP_TRUSTED_HOST={WEB} pip install sbxdemo",
            user="root",
            timeout=300,
        )
        s.files.write("/tmp/app.txt", "x")
    finally:
        kill(s)
    return time.monotonic() - started


def run_templates(
    warm: Any, cold: Any, dl: Any, workdir: Path, lab_dir: Path, phase: Callable[[str, Callable[[], object]], bool]
) -> dict[str, Any]:
    """warm, cold: run.Client of a server with the warm pool and of one with --pool-size 0, sharing one
    templates dir; started and stopped here. lab_dir: the running lab's directory (its /files/)."""
    from e2b import Sandbox, Template, wait_for_port

    out: dict[str, Any] = {"errors": []}
    ctx = workdir / "ctx"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "app.txt").write_text("v0\n")
    name = "bench-small"
    started_name = "bench-start"

    def cold_builds() -> None:
        xs = []
        for _ in range(COLD_RUNS):
            dl.check()
            t0 = time.monotonic()
            Template.build(_template(ctx), name, skip_cache=True)
            xs.append(time.monotonic() - t0)
        out["cold_build_s"] = xs
        floors = [_floor_cold(lambda: warm.create(dl), warm.kill) for _ in range(COLD_RUNS)]
        out["cold_floor_s"] = floors
        s = Sandbox.create(name)
        try:
            r = s.commands.run("sbx-hello; python3 -c 'import sbxdemo; print(sbxdemo.ANSWER)'; cat /app/app.txt")
            out["cold_check"] = r.stdout.split()
        finally:
            s.kill()

    def rebuilds() -> None:
        xs, floors = [], []
        Template.build(_template(ctx), name)  # untimed: the cold builds skipped the cache, this one fills it
        for i in range(REBUILDS):
            dl.check()
            (ctx / "app.txt").write_text(f"v{i + 1}\n")
            lines: list[str] = []
            t0 = time.monotonic()
            Template.build(_template(ctx), name, on_build_logs=lambda e, lines=lines: lines.append(e.message))
            xs.append(time.monotonic() - t0)
            if sum(1 for line in lines if line.startswith("CACHED")) < 3:  # RUN, RUN, RUN (ENV has no layer)
                out["errors"].append(f"rebuild {i}: steps were not cached: {lines}")
            t0 = time.monotonic()
            s = warm.create(dl)
            s.files.write("/tmp/app.txt", f"v{i}\n")
            floors.append(time.monotonic() - t0)
            warm.kill(s)
        out["rebuild_s"], out["rebuild_floor_s"] = xs, floors

    def timed_create(create: Callable[[], Any], kill: Callable[[Any], None], pooled: bool) -> float:
        if pooled:
            time.sleep(PACE)  # the pool has refilled: the steady state of a pooled server
        t0 = time.monotonic()
        s = create()
        s.commands.run("true")
        took = (time.monotonic() - t0) * 1000
        kill(s)
        return took

    def start_creates(client: Any, key: str, pooled: bool) -> None:
        xs, base = [], []
        for _ in range(8):
            dl.check()
            xs.append(timed_create(lambda: Sandbox.create(started_name), lambda s: s.kill(), pooled))
            base.append(timed_create(lambda: client.create(dl), client.kill, pooled))
        out[f"start_{key}_ms"], out[f"base_{key}_ms"] = xs, base

    if phase("start sandboxd (templates)", warm.server.start):
        prepare_repos(lab_dir)
        phase("templates: cold build", cold_builds)
        phase("templates: cached rebuild", rebuilds)
        t = (
            Template()
            .from_base_image()
            .set_start_cmd(f"sleep {START_DELAY}; python3 -m http.server 8000", wait_for_port(8000))
        )
        if phase("templates: build the start-command template", lambda: Template.build(t, started_name)):
            phase("templates: create with a start command, pool", lambda: start_creates(warm, "pool", True))
        out["errors"] += warm.kill_all()
        warm.server.stop()
    if phase("start sandboxd (templates, no pool)", cold.server.start):
        phase("templates: create with a start command, no pool", lambda: start_creates(cold, "nopool", False))
        out["errors"] += cold.kill_all()
        cold.server.stop()
    shutil.rmtree(ctx, ignore_errors=True)
    return out


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def print_report(r: dict[str, Any]) -> None:
    print("\ntemplates (median; floor measured in the same run; ratio = sandboxd / floor)")
    rows = [
        ("cold build (apt + pip + copy)", "cold_build_s", "cold_floor_s", "s", "same work as commands in one sandbox"),
        ("cached rebuild, last COPY changed", "rebuild_s", "rebuild_floor_s", "s", "create + write one file"),
        ("create -> first cmd, start cmd, pool", "start_pool_ms", "base_pool_ms", "ms", "base template, pool"),
        (
            "create -> first cmd, start cmd, no pool",
            "start_nopool_ms",
            "base_nopool_ms",
            "ms",
            f"base template, no pool (+{START_DELAY:.0f} s ready wait)",
        ),
    ]
    for label, key, floor_key, unit, floor_label in rows:
        if key not in r:
            continue
        ours, floor = _med(r[key]), _med(r.get(floor_key, []))
        ratio = ours / floor if floor else float("nan")
        print(f"  {label:42} {ours:9.2f} {unit:2}   floor {floor:9.2f} {unit:2} ({floor_label})   x{ratio:.2f}")
    if "rebuild_s" in r:
        verdict = "PASS" if _med(r["rebuild_s"]) <= 2.0 else "MISS"
        print(f"  target: cached rebuild <= 2 s: {verdict}")
    if r.get("cold_check"):
        print(f"  built template answers: {' '.join(r['cold_check'])}")
