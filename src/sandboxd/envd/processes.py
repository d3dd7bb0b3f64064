"""Processes running in a sandbox, as envd sees them: spawn, output fan-out, stdin, signals, PTY.

envd runs host-side: a process in a sandbox is started by the runtime's helper (one small fork+exec),
and its stdio are pipes (or a PTY) held by the server. Output is read with the event loop's readers,
never a thread per process, and fanned out to every connected stream (Start, and any Connect).

Output is never read faster than it can be kept (the work is charged to the sandbox, not the server):

- With streams attached, the slowest one sets the pace: when a stream has `stream_queue_events` events
  queued, the server stops reading the process's pipes until it has caught up. A stream that stays
  full for `stalled_stream_seconds` while other streams of the process wait for it is dropped with
  `resource_exhausted`.
- With no stream attached, output is kept in a buffer (`output_buffer_bytes`) for the next `Connect`,
  which receives it first and then live output. When the buffer is full the server stops reading:
  the process blocks on its full pipe, as it would in a shell, until a client connects.
- When the process exits, what is still in its pipes is read (at most one pipe's worth more per pipe
  if a child keeps writing) and the end event follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import termios
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from protobuf import Oneof

from sandboxd.core.tenant_limits import TenantLimits
from sandboxd.envd import kept
from sandboxd.envd.gen.process import process_pb as pb
from sandboxd.runtime import pids
from sandboxd.runtime.base import ExecSpec, Keep, Runtime, SandboxHandle

log = logging.getLogger("sandboxd.envd")

CHUNK = 32 * 1024  # largest data event, as envd
FINAL_READS = 32  # chunks read per pipe after the process exited (a child may keep writing): 1 MiB
# What one kept run of output costs beyond its bytes (objects, event): counted against the buffer, so
# that a process alternating 1-byte writes to stdout and stderr cannot make a million tiny runs.
RUN_COST = 256


def _wake(waiter: asyncio.Future[None]) -> None:
    """Loop reader/writer callback: the fd is ready."""
    if not waiter.done():
        waiter.set_result(None)


class ProcessGone(Exception):
    pass


class ServerShuttingDown(Exception):
    """The server is stopping: streams end, the process itself is left running (with the sandbox)."""


class SandboxKilled(Exception):
    pass


class ClientGone(Exception):
    """The client of a stream disconnected: the stream ends quietly."""


class StreamDropped(Exception):
    """A stream fell so far behind that it held back the process's other streams."""


@dataclass
class Subscriber:
    queue: asyncio.Queue[pb.ProcessEvent | Exception | None] = field(default_factory=asyncio.Queue)
    dropped: StreamDropped | None = None
    taken: int = 0  # events taken from the queue so far: progress, for the stall check
    mark: int = 0  # `taken` when the stall check was armed


