"""The `process.Process` Connect service (envd's, as the SDKs' `commands` and `pty` call it), implemented
over the runtime's exec."""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import shlex
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.core.tenant_limits import TenantLimits
from sandboxd.envd import context, kept
from sandboxd.envd.gen.process import process_pb as pb
from sandboxd.envd.processes import (
    ClientGone,
    Proc,
    ProcessGone,
    ProcessTable,
    SandboxKilled,
    ServerShuttingDown,
    StreamDropped,
    Subscriber,
)
from sandboxd.runtime.base import ExecSpec

DEFAULT_KEEPALIVE = 90.0
KILL_WAIT = 2.0  # s: how long a command killed at its deadline may take to be gone before the error is sent


def table_of(sbx: Sandbox, limits: TenantLimits | None = None) -> ProcessTable:
    table = sbx.ext.get("processes")
    if table is None:
        table = sbx.ext["processes"] = ProcessTable(limits)
        sbx.on_kill.append(table.kill_all)
        kept.readopt(table, sbx.handle.state_dir)  # its processes a previous server run started
    return table


def _find(table: ProcessTable, selector: pb.ProcessSelector | None) -> Proc:
    sel = selector.selector if selector is not None else None
    if sel is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required")
    if sel.field == "pid":
        proc = table.find(pid=sel.value)
        what = f"pid {sel.value}"
    else:
        proc = table.find(tag=sel.value)
        what = f"tag '{sel.value}'"
    if proc is None:
        raise ConnectError(Code.NOT_FOUND, f"process with {what} not found")
    return proc


def _log_process(manager: SandboxManager, sandbox_id: str, proc: Proc, argv: list[str], user: str) -> None:
    """Its start now, and its end when it comes, in the sandbox's log (core/sandbox_logs.py)."""
    cmd = shlex.join(argv)[:500]
    logs, pid = manager.logs, proc.pid
    logs.add(sandbox_id, "info", f"process {pid} started as {user}: {cmd}", pid=pid, user=user, cmd=cmd)

    def ended(code: int, status: str, error: str | None) -> None:
        level = "info" if error is None else "warn"
        logs.add(sandbox_id, level, f"process {pid} ended: {status}", pid=pid, exitCode=code)

    proc.on_end = ended


def _deadline(ctx: RequestContext) -> float | None:
    """The loop time at which the request's Connect-Timeout-Ms runs out (None: no timeout)."""
    return asyncio.get_running_loop().time() + ctx.timeout_ms / 1000 if ctx.timeout_ms else None


async def _stream(
    proc: Proc, sub: Subscriber, ctx: RequestContext, deadline: float | None, kills: bool
) -> AsyncGenerator[pb.ProcessEvent]:
    """Events of `proc` until `deadline` (enforced here, on the server). kills: the process dies at that
    deadline too (Start's Proc.kill_at): an end that comes after it is that kill, reported as the
    timeout, and the timeout is answered once the process is gone."""
    keepalive = context.keepalive_interval(ctx.request_headers, DEFAULT_KEEPALIVE)
    forget = context.on_client_gone(lambda: sub.queue.put_nowait(ClientGone()))
    try:
        async with contextlib.aclosing(proc.events(sub, keepalive, deadline)) as events:
            async for event in events:
                if kills and event is proc.end and deadline is not None:
                    if asyncio.get_running_loop().time() >= deadline:
                        raise TimeoutError
                yield event
    except TimeoutError:
        if kills:
            # bounded: a client that gets the timeout and looks at once (`ps`) must not still find the
            # command it timed out
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.done.wait(), KILL_WAIT)
        raise ConnectError(Code.DEADLINE_EXCEEDED, f"the deadline of {ctx.timeout_ms:.0f} ms was exceeded") from None
    except SandboxKilled as e:
        raise ConnectError(Code.UNAVAILABLE, f"{e}: the sandbox was not found") from None
    except StreamDropped as e:
        raise ConnectError(Code.RESOURCE_EXHAUSTED, str(e)) from None
    except ServerShuttingDown as e:
        raise ConnectError(Code.UNAVAILABLE, str(e)) from None
    finally:
        forget()


@contextlib.contextmanager
def _stream_slot(table: ProcessTable) -> Iterator[None]:
    """One of the sandbox's open process streams (Start or Connect), refused beyond the cap."""
    cap = table.limits.process_streams
    if table.streams >= cap:
        raise ConnectError(
            Code.RESOURCE_EXHAUSTED,
            f"this sandbox already has {table.streams} open process streams (Start/Connect), the limit "
            f"(process_streams, `sandboxd serve --max-process-streams`) is {cap}: disconnect from processes "
            "you do not follow (they keep running and can be reconnected) or wait for some to end",
        )
    table.streams += 1
    try:
        yield
    finally:
        table.streams -= 1


def end_streams_for_shutdown(manager: SandboxManager, sandboxes_kept: bool) -> None:
    """The server is stopping: end every open process stream with an error the SDKs show, instead of
    cutting the connection. Processes keep running when sandboxes are kept for the next start."""
    if sandboxes_kept:
        reason = (
            "sandboxd server is shutting down, reconnect: the process keeps running in its sandbox "
            "(commands.connect(pid) once the server is back)"
        )
    else:
        reason = "sandboxd server is shutting down and destroying its sandboxes"
    for sbx in list(manager.sandboxes.values()):
        table = sbx.ext.get("processes")
        if table is not None:
            table.end_streams(reason)


