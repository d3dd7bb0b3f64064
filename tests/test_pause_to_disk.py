"""Pause to disk (core/pausing.py): a sandbox paused in memory for `--checkpoint-after` seconds has its processes
written by CRIU and ended, freeing their memory; a resume restores them as they were. Driven with the official
SDK: a command started before the pause keeps its memory, its open file's offset, its child and its output
stream (envd/checkpointing.py)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import CommandExitException, CommandHandle, PtySize, Sandbox, SandboxException

from conftest import (
    TCP_PAIR,
    PtyOutput,
    Server,
    host_pids_of,
    keeping_server,
    read_until,
    start_server,
    start_ticker,
    ticks_through_port,
)

# Counts in memory; reads a file line by line (its offset is the file's); has a child. One line per step:
# "count offset child-alive".
WORKER = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "1000"])
f = open("/tmp/lines")
n = 0
while True:
    n += 1
    line = f.readline()
    alive = child.poll() is None
    print(n, f.tell(), int(alive), child.pid, flush=True)
    time.sleep(0.05)
"""


def _start_worker(sbx: Sandbox) -> CommandHandle:
    """WORKER running in the sandbox (as a command through envd), its file to read written."""
    sbx.files.write("/tmp/lines", "".join(f"line {i}\n" for i in range(100000)))
    sbx.files.write("/tmp/worker.py", WORKER)
    return sbx.commands.run("python3 /tmp/worker.py", background=True)


@pytest.fixture(scope="module")
def disk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("disk") / "data", "--pool-size", "0", "--checkpoint-after", "0")
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def _env(srv: Server) -> dict[str, str]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}


def _detail(srv: Server, sandbox_id: str) -> dict:
    r = httpx.get(f"{srv.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": srv.api_key})
    assert r.status_code == 200, r.text
    return r.json()


def _on_disk(srv: Server, sandbox_id: str, running_first: bool = False) -> None:
    deadline = time.monotonic() + 30
    while (detail := _detail(srv, sandbox_id)).get("pausedTo") != "disk":
        if not (running_first and detail["state"] == "running"):
            assert detail["state"] == "paused" and detail["pauseMode"] == "full", detail
        assert time.monotonic() < deadline, f"not written to disk: {detail}"
        time.sleep(0.05)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "(gone)"


def _images_gone(state_dir: Path) -> None:
    """A restore's images go (deleted by a thread of the server's, after the resume returned)."""
    deadline = time.monotonic() + 10
    while left := sorted(p.name for p in state_dir.glob("checkpoint*")):
        assert time.monotonic() < deadline, f"checkpoint images left after a resume: {left}"
        time.sleep(0.05)


