"""Running commands to completion in a sandbox from the host (a build step, a template's ready check), and
a template's start command: started, then its ready command run until it succeeds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from sandboxd.core.users import DEFAULT_PATH, User, lookup_user
from sandboxd.runtime.base import ExecSpec, Runtime, SandboxHandle
from sandboxd.runtime.rootfs import read_file_in_root

READY_TIMEOUT = 120.0  # how long a create (or a build's finalize) waits for the ready command
READY_INTERVAL = 0.05
START_LOG = "/tmp/.sandboxd-start.log"  # the start command's output, inside the sandbox
MAX_LINE = 4096
OUTPUT_GRACE = 1.0  # how long output is read after the command exited


class StartError(Exception):
    """The start command ended, or the ready command did not succeed in time."""


@dataclass(frozen=True)
class Identity:
    user: User
    env: dict[str, str]
    cwd: str


def identity(runtime: Runtime, handle: SandboxHandle, user: str, env: dict[str, str], cwd: str) -> Identity:
    """Who a command runs as in the sandbox (from its own /etc/passwd), with what environment, where."""
    u = lookup_user(str(runtime.root_path(handle)), user, handle.uid_base)
    if u is None:
        raise StartError(f"user '{user}' does not exist in the sandbox")
    full = {"PATH": DEFAULT_PATH, "HOME": u.home, "USER": u.name, "LANG": "C.UTF-8", **env}
    return Identity(u, full, cwd or u.home)


def _spec(who: Identity, command: str) -> ExecSpec:
    return ExecSpec(
        argv=["/bin/sh", "-c", command],
        env=who.env,
        cwd=who.cwd,
        uid=who.user.uid,
        gid=who.user.gid,
        groups=who.user.groups,
    )


async def run(
    runtime: Runtime,
    handle: SandboxHandle,
    who: Identity,
    command: str,
    on_line: Callable[[str], None] | None = None,
    stdin: int | None = None,
    timeout: float | None = None,
) -> int:
    """Run `command` (sh -c) to its end; each output line goes to `on_line`. Returns its exit status
    (128+N for a signal; -1 when `timeout` ran out and it was killed)."""
    read, write = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        proc = runtime.spawn_exec(handle, _spec(who, command), (stdin if stdin is not None else devnull, write, write))
    finally:
        os.close(write)
        os.close(devnull)

    def pump() -> None:
        # Lines are read at most MAX_LINE bytes at a time: output without newlines costs no memory.
        with os.fdopen(read, "rb") as f:
            while raw := f.readline(MAX_LINE):
                if on_line is not None:
                    on_line(raw.decode(errors="replace").rstrip("\r\n"))

    reader = asyncio.ensure_future(asyncio.to_thread(pump))
    try:
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
    except TimeoutError:
        proc.kill()
        await asyncio.to_thread(proc.wait)
        code = -1
    # The output ends when every process holding the pipe is gone: what the command left running in
    # the background may hold it for good (a build step's sandbox ends with the step; that closes it).
    await asyncio.wait({reader}, timeout=OUTPUT_GRACE)
    return 128 - code if code < -1 else code


async def start_service(
    runtime: Runtime,
    handle: SandboxHandle,
    who: Identity,
    start_cmd: str,
    ready_cmd: str,
    timeout: float = READY_TIMEOUT,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `start_cmd` in the background (its output in START_LOG) and return once `ready_cmd` exits 0."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        quoted = start_cmd.replace("'", "'\\''")
        proc = runtime.spawn_exec(
            handle, _spec(who, f"exec /bin/sh -c '{quoted}' >>{START_LOG} 2>&1"), (devnull, devnull, devnull)
        )
    finally:
        os.close(devnull)
    if not ready_cmd:
        return proc
    deadline = time.monotonic() + timeout
    last: list[str] = []
    while True:
        lines: list[str] = []
        code = await run(runtime, handle, who, ready_cmd, lines.append, timeout=max(1.0, deadline - time.monotonic()))
        if code == 0:
            return proc
        last = lines[-5:] or last
        if proc.poll() is not None:
            raise StartError(
                f"the start command exited with status {proc.returncode} before the ready command succeeded; "
                f"its last output ({START_LOG} in the sandbox):\n{_tail(runtime, handle)}"
            )
        if time.monotonic() >= deadline:
            proc.kill()
            tail = ("; its last output: " + " | ".join(last)) if last else ""
            raise StartError(
                f"the ready command `{ready_cmd[:200]}` did not succeed within {timeout:.0f} s{tail}; the start "
                f"command's last output ({START_LOG} in the sandbox):\n{_tail(runtime, handle)}"
            )
        await asyncio.sleep(READY_INTERVAL)


def _tail(runtime: Runtime, handle: SandboxHandle, lines: int = 15) -> str:
    """The end of the start command's output, read in the sandbox's root (never through its symlinks)."""
    try:
        data = read_file_in_root(str(runtime.root_path(handle)), START_LOG, limit=1 << 20)
    except OSError:
        return "(none)"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:]) or "(none)"
