"""Snapshots (core/snapshots.py) with the official SDK: a template-like source that new sandboxes start from,
sharing its layers and diverging on their own; listed, deleted. With memory (E2B's default), the new sandboxes
run the source's processes from where the snapshot caught them, the commands started through envd among them
(listed, connectable, with their input and output), terminals too."""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import SandboxException

from conftest import (
    TCP_PAIR,
    TEMPLATES_DIR,
    PtyOutput,
    Server,
    cgroup_dir,
    held_top_layer,
    start_server,
    start_ticker,
    ticks_through_port,
)


def _lowers(server: Server, sandbox_id: str) -> str:
    return held_top_layer(sandbox_id)


def test_a_filesystem_snapshot_starts_new_sandboxes_that_diverge(server: Server) -> None:
    src = Sandbox.create(template="base", timeout=120)
    made: list[Sandbox] = []
    name = f"snap-{secrets.token_hex(3)}"
    snapshot_id = None
    try:
        src.files.write("/home/user/notes.txt", "from the source\n")
        src.commands.run("rm /etc/motd; echo made > /etc/by-root", user="root")
        bg = src.commands.run("sleep 1000", background=True)
        snap = src.create_snapshot(name=name, mode="filesystem")
        snapshot_id = snap.snapshot_id
        assert name in snap.names
        assert any(p.pid == bg.pid for p in src.commands.list()), "the source stopped running"
        src.files.write("/home/user/notes.txt", "changed after the snapshot\n")

        made = [Sandbox.create(template=snapshot_id, timeout=60) for _ in range(2)]
        for child in made:
            assert child.files.read("/home/user/notes.txt") == "from the source\n"
            assert child.commands.run("test -e /etc/motd || echo deleted").stdout == "deleted\n"
            assert child.commands.run("stat -c '%U %s' /etc/by-root").stdout == "root 5\n"
            assert child.commands.run("whoami; pgrep -x sleep || echo none").stdout == "user\nnone\n"
        assert _lowers(server, made[0].sandbox_id) == _lowers(server, made[1].sandbox_id)  # shared, not copied
        made[0].files.write("/home/user/notes.txt", "child 0\n")
        assert made[1].files.read("/home/user/notes.txt") == "from the source\n"

        assert snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=src.sandbox_id).next_items()]
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name=name).next_items()] == [snapshot_id]
        again = src.create_snapshot(name=name, mode="filesystem")  # the same name: a new build of it
        assert again.snapshot_id == snapshot_id
        assert Sandbox.create(template=name, timeout=60).files.read("/home/user/notes.txt") == (
            "changed after the snapshot\n"
        )
    finally:
        for child in made:
            child.kill()
        src.kill()
        if snapshot_id is not None:
            assert Sandbox.delete_snapshot(snapshot_id) is True
    with pytest.raises(SandboxException):
        Sandbox.create(template=name, timeout=30)


# Counts in memory, and says so in a file; a child of its own.
COUNTER = """
import os, subprocess, time
child = subprocess.Popen(["sleep", "1000"])
n = 0
while True:
    n += 1
    with open("/tmp/n.new", "w") as f:
        f.write(f"{n} {child.pid} {int(child.poll() is None)}")
    os.replace("/tmp/n.new", "/tmp/n")
    time.sleep(0.02)
"""


def _counted(sbx: Sandbox) -> tuple[int, int, int]:
    n, child, alive = sbx.files.read("/tmp/n").split()
    return int(n), int(child), int(alive)


def _start_counting(sbx: Sandbox, notes: str) -> int:
    """COUNTER started on its own (not kept by envd), counting; a file written; the counter's PID."""
    sbx.files.write("/tmp/count.py", COUNTER)
    sbx.commands.run("nohup python3 /tmp/count.py > /tmp/count.log 2>&1 &")
    sbx.files.write("/home/user/notes.txt", notes)
    deadline = time.monotonic() + 10
    while not sbx.files.exists("/tmp/n") or _counted(sbx)[0] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return int(sbx.commands.run("pgrep -f count.py").stdout)