def test_a_command_keeps_its_memory_file_offset_child_and_output_across_a_pause_to_disk(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    try:
        handle = _start_worker(sbx)
        time.sleep(1)
        assert sbx.pause() is True
        assert sbx.pause() is False  # 409: paused already
        _on_disk(disk_server, sbx.sandbox_id)
        assert not sbx.is_running()
        # its processes are gone (their memory with them): only the keeper of its command is left, on the host
        left = {_comm(p) for p in host_pids_of(disk_server, sbx.sandbox_id)}
        assert left <= {"sandbox-exec", "(gone)"}, left
        assert (disk_server.data_dir / "sandboxes" / sbx.sandbox_id / "checkpoint").is_dir()
        time.sleep(0.5)  # (nothing of it runs meanwhile)

        again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        assert again.is_running()
        assert handle.pid in [p.pid for p in again.commands.list()]
        time.sleep(1)
        child = int(again.commands.run(f"cat /proc/{handle.pid}/task/{handle.pid}/children").stdout.split()[0])
        assert again.commands.run(f"cat /proc/{child}/cmdline").stdout.startswith("sleep")
        _images_gone(disk_server.data_dir / "sandboxes" / sbx.sandbox_id)
        handle.kill()
        with pytest.raises(CommandExitException) as ended:
            handle.wait()
        rows = [[int(x) for x in line.split()] for line in ended.value.stdout.splitlines()]
        counts = [r[0] for r in rows]
        # one stream from the start to the kill: every count once, in order (its memory, not a restart), the
        # file read on from where it was, the same child alive all along
        assert counts == list(range(1, len(counts) + 1)) and len(counts) > 25, counts
        assert all(b[1] - a[1] == len(f"line {b[0] - 1}\n") for a, b in itertools.pairwise(rows)), rows
        assert {(r[2], r[3]) for r in rows} == {(1, child)}
        # and the sandbox works on: commands, files, another pause (in memory, then to disk again)
        assert again.commands.run("echo ok").stdout == "ok\n"
        assert again.files.read("/tmp/lines").startswith("line 0\n")
        assert again.pause() is True
        _on_disk(disk_server, sbx.sandbox_id)
        assert Sandbox.connect(sbx.sandbox_id, **env).commands.run("echo again").stdout == "again\n"  # type: ignore[arg-type]
    finally:
        sbx.kill()


def test_a_sandbox_killed_while_on_disk_leaves_nothing(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    handle = sbx.commands.run("sleep 1000", background=True)
    sbx.pause()
    _on_disk(disk_server, sbx.sandbox_id)
    sbx.kill()
    with pytest.raises((CommandExitException, SandboxException)):
        handle.wait()  # its stream ends with the sandbox (its keeper ended too)
    assert not host_pids_of(disk_server, sbx.sandbox_id)
    assert not (disk_server.data_dir / "sandboxes" / sbx.sandbox_id).exists()


ECHO = 'python3 -u -c \'import sys\nfor line in sys.stdin: print("got", line.strip())\nprint("eof"); sys.exit(4)\''


def test_stdin_and_the_exit_code_of_a_command_carry_over(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    try:
        echo = sbx.commands.run(ECHO, background=True, stdin=True)
        sbx.commands.send_stdin(echo.pid, "one\n")
        assert "got one" in read_until(echo, "got one")
        ended = sbx.commands.run("sleep 0.2; exit 5", background=True)  # ends before the dump: init knows how
        # input it had not read yet, nor written output for: in the pipes at the dump, there after the restore
        late = sbx.commands.run("sleep 2; head -n 1; echo written >&2; sleep 1", background=True, stdin=True)
        sbx.commands.send_stdin(late.pid, "sent before the pause\n")
        sbx.pause()
        _on_disk(disk_server, sbx.sandbox_id)
        again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        follow = again.commands.connect(echo.pid)
        again.commands.send_stdin(echo.pid, "two\n")
        seen = read_until(follow, "got two")
        assert "got two" in seen, seen
        again.commands.close_stdin(echo.pid)
        with pytest.raises(CommandExitException) as exited:
            follow.wait()
        assert exited.value.exit_code == 4 and "eof" in exited.value.stdout
        with pytest.raises(CommandExitException) as five:
            ended.wait()
        assert five.value.exit_code == 5
        done = late.wait()
        assert (done.stdout, done.stderr) == ("sent before the pause\n", "written\n")
    finally:
        sbx.kill()


def test_a_sandbox_on_disk_resumes_with_its_memory_after_a_server_crash(tmp_path: Path) -> None:
    # Its namespaces are pinned by files of its state dir, its commands' keepers wait: the next server restores it.
    data = tmp_path / "data"
    with keeping_server(data, "--pool-size", "0", "--checkpoint-after", "0") as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)  # type: ignore[arg-type]
        handle = _start_worker(sbx)
        term = sbx.pty.create(size=PtySize(rows=24, cols=80))  # (the next server asks its keeper which it was)
        sbx.pty.send_stdin(term.pid, b"Z=5\n")
        time.sleep(0.5)
        sbx.pause()
        _on_disk(srv, sbx.sandbox_id)
        srv.stop(signal.SIGKILL)
        # images a restore had used and a thread was deleting when the server died: the next start deletes them
        state_dir = data / "sandboxes" / sbx.sandbox_id
        (state_dir / "checkpoint.discarded-0dead0").mkdir()
        (state_dir / "checkpoint.discarded-0dead0" / "pages-1.img").write_bytes(b"x" * 4096)
        srv2 = start_server(data, "--pool-size", "0", port=port, keep=True)
        try:
            assert not (state_dir / "checkpoint.discarded-0dead0").exists()
            assert _detail(srv2, sbx.sandbox_id).get("pausedTo") == "disk"
            again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
            time.sleep(0.5)
            follow = again.commands.connect(handle.pid)
            again.commands.kill(handle.pid)
            with pytest.raises(CommandExitException) as ended:
                follow.wait()
            counts = [int(line.split()[0]) for line in ended.value.stdout.splitlines()]
            assert counts == list(range(1, len(counts) + 1)) and len(counts) > 12, counts  # its memory, its output
            shell = PtyOutput(again.pty.connect(term.pid))
            again.pty.send_stdin(term.pid, b"echo z-$((Z*8)); exit\n")
            shell.until(b"z-40")
            _images_gone(state_dir)
            assert not (state_dir / "ns").exists(), "its namespaces stay pinned"
            again.kill()
        finally:
            srv2.stop()


def _reboot(srv: Server, sandbox_id: str) -> None:
    """What a host reboot does to a sandbox on disk (and its server): every process of it gone (the keepers of
    its commands), its pinned namespaces with them; its files and images stay."""
    keepers = host_pids_of(srv, sandbox_id)
    srv.stop(signal.SIGKILL)
    for pid in keepers:  # (processes this test's server started)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pins = srv.data_dir / "sandboxes" / sandbox_id / "ns"
    for name in ("uts", "net"):
        subprocess.run(["umount", str(pins / name)], check=True)


def test_a_sandbox_on_disk_resumes_with_its_memory_after_a_host_reboot(tmp_path: Path) -> None:
    # Its namespaces are gone and the keepers of its commands: the restore makes it new namespaces (a new
    # address) and new keepers for its commands and its terminal, from what was written down at the dump.
    data = tmp_path / "data"
    with keeping_server(data, "--pool-size", "0", "--checkpoint-after", "0") as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)  # type: ignore[arg-type]
        handle = _start_worker(sbx)
        term = sbx.pty.create(size=PtySize(rows=24, cols=80))
        sbx.pty.send_stdin(term.pid, b"W=6\n")
        sbx.commands.run("nohup python3 -m http.server 8000 >/dev/null 2>&1 &")  # (bound to all addresses)
        time.sleep(0.5)
        sbx.pause()
        _on_disk(srv, sbx.sandbox_id)
        _reboot(srv, sbx.sandbox_id)
        srv2 = start_server(data, "--pool-size", "0", port=port)  # (its stop destroys them)
        try:
            assert _detail(srv2, sbx.sandbox_id).get("pausedTo") == "disk"
            again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
            time.sleep(0.5)
            follow = again.commands.connect(handle.pid)  # kept again, by a new keeper
            again.commands.kill(handle.pid)
            with pytest.raises(CommandExitException) as ended:
                follow.wait()
            counts = [int(line.split()[0]) for line in ended.value.stdout.splitlines()]
            assert counts and counts == list(range(counts[0], counts[0] + len(counts))), counts
            assert counts[0] > 5, counts  # its memory: it counts on from where it was, not from 1
            shell = PtyOutput(again.pty.connect(term.pid))
            again.pty.send_stdin(term.pid, b"echo w-$((W*7)); exit\n")
            shell.until(b"w-42")
            # a new address, and its service (restored, listening) reached there through the port route
            r = httpx.get(srv2.url + "/", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"})
            assert r.status_code == 200, r.text
            assert not (data / "sandboxes" / sbx.sandbox_id / "checkpoint").exists()
            again.kill()
        finally:
            srv2.stop()


def test_a_sandbox_on_disk_whose_restore_fails_after_a_reboot_resumes_from_its_files(tmp_path: Path) -> None:
    # (what its processes held was not written down: the restore cannot attach their commands anew)
    data = tmp_path / "data"
    with keeping_server(data, "--pool-size", "0", "--checkpoint-after", "0") as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)  # type: ignore[arg-type]
        sbx.files.write("/home/user/kept.txt", "kept\n")
        sbx.commands.run("sleep 1000", background=True)
        sbx.pause()
        _on_disk(srv, sbx.sandbox_id)
        _reboot(srv, sbx.sandbox_id)
        (data / "sandboxes" / sbx.sandbox_id / "checkpoint-parts.json").unlink()
        srv2 = start_server(data, "--pool-size", "0", port=port)  # (its stop destroys them)
        try:
            detail = _detail(srv2, sbx.sandbox_id)
            assert detail["state"] == "paused" and detail["pauseMode"] == "filesystem", detail
            again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
            assert again.files.read("/home/user/kept.txt") == "kept\n"
            assert "sleep 1000" not in again.commands.run("ps -eo args").stdout  # booted: its processes are new
            assert not (data / "sandboxes" / sbx.sandbox_id / "checkpoint").exists()
            again.kill()
        finally:
            srv2.stop()


def test_pause_on_exit_writes_sandboxes_to_disk_and_the_next_start_runs_them_again(tmp_path: Path) -> None:
    # `--pause-on-exit`: a graceful stop writes them to disk; through a reboot, the next start runs again those
    # that ran (with the time they had left), and those that were paused stay paused.
    data = tmp_path / "data"
    with keeping_server(data, "--pool-size", "0", "--pause-on-exit") as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)  # type: ignore[arg-type]
        handle = _start_worker(sbx)
        paused = Sandbox.create(template="base", timeout=300, **env)  # type: ignore[arg-type]
        paused.files.write("/tmp/note", "paused\n")
        assert paused.pause() is True  # (in memory: --checkpoint-after is 60 s)
        time.sleep(0.5)
        assert srv.stop() == 0  # SIGTERM
        for s in (sbx, paused):  # on disk: of each, only the keepers of its commands are left
            assert {_comm(p) for p in host_pids_of(srv, s.sandbox_id)} <= {"sandbox-exec", "(gone)"}
            assert (data / "sandboxes" / s.sandbox_id / "checkpoint" / "inventory.img").is_file()
        for s in (sbx, paused):
            _reboot(srv, s.sandbox_id)
        srv2 = start_server(data, "--pool-size", "0", port=port)  # (its stop destroys them)
        try:
            deadline = time.monotonic() + 30
            while (detail := _detail(srv2, sbx.sandbox_id))["state"] != "running":  # no connect: the start did it
                assert time.monotonic() < deadline, detail
                time.sleep(0.1)
            assert 200 < (Sandbox.get_info(sbx.sandbox_id, **env).end_at.timestamp() - time.time()) <= 300  # type: ignore[arg-type]
            assert _detail(srv2, paused.sandbox_id)["state"] == "paused"
            again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
            follow = again.commands.connect(handle.pid)
            time.sleep(0.3)
            again.commands.kill(handle.pid)
            with pytest.raises(CommandExitException) as ended:
                follow.wait()
            counts = [int(line.split()[0]) for line in ended.value.stdout.splitlines()]
            assert counts and counts[0] > 5 and counts == list(range(counts[0], counts[0] + len(counts))), counts
            assert Sandbox.connect(paused.sandbox_id, **env).files.read("/tmp/note") == "paused\n"  # type: ignore[arg-type]
        finally:
            srv2.stop()


