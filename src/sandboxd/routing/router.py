"""The top-level ASGI app: sends each request to the control plane or to a sandbox's port.

Requests that carry `E2b-Sandbox-Id` go to that sandbox's service on `E2b-Sandbox-Port` (49983, envd,
by default); all other requests are the control plane's. An unknown, killed, expired or paused sandbox
answers 502 with the JSON body the SDK recognises ("The sandbox was not found"), which is how
`is_running()` learns that a sandbox is gone.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sandboxd.core.manager import SandboxManager
from sandboxd.envd.context import current_sandbox

ENVD_PORT = 49983
# envd paths reachable without X-Access-Token (upstream: /health; /files take a signature instead).
PUBLIC_ENVD_PATHS = frozenset({"/health"})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


class Router:
    def __init__(self, manager: SandboxManager, control_plane: ASGIApp, ports: dict[int, ASGIApp]) -> None:
        self.manager = manager
        self.control_plane = control_plane
        self.ports = ports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.control_plane(scope, receive, send)
            return
        sandbox_id = _header(scope, b"e2b-sandbox-id")
        if sandbox_id is None:
            await self.control_plane(scope, receive, send)
            return
        port_raw = _header(scope, b"e2b-sandbox-port") or str(ENVD_PORT)
        sandbox = self.manager.find(sandbox_id)
        if sandbox is None or not sandbox.running:
            await JSONResponse(
                {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502}, status_code=502
            )(scope, receive, send)
            return
        port = int(port_raw) if port_raw.isdigit() else -1
        app = self.ports.get(port)
        if app is None:
            await JSONResponse(
                {
                    "sandboxId": sandbox_id,
                    "port": port_raw,
                    "code": 502,
                    "message": f"The sandbox is running but port is not open: {port_raw}",
                },
                status_code=502,
            )(scope, receive, send)
            return
        if port == ENVD_PORT and scope["path"] not in PUBLIC_ENVD_PATHS:
            token = _header(scope, b"x-access-token")
            if token is None or not hmac.compare_digest(token, sandbox.record.envd_token):
                await JSONResponse(
                    {"code": 401, "message": "missing or invalid X-Access-Token for this sandbox"}, status_code=401
                )(scope, receive, send)
                return
        reset = current_sandbox.set(sandbox)
        try:
            await app(scope, receive, send)
        finally:
            current_sandbox.reset(reset)