def test_a_snapshot_with_memory_starts_sandboxes_running_its_processes_from_where_they_were(server: Server) -> None:
    src = Sandbox.create(template="base", timeout=120)
    made: list[Sandbox] = []
    snapshot_id = None
    try:
        counter = _start_counting(src, "from the source\n")
        snap = src.create_snapshot()  # memory and files: E2B's default
        snapshot_id = snap.snapshot_id
        caught = _counted(src)[0]  # (a moment after the snapshot: at least its count)
        src.files.write("/home/user/notes.txt", "changed after the snapshot\n")
        assert int(src.commands.run("pgrep -f count.py").stdout) == counter  # the source runs on

        made = [Sandbox.create(template=snapshot_id, timeout=60) for _ in range(3)]
        for child in made:
            n, sleeper, alive = _counted(child)
            # the same process (its PID in the sandbox), counting on from where the snapshot caught it (not from
            # 1: nothing started it again), with its child
            assert int(child.commands.run("pgrep -f count.py").stdout) == counter
            assert n <= caught + 50 and alive == 1, (n, caught)
            assert child.commands.run(f"cat /proc/{sleeper}/comm").stdout == "sleep\n"
            assert child.files.read("/home/user/notes.txt") == "from the source\n"
            assert child.commands.run("hostname").stdout == f"{child.sandbox_id}\n"
            assert child.commands.run("whoami").stdout == "user\n"
        time.sleep(0.3)
        assert all(_counted(c)[0] > caught for c in made)  # each counting on its own
        assert _lowers(server, made[0].sandbox_id) == _lowers(server, made[1].sandbox_id)  # files shared
        made[0].commands.run(f"kill {counter}")
        time.sleep(0.2)
        frozen = _counted(made[0])[0]
        time.sleep(0.2)
        assert _counted(made[0])[0] == frozen  # ended there...
        assert int(made[1].commands.run("pgrep -f count.py").stdout) == counter  # ...not in its siblings
        assert int(src.commands.run("pgrep -f count.py").stdout) == counter  # nor in the source

        # a sandbox made from a snapshot goes to disk and back like any other
        r = httpx.post(
            f"{server.url}/sandboxes/{made[1].sandbox_id}/pause",
            json={"toDisk": True},
            headers={"X-API-KEY": server.api_key},
            timeout=60,
        )
        assert r.status_code == 204, r.text
        again = Sandbox.connect(made[1].sandbox_id)
        before = _counted(again)[0]
        time.sleep(0.2)
        assert _counted(again)[0] > before and int(again.commands.run("pgrep -f count.py").stdout) == counter
    finally:
        for child in made:
            child.kill()
        src.kill()
        if snapshot_id is not None:
            assert Sandbox.delete_snapshot(snapshot_id) is True
            assert not (TEMPLATES_DIR / snapshot_id).exists()  # its memory went with it


def test_a_code_interpreter_snapshot_with_memory_keeps_its_kernels_variables(server: Server) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    src = CodeSandbox.create(timeout=120)
    made: list[CodeSandbox] = []
    snapshot_id = None
    try:
        assert src.run_code("import numpy; prepared = numpy.arange(10).sum()").error is None
        snapshot_id = src.create_snapshot().snapshot_id
        made = [CodeSandbox.create(template=snapshot_id, timeout=60) for _ in range(2)]
        for i, child in enumerate(made):
            assert child.run_code(f"prepared += {i}; int(prepared)").text == str(45 + i)  # diverging
        assert src.run_code("int(prepared)").text == "45"
    finally:
        for child in made:
            child.kill()
        src.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)