def _stays_in_memory(srv: Server, sandbox_id: str, why: str) -> None:
    """The reaper tried to write the sandbox to disk, could not, and left it paused in memory."""
    deadline = time.monotonic() + 30
    while why not in srv.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no attempt to write {sandbox_id} to disk was logged"
        time.sleep(0.05)
    detail = _detail(srv, sandbox_id)
    assert detail["state"] == "paused" and detail.get("pausedTo") == "memory", detail
    assert not (srv.data_dir / "sandboxes" / sandbox_id / "checkpoint").exists(), "its failed images were left"


def test_tcp_connections_inside_the_sandbox_carry_over_a_pause_to_disk(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    try:
        sbx.files.write("/tmp/tcp.py", TCP_PAIR)
        pair = sbx.commands.run("python3 /tmp/tcp.py", background=True)
        time.sleep(0.5)
        sbx.pause()
        _on_disk(disk_server, sbx.sandbox_id)  # (it stayed in memory before: "Connected TCP socket")
        again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        time.sleep(0.5)
        assert again.pause() is True  # and a second time, restored sockets and all
        _on_disk(disk_server, sbx.sandbox_id)
        again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        time.sleep(0.5)
        pair.kill()
        with pytest.raises(CommandExitException) as ended:
            pair.wait()
        counts = [int(x) for x in ended.value.stdout.split()]
        # one connection all along: every round trip once, in order, none failed
        assert counts == list(range(1, len(counts) + 1)) and len(counts) > 15, counts
        assert "Traceback" not in ended.value.stderr, ended.value.stderr
    finally:
        sbx.kill()


# Holds an exclusive flock and a POSIX record lock (as SQLite does) on two files.
LOCKER = """
import fcntl, time
a = open("/tmp/flocked", "w"); fcntl.flock(a, fcntl.LOCK_EX)
b = open("/tmp/posix-locked", "w"); fcntl.lockf(b, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(3600)
"""

TRY_LOCKS = """
import fcntl
for path, take in (("/tmp/flocked", fcntl.flock), ("/tmp/posix-locked", fcntl.lockf)):
    f = open(path, "w")
    try:
        take(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free", end=" ")
    except BlockingIOError:
        print("held", end=" ")
"""


def test_file_locks_carry_over_a_pause_to_disk(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    try:
        sbx.files.write("/tmp/locker.py", LOCKER)
        sbx.files.write("/tmp/try.py", TRY_LOCKS)
        locker = sbx.commands.run("python3 /tmp/locker.py", background=True)
        assert "locked" in read_until(locker, "locked")
        assert sbx.commands.run("python3 /tmp/try.py").stdout == "held held "
        sbx.pause()
        _on_disk(disk_server, sbx.sandbox_id)  # (it stayed in memory before: "Some file locks are hold")
        again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        assert again.commands.run("python3 /tmp/try.py").stdout == "held held "  # its locks, still its own
        again.commands.kill(locker.pid)
        deadline = time.monotonic() + 10
        while (out := again.commands.run("python3 /tmp/try.py").stdout) != "free free ":
            assert time.monotonic() < deadline, out
            time.sleep(0.1)
    finally:
        sbx.kill()


def test_what_cannot_go_to_disk_stays_paused_in_memory_intact(disk_server: Server) -> None:
    # A connection whose other end is outside the sandbox (here: the server's port proxy, a client streaming
    # from a service of the sandbox) would come back talking to nothing: the sandbox stays paused in memory.
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    try:
        start_ticker(sbx)
        with ticks_through_port(disk_server, sbx.sandbox_id) as stream:
            lines = stream.iter_lines()
            assert next(lines) == "tick 1"
            sbx.pause()
            _stays_in_memory(disk_server, sbx.sandbox_id, "with an end outside the sandbox")
            Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
            # the stream goes on, whole: its connection was never cut
            seen = [next(lines) for _ in range(20)]
            assert seen == [f"tick {n}" for n in range(2, 22)], seen
    finally:
        sbx.kill()


# A foreground job of the terminal's shell: reads the terminal line by line.
FOREGROUND = """
import sys
print("fg-" + "ready", flush=True)
for line in sys.stdin:
    print("got", line.strip(), flush=True)
"""


def test_a_terminal_keeps_its_shell_foreground_job_and_settings_across_a_pause_to_disk(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    try:
        sbx.files.write("/tmp/fg.py", FOREGROUND)
        term = sbx.pty.create(size=PtySize(rows=24, cols=80))
        out = PtyOutput(term)
        sbx.pty.send_stdin(term.pid, b"X=41; echo ready-$((6*7))\n")
        out.until(b"ready-42")
        sbx.pty.resize(term.pid, PtySize(rows=33, cols=99))
        sbx.pty.send_stdin(term.pid, b"python3 /tmp/fg.py\n")
        out.until(b"fg-ready")
        assert sbx.pause() is True
        _on_disk(disk_server, sbx.sandbox_id)  # (it stayed in memory before: "has a terminal (PTY)")
        left = {_comm(p) for p in host_pids_of(disk_server, sbx.sandbox_id)}
        assert left <= {"sandbox-exec", "(gone)"}, left

        again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        assert term.pid in [p.pid for p in again.commands.list()]
        # the foreground job reads the (new) terminal, the stream from before the pause still follows it
        again.pty.send_stdin(term.pid, b"hello\n")
        out.until(b"got hello")
        # ^C reaches the foreground job through the terminal (its session, foreground group and settings
        # came back): the shell is back, with its variable and the size it was given
        again.pty.send_stdin(term.pid, b"\x03")
        out.until(b"KeyboardInterrupt")  # (what is typed before the job ends may be its, not the shell's)
        again.pty.send_stdin(term.pid, b"echo x-$((X+1)); stty size; test -c $(tty) && echo tty-$((2+2))\n")
        out.until(b"x-42")
        out.until(b"33 99")
        out.until(b"tty-4")
        # and it goes on: resize, another pause to disk, exit
        again.pty.resize(term.pid, PtySize(rows=20, cols=70))
        again.pty.send_stdin(term.pid, b"stty size\n")
        out.until(b"20 70")
        assert again.pause() is True
        _on_disk(disk_server, sbx.sandbox_id)
        third = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        third.pty.send_stdin(term.pid, b"echo y-$((X*2)); exit 3\n")
        out.until(b"y-82")
        assert out.done.wait(10)
    finally:
        sbx.kill()


def test_a_sandbox_with_a_volume_goes_to_disk_with_the_volume_and_the_files_it_holds_open(
    disk_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b import Volume

    env = _env(disk_server)
    monkeypatch.setenv("E2B_VOLUME_API_URL", disk_server.url)  # (the volume content API: this server's)
    vol = Volume.create(f"disk-{time.monotonic_ns()}", **env)  # type: ignore[arg-type]
    sbx = Sandbox.create(template="base", timeout=120, volume_mounts={"/data/vol": vol}, **env)  # type: ignore[arg-type]
    try:
        sbx.files.write("/data/vol/log", "first\n")
        # a process whose working directory is in the volume, holding a file of it open to append to
        appender = sbx.commands.run(
            "cd /data/vol && exec 3>>log && while read -r line; do echo $line >&3; done", background=True, stdin=True
        )
        sbx.commands.send_stdin(appender.pid, "before\n")
        sbx.pause()
        _on_disk(disk_server, sbx.sandbox_id)  # (a volume kept it in memory before)
        sbx = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
        sbx.commands.send_stdin(appender.pid, "after\n")
        deadline = time.monotonic() + 10
        while (seen := vol.read_file("/log", format="text")) != "first\nbefore\nafter\n":  # (from the host)
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        # the same volume, mounted as before: its files the sandbox user's, what the sandbox writes in the volume
        assert sbx.commands.run("stat -c %U /data/vol/log; echo new > /data/vol/new").stdout == "user\n"
        assert vol.read_file("/new", format="text") == "new\n"
        sbx.commands.send_stdin(appender.pid, "end\n")
        sbx.commands.close_stdin(appender.pid)
        assert appender.wait().exit_code == 0
    finally:
        sbx.kill()
        Volume.destroy(vol.volume_id, **env)  # type: ignore[arg-type]


# A server on a unix socket bound on the sandbox's root (an overlay), with a connection of its own open.
UNIX_SERVER = """
import socket, threading
server = socket.socket(socket.AF_UNIX)
server.bind("/tmp/app.sock")
server.listen()
def serve(conn):
    while data := conn.recv(100):
        conn.sendall(data.upper())
def accept():
    while True:
        threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
mine = socket.socket(socket.AF_UNIX)
mine.connect("/tmp/app.sock")
for line in iter(input, "end"):
    mine.sendall(line.encode())
    print(mine.recv(100).decode(), flush=True)
"""
UNIX_CLIENT = (
    "python3 -c \"import socket; c = socket.socket(socket.AF_UNIX); c.connect('/tmp/app.sock'); "
    "c.sendall(b'new'); print(c.recv(9).decode())\""
)


def test_a_unix_socket_server_keeps_its_path_and_connections_across_pauses_to_disk(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
    try:
        sbx.files.write("/tmp/server.py", UNIX_SERVER)
        server = sbx.commands.run("python3 /tmp/server.py", background=True, stdin=True)
        sbx.commands.send_stdin(server.pid, "before\n")
        for round in range(2):  # (a second dump failed when the first restore lost the socket's path)
            sbx.pause()
            _on_disk(disk_server, sbx.sandbox_id)
            sbx = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
            assert sbx.commands.run(UNIX_CLIENT).stdout == "NEW\n"  # its path still leads to it
            sbx.commands.send_stdin(server.pid, f"round{round}\n")  # its own connection still open
        sbx.commands.send_stdin(server.pid, "end\n")
        assert server.wait().stdout.split() == ["BEFORE", "ROUND0", "ROUND1"]
    finally:
        sbx.kill()


TICKER = """
import threading, time
ticks = []
def tick():
    while True:
        ticks.append(1)
        time.sleep(0.01)
threading.Thread(target=tick, daemon=True).start()
"""


def test_a_code_interpreter_keeps_its_kernels_variables_across_a_pause_to_disk(disk_server: Server) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    env = _env(disk_server)
    ci = CodeSandbox.create(timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True}, **env)  # type: ignore[arg-type]
    try:
        first = ci.run_code("import os, numpy; x = int(numpy.arange(42).sum()); os.getpid()")
        assert first.error is None, first.error
        ctx = ci.create_code_context(language="python", cwd="/tmp")
        assert ci.run_code("import os; y = 'in its own context'; open('f', 'w').write('z')", context=ctx).error is None
        shell = ci.create_code_context(language="bash")
        assert ci.run_code("export WHO=bash-context; cd /etc", context=shell).error is None
        # Deno's kernel talks to the interpreter over TCP on loopback (carried with TCP repair) and holds file
        # locks (carried too)
        assert ci.run_code("let v = 20; v + 1", language="javascript").text == "21"
        ci.pause()  # (the connections the interpreter's requests left are no hindrance)
        _on_disk(disk_server, ci.sandbox_id)
        # a request on its port resumes it (auto_resume): the same kernels, their state whole
        assert ci.run_code("(int(x), os.getpid())").text == f"(861, {first.text})"
        assert _detail(disk_server, ci.sandbox_id)["state"] == "running"
        in_ctx = ci.run_code("y, os.getcwd(), open('f').read()", context=ctx)
        assert in_ctx.text == "('in its own context', '/tmp', 'z')"
        assert ci.run_code("echo $WHO $PWD", context=shell).logs.stdout == ["bash-context /etc\n"]
        assert ci.run_code("v * 2 + 2", language="javascript").text == "42"

        # and again, while a context runs code in the background of its kernel (a thread)
        ci.run_code(TICKER)
        ci.pause()
        _on_disk(disk_server, ci.sandbox_id)
        again = CodeSandbox.connect(ci.sandbox_id, **env)  # type: ignore[arg-type]
        before = int(again.run_code("len(ticks)").text)
        time.sleep(0.2)
        assert int(again.run_code("len(ticks)").text) > before > 0
    finally:
        ci.kill()


def test_auto_pause_goes_to_disk_and_a_command_resumes_it(disk_server: Server) -> None:
    env = _env(disk_server)
    sbx = Sandbox.create(template="base", timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": True}, **env)  # type: ignore[arg-type]
    try:
        counter = sbx.commands.run(
            "n=0; while :; do n=$((n+1)); echo $n > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.05; done", background=True
        )
        _on_disk(disk_server, sbx.sandbox_id, running_first=True)  # its end time came: paused, then to disk
        first = int(sbx.files.read("/tmp/n"))  # an envd request: resumed from disk (auto_resume)
        assert _detail(disk_server, sbx.sandbox_id)["state"] == "running"
        time.sleep(0.3)
        assert int(sbx.commands.run("cat /tmp/n").stdout) > first  # the same loop, counting on
        assert counter.pid in [p.pid for p in sbx.commands.list()]
    finally:
        sbx.kill()


@pytest.mark.parametrize("to_disk", [True, False])
def test_an_upload_cut_by_a_crash_while_its_sandbox_was_paused_leaves_no_temporary_file(
    tmp_path: Path, to_disk: bool
) -> None:
    # The upload's temporary file is made, then the sandbox paused (its broker frozen mid-upload), then the
    # server dies: the next one finds the sandbox paused, its journal naming that file; once the sandbox runs
    # again the file goes (it used to stay: a paused sandbox was skipped, or its frozen broker failed the unlink
    # and the journal forgot the file anyway).
    data = tmp_path / "data"
    after = ("--checkpoint-after", "0") if to_disk else ("--checkpoint-after", "never")
    with keeping_server(data, "--pool-size", "0", *after) as (srv, port):
        env = _env(srv)
        sbx = Sandbox.create(template="base", timeout=300, **env)  # type: ignore[arg-type]
        sbx.commands.run("true")
        url = sbx.upload_url("/home/user/big.bin")

        def body() -> Iterator[bytes]:
            yield b"x" * (1 << 20)
            time.sleep(2)  # (the pause and the crash come meanwhile)
            yield b"y" * (1 << 20)

        def upload() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(url, content=body(), headers={"Content-Type": "application/octet-stream"}, timeout=30)

        import threading

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        deadline = time.monotonic() + 10
        while not [n for n in sbx.commands.run("ls -a /home/user").stdout.split() if n.startswith(".sandboxd-upload-")]:
            assert time.monotonic() < deadline, "the upload's temporary file did not appear"
            time.sleep(0.05)
        sbx.pause()
        if to_disk:
            _on_disk(srv, sbx.sandbox_id)
        srv.stop(signal.SIGKILL)
        uploader.join(timeout=30)
        srv2 = start_server(data, "--pool-size", "0", *after, port=port, keep=True)
        try:
            again = Sandbox.connect(sbx.sandbox_id, **env)  # type: ignore[arg-type]
            left = [
                n for n in again.commands.run("ls -a /home/user").stdout.split() if n.startswith(".sandboxd-upload-")
            ]
            assert not left, left
            journal = data / "sandboxes" / sbx.sandbox_id / "uploads"
            assert not [p for p in journal.rglob("*") if p.is_file()], "its journal keeps entries"
            again.kill()
        finally:
            srv2.stop()
