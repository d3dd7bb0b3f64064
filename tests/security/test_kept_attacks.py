"""Kept processes (envd/kept.py) as a hostile tenant sees them: their keepers are host-root processes in
the sandbox's cgroups, so none may be visible, signalled or reached from inside; what they keep on the
host's disk is bounded per process and per sandbox."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from e2b import Sandbox

from conftest import Server, host_pids_of, run_as, run_python


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
        # inside, the command is init's child (a checkpoint of init's tree holds it): no host-root keeper
        # among its processes
        ps = run_as(sbx, "ps -eo pid,ppid,user,comm --no-headers")[1]
        assert "sandbox-exec" not in ps and "sbxhelper" not in ps, ps
        assert run_as(sbx, f"cat /proc/{bg.pid}/status | grep PPid")[1].split()[-1] == "1"
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


# A sandbox process talking to init's socket (sbxhelper.c, init_serve) as keepers do: floods of registrations
# for PIDs that are not its children, datagrams of every wrong shape, descriptors by the hundred.
INIT_ABUSE = """
    import array, os, socket, struct
    addr = "\\0sandboxd-init"
    sent = 0
    def ask(payload, fds=1):
        global sent
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [b.fileno()] * fds))] if fds else []
        try:
            s.sendmsg([payload], anc, 0, addr)
            sent += 1
        finally:
            s.close(); b.close()
        a.settimeout(2)
        try:
            return a.recv(64)
        except OSError:
            return b""
        finally:
            a.close()
    states = set()
    for pid in range(100000, 105000):  # more than init's table holds, for PIDs that name nothing
        states.add(struct.unpack("=Ii", ask(struct.pack("=Ii", 1, pid)))[0])
    for payload in (b"", b"x", struct.pack("=Iii", 1, 2, 3), struct.pack("=Ii", 9, 2), struct.pack("=Ii", 2, -5)):
        ask(payload)
        ask(payload, fds=0)
    ask(struct.pack("=Ii", 2, 1), fds=200)  # more descriptors than init takes: the kernel closes the rest
    # QUERY of init itself (unknown) and of this process (running, as its keeper registered it): nothing reaped
    print(sorted(states), ask(struct.pack("=Ii", 2, 1)), ask(struct.pack("=Ii", 2, os.getpid())), sent)
"""


INIT = "sandbox-init\n"


def test_init_socket_abuse_harms_nothing(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        out = run_python(sbx, INIT_ABUSE, user="user", timeout=120)
        assert out.startswith("[1]"), out  # every registration taken: the ones for dead PIDs made room
        assert "b'\\x03\\x00\\x00\\x00\\x00\\x00\\x00\\x00' b'\\x01\\x00" in out, out
        # init lives, holds what it held, and commands still start as its children and report how they end
        assert run_as(sbx, "sh -c 'exit 7'")[0] == 7
        assert run_as(sbx, "cat /proc/$$/status | grep PPid")[1].split()[-1] == "1"
        [init] = [p for p in host_pids_of(server, sbx.sandbox_id) if Path(f"/proc/{p}/comm").read_text() == INIT]
        fds = {n: os.readlink(f"/proc/{init}/fd/{n}") for n in os.listdir(f"/proc/{init}/fd")}
        assert len(fds) == 5, str(sorted(fds.items()))  # stdio, its socket, its signalfd: nothing it was sent
        bg = sbx.commands.run("sleep 30", background=True)
        bg.kill()
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    finally:
        sbx.kill()