def test_fork_children_have_the_parents_memory_and_diverge(server: Server) -> None:
    src = Sandbox.create(template="base", timeout=120, metadata={"who": "parent"})
    forks: list[Sandbox] = []
    try:
        counter = _start_counting(src, "before the fork\n")
        made = src.fork(count=3, timeout=60)
        forks = [f for f in made if isinstance(f, Sandbox)]
        assert len(forks) == 3, made
        assert len({f.sandbox_id for f in forks} | {src.sandbox_id}) == 4
        for f in forks:
            assert int(f.commands.run("pgrep -f count.py").stdout) == counter  # the parent's process, running
            assert f.files.read("/home/user/notes.txt") == "before the fork\n"
            assert f.commands.run("hostname").stdout == f"{f.sandbox_id}\n"
            info = f.get_info()
            assert info.template_id == src.get_info().template_id and info.metadata == {"who": "parent"}
        forks[0].files.write("/home/user/notes.txt", "fork 0\n")
        assert forks[1].files.read("/home/user/notes.txt") == "before the fork\n"
        assert src.files.read("/home/user/notes.txt") == "before the fork\n"
        assert int(src.commands.run("pgrep -f count.py").stdout) == counter  # the parent runs on
        assert not [s for s in Sandbox.list_snapshots(sandbox_id=src.sandbox_id).next_items()]  # (its snapshot: gone)
        r = httpx.post(
            f"{server.url}/sandboxes/{src.sandbox_id}/fork", json={"count": 21}, headers={"X-API-KEY": server.api_key}
        )
        assert r.status_code == 400, r.text
        layer = Path(held_top_layer(forks[0].sandbox_id)).parent  # (<templates>/.layers/<key>/diff)
        assert layer.parent.name == ".layers" and layer.is_dir()
        for f in forks:
            f.kill()
        assert not layer.exists(), "the fork's snapshot's layer outlived the last fork standing on it"
    finally:
        for f in forks:
            f.kill()
        src.kill()


ECHO = "python3 -u -c 'import sys\nfor line in sys.stdin: print(line.upper(), end=\"\", flush=True)'"


def test_commands_run_through_envd_go_on_in_sandboxes_from_a_snapshot_and_in_forks(server: Server) -> None:
    from e2b import CommandExitException

    src = Sandbox.create(template="base", timeout=120)
    made: list[Sandbox] = []
    snapshot_id = None
    try:
        echo = src.commands.run(ECHO, background=True, stdin=True)  # under its keeper, its stdin and stdout pipes
        src.commands.send_stdin(echo.pid, "before\n")
        time.sleep(0.3)
        snapshot_id = src.create_snapshot().snapshot_id
        made = [Sandbox.create(template=snapshot_id, timeout=60)]
        made += [f for f in src.fork(count=1, timeout=60) if isinstance(f, Sandbox)]
        assert len(made) == 2
        for i, child in enumerate(made):
            assert echo.pid in [p.pid for p in child.commands.list()]  # kept again, in the new sandbox
            handle = child.commands.connect(echo.pid)
            child.commands.send_stdin(echo.pid, f"in child {i}\n")
            time.sleep(0.3)
            child.commands.kill(echo.pid)
            with pytest.raises(CommandExitException) as ended:
                handle.wait()
            assert f"IN CHILD {i}" in ended.value.stdout, ended.value.stdout
        # the source's command is its own: it goes on, its output its own
        src.commands.send_stdin(echo.pid, "in the source\n")
        time.sleep(0.3)
        src.commands.kill(echo.pid)
        with pytest.raises(CommandExitException) as ended:
            echo.wait()
        assert ended.value.stdout == "BEFORE\nIN THE SOURCE\n"

    finally:
        for child in made:
            child.kill()
        src.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)


def test_a_terminal_goes_on_in_sandboxes_from_a_snapshot_and_in_forks(server: Server) -> None:
    from e2b import PtySize

    src = Sandbox.create(template="base", timeout=120)
    made: list[Sandbox] = []
    snapshot_id = None
    try:
        term = src.pty.create(size=PtySize(rows=30, cols=90))
        out = PtyOutput(term)
        src.pty.send_stdin(term.pid, b"Y=7; echo set-$((Y*6))\n")
        out.until(b"set-42")
        snapshot_id = src.create_snapshot().snapshot_id  # (refused before: "has a terminal (PTY)")
        made = [Sandbox.create(template=snapshot_id, timeout=60)]
        made += [f for f in src.fork(count=1, timeout=60) if isinstance(f, Sandbox)]
        assert len(made) == 2
        for i, child in enumerate(made):
            assert term.pid in [p.pid for p in child.commands.list()]  # the shell, kept again in the new sandbox
            theirs = PtyOutput(child.pty.connect(term.pid))
            child.pty.send_stdin(term.pid, f"echo child-{i}-$((Y+1)); stty size; tty\n".encode())
            theirs.until(f"child-{i}-8".encode())
            theirs.until(b"30 90")
            theirs.until(b"/dev/pts/")
            child.pty.resize(term.pid, PtySize(rows=21, cols=61))
            child.pty.send_stdin(term.pid, b"stty size; exit\n")
            theirs.until(b"21 61")
            assert theirs.done.wait(10)
            assert f"child-{i}".encode() not in out.data  # (the source's terminal is its own)
        # the source's shell goes on, its size its own
        src.pty.send_stdin(term.pid, b"echo source-$((Y+2)); stty size; exit\n")
        out.until(b"source-9")
        out.until(b"30 90")
        assert out.done.wait(10)
    finally:
        for child in made:
            child.kill()
        src.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)


