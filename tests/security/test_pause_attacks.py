"""A sandbox paused to its files (core/pausing.py) is reachable by nothing until it is resumed: not
through envd, not through its ports, not through its files on the host; a hostile pause or connect
body is refused before it does anything; a process cannot hide from the pause in a new session or a
double fork; and its files come back owned as they were. A pause to disk never fills the host's disk; a terminal
restored from disk is the sandbox's own, never one of the host's; TCP repair, which the restore does for the
sandbox's connections, stays out of its own reach."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from e2b import PtySize, Sandbox

from conftest import PtyOutput, Server, host_pids_of, start_server


def test_a_sandbox_paused_to_its_files_is_reachable_by_nothing(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        sbx.commands.run("setsid sh -c 'sleep 1000 & sleep 1000' >/dev/null 2>&1 &", user="root")
        sbx.commands.run("nohup python3 -m http.server 8080 >/dev/null 2>&1 &")
        assert sbx.pause(mode="filesystem") is True
        assert not host_pids_of(server, sbx.sandbox_id), "a process escaped the pause"
        routing = {"E2b-Sandbox-Id": sbx.sandbox_id}
        for port, path in (("49983", "/health"), ("49983", "/files?path=/etc/passwd"), ("8080", "/")):
            r = httpx.get(f"{server.url}{path}", headers={**routing, "E2b-Sandbox-Port": port})
            assert r.status_code == 502, (port, path, r.status_code)
        headers = {"X-API-KEY": server.api_key}
        deep = '{"memory": ' + "[" * 64 + "1" + "]" * 64 + "}"
        for body in (deep, '{"memory": "maybe"}', "[1,2]", "x"):
            r = httpx.post(f"{server.url}/sandboxes/{sbx.sandbox_id}/connect", content=body, headers=headers)
            assert r.status_code == 400, (body, r.text)
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"  # nothing above resumed it
        resumed = Sandbox.connect(sbx.sandbox_id)
        owners = resumed.commands.run("stat -c %U:%G /home/user /etc/passwd").stdout
        assert owners == "user:user\nroot:root\n"
    finally:
        sbx.kill()


def test_a_pause_to_disk_never_fills_the_hosts_disk(tmp_path: Path) -> None:
    # A sandbox's memory written out goes to the host's data dir: a tenant that fills its memory and pauses
    # must not fill the host's disk with it. The data dir here is a 160 MiB tmpfs; the sandbox holds 200 MB.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(small)], check=True)
    try:
        srv = start_server(small / "data", "--pool-size", "0", "--disk-mb", "0", "--checkpoint-after", "0")
        try:
            env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
            sbx = Sandbox.create(template="base", timeout=120, metadata={"sandboxd.memory_mb": "512"}, **env)
            hold = sbx.commands.run(
                'python3 -c "import os, time; b = bytearray(200 << 20)\n'
                "for i in range(0, len(b), 1 << 20): b[i : i + (1 << 20)] = os.urandom(1 << 20)\n"
                "print('ready', flush=True); time.sleep(3600)\"",
                background=True,
            )
            for stdout, _, _ in hold:
                if "ready" in (stdout or ""):
                    break
            sbx.pause()
            deadline = time.monotonic() + 30
            while "MiB free" not in srv.log_path.read_text(errors="replace"):
                assert time.monotonic() < deadline, "no refused pause to disk was logged"
                time.sleep(0.05)
            assert not (srv.data_dir / "sandboxes" / sbx.sandbox_id / "checkpoint").exists()
            assert shutil.disk_usage(small).free > 64 << 20
            again = Sandbox.connect(sbx.sandbox_id, **env)
            assert hold.pid in [p.pid for p in again.commands.list()]  # paused in memory, whole
            again.kill()
        finally:
            srv.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_sandbox_booting_again_from_its_files_cannot_make_the_helper_write_on_the_host(
    server: Server, tmp_path: Path
) -> None:
    """The helper (host root) writes the sandbox's /etc/hostname and /etc/hosts at each boot: the sandbox's own
    symlinks, pointing at host paths, lead nowhere but into the sandbox. (Before: /etc -> a host directory got
    hostname and hosts written there, chowned to the sandbox's uid; /etc -> /etc would have been the host's.)"""
    target = tmp_path / "host-dir"
    target.mkdir()
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        sbx.commands.run(f"mv /etc /etc.old && /bin/ln -s {target} /etc", user="root")
        assert sbx.pause(mode="filesystem") is True
        again = Sandbox.connect(sbx.sandbox_id)
        assert sorted(p.name for p in target.iterdir()) == [], "the helper wrote on the host through a symlink"
        assert again.commands.run("readlink /etc", user="root").stdout == f"{target}\n"  # left as it made it
    finally:
        sbx.kill()


def _host_devpts() -> tuple[int, set[str]]:
    mounts = sum(" - devpts " in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return mounts, set(os.listdir("/dev/pts"))


def test_a_terminal_restored_from_disk_is_the_sandboxs_own_and_leaves_nothing_on_the_host(server: Server) -> None:
    # The restore makes the new terminals on the host (runtime/terminals.py): the slave the tenant gets must be of
    # its own /dev/pts, never a terminal of the host's, and the devpts made for it must be mounted nowhere here.
    before = _host_devpts()
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        term = sbx.pty.create(size=PtySize(rows=24, cols=80))
        out = PtyOutput(term)
        r = httpx.post(
            f"{server.url}/sandboxes/{sbx.sandbox_id}/pause",
            json={"toDisk": True},
            headers={"X-API-KEY": server.api_key},
        )
        assert r.status_code == 204, r.text
        assert _host_devpts() == before
        again = Sandbox.connect(sbx.sandbox_id)
        again.pty.send_stdin(term.pid, b"stat -L -c dev-%d $(tty) /dev/pts/ptmx; echo done-$((1+1))\n")
        out.until(b"done-2")
        devs = re.findall(rb"dev-(\d+)", bytes(out.data))
        assert len(devs) == 2 and devs[0] == devs[1], bytes(out.data)  # its terminal: of the devpts it sees
        assert int(devs[0]) != os.stat("/dev/pts/ptmx").st_dev  # not the host's
        assert _host_devpts() == before
    finally:
        sbx.kill()
    assert _host_devpts() == before


# TCP repair lets a socket take any sequence numbers and queues without a handshake (a tool for forging
# connections): only CRIU's own processes may use it, never the sandbox's, before or after a restore.
REPAIR_PROBE = """
import socket
s = socket.socket()
try:
    s.setsockopt(socket.SOL_TCP, 19, 1)  # TCP_REPAIR
    print("repair-on")
except PermissionError:
    print("refused")
"""


def test_a_sandbox_gets_no_tcp_repair_from_a_restore_of_its_connections(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        sbx.files.write("/tmp/probe.py", REPAIR_PROBE)
        sbx.files.write(
            "/tmp/pair.py",
            "import socket, time\nsrv = socket.create_server(('127.0.0.1', 0))\n"
            "c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()\ntime.sleep(3600)\n",
        )
        assert sbx.commands.run("python3 /tmp/probe.py", user="root").stdout == "refused\n"
        sbx.commands.run("python3 /tmp/pair.py", background=True, user="root")
        time.sleep(0.5)
        r = httpx.post(
            f"{server.url}/sandboxes/{sbx.sandbox_id}/pause",
            json={"toDisk": True},
            headers={"X-API-KEY": server.api_key},
        )
        assert r.status_code == 204, r.text  # (its connection carried: restored with TCP repair)
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.commands.run("python3 /tmp/probe.py", user="root").stdout == "refused\n"
    finally:
        sbx.kill()
