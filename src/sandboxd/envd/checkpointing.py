"""The processes envd follows, through a checkpoint of their sandbox (core/pausing.py, pause to disk).

A kept command (envd/kept.py) is the sandbox init's child, so CRIU writes it with the rest of the sandbox;
its keeper stays on the host, holding the other ends of the command's pipes. Around the checkpoint the
keeper is told (on its session, sbxhelper.c keep_session):

- `s` before the dump: the command's end is no end until told otherwise; it answers with the inodes of the
  pipes the command holds of its (CRIU's names for them: `pipe:[INODE]`);
- `u` if the dump failed (the command ran on);
- `n` before the restore: it makes new pipes and sends the command's ends, which the restore gives to the
  restored command in place of the old ones (CRIU's `--inherit-fd`): output, input and the keeper's log
  go on as if nothing happened, and the server's streams of the process with them. A terminal's keeper
  (asked `t` which terminal: CRIU's `tty[RDEV:DEV]`, external to the dump) gets the master of a new terminal
  with its `n`, and the restore gives the slave to the command and its children (runtime/terminals.py): what
  was typed and not yet read when the dump came is lost with the old terminal;
- `g` after it, with a pidfd of the restored command (or without one: it had ended before the dump, and
  init, restored, tells how);
- `e` if the sandbox ended while checkpointed: the command ended killed.

What cannot be carried over refuses the checkpoint (the sandbox then stays paused in memory): a command
started past the `kept_processes` cap (its pipes, or its terminal, are the server's own, with no keeper to
swap them).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sandboxd.core.errors import Conflict
from sandboxd.envd import kept
from sandboxd.envd.gen.process import process_pb as pb
from sandboxd.envd.process_service import table_of
from sandboxd.runtime import pids
from sandboxd.runtime import terminals as terminals_
from sandboxd.runtime.base import ExecSpec, Runtime

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox
    from sandboxd.envd.processes import Proc
    from sandboxd.runtime.terminals import Terminals

log = logging.getLogger("sandboxd.envd")

ANSWER_WAIT = 5.0  # s: a keeper answers at once (it polls its session); past this it is taken as gone
MAX_CARRIED = 1024  # kept commands carried by a snapshot (the kept-processes cap bounds them well below)


def _stdio_pipes(command: int, keeper: int) -> list[int]:
    """The inodes of the command's stdout, stderr and stdin (host PID `command`) that are pipes to its keeper
    (host PID `keeper`); 0 where none (redirected elsewhere, or no stdin)."""
    theirs = pids.pipes_of(keeper, limit=64)
    return [ino if (ino := pids.pipe_of(command, n)) in theirs and ino is not None else 0 for n in (1, 2, 0)]


def _close_pending(inherit: list[tuple[int, str]], pending: list[Any]) -> None:
    for fd, _ in inherit:
        with contextlib.suppress(OSError):
            os.close(fd)
    for _, ours in pending:
        for fd in ours:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


_INODES = struct.Struct("=QQQ")


@dataclass
class _Held:
    proc: Proc
    inodes: tuple[int, int, int]
    tty: str | None = None  # a terminal's: CRIU's name of its slave (the command's)


def _answer(sock: socket.socket, tag: bytes, fds: int = 0) -> tuple[bytes, list[int]]:
    """The keeper's next answer starting with `tag` (an attach's "k" may come first), with its descriptors."""
    sock.settimeout(ANSWER_WAIT)
    try:
        while True:
            msg, anc, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(fds * 4) if fds else 0)
            got: list[int] = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got += array.array("i", data[: len(data) - len(data) % 4]).tolist()
            if msg[:1] == tag:
                return msg, got
            for fd in got:
                os.close(fd)
            if not msg:
                raise OSError("the keeper is gone")
    finally:
        sock.settimeout(None)


_TTY = struct.Struct("=QQ")


def _which_tty(proc: Proc) -> str:
    """CRIU's name of the terminal a command's keeper holds the master of (its slave: the command's)."""
    assert proc.session is not None
    proc.session.send(b"t")
    msg, _ = _answer(proc.session, b"T")
    if len(msg) != 1 + _TTY.size:
        raise OSError("its answer is malformed")
    rdev, dev = _TTY.unpack_from(msg, 1)
    if not rdev:
        raise OSError("its keeper holds no terminal")
    return terminals_.key(rdev, dev)


def _suspend(proc: Proc) -> _Held:
    assert proc.session is not None
    proc.session.send(b"s")
    msg, _ = _answer(proc.session, b"S")
    if len(msg) != 1 + _INODES.size:
        raise OSError("its answer is malformed")
    return _Held(proc, _INODES.unpack_from(msg, 1), _which_tty(proc) if proc.is_pty else None)


def _new_terminal(held: _Held, terminals: Terminals) -> tuple[int, str]:
    """A new terminal for a restored command: its keeper takes the master; (the slave, the old one's name)."""
    assert held.proc.session is not None and held.tty is not None
    master, slave = terminals.open_pair()
    try:
        held.proc.session.sendmsg([b"n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master]))])
        _answer(held.proc.session, b"N")
    except BaseException:
        os.close(slave)
        raise
    finally:
        os.close(master)
    return slave, held.tty


def _new_pipes(held: _Held) -> list[tuple[int, str]]:
    assert held.proc.session is not None
    held.proc.session.send(b"n")
    wanted = [ino for ino in held.inodes if ino]
    _, fds = _answer(held.proc.session, b"N", len(wanted))
    if len(fds) != len(wanted):
        for fd in fds:
            os.close(fd)
        raise OSError(f"process {held.proc.pid}: its keeper sent {len(fds)} pipes of {len(wanted)}")
    return [(fd, f"pipe:[{ino}]") for fd, ino in zip(fds, wanted, strict=True)]


class EnvdAtCheckpoint:
    """core/pausing.py's CheckpointPart for envd: its processes (above) and its file brokers (which are not
    init's children: they end with the dump, and are made again on the next file request)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._held: dict[str, list[_Held]] = {}

    async def before_dump(self, sandbox: Sandbox) -> tuple[list[str], dict[str, Any]]:
        table = table_of(sandbox)  # (loads the kept processes of a previous server run, if not yet)
        running = [p for p in table.by_pid.values() if not p.done.is_set()]
        for proc in running:
            if proc.keep_dir is None or proc.session is None:
                raise Conflict(
                    f"process {proc.pid} was started past the kept-processes limit, without a keeper to carry "
                    "its output over a pause to disk: the sandbox stays paused in memory"
                )
        held = self._held[sandbox.id] = await self._suspend_all(running)
        brokers = sandbox.ext.get("brokers")
        if brokers is not None:
            brokers.close()
        # (what a restore without these keepers takes, after a host reboot: as a snapshot's, see below)
        commands = [
            {
                "pid": h.proc.pid,
                "config": h.proc.config.to_json(),
                "tag": h.proc.tag,
                "stdin": h.proc.stdin_fd is not None,
                "pipes": list(h.inodes),
                "tty": h.tty,
            }
            for h in held
        ]
        return [h.tty for h in held if h.tty], {"commands": commands}

    async def dump_failed(self, sandbox: Sandbox) -> None:
        self._tell(self._held.pop(sandbox.id, []), b"u")

    async def before_snapshot(self, sandbox: Sandbox) -> tuple[dict[str, Any], list[str]]:
        """The kept commands that run, to be kept again in each sandbox made from the snapshot (their output,
        input and process entry: `commands.list()`, `connect`, `send_stdin`, `kill`), and CRIU's names of the
        pipes between them and their keepers, which the snapshot carries (new ones in each new sandbox)."""
        commands: list[dict[str, Any]] = []
        carried: list[str] = []
        for proc in table_of(sandbox).by_pid.values():
            if proc.done.is_set():
                continue
            if proc.keep_dir is None or proc.session is None or not proc.host_pid or proc.popen is None:
                raise Conflict(
                    f"process {proc.pid} was started past the kept-processes limit, without a keeper: a snapshot "
                    "with memory cannot carry its output into new sandboxes; end it, or take a filesystem snapshot"
                )
            tty = None
            if proc.is_pty:  # (its stdio is the terminal, no pipe of its keeper's)
                try:
                    tty = await asyncio.to_thread(_which_tty, proc)
                except OSError as e:
                    raise Conflict(f"process {proc.pid}: its keeper did not answer ({e}): try again") from None
                pipes, carried = [0, 0, 0], [*carried, tty]
            else:
                pipes = await asyncio.to_thread(_stdio_pipes, proc.host_pid, proc.popen.pid)
                carried += [f"pipe:[{ino}]" for ino in pipes if ino]
            commands.append(
                {
                    "pid": proc.pid,
                    "config": proc.config.to_json(),
                    "tag": proc.tag,
                    "stdin": proc.stdin_fd is not None,
                    "pipes": pipes,
                    "tty": tty,
                }
            )
        return {"commands": commands}, carried

    def before_snapshot_restore(self, state: dict[str, Any], terminals: Terminals) -> tuple[list[tuple[int, str]], Any]:
        """New pipes for the carried commands of a snapshot's new sandbox (or a new terminal, from `terminals`):
        (their ends, for CRIU to put in place of the old ones), and ours, for their new keepers
        (`snapshot_restored`)."""
        inherit: list[tuple[int, str]] = []
        pending: list[tuple[dict[str, Any], list[int]]] = []
        try:
            for command in state.get("commands", [])[:MAX_CARRIED]:
                ours = [-1, -1, -1]
                pending.append((command, ours))  # (before its pipes are made: a failure closes what was)
                if command.get("tty"):  # the keeper's end: the master
                    ours[0], slave = terminals.open_pair()
                    inherit.append((slave, str(command["tty"])))
                    continue
                for i, ino in enumerate(command["pipes"][:3]):
                    if not ino:
                        continue
                    r, w = os.pipe2(os.O_CLOEXEC)
                    theirs, ours[i] = (w, r) if i < 2 else (r, w)  # (stdout, stderr: they write; stdin: we)
                    inherit.append((theirs, f"pipe:[{int(ino)}]"))
        except BaseException:
            _close_pending(inherit, pending)
            raise
        return inherit, pending

    def drop_snapshot_restore(self, pending: Any) -> None:
        _close_pending([], pending)

    async def snapshot_restored(self, sandbox: Sandbox, pending: Any, host_pids: dict[int, int]) -> None:
        """Each carried command kept again, by a keeper of the new sandbox that starts nothing (`--adopt`)."""
        from sandboxd.envd.processes import Proc  # (processes imports this module's neighbours)

        table = table_of(sandbox)
        for command, ours in pending:
            try:
                host = host_pids.get(int(command["pid"]))
                start = pids.start_time(host) if host else None
                if host is None or start is None:
                    raise OSError("it is not running in the new sandbox")
                config = pb.ProcessConfig.from_json(command["config"])
                pty = bool(command.get("tty"))
                proc = Proc(table, config, command.get("tag"), pty=pty)
                spec = ExecSpec(argv=[config.cmd, *config.args], env={}, cwd=config.cwd or "/", uid=0, gid=0, pty=pty)
                adopt = ((int(command["pid"]), host, start), (ours[0], ours[1], ours[2]))
                ours = [-1, -1, -1]  # (the keeper's now: spawn closes them)
                await proc.spawn(
                    self.runtime, sandbox.handle, spec, stdin=bool(command["stdin"]), size=None, adopt=adopt
                )
                old = table.by_pid.get(proc.pid)
                if old is not None and old is not proc:  # (a restore after a host reboot: the record of its
                    # keeper, gone, or one left behind: told the command is gone, which it is to it)
                    if old.session is not None:
                        with contextlib.suppress(OSError):
                            old.session.send(b"e")
                    if old.done.is_set():
                        kept.forget(old.keep_dir)
                table.add(proc)
            except Exception as e:
                log.warning("sandbox %s: process %s of its snapshot is not kept: %s", sandbox.id, command.get("pid"), e)
            finally:
                for fd in ours:
                    if fd >= 0:
                        os.close(fd)

    async def before_restore(self, sandbox: Sandbox, terminals: Terminals) -> list[tuple[int, str]]:
        """(fd, CRIU's name of the file it replaces) for every pipe between a kept command and its keeper, and
        every terminal a keeper holds the master of (a new one's slave, from `terminals`)."""
        if sandbox.id not in self._held:  # written to disk by a previous server run: its keepers are asked again
            table = table_of(sandbox)  # (takes the kept processes over: envd/kept.py)
            procs = [p for p in table.by_pid.values() if not p.done.is_set() and p.session is not None]
            self._held[sandbox.id] = await self._suspend_all(procs)
        inherit: list[tuple[int, str]] = []
        try:
            for held in self._held.get(sandbox.id, []):
                if held.tty:
                    inherit.append(await asyncio.to_thread(_new_terminal, held, terminals))
                else:
                    inherit += await asyncio.to_thread(_new_pipes, held)
        except BaseException:
            for fd, _ in inherit:
                os.close(fd)
            raise
        return inherit

    async def restored(self, sandbox: Sandbox, host_pids: dict[int, int]) -> None:
        """Each kept command again, by its PID in the sandbox (`host_pids`: the sandbox's PID -> the host's)."""
        for held in self._held.pop(sandbox.id, []):
            proc = held.proc
            host = host_pids.get(proc.pid)
            pidfd = None
            if host is not None:  # (the number was read from the cgroup a moment ago: it may name another now)
                with contextlib.suppress(pids.ProcessChanged):
                    pidfd = pids.open_checked(host, inside=proc.pid)
            if proc._child_pidfd is not None:
                os.close(proc._child_pidfd)
                proc._child_pidfd = None
            try:
                assert proc.session is not None
                if pidfd is None or host is None:  # it had ended before the dump: its keeper asks init how
                    proc.session.send(b"g")
                    continue
                proc.session.sendmsg([b"g"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
                proc.host_pid, proc.host_start = host, pids.start_time(host) or 0
                proc._child_pidfd = os.dup(pidfd)
            except OSError as e:
                log.warning("process %d: its keeper did not take the restored process: %s", proc.pid, e)
            finally:
                if pidfd is not None:
                    os.close(pidfd)

    async def ended(self, sandbox: Sandbox) -> None:
        """The sandbox's checkpoint is let go of (killed, or booted from its files): its kept commands ended
        killed."""
        self._tell(self._held.pop(sandbox.id, []), b"e")

    async def _suspend_all(self, procs: list[Proc]) -> list[_Held]:
        """Each keeper suspended, with its pipes' inodes; if one does not answer, the others go on (Conflict)."""
        held: list[_Held] = []
        for proc in procs:
            try:
                held.append(await asyncio.to_thread(_suspend, proc))
            except OSError as e:
                self._tell(held, b"u")
                raise Conflict(
                    f"process {proc.pid}: its keeper did not answer ({e}): the sandbox stays paused in memory"
                ) from None
        return held

    @staticmethod
    def _tell(held: list[_Held], what: bytes) -> None:
        for h in held:
            with contextlib.suppress(OSError, AttributeError):
                h.proc.session.send(what)  # type: ignore[union-attr]