def _frozen_unlisted(data: Path, known: set[str]) -> list[str]:
    """Sandboxes of the data dir not in `known` (pooled ones) whose processes are frozen."""
    found = []
    for d in (data / "sandboxes").iterdir():
        state = cgroup_dir("freezer", d.name) / "freezer.state"
        with contextlib.suppress(OSError):
            if d.name not in known and state.read_text().strip() == "FROZEN":
                found.append(d.name)
    return found


def _until_frozen_unlisted(data: Path, known: set[str]) -> list[str]:
    deadline = time.monotonic() + 60
    while not (frozen := _frozen_unlisted(data, known)):  # (the base template's pooled ones run)
        assert time.monotonic() < deadline, "no pooled sandbox of the snapshot was made"
        time.sleep(0.1)
    return frozen


def test_a_snapshot_with_memory_is_pooled_frozen_and_handed_out_running(tmp_path: Path) -> None:
    # (its pooled sandboxes: restored ahead, their processes frozen until a create hands one out)
    from e2b import CommandExitException

    data = tmp_path / "data"
    srv = start_server(data, "--pool-size", "1", "--pool-max", "1", "--disk-mb", "0", "--prewarm", "")  # (fixed)
    env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
    snapshot_id = None
    try:
        src = Sandbox.create(template="base", timeout=120, **env)  # type: ignore[arg-type]
        echo = src.commands.run(ECHO, background=True, stdin=True)
        src.commands.run("nohup sh -c 'while :; do echo tick >> /tmp/ticks; sleep 0.05; done' >/dev/null 2>&1 &")
        snapshot_id = src.create_snapshot().snapshot_id
        first = Sandbox.create(template=snapshot_id, timeout=60, **env)  # (not pooled yet: its first use)
        known = {src.sandbox_id, first.sandbox_id}
        [pooled] = _until_frozen_unlisted(data, known)
        member = min(int(p) for p in (cgroup_dir("freezer", pooled) / "cgroup.procs").read_text().split())
        ticks = Path(f"/proc/{member}/root/tmp/ticks")  # (as its processes see it)
        seen = ticks.read_text().count("tick")
        time.sleep(0.5)
        assert ticks.read_text().count("tick") == seen  # frozen: its processes wait

        second = Sandbox.create(template=snapshot_id, timeout=60, **env)  # type: ignore[arg-type]
        assert second.sandbox_id == pooled  # handed out from the pool, running
        n = int(second.commands.run("grep -c tick /tmp/ticks").stdout)
        time.sleep(0.3)
        assert int(second.commands.run("grep -c tick /tmp/ticks").stdout) > n
        assert echo.pid in [p.pid for p in second.commands.list()]  # what it carried, attached at the hand-out
        handle = second.commands.connect(echo.pid)
        second.commands.send_stdin(echo.pid, "pooled\n")
        time.sleep(0.3)
        second.commands.kill(echo.pid)
        with pytest.raises(CommandExitException) as ended:
            handle.wait()
        assert "POOLED" in ended.value.stdout, ended.value.stdout

        # the snapshot deleted: its pooled sandbox (made again after the hand-out) goes with it
        known.add(second.sandbox_id)
        [again] = _until_frozen_unlisted(data, known)
        Sandbox.delete_snapshot(snapshot_id, **env)  # type: ignore[arg-type]
        snapshot_id = None
        deadline = time.monotonic() + 30
        while (data / "sandboxes" / again).exists():
            assert time.monotonic() < deadline, "the deleted snapshot's pooled sandbox stays"
            time.sleep(0.2)
        for s in (first, second, src):
            s.kill()
    finally:
        if snapshot_id is not None:  # (the shared templates dir keeps no snapshot of a failed run)
            Sandbox.delete_snapshot(snapshot_id, **env)  # type: ignore[arg-type]
        assert srv.stop() == 0


