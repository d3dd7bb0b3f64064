"""Processes that outlive the server process (beyond E2B: its #1074).

Every command started through envd (a terminal's too) runs under a *keeper*: the `sbxhelper exec` that
started it (the command itself is the sandbox init's child, so that a checkpoint holds it; init tells the
keeper how it ended) holds its pipes, relays them to the server and logs its output in the sandbox's state
dir, `<state>/procs/<id>/` (sbxhelper.c, keep_relay): `out.0`/`out.1` (the newest half to all of
`--max-output-buffer-kib` of its output, records of stdout, stderr or a terminal with their offsets; made
only once it writes), `status` (how it ended, if no server was there to hear it), `ctl` (a socket a new
server attaches through) and `meta.json` (written here: its PID, its keeper, its config and tag). At most
`kept_processes` (core/tenant_limits.py) of a sandbox's processes are kept at once.

When the server goes away (a crash, a restart, an upgrade), the keepers keep the commands running, their
output logged and their stdin open. The next server, the first time it is asked about a sandbox's
processes, finds them here: a running one is attached again (new pipes sent to its keeper, which first
writes the logged output into them), so it is listed, `connect(pid)` follows it with the output it wrote
meanwhile, and stdin, signals and its end work as before; one that ended meanwhile can still be connected
to once: its logged output, then its end.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.envd.gen.process import process_pb as pb
from sandboxd.runtime import pids

if TYPE_CHECKING:
    from sandboxd.envd.processes import Proc, ProcessTable

log = logging.getLogger("sandboxd.envd")

PROCS = "procs"  # in the sandbox's state dir
META = "meta.json"
_REC = struct.Struct("=IIQ")  # kind (1 stdout, 2 stderr, 3 pty), length, offset (sbxhelper.c, keep_rec)
MAX_REC = 65536


def room(table: ProcessTable) -> bool:
    """May one more process of this sandbox be kept? Each keeps up to `output_buffer_bytes` of output on
    the host's disk: `kept_processes` of them bound what a sandbox can make the host hold. Past that, a
    command runs as before (it ends with the server)."""
    cap = table.limits.kept_processes
    return cap > 0 and sum(1 for p in table.by_pid.values() if p.keep_dir is not None and not p.done.is_set()) < cap


def new_dir(state_dir: Path, table: ProcessTable) -> Path:
    procs = state_dir / PROCS
    if not table.procs_made:
        procs.mkdir(mode=0o700, exist_ok=True)
        table.procs_made = True
    d = procs / os.urandom(8).hex()
    d.mkdir(mode=0o700)
    return d


def write_meta(d: Path, proc: Proc, keeper_pid: int, stdin: bool) -> None:
    meta = {
        "pid": proc.pid,
        "host_pid": proc.host_pid,
        "host_start": proc.host_start,
        "keeper_pid": keeper_pid,
        "keeper_start": pids.start_time(keeper_pid),
        "tag": proc.tag,
        "config": proc.config.to_json(),
        "stdin": stdin,
        "pty": proc.is_pty,
    }
    # (not atomic: a crash halfway through leaves a record readopt skips, and the command unlisted)
    fd = os.open(d / META, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(meta).encode())
    finally:
        os.close(fd)


def returncode_of(status: str) -> int | None:
    """Popen's returncode from a keeper's status file ("exit N" / "signal N"), None if it has none."""
    kind, _, value = status.strip().partition(" ")
    if not value.lstrip("-").isdigit():
        return None
    return int(value) if kind == "exit" else -int(value) if kind == "signal" else None


class KeeperWatch:
    """What Proc needs of a Popen, for a keeper that is not our child (it was the previous server's)."""

    def __init__(self, pid: int, status: Path) -> None:
        self.pid = pid
        self.status = status
        self.returncode: int | None = None
        self.pidfd: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.pidfd is not None and pids.is_alive(self.pidfd):
            return None
        try:
            code = returncode_of(self.status.read_text())
        except OSError:
            code = None
        # no status: the keeper died with its command (killed with the sandbox's cgroup, or a reboot)
        self.returncode = code if code is not None else -signal.SIGKILL
        return self.returncode


def read_log(d: Path) -> list[tuple[str, bytes]]:
    """The logged output, oldest first: (stdout|stderr, data) records (the older file first)."""
    files = []
    for name in ("out.0", "out.1"):
        with contextlib.suppress(OSError):
            data = (d / name).read_bytes()
            first = _REC.unpack_from(data, 0)[2] if len(data) >= _REC.size else None
            files.append((first, data))
    files.sort(key=lambda f: -1 if f[0] is None else f[0])
    out: list[tuple[str, bytes]] = []
    for _, data in files:
        pos = 0
        while pos + _REC.size <= len(data):
            kind, length, _ = _REC.unpack_from(data, pos)
            pos += _REC.size
            if length > MAX_REC or pos + length > len(data):
                break
            out.append(({1: "stdout", 2: "stderr"}.get(kind, "pty"), data[pos : pos + length]))
            pos += length
    return out


def readopt(table: ProcessTable, state_dir: Path) -> None:
    """Register the kept processes of a previous server run in `table` (the sandbox's, just made)."""
    from sandboxd.envd.processes import Proc

    procs = state_dir / PROCS
    if not procs.is_dir():
        return
    for d in sorted(procs.iterdir()):
        try:
            meta = json.loads((d / META).read_text())
            config = pb.ProcessConfig.from_json(meta["config"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not written whole (the server died right after the spawn): left to the sandbox's end
        proc = Proc(table, config, meta.get("tag"), pty=bool(meta.get("pty")))
        proc.pid, proc.host_pid, proc.keep_dir = int(meta["pid"]), int(meta["host_pid"]), d
        proc.host_start = int(meta.get("host_start") or 0)
        watch = KeeperWatch(int(meta["keeper_pid"]), d / "status")
        try:
            watch.pidfd = pids.open_checked(watch.pid, start=meta.get("keeper_start"))
        except pids.ProcessChanged as e:
            log.warning("process %s: its keeper is gone: %s", meta.get("pid"), e)
            watch.pidfd = None
        if watch.pidfd is None or not _attach(proc, watch, d, bool(meta.get("stdin")) or proc.is_pty):
            _ended_meanwhile(proc, watch, d)
        table.add(proc)
        log.info(
            "process %d (%s) of a previous server run taken over",
            proc.pid,
            "running" if not proc.done.is_set() else "ended",
        )


def _attach(proc: Proc, watch: KeeperWatch, d: Path, stdin: bool) -> bool:
    """Give the keeper new pipes (it writes its logged output into them first) and follow them."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), -1)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dirfd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/ctl")
        sock.sendmsg(
            [struct.pack("=Q", 0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [out_w, err_w, in_r]))]
        )
    except OSError as e:
        log.warning("process %d: attaching to its keeper failed: %s", proc.pid, e)
        sock.close()
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
            if fd >= 0:
                os.close(fd)
        return False
    finally:
        os.close(dirfd)
    for fd in (out_w, err_w, in_r):
        os.close(fd)
    proc.session = sock  # open while we follow it: the keeper tells a closed stdin from a gone server by it
    if proc.is_pty:  # one stream of a terminal's output; nothing comes on the other pipe
        os.close(err_r)
        proc.out_fds = {out_r: "pty"}
    else:
        proc.out_fds = {out_r: "stdout", err_r: "stderr"}
    for fd in proc.out_fds:
        os.set_blocking(fd, False)
    if in_w >= 0:
        os.set_blocking(in_w, False)
        proc.stdin_fd = in_w
    proc.popen = watch
    loop = asyncio.get_running_loop()
    assert watch.pidfd is not None
    proc._pidfd = watch.pidfd
    loop.add_reader(watch.pidfd, proc._on_exit)
    with contextlib.suppress(pids.ProcessChanged):  # (a record of an older sandboxd has no start time)
        start = proc.host_start or None
        proc._child_pidfd = pids.open_checked(proc.host_pid, start=start, parent=None if start else watch.pid)
    proc.paused = set(proc.out_fds)
    proc._pace()
    return True


def _ended_meanwhile(proc: Proc, watch: KeeperWatch, d: Path) -> None:
    """A process that ended while no server ran: its logged output and its end, for one Connect."""
    code = watch.poll()
    if watch.pidfd is not None:
        os.close(watch.pidfd)
        watch.pidfd = None
    for kind, data in read_log(d):
        proc._keep(kind, data)
    proc._exited = True
    proc.popen = watch
    proc.ended_meanwhile = True
    proc._finish_with(code if code is not None else -signal.SIGKILL)


FILES = ("ctl", META, "out.0", "out.1", "status")  # all a record dir may hold


def forget(d: Path | None) -> None:
    """Remove a record (its few known files, then the dir: cheaper than a tree walk on every command's end)."""
    if d is None:
        return
    for name in FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / name)
    try:
        os.rmdir(d)
    except FileNotFoundError:
        pass
    except OSError:  # something else in it (not ours): the sandbox's end removes it
        shutil.rmtree(d, ignore_errors=True)