class ProcessService:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    def _table(self) -> ProcessTable:
        return table_of(context.sandbox(), self.manager.settings.tenant)

    def _find(self, selector: pb.ProcessSelector | None) -> Proc:
        return _find(self._table(), selector)

    async def list(self, request: pb.ListRequest, ctx: RequestContext) -> pb.ListResponse:
        table = self._table()
        return pb.ListResponse(
            processes=[
                pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag)
                for p in table.by_pid.values()
                if not p.done.is_set()
            ]
        )

    async def start(self, request: pb.StartRequest, ctx: RequestContext) -> AsyncIterator[pb.StartResponse]:
        sbx = context.sandbox()
        user = context.resolve_user(self.manager, sbx, ctx.request_headers.get("authorization"))
        cfg = request.process
        if cfg is None or not cfg.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        env = context.base_env(sbx, user)
        env.update(cfg.envs)
        # the template's WORKDIR (a built template's, as envd's defaultWorkdir), else the user's home
        workdir = sbx.record.default_workdir
        cwd = cfg.cwd or (workdir if workdir and workdir != "/home/user" else user.home)
        if not cwd.startswith("/"):
            cwd = posixpath.join(user.home, cwd)
        pty = request.pty
        size = (pty.size.rows, pty.size.cols) if pty is not None and pty.size is not None else None
        spec = ExecSpec(
            argv=[cfg.cmd, *cfg.args],
            env=env,
            cwd=cwd,
            uid=user.uid,
            gid=user.gid,
            groups=user.groups,
            pty=pty is not None,
        )
        table = self._table()
        with _stream_slot(table):  # refused before anything is started
            proc = Proc(table, cfg, request.tag, pty=pty is not None)
            sub = proc.subscribe()  # before the process can write anything
            try:
                await proc.spawn(self.manager.runtime, sbx.handle, spec, stdin=bool(request.stdin), size=size)
            except ValueError as e:  # an environment variable the kernel cannot carry
                proc.unsubscribe(sub)
                raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None
            except BaseException:
                proc.unsubscribe(sub)
                raise
            table.add(proc)
            _log_process(self.manager, sbx.id, proc, spec.argv, user.name)
            deadline = _deadline(ctx)
            if deadline is not None:
                proc.kill_at(deadline)
            start = pb.ProcessEvent.StartEvent(pid=proc.pid)
            yield pb.StartResponse(event=pb.ProcessEvent(event=Oneof("start", start)))  # type: ignore[arg-type]
            async with contextlib.aclosing(_stream(proc, sub, ctx, deadline, kills=deadline is not None)) as events:
                async for event in events:
                    yield pb.StartResponse(event=event)

    async def connect(self, request: pb.ConnectRequest, ctx: RequestContext) -> AsyncIterator[pb.ConnectResponse]:
        table = self._table()
        proc = _find(table, request.process)
        with _stream_slot(table):
            yield pb.ConnectResponse(
                event=pb.ProcessEvent(event=Oneof("start", pb.ProcessEvent.StartEvent(pid=proc.pid)))  # type: ignore[arg-type]
            )
            async with contextlib.aclosing(_stream(proc, proc.subscribe(), ctx, _deadline(ctx), kills=False)) as events:
                async for event in events:
                    yield pb.ConnectResponse(event=event)

    async def update(self, request: pb.UpdateRequest, ctx: RequestContext) -> pb.UpdateResponse:
        proc = self._find(request.process)
        if request.pty is not None and request.pty.size is not None:
            try:
                proc.resize(request.pty.size.cols, request.pty.size.rows)
            except ProcessGone as e:
                raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from None
        return pb.UpdateResponse()

    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest], ctx: RequestContext
    ) -> pb.StreamInputResponse:
        proc: Proc | None = None
        async for message in request:
            ev = message.event
            if ev is None or ev.field == "keepalive":
                continue
            if ev.field == "start":
                proc = self._find(ev.value.process)
            elif ev.field == "data":
                if proc is None:
                    raise ConnectError(Code.INVALID_ARGUMENT, "the first message must be 'start' with a process")
                await self._write(proc, ev.value.input)
        return pb.StreamInputResponse()

    async def send_input(self, request: pb.SendInputRequest, ctx: RequestContext) -> pb.SendInputResponse:
        proc = self._find(request.process)
        await self._write(proc, request.input)
        return pb.SendInputResponse()

    @staticmethod
    async def _write(proc: Proc, data: pb.ProcessInput | None) -> None:
        if data is None or data.input is None:
            return
        try:
            await proc.write_stdin(data.input.value)
        except ProcessGone as e:
            raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from None

    async def send_signal(self, request: pb.SendSignalRequest, ctx: RequestContext) -> pb.SendSignalResponse:
        proc = self._find(request.process)
        sig = {pb.Signal.SIGKILL: signal.SIGKILL, pb.Signal.SIGTERM: signal.SIGTERM}.get(request.signal)
        if sig is None:
            raise ConnectError(Code.INVALID_ARGUMENT, f"unsupported signal {request.signal!r}: use SIGTERM or SIGKILL")
        try:
            proc.signal(sig)
        except ProcessGone as e:
            raise ConnectError(Code.NOT_FOUND, str(e)) from None
        return pb.SendSignalResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: RequestContext) -> pb.CloseStdinResponse:
        proc = self._find(request.process)
        if proc.is_pty:
            raise ConnectError(Code.FAILED_PRECONDITION, "cannot close stdin of a PTY process: send Ctrl-D (0x04)")
        proc.close_stdin()
        return pb.CloseStdinResponse()
