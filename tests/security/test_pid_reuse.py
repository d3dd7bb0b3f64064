"""PIDs are handles: a number that now names another process (a recycled PID) is never signalled or entered.

The victims are host processes these tests start themselves, standing where a recycled PID would be:
alive, with the PID the server remembers, but not the process it meant (another start time, another
parent). Everything runs through the server's own code paths (runtime.pids, the runtime's netns entry).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sandboxd.runtime import pids
from sandboxd.runtime.namespaces import _socket_in_netns

LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 47999)); s.listen(); print("ready", flush=True)
s.settimeout(3)
try:
    c, _ = s.accept(); print("CONNECTED", flush=True)
except OSError:
    print("nobody", flush=True)
"""


def test_entering_a_recycled_init_pid_reaches_nothing() -> None:
    # A host process in a network namespace of its own, listening on its loopback: what a recycled
    # sandbox-init PID would point at.
    victim = subprocess.Popen(["unshare", "--net", sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "ready"
        # Bring up its loopback so that a connection could succeed if it were attempted.
        subprocess.run(["nsenter", "-t", str(victim.pid), "-n", "ip", "link", "set", "lo", "up"], check=True)
        real_start = pids.start_time(victim.pid)
        assert real_start is not None
        with pytest.raises(pids.ProcessChanged):
            _socket_in_netns(victim.pid, real_start - 1)  # the sandbox's init started at another time
        out, _ = victim.communicate(timeout=10)
        assert "CONNECTED" not in out and "nobody" in out, out
    finally:
        victim.kill()
        victim.wait()


def test_the_right_process_is_entered() -> None:
    victim = subprocess.Popen(["unshare", "--net", sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        subprocess.run(["nsenter", "-t", str(victim.pid), "-n", "ip", "link", "set", "lo", "up"], check=True)
        sock = _socket_in_netns(victim.pid, pids.start_time(victim.pid) or 0)
        with sock:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", 47999))
        out, _ = victim.communicate(timeout=10)
        assert "CONNECTED" in out  # the check above is not vacuous: the right process is reached
    finally:
        victim.kill()
        victim.wait()


def test_a_pid_with_another_parent_is_not_signalled() -> None:
    # The server signals a command through a pidfd checked to be the child of its exec helper.
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with pytest.raises(pids.ProcessChanged):
            pids.open_checked(victim.pid, parent=os.getpid() + 1_000_000)
        assert victim.poll() is None
        fd = pids.open_checked(victim.pid, parent=os.getpid(), start=pids.start_time(victim.pid))
        try:
            pids.signal_group(fd, signal.SIGTERM)
        finally:
            os.close(fd)
        assert victim.wait(timeout=10) == -signal.SIGTERM
    finally:
        victim.kill()
        victim.wait()


def test_signal_group_reaches_the_whole_group_and_nothing_else() -> None:
    group = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        time.sleep(0.2)
        found = subprocess.run(["pgrep", "-g", str(group.pid)], capture_output=True, text=True).stdout
        members = {int(p) for p in found.split()} - {group.pid}
        assert len(members) == 2, members
        fd = pids.open_checked(group.pid, parent=os.getpid())
        try:
            pids.signal_group(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        group.wait(timeout=10)
        time.sleep(0.2)
        for pid in members:
            assert pids.start_time(pid) is None, f"group member {pid} survived"
        assert bystander.poll() is None
    finally:
        for p in (group, bystander):
            p.kill()
            p.wait()


def test_kill_member_spares_a_process_outside_the_cgroup() -> None:
    victim = subprocess.Popen(["sleep", "60"])
    try:
        pids.kill_member(victim.pid, "/sandboxd/no-such-instance/no-such-sandbox")
        time.sleep(0.1)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_the_helper_refuses_an_init_pid_with_another_start_time(server, sandbox) -> None:  # type: ignore[no-untyped-def]
    # The exec helper and the file broker are given the init's PID *and* its start time: a PID that now
    # names another process (same number, other start) is refused before any namespace is entered.
    from conftest import host_pids_of

    helper = next((server.data_dir / "bin").glob("sbxhelper-*"))
    init = next(
        p for p in host_pids_of(server, sandbox.sandbox_id) if open(f"/proc/{p}/comm").read().strip() == "sandbox-init"
    )
    start = pids.start_time(init)
    assert start is not None
    base = ["exec", "--pid", str(init), "--uid", "0", "--gid", "0", "--cwd", "/"]
    wrong = subprocess.run(
        [str(helper), *base, "--pid-start", str(start + 1), "--", "/bin/true"], capture_output=True, text=True
    )
    assert wrong.returncode == 125 and "now names another process" in wrong.stderr, wrong.stderr
    right = subprocess.run(
        [str(helper), *base, "--pid-start", str(start), "--", "/bin/hostname"], capture_output=True, text=True
    )
    assert right.returncode == 0 and right.stdout.strip() == sandbox.sandbox_id, (right.stdout, right.stderr)
