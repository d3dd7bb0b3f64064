"""Kept processes (envd/kept.py) as a hostile tenant sees them: their keepers are host-root processes in
the sandbox's cgroups, so none may be visible, signalled or reached from inside; what they keep on the
host's disk is bounded per process and per sandbox."""

from __future__ import annotations

import json
import time
from pathlib import Path

from e2b import Sandbox

from conftest import Server, run_as


def _procs_dir(server: Server, sandbox_id: str) -> Path:
    return server.data_dir / "sandboxes" / sandbox_id / "procs"


def test_keepers_are_out_of_the_sandboxs_reach(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        bg = sbx.commands.run("sleep 1000", background=True)
        deadline = time.monotonic() + 5  # (its record is written just after the start event goes out)
        while not (keepers := [d for d in _procs_dir(server, sbx.sandbox_id).iterdir() if (d / "meta.json").exists()]):
            assert time.monotonic() < deadline, "the command has a keeper"
            time.sleep(0.02)
        # inside, the command's parent is the sandbox's init side: no host-root keeper among its processes
        ps = run_as(sbx, "ps -eo pid,ppid,user,comm --no-headers")[1]
        assert "sandbox-exec" not in ps and "sbxhelper" not in ps, ps
        assert run_as(sbx, f"cat /proc/{bg.pid}/status | grep PPid")[1].split()[-1] == "0"
        # no path of the host's state dir exists in the sandbox; the keeper's host PID names nothing there
        assert run_as(sbx, f"ls {keepers[0]} 2>&1; find / -name ctl -type s 2>/dev/null | head -3")[1].count("ctl") == 0
        keeper = json.loads((keepers[0] / "meta.json").read_text())["keeper_pid"]
        code, _, err = run_as(sbx, f"kill -9 {keeper}")
        assert code != 0 and "No such process" in err, err
        assert Path(f"/proc/{keeper}").exists(), "the keeper was killed from inside the sandbox"
        assert bg.pid in [p.pid for p in sbx.commands.list()]
    finally:
        sbx.kill()


def test_what_keepers_hold_on_the_host_is_bounded(server: Server) -> None:
    from sandboxd.core.tenant_limits import TenantLimits

    cap = TenantLimits().kept_processes

    sbx = Sandbox.create(template="base", timeout=120)
    try:
        handles = [sbx.commands.run("sleep 1000", background=True) for _ in range(cap + 3)]
        kept = [d for d in _procs_dir(server, sbx.sandbox_id).iterdir() if (d / "meta.json").exists()]
        assert len(kept) == cap, len(kept)
        assert len(sbx.commands.list()) == cap + 3, "processes past the cap run all the same"
        # a flood of output: its log stays within the output buffer (1 MiB by default) on the host
        sbx.commands.run("head -c 20000000 /dev/zero | tr '\\0' x; true", timeout=60)
        for d in _procs_dir(server, sbx.sandbox_id).iterdir():
            size = sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("out."))
            assert size <= (1 << 20) + 65536 + 16, (d, size)
        for h in handles:
            h.kill()
        # each record goes with its command: none is left on the host
        deadline = time.monotonic() + 10
        while any(_procs_dir(server, sbx.sandbox_id).iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list(_procs_dir(server, sbx.sandbox_id).iterdir())
    finally:
        sbx.kill()