def _oom_kills(runtime: Runtime, handle: SandboxHandle) -> int | None:
    """How many processes the OOM killer has killed in the sandbox so far (None if unknown)."""
    try:
        return runtime.oom_kills(handle)
    except OSError:
        return None


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
        # told (exit code, status, error) when it ends: the sandbox's log (core/sandbox_logs.py)
        self.on_end: Callable[[int, str, str | None], None] | None = None
        self.table = table
        self.config = config
        self.tag = tag
        self.is_pty = pty
        self.pid = 0  # as seen inside the sandbox
        self.host_pid = 0
        self.host_start = 0  # its start time (clock ticks since boot): with host_pid, it names the process
        self.popen: subprocess.Popen[bytes] | kept.KeeperWatch | None = None
        self.stdin_fd: int | None = None
        self.master_fd: int | None = None
        self.out_fds: dict[int, str] = {}  # fd -> "stdout" | "stderr" | "pty"
        self.limits: TenantLimits = table.limits
        self.paused: set[int] = set()  # output fds whose reader is removed: back-pressure
        self.subscribers: list[Subscriber] = []
        # Output produced while no stream is attached, for the next Connect: (kind, data) per run of
        # one fd's output (merged up to CHUNK); its cost (bytes + RUN_COST per run) stays about
        # within limits.output_buffer_bytes.
        self.backlog: deque[tuple[str, bytearray]] = deque()
        self.backlog_cost = 0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None  # kill_at
        self.end: pb.ProcessEvent | None = None
        self.done = asyncio.Event()
        self._exited = False
        self._pidfd: int | None = None  # the helper's
        self._child_pidfd: int | None = None  # the command's (it leads its process group)
        self._oom_before: int | None = None  # the sandbox's OOM kill count when the command started
        self._oom_probe: tuple[Runtime, SandboxHandle] | None = None
        self._stdin_lock = asyncio.Lock()
        self._stdin_waiter: asyncio.Future[None] | None = None
        # kept processes (envd/kept.py): its dir in the sandbox's state dir; the socket to a previous run's
        # keeper; whether it ended while no server ran (its output and end kept for one Connect)
        self.keep_dir: Path | None = None
        self.session: socket.socket | None = None
        self.ended_meanwhile = False

    # -- start ---------------------------------------------------------------------------------
    async def spawn(
        self,
        runtime: Runtime,
        handle: SandboxHandle,
        spec: ExecSpec,
        stdin: bool,
        size: tuple[int, int] | None,
        adopt: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
    ) -> None:
        """Start the command under its keeper (or the helper alone, past the kept-processes cap). `adopt`: keep a
        command that runs already instead ((its PIDs and start time, the keeper's ends of its pipes): Keep's),
        which takes one of the cap's places (and is refused past it: its pipes need a keeper)."""
        loop = asyncio.get_running_loop()
        report_r, report_w = os.pipe()
        child_fds: list[int] = [report_w, *(fd for fd in adopt[1] if fd >= 0)] if adopt else [report_w]
        keeping = runtime.keeps_processes and kept.room(self.table)
        if adopt is not None and not keeping:
            for fd in child_fds:
                os.close(fd)
            os.close(report_r)
            raise OSError("no room for one more kept process in the sandbox (its kept-processes limit)")
        pty: tuple[int, int] | None = None
        try:
            if self.is_pty:
                if adopt is None:  # (an adopted one's keeper gets the master of its restored terminal)
                    master, slave = runtime.open_pty(handle)
                    child_fds.append(slave)
                    if size:
                        _set_winsize(slave, *size)
                if keeping:  # its keeper holds the terminal (envd/kept.py): its output and input go by pipes
                    if adopt is None:
                        child_fds.append(master)
                        pty = (master, slave)
                    out_r, out_w = os.pipe()
                    in_r, in_w = os.pipe()
                    child_fds += [out_w, in_r]
                    stdio = (in_r, out_w, out_w)
                    self.stdin_fd = in_w
                    os.set_blocking(in_w, False)
                    self.out_fds = {out_r: "pty"}
                else:
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
            # vfork + exec of a small helper: well under a millisecond; waiting for the helper is done with
            # a pidfd on the event loop, never by blocking.
            self._oom_before = _oom_kills(runtime, handle)
            self._oom_probe = (runtime, handle)
            keep = None
            if keeping:
                self.keep_dir = kept.new_dir(handle.state_dir, self.table)
                self.session, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                child_fds.append(theirs.detach())
                keep = Keep(self.keep_dir, child_fds[-1], self.limits.output_buffer_bytes, pty)
                if adopt is not None:
                    keep = replace(keep, adopt=adopt[0], adopt_fds=adopt[1])
            self.popen = runtime.spawn_exec(handle, spec, stdio, report_fd=report_w, keep=keep)
        except BaseException:
            for fd in [*child_fds, *self.out_fds, *([self.stdin_fd] if self.stdin_fd else []), report_r]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            # closed: nothing may close these numbers again (they may be another thread's descriptors by then)
            self.out_fds, self.stdin_fd, self.master_fd = {}, None, None
            kept.forget(self.keep_dir)
            if self.session is not None:
                self.session.close()
                self.session = None
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
            elif kind == "h" and value.replace(" ", "").isdigit() and value.count(" ") == 1:
                host, start = value.split()
                self.host_pid, self.host_start = int(host), int(start)
        for fd in self.out_fds:
            os.set_blocking(fd, False)
        self.paused = set(self.out_fds)
        self._pace()  # start reading (the Start stream is attached, with nothing queued yet)
        self._pidfd = os.pidfd_open(self.popen.pid)
        loop.add_reader(self._pidfd, self._on_exit)
        if self.host_pid:
            # Signals go through a pidfd of the command, checked to be the process the helper started (its
            # start time): never a PID that was recycled after the command ended.
            with contextlib.suppress(pids.ProcessChanged):
                self._child_pidfd = pids.open_checked(self.host_pid, start=self.host_start)
        if not self.pid:
            # The helper failed before running the command (its message is on stderr): report a pid
            # the table cannot confuse with a real one.
            self.pid = self.table.synthetic_pid()
        elif self.keep_dir is not None:  # after the start event is out: off the command's round trip
            loop.call_soon(self._write_meta, self.popen.pid, stdin)

    def _write_meta(self, keeper_pid: int, stdin: bool) -> None:
        if self.keep_dir is None or self.done.is_set():
            return
        try:
            kept.write_meta(self.keep_dir, self, keeper_pid, stdin)
        except FileNotFoundError:  # it ended already and its keeper removed its record
            pass
        except OSError as e:  # the command runs; only a server restart would lose it
            log.warning("process %d: keeping its record failed: %s", self.pid, e)

    # -- output --------------------------------------------------------------------------------
    def _on_readable(self, fd: int) -> None:
        if fd not in self.out_fds:  # closed already (a callback queued before its reader was removed)
            return
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
        self._pace()

    def _can_read(self, resuming: bool) -> bool:
        """May more output be read now? Attached: while every stream's queue has room (resuming: once
        every queue is down to a quarter). Detached: while the buffer for the next Connect has room."""
        if self.subscribers:
            limit = self.limits.stream_queue_events
            if resuming:
                limit = max(1, limit // 4)
            return all(s.queue.qsize() < limit for s in self.subscribers)
        return self.backlog_cost < self.limits.output_buffer_bytes

    def _pace(self) -> None:
        """Add or remove the pipes' event-loop readers so that output is read only as fast as it is kept."""
        if not self.out_fds:
            return
        loop = asyncio.get_running_loop()
        if self.paused:
            if not self._can_read(resuming=True):
                self._arm_stall_check()
                return
            for fd in self.paused:
                loop.add_reader(fd, self._on_readable, fd)
            self.paused.clear()
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
        elif not self._can_read(resuming=False):
            for fd in self.out_fds:
                loop.remove_reader(fd)
            self.paused.update(self.out_fds)
            self._arm_stall_check()

    def _arm_stall_check(self) -> None:
        if self._stall_timer is not None or len(self.subscribers) < 2:
            return
        for sub in self.subscribers:
            sub.mark = sub.taken
        loop = asyncio.get_running_loop()
        self._stall_timer = loop.call_later(self.limits.stalled_stream_seconds, self._drop_stalled)

    def _drop_stalled(self) -> None:
        """Reading has been paused for `stalled_stream_seconds`: drop the streams that took nothing
        meanwhile and keep reading paused (too many events queued to resume), if others wait for them."""
        self._stall_timer = None
        if not self.paused or self.done.is_set():
            return
        limit = self.limits.stream_queue_events
        holding = max(1, limit // 4)  # reading resumes once every queue is below this
        stalled = [s for s in self.subscribers if s.queue.qsize() >= holding and s.taken == s.mark]
        if stalled and len(stalled) < len(self.subscribers):
            for sub in stalled:
                self.subscribers.remove(sub)
                sub.dropped = StreamDropped(
                    f"this stream read none of the process's output for {self.limits.stalled_stream_seconds:g} s "
                    f"(stalled_stream_seconds) with {sub.queue.qsize()} events queued (the per-stream queue holds "
                    f"{limit}) while other streams of the process waited for it: it was dropped; reconnect with "
                    "Connect to follow the process again"
                )
                while not sub.queue.empty():  # free what it held; wake it if it is waiting
                    sub.queue.get_nowait()
                sub.queue.put_nowait(sub.dropped)
        self._pace()

    def _close_reader(self, fd: int) -> None:
        kind = self.out_fds.pop(fd, None)
        if kind is None:  # closed already: a descriptor number is never closed twice (another may own it now)
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        if kind == "pty":  # also the PTY's input side: release a waiting writer first
            self._wake_stdin_writer()
            loop.remove_writer(fd)
            self.master_fd = None
        self.paused.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        self._maybe_finish()

    def _publish_data(self, fd: int, data: bytes) -> None:
        kind = self.out_fds[fd]  # stdout, stderr or pty
        if not self.subscribers:
            self._keep(kind, data)
            return
        self._publish(_data_event(kind, data))

    def _keep(self, kind: str, data: bytes) -> None:
        """Keep output for the next Connect. Reading stops when the buffer is full, so it overflows
        only once the process has exited (its last output): then the oldest output goes."""
        last = self.backlog[-1] if self.backlog else None
        if last is not None and last[0] == kind and len(last[1]) + len(data) <= CHUNK:
            last[1].extend(data)
        else:
            self.backlog.append((kind, bytearray(data)))
            self.backlog_cost += RUN_COST
        self.backlog_cost += len(data)
        while self._exited and self.backlog_cost > self.limits.output_buffer_bytes and len(self.backlog) > 1:
            self.backlog_cost -= len(self.backlog.popleft()[1]) + RUN_COST

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
        # Output written just before exit is still in the pipes: it is read as it can be kept, and
        # after a short grace period what is left is read at once. A background grandchild may keep a
        # pipe open (and writing) forever, so stop waiting for EOF then.
        loop.call_later(0.2, self._force_finish)
        self._maybe_finish()

    def _force_finish(self) -> None:
        for fd in list(self.out_fds):
            # read what the pipe holds (at most one pipe's worth: a child may still be writing), then give up on it
            for _ in range(FINAL_READS):
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
        assert self.popen is not None and self.popen.returncode is not None
        self._finish_with(self.popen.returncode)

    def _finish_with(self, returncode: int) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        code, exited, status = _status_of(returncode)
        # As envd (Go's cmd.Wait): an error text whenever the command did not exit 0.
        error = None if exited and code == 0 else status
        # Killed by SIGKILL, or a shell reporting a child killed so (137): was it the OOM killer?
        if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) and self._oom_probe is not None:
            stats = _oom_kills(*self._oom_probe)
            if stats is not None and self._oom_before is not None and stats > self._oom_before:
                error = f"{status} (out of memory: the sandbox reached its memory limit and the kernel killed it)"
        end = pb.ProcessEvent.EndEvent(exit_code=code, exited=exited, status=status, error=error)
        if self.on_end is not None:
            self.on_end(code, status, error)
        self.end = pb.ProcessEvent(event=Oneof("end", end))  # type: ignore[arg-type]
        self._publish(self.end)
        self._publish(None)
        self.done.set()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.session is not None:
            self.session.close()
            self.session = None
        if self.ended_meanwhile:  # kept (output and end) for the next Connect
            return
        self.backlog.clear()
        self.backlog_cost = 0
        self.table.forget(self)
        # Its keeper removed its record when it ended under us; one taken over from a previous run, or a
        # keeper killed with its command, leaves it to us (once the end event is out).
        if self.keep_dir is not None and (isinstance(self.popen, kept.KeeperWatch) or returncode < 0):
            asyncio.get_running_loop().call_soon(kept.forget, self.keep_dir)

    # -- control -------------------------------------------------------------------------------
    def kill_at(self, when: float) -> None:
        """SIGKILL the command's process group at loop time `when` unless it has ended: its deadline, as
        envd enforces a Start's timeout on the command itself, whether its client is still there or not
        (a client whose own timer fires first just disconnects)."""

        def expire() -> None:
            self._deadline = None
            with contextlib.suppress(ProcessGone):
                self.signal(signal.SIGKILL)

        if not self.done.is_set():
            self._deadline = asyncio.get_running_loop().call_at(when, expire)

    def subscribe(self) -> Subscriber:
        """Attach a stream: it receives the output kept while none was attached, then live output."""
        sub = Subscriber()
        self.subscribers.append(sub)
        if self.done.is_set():
            if self.ended_meanwhile:  # once: what it wrote while no server ran, then its end
                while self.backlog:
                    kind, data = self.backlog.popleft()
                    sub.queue.put_nowait(_data_event(kind, bytes(data)))
                self.backlog_cost = 0
                self.table.forget(self)
                kept.forget(self.keep_dir)
            sub.queue.put_nowait(self.end)
            sub.queue.put_nowait(None)
            return sub
        while self.backlog:
            kind, data = self.backlog.popleft()
            sub.queue.put_nowait(_data_event(kind, bytes(data)))
        self.backlog_cost = 0
        self._pace()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(sub)
        if not self.done.is_set():
            self._pace()

    async def events(
        self, sub: Subscriber, keepalive: float, deadline: float | None = None
    ) -> AsyncGenerator[pb.ProcessEvent]:
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
                if sub.dropped is not None:
                    raise sub.dropped
                try:
                    item = await asyncio.wait_for(sub.queue.get(), timeout=wait)
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        raise
                    yield pb.ProcessEvent(event=Oneof("keepalive", pb.ProcessEvent.KeepAlive()))  # type: ignore[arg-type]
                    continue
                sub.taken += 1
                if self.paused:
                    self._pace()
                if item is None or isinstance(item, ClientGone):
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
                fd = self.master_fd if self.master_fd is not None else self.stdin_fd
                if fd is None:
                    raise ProcessGone("stdin is not open for this process (start it with stdin enabled)")
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    waiter = self._stdin_waiter = loop.create_future()
                    loop.add_writer(fd, _wake, waiter)
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
        if self.session is not None:  # the keeper gives the command EOF for this close, not for a server's end
            with contextlib.suppress(OSError):
                self.session.send(b"c")
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
        if self.is_pty and self.master_fd is None and self.session is not None and not self.done.is_set():
            with contextlib.suppress(OSError):  # its keeper holds the terminal
                self.session.send(b"r" + struct.pack("=HH", rows, cols))
            return
        if self.master_fd is None:
            raise ProcessGone(f"process {self.pid} has no PTY")
        _set_winsize(self.master_fd, rows, cols)

    def sandbox_killed(self) -> None:
        if not self.done.is_set():
            self._publish(SandboxKilled("the sandbox was killed while the process was running"))


class ProcessTable:
    """The processes of one sandbox, by PID and by tag, and its count of open process streams."""

    def __init__(self, limits: TenantLimits | None = None) -> None:
        self.limits = limits or TenantLimits()
        self.by_pid: dict[int, Proc] = {}
        self.streams = 0
        self._synthetic = 1 << 30
        self.procs_made = False  # its sandbox's dir of kept processes' records exists (envd/kept.py)

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


def _data_event(kind: str, data: bytes) -> pb.ProcessEvent:
    return pb.ProcessEvent(event=Oneof("data", pb.ProcessEvent.DataEvent(output=Oneof(kind, data))))  # type: ignore[arg-type]


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