def test_tcp_connections_on_loopback_go_on_in_sandboxes_from_a_snapshot(server: Server) -> None:
    from e2b import CommandExitException

    src = Sandbox.create(template="base", timeout=120)
    snapshot_id = None
    try:
        src.files.write("/tmp/tcp.py", TCP_PAIR)
        pair = src.commands.run("python3 /tmp/tcp.py", background=True)
        time.sleep(0.5)
        snapshot_id = src.create_snapshot().snapshot_id  # (refused before: "Connected TCP socket")
        child = Sandbox.create(template=snapshot_id, timeout=60)
        try:
            follow = child.commands.connect(pair.pid)
            time.sleep(0.5)
            child.commands.kill(pair.pid)
            with pytest.raises(CommandExitException) as ended:
                follow.wait()
            counts = [int(x) for x in ended.value.stdout.split()]
            assert counts and counts == list(range(counts[0], counts[0] + len(counts))) and len(counts) > 5, counts
            assert "Traceback" not in ended.value.stderr, ended.value.stderr
        finally:
            child.kill()

        # one with an end outside the sandbox (a client streaming through the port proxy): refused, saying why
        start_ticker(src)
        with ticks_through_port(server, src.sandbox_id) as stream:
            lines = stream.iter_lines()  # (held: a dropped iterator closes the stream)
            assert next(lines) == "tick 1"
            with pytest.raises(SandboxException) as refused:
                src.create_snapshot()
        assert "TCP connection" in str(refused.value) and "filesystem snapshot" in str(refused.value)
    finally:
        src.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)


def test_a_snapshot_with_memory_of_a_sandbox_with_a_volume_mounts_the_same_volume(server: Server) -> None:
    from e2b import Volume

    vol = Volume.create(f"snap-{secrets.token_hex(3)}")
    src = Sandbox.create(template="base", timeout=120, volume_mounts={"/data/vol": vol})
    made: list[Sandbox] = []
    snapshot_id = None
    try:
        # a command with its cwd in the volume, appending its input to a file of it (open all along)
        appender = src.commands.run(
            "cd /data/vol && exec 3>>log && while read -r line; do echo $line >&3; done", background=True, stdin=True
        )
        src.commands.send_stdin(appender.pid, "source\n")
        snapshot_id = src.create_snapshot().snapshot_id
        made = [Sandbox.create(template=snapshot_id, timeout=60)]
        made += [f for f in src.fork(count=1, timeout=60) if isinstance(f, Sandbox)]
        assert len(made) == 2
        for i, child in enumerate(made):
            assert [(m["name"], m["path"]) for m in child.get_info().volume_mounts] == [(vol.name, "/data/vol")]
            child.commands.send_stdin(appender.pid, f"child-{i}\n")  # its own copy of the command, same volume
        deadline = time.monotonic() + 10
        while sorted((seen := vol.read_file("/log", format="text")).split()) != ["child-0", "child-1", "source"]:
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        assert made[0].commands.run("stat -c %U /data/vol/log").stdout == "user\n"  # idmapped as in the source
        other = Volume.create(f"snap-{secrets.token_hex(3)}")
        try:
            with pytest.raises(SandboxException) as refused:  # (its processes had that volume there)
                Sandbox.create(template=snapshot_id, timeout=60, volume_mounts={"/data/vol": other})
            assert "same" in str(refused.value)
        finally:
            Volume.destroy(other.volume_id)
    finally:
        for child in made:
            child.kill()
        src.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)
        Volume.destroy(vol.volume_id)
