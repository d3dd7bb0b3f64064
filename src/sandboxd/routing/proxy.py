"""HTTP to a port on a sandbox's own loopback (`E2b-Sandbox-Port` other than envd's): the code
interpreter on 49999, or anything the user runs in the sandbox.

The connection is made inside the sandbox's network namespace by the runtime, so no host port or
path is involved. Bodies stream both ways; if the client goes away, the upstream connection is
closed at once, so the service sees the disconnect (the interpreter then interrupts its kernel).
Finished connections are kept for reuse (HTTP/1.1 keep-alive) for a short while: back-to-back
requests (run_code in a loop) skip the socket set-up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from sandboxd import httpfwd
from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.httpfwd import Upstream, UpstreamClosed

if TYPE_CHECKING:
    from sandboxd.runtime.terminals import Terminals

INTERPRETER_PORT = 49999
# The interpreter starts with the sandbox: a request that arrives first waits for it, within reason.
SERVICE_WAIT_S = 60.0
MAX_IDLE_PER_PORT = 4
# Never passed on: per hop (httpfwd's), and what sandboxd adds for its interpreter
HOP_BY_HOP = httpfwd.HOP_BY_HOP | {b"x-sandboxd-env"}
# Credentials meant for sandboxd: never passed on to the sandbox's own services, which may be anyone's code.
# (Authorization stays: it is how a browser authenticates to the user's own web app.)
CREDENTIALS = {b"x-access-token", b"e2b-traffic-access-token", b"x-api-key"}
DROPPED = HOP_BY_HOP | CREDENTIALS


def _not_open(sandbox: Sandbox, port: int) -> JSONResponse:
    return JSONResponse(
        {
            "sandboxId": sandbox.id,
            "port": port,
            "code": 502,
            "message": f"The sandbox is running but port is not open: {port}",
        },
        status_code=502,
    )


class PortProxy:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self._idle: dict[tuple[str, int], list[Upstream]] = {}

    async def _connect(self, sandbox: Sandbox, port: int) -> Upstream | None:
        key = (sandbox.id, port)
        pool = self._idle.get(key, [])
        while pool:
            up = pool.pop()
            if up.reusable():
                return up
            up.close()
        deadline = time.monotonic() + (SERVICE_WAIT_S if port == INTERPRETER_PORT else 0)
        delay = 0.01
        while True:
            try:
                sock = await self.manager.runtime.connect_tcp(sandbox.handle, port)
                break
            except (ConnectionRefusedError, NotImplementedError):
                if time.monotonic() >= deadline or not sandbox.running:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        if key not in self._idle:
            self._idle[key] = []
            sandbox.on_kill.append(lambda: self._drop(key))
        reader, writer = await asyncio.open_connection(sock=sock)
        return Upstream(reader, writer)

    @staticmethod
    def host_for(sandbox: Sandbox, port: int) -> str:
        """The Host header the sandbox's service sees: `localhost`, or its maskRequestHost."""
        mask = sandbox.record.mask_request_host
        return mask.replace("${PORT}", str(port)) if mask else "localhost"

    def _drop(self, key: tuple[str, int]) -> None:
        for up in self._idle.pop(key, []):
            up.close()

    # -- a pause to disk (core/pausing.py's CheckpointPart) ----------------------------------------
    async def before_dump(self, sandbox: Sandbox) -> tuple[list[str], dict[str, Any]]:
        """The idle connections kept for reuse go: a connection from outside keeps a sandbox paused in
        memory (CRIU restores no established TCP connection there), a closed socket does not. A reset
        closes the service's end at once, while the sandbox is still paused."""
        for (sandbox_id, _), pool in self._idle.items():
            while sandbox_id == sandbox.id and pool:
                pool.pop().reset()
        return [], {}

    async def dump_failed(self, sandbox: Sandbox) -> None:
        pass

    async def before_snapshot(self, sandbox: Sandbox) -> tuple[dict[str, Any], list[str]]:
        await self.before_dump(sandbox)
        return {}, []

    def before_snapshot_restore(self, state: dict[str, Any], terminals: Terminals) -> tuple[list[tuple[int, str]], Any]:
        return [], None

    async def snapshot_restored(self, sandbox: Sandbox, pending: Any, host_pids: dict[int, int]) -> None:
        pass

    def drop_snapshot_restore(self, pending: Any) -> None:
        pass

    async def before_restore(self, sandbox: Sandbox, terminals: Terminals) -> list[tuple[int, str]]:
        return []

    async def restored(self, sandbox: Sandbox, host_pids: dict[int, int]) -> None:
        pass

    async def ended(self, sandbox: Sandbox) -> None:
        pass

    def _release(self, sandbox: Sandbox, port: int, up: Upstream) -> None:
        if sandbox.running and up.release():
            pool = self._idle.setdefault((sandbox.id, port), [])
            if len(pool) < MAX_IDLE_PER_PORT:
                pool.append(up)
                return
        up.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, sandbox: Sandbox, port: int) -> None:
        if scope["type"] != "http":
            await _not_open(sandbox, port)(scope, receive, send)
            return
        up = await self._connect(sandbox, port)
        if up is None:
            await _not_open(sandbox, port)(scope, receive, send)
            return
        extra = []
        if port == INTERPRETER_PORT:
            env = base64.b64encode(json.dumps(sandbox.record.env_vars).encode())
            extra.append((b"x-sandboxd-env", env))
        if await _forward(scope, receive, send, up, extra, sandbox, self.host_for(sandbox, port)):
            self._release(sandbox, port, up)
        else:
            up.close()


async def _forward(
    scope: Scope, receive: Receive, send: Send, up: Upstream, extra: list, sandbox: Sandbox, host: str
) -> bool:
    """Forwards one request; True if the connection finished cleanly and may be reused."""
    headers = [
        (b"host", host.encode("latin-1")),
        *((k, v) for k, v in scope["headers"] if k.lower() not in DROPPED),
        *extra,
        *httpfwd.framing(scope),
    ]
    try:
        outcome = await httpfwd.forward(scope, receive, send, up, headers, drop=HOP_BY_HOP)
    except UpstreamClosed:
        # The service went away mid-response (the sandbox was killed, say): abort the client's connection
        # rather than end the body cleanly, so the client knows the response is incomplete.
        raise UpstreamClosed(f"sandbox {sandbox.id}: the service closed the connection mid-response") from None
    if outcome is httpfwd.Outcome.NOT_STARTED:
        await _not_open(sandbox, 0)(scope, receive, send)
    return outcome is httpfwd.Outcome.DONE
