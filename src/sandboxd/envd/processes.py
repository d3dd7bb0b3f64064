"""Processes running in a sandbox, as envd sees them: spawn, output fan-out, stdin, signals, PTY.

envd runs host-side: a process in a sandbox is started by the runtime's helper (one small fork+exec),
and its stdio are pipes (or a PTY) held by the server. Output is read with the event loop's readers,
never a thread per process, and fanned out to every connected stream (Start, and any Connect). With
no stream connected, output is read and dropped so the process never blocks on a full pipe. With a
slow stream connected, reading pauses until it catches up, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protobuf import Oneof

from sandboxd.envd.gen.process import process_pb as pb
from sandboxd.runtime import pids
from sandboxd.runtime.base import ExecSpec, Runtime, SandboxHandle

CHUNK = 32 * 1024  # largest data event, as envd
HIGH_WATER = 64  # queued events per subscriber before reading pauses (~2 MiB)
LOW_WATER = 16


class ProcessGone(Exception):
    pass


class ServerShuttingDown(Exception):
    """The server is stopping: streams end, the process itself is left running (with the sandbox)."""


class SandboxKilled(Exception):
    pass


@dataclass
class Subscriber:
    queue: asyncio.Queue[pb.ProcessEvent | Exception | None] = field(default_factory=asyncio.Queue)


def _status_of(returncode: int) -> tuple[int, bool, str]:
    """(exit_code, exited, status) in the form envd reports (Go's ProcessState strings)."""
    if returncode >= 0:
        return returncode, True, f"exit status {returncode}"
    sig = -returncode
    names = {
        signal.SIGKILL: "killed",
        signal.SIGTERM: "terminated",
        signal.SIGINT: "interrupt",
        signal.SIGHUP: "hangup",
        signal.SIGPIPE: "broken pipe",
        signal.SIGSEGV: "segmentation fault",
        signal.SIGABRT: "aborted",
        signal.SIGQUIT: "quit",
    }
    return -1, False, f"signal: {names.get(signal.Signals(sig), f'signal {sig}')}"


class Proc:
    def __init__(self, table: ProcessTable, config: pb.ProcessConfig, tag: str | None, pty: bool) -> None:
        self.table = table
        self.config = config
        self.tag = tag
        self.is_pty = pty
        self.pid = 0  # as seen inside the sandbox
        self.host_pid = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.stdin_fd: int | None = None
        self.master_fd: int | None = None
        self.out_fds: dict[int, str] = {}  # fd -> "stdout" | "stderr" | "pty"
        self.paused: set[int] = set()
        self.subscribers: list[Subscriber] = []
        self.end: pb.ProcessEvent | None = None
        self.done = asyncio.Event()
        self._exited = False
        self._pidfd: int | None = None  # the helper's
        self._child_pidfd: int | None = None  # the command's (it leads its process group)
        self._stdin_lock = asyncio.Lock()
        self._stdin_waiter: asyncio.Future[None] | None = None

    # -- start ---------------------------------------------------------------------------------
    async def spawn(
        self, runtime: Runtime, handle: SandboxHandle, spec: ExecSpec, stdin: bool, size: tuple[int, int] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        report_r, report_w = os.pipe()
        child_fds: list[int] = [report_w]
        try:
            if self.is_pty:
                master, slave = runtime.open_pty(handle)
                if size:
                    _set_winsize(slave, *size)
                child_fds.append(slave)
                stdio = (slave, slave, slave)
                self.master_fd = master
                self.out_fds = {master: "pty"}
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                child_fds += [out_w, err_w]
                if stdin:
                    in_r, in_w = os.pipe()
                    child_fds.append(in_r)
                    self.stdin_fd = in_w
                    os.set_blocking(in_w, False)
                else:
                    in_r = os.open(os.devnull, os.O_RDONLY)
                    child_fds.append(in_r)
                stdio = (in_r, out_w, err_w)
                self.out_fds = {out_r: "stdout", err_r: "stderr"}
            argv = runtime.exec_argv(handle, spec, report_fd=report_w)
            # Popen (vfork + exec of a small helper) returns in well under a millisecond; waiting for the
            # helper is done with a pidfd on the event loop, never by blocking.
            self.popen = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                pass_fds=(report_w,),
                env=spec.env,
                close_fds=True,
            )
        except BaseException:
            for fd in [*child_fds, *self.out_fds, *([self.stdin_fd] if self.stdin_fd else []), report_r]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        try:
            report = await _read_all(loop, report_r)
        finally:
            os.close(report_r)
        for line in report.decode().split("\n"):
            kind, _, value = line.partition(" ")
            if kind == "c" and value.isdigit():
                self.pid = int(value)
            elif kind == "h" and value.isdigit():
                self.host_pid = int(value)
        for fd in self.out_fds:
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._on_readable, fd)
        self._pidfd = os.pidfd_open(self.popen.pid)
        loop.add_reader(self._pidfd, self._on_exit)
        if self.host_pid:
            # Signals go through a pidfd of the command, checked to be the helper's child: never a PID
            # that was recycled after the command ended.
            with contextlib.suppress(pids.ProcessChanged):
                self._child_pidfd = pids.open_checked(self.host_pid, parent=self.popen.pid)
        if not self.pid:
            # The helper failed before running the command (its message is on stderr): report a pid
            # the table cannot confuse with a real one.
            self.pid = self.table.synthetic_pid()

    # -- output --------------------------------------------------------------------------------
    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO on a PTY whose other side is closed
            data = b""
        if not data:
            self._close_reader(fd)
            return
        self._publish_data(fd, data)
        if any(s.queue.qsize() >= HIGH_WATER for s in self.subscribers):
            asyncio.get_running_loop().remove_reader(fd)
            self.paused.add(fd)

    def resume_reading(self) -> None:
        if self.paused and all(s.queue.qsize() <= LOW_WATER for s in self.subscribers):
            loop = asyncio.get_running_loop()
            for fd in self.paused:
                loop.add_reader(fd, self._on_readable, fd)
            self.paused.clear()

    def _close_reader(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        if self.out_fds.get(fd) == "pty":  # also the PTY's input side: release a waiting writer first
            self._wake_stdin_writer()
            loop.remove_writer(fd)
        self.paused.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        kind = self.out_fds.pop(fd, None)
        if kind == "pty":
            self.master_fd = None
        self._maybe_finish()

    def _publish_data(self, fd: int, data: bytes) -> None:
        output = Oneof(self.out_fds[fd], data)  # stdout, stderr or pty
        self._publish(pb.ProcessEvent(event=Oneof("data", pb.ProcessEvent.DataEvent(output=output))))

    def _publish(self, event: pb.ProcessEvent | Exception | None) -> None:
        for sub in self.subscribers:
            sub.queue.put_nowait(event)

    # -- exit ----------------------------------------------------------------------------------
    def _on_exit(self) -> None:
        assert self.popen is not None and self._pidfd is not None
        if self.popen.poll() is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        if self._child_pidfd is not None:
            os.close(self._child_pidfd)
            self._child_pidfd = None
        self._exited = True
        self.close_stdin()
        # Output written just before exit is still in the pipes: drain it. A background grandchild
        # may keep a pipe open forever, so stop waiting for EOF after a short grace period.
        loop.call_later(0.2, self._force_finish)
        for fd in list(self.paused):
            loop.add_reader(fd, self._on_readable, fd)
        self.paused.clear()
        self._maybe_finish()

    def _force_finish(self) -> None:
        for fd in list(self.out_fds):
            # read what is buffered, then give up on the pipe
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except OSError:
                    break
                if not data:
                    break
                self._publish_data(fd, data)
            self._close_reader(fd)

    def _maybe_finish(self) -> None:
        if not self._exited or self.out_fds or self.done.is_set():
            return
        assert self.popen is not None
        code, exited, status = _status_of(self.popen.returncode)
        end = pb.ProcessEvent.EndEvent(exit_code=code, exited=exited, status=status)
        self.end = pb.ProcessEvent(event=Oneof("end", end))
        self._publish(self.end)
        self._publish(None)
        self.done.set()
        self.table.forget(self)

    # -- control -------------------------------------------------------------------------------
    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self.subscribers.append(sub)
        if self.done.is_set():
            sub.queue.put_nowait(self.end)
            sub.queue.put_nowait(None)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(sub)
        self.resume_reading()

    async def events(
        self, sub: Subscriber, keepalive: float, deadline: float | None = None
    ) -> AsyncIterator[pb.ProcessEvent]:
        """Events for one stream until the end event; keepalives after `keepalive` s of silence;
        TimeoutError once the loop time `deadline` has passed."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                wait = keepalive
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise TimeoutError
                try:
                    item = await asyncio.wait_for(sub.queue.get(), timeout=wait)
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise
                    yield pb.ProcessEvent(event=Oneof("keepalive", pb.ProcessEvent.KeepAlive()))
                    continue
                if self.paused:
                    self.resume_reading()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.unsubscribe(sub)

    async def write_stdin(self, data: bytes) -> None:
        """Write all of `data` to the process's stdin (or PTY). When the pipe is full (the process is
        not reading), wait for it on the event loop: never block the server for everyone else."""
        loop = asyncio.get_running_loop()
        async with self._stdin_lock:  # concurrent writers keep their order
            view = memoryview(data)
            while view:
                fd = self.master_fd if self.is_pty else self.stdin_fd
                if fd is None:
                    raise ProcessGone("stdin is not open for this process (start it with stdin enabled)")
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    waiter = self._stdin_waiter = loop.create_future()
                    loop.add_writer(fd, lambda w=waiter: w.done() or w.set_result(None))
                    try:
                        await waiter
                    finally:
                        with contextlib.suppress(Exception):
                            loop.remove_writer(fd)
                        self._stdin_waiter = None
                except (BrokenPipeError, OSError):
                    raise ProcessGone("the process closed its stdin") from None

    def _wake_stdin_writer(self) -> None:
        waiter = self._stdin_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ProcessGone("the process closed its stdin"))

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            self._wake_stdin_writer()
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self.stdin_fd)
            with contextlib.suppress(OSError):
                os.close(self.stdin_fd)
            self.stdin_fd = None

    def signal(self, sig: int) -> None:
        if self.done.is_set() or self._child_pidfd is None:
            raise ProcessGone(f"process {self.pid} is not running")
        # The command leads its own process group: signal the group so its children go too.
        with contextlib.suppress(ProcessLookupError):
            pids.signal_group(self._child_pidfd, sig)

    def resize(self, cols: int, rows: int) -> None:
        if self.master_fd is None:
            raise ProcessGone(f"process {self.pid} has no PTY")
        _set_winsize(self.master_fd, rows, cols)

    def sandbox_killed(self) -> None:
        if not self.done.is_set():
            self._publish(SandboxKilled("the sandbox was killed while the process was running"))


class ProcessTable:
    """The processes of one sandbox, by PID and by tag."""

    def __init__(self) -> None:
        self.by_pid: dict[int, Proc] = {}
        self._synthetic = 1 << 30

    def add(self, proc: Proc) -> None:
        self.by_pid[proc.pid] = proc

    def forget(self, proc: Proc) -> None:
        if self.by_pid.get(proc.pid) is proc:
            del self.by_pid[proc.pid]

    def synthetic_pid(self) -> int:
        self._synthetic += 1
        return self._synthetic

    def find(self, pid: int | None = None, tag: str | None = None) -> Proc | None:
        if pid is not None:
            return self.by_pid.get(pid)
        for proc in self.by_pid.values():
            if proc.tag == tag:
                return proc
        return None

    def kill_all(self) -> None:
        for proc in list(self.by_pid.values()):
            proc.sandbox_killed()

    def end_streams(self, reason: str) -> None:
        """End every open stream with ServerShuttingDown (the processes keep running)."""
        for proc in list(self.by_pid.values()):
            if not proc.done.is_set():
                proc._publish(ServerShuttingDown(reason))


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def _read_all(loop: asyncio.AbstractEventLoop, fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            chunks.append(data)

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)
