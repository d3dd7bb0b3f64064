"""The top-level ASGI app: sends each request to the control plane or to a sandbox's port.

Requests that carry `E2b-Sandbox-Id` go to that sandbox's service on `E2b-Sandbox-Port` (49983, envd,
by default); with `--domain D`, so do requests for the host `{port}-{id}.D` (how E2B's SDKs and a
browser reach a sandbox's port: `sandbox.get_host(port)`); all other requests are the control plane's.
A sandbox whose ports are not public (`allowPublicTraffic: false`) wants its `e2b-traffic-access-token`
on every port but envd's; a paused sandbox with `autoResume` is resumed by a request to its ports. An
unknown, killed, expired or (otherwise) paused sandbox answers 502 with the JSON body the SDK recognises
("The sandbox was not found"), which is how `is_running()` learns that a sandbox is gone.
"""

from __future__ import annotations

import hmac
import re
import time
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sandboxd.cluster import CLUSTER_HEADER
from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.envd.context import current_sandbox
from sandboxd.envd.files_http import operation_of, signature_matches
from sandboxd.routing.proxy import INTERPRETER_PORT, PortProxy
from sandboxd.routing.websocket import proxy_websocket

ENVD_PORT = 49983
# envd paths reachable without X-Access-Token: /health, and /files, which checks the token or a signature.
PUBLIC_ENVD_PATHS = frozenset({"/health", "/files"})
# The code interpreter executes code: every request to it needs the access token, except the context
# calls that the official SDKs make without one (they start, list, restart or remove kernels, never run
# code given in the request).
_CONTEXT_CALLS = re.compile(
    r"(GET|POST) /contexts|(DELETE|PATCH) /contexts/[^/]+|POST /contexts/[^/]+/restart|GET /health"
)
SIGNATURE_CACHE = 4096


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


async def _forbidden(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(
        {
            "code": 403,
            "message": "this sandbox's ports are not public: send its traffic access token in the "
            "e2b-traffic-access-token header (sandbox.traffic_access_token)",
        },
        status_code=403,
    )(scope, receive, send)


async def _unauthorized(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse({"code": 401, "message": "missing or invalid X-Access-Token for this sandbox"}, status_code=401)(
        scope, receive, send
    )


def host_route(domain: str) -> re.Pattern[str]:
    """`{port}-{sandbox ID}.{domain}`, with or without a port: a request for a sandbox's port by its host name."""
    return re.compile(rf"(\d{{1,5}})-([a-z0-9]{{1,64}})\.{re.escape(domain.lower())}(?::\d+)?")


class Router:
    def __init__(
        self,
        manager: SandboxManager,
        control_plane: ASGIApp,
        ports: dict[int, ASGIApp],
        proxy: PortProxy,
        domain: str | None = None,
        cluster_token: str | None = None,
    ) -> None:
        self.manager = manager
        # a cluster's node with a token: only requests the cluster's API replicas pass on (they carry it)
        self.cluster_token = cluster_token.encode() if cluster_token else None
        # {port}-{sandbox id}.DOMAIN (an optional :port after it)
        self._host_route = host_route(domain) if domain else None
        self.control_plane = control_plane
        self.ports = ports
        self.proxy = proxy  # every other port: the sandbox's own services
        self._by_signature: dict[str, str] = {}  # signature -> sandbox ID (bounded, most recent kept)
        self.draining = False  # the server is shutting down: new requests get 503

    @staticmethod
    def _token_ok(scope: Scope, expected: str) -> bool:
        token = _header(scope, b"x-access-token")
        return token is not None and hmac.compare_digest(token.encode(), expected.encode())

    def _sandbox_by_signature(self, scope: Scope) -> str | None:
        """Signed /files URLs carry no sandbox header: the sandbox is the one whose access token
        reproduces the signature. One sha256 per running sandbox, then cached: O(1) for repeats."""
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        sig = query.get("signature")
        if not sig:
            return None
        cached = self._by_signature.get(sig)
        if cached is not None and self.manager.find(cached) is not None:
            return cached
        operation = operation_of(scope["method"])
        for sandbox in list(self.manager.sandboxes.values()):
            if signature_matches(query, operation, sandbox.record.envd_token):
                if len(self._by_signature) >= SIGNATURE_CACHE:
                    self._by_signature.pop(next(iter(self._by_signature)))
                self._by_signature[sig] = sandbox.id
                return sandbox.id
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.control_plane(scope, receive, send)
            return
        if self.cluster_token is not None and scope.get("path") != "/health":
            given = next((v for k, v in scope["headers"] if k == CLUSTER_HEADER), b"")
            if not hmac.compare_digest(given, self.cluster_token):
                if scope["type"] == "websocket":
                    await receive()
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await JSONResponse(
                    {
                        "code": 403,
                        "message": "this node serves its cluster's API replicas only: use one",
                    },
                    status_code=403,
                )(scope, receive, send)
                return
        if self.draining:
            await JSONResponse(
                {"code": 503, "message": "sandboxd is shutting down; sandboxes keep running: retry in a moment"},
                status_code=503,
                headers={"Retry-After": "2", "Connection": "close"},
            )(scope, receive, send)
            return
        sandbox_id = _header(scope, b"e2b-sandbox-id")
        port_raw = _header(scope, b"e2b-sandbox-port")
        if sandbox_id is None and self._host_route is not None:
            m = self._host_route.fullmatch((_header(scope, b"host") or "").lower())
            if m:
                port_raw, sandbox_id = m.group(1), m.group(2)
        if scope["type"] == "websocket":
            if sandbox_id is None:  # (the dashboard's terminal: the control plane's)
                await self.control_plane(scope, receive, send)
            else:
                await self._websocket(scope, receive, send, sandbox_id, port_raw)
            return
        if sandbox_id is None and scope["path"] == "/files":
            sandbox_id = self._sandbox_by_signature(scope)
            if sandbox_id is None:
                await JSONResponse(
                    {"code": 401, "message": "a /files request needs the E2b-Sandbox-Id header or a valid signature"},
                    status_code=401,
                )(scope, receive, send)
                return
        if sandbox_id is None:
            await self.control_plane(scope, receive, send)
            return
        port_raw = port_raw or str(ENVD_PORT)
        port = int(port_raw) if port_raw.isdigit() and 0 < int(port_raw) < 65536 else -1
        sandbox = await self._live(sandbox_id)
        if sandbox is None:
            # The SDKs know this message ("The sandbox was not found"); what follows says why (it ended, or
            # it is paused), and they put it in their exceptions.
            message = "The sandbox was not found"
            known = self.manager.find(sandbox_id)
            if known is not None:
                message += f": it is {known.record.state}"
            else:
                why = self.manager.gone_message(sandbox_id).partition(": ")[2]
                message += f": {why}" if why else ""
            await JSONResponse({"sandboxId": sandbox_id, "message": message, "code": 502}, status_code=502)(
                scope, receive, send
            )
            return
        if port != ENVD_PORT and not self._traffic_ok(scope, sandbox):
            await _forbidden(scope, receive, send)
            return
        app = self.ports.get(port)
        if app is None and port > 0:
            if port == INTERPRETER_PORT and not _CONTEXT_CALLS.fullmatch(f"{scope['method']} {scope['path']}"):
                if not self._token_ok(scope, sandbox.record.envd_token):
                    await _unauthorized(scope, receive, send)
                    return
            await self.proxy(scope, receive, send, sandbox, port)
            return
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
            if not self._token_ok(scope, sandbox.record.envd_token):
                await _unauthorized(scope, receive, send)
                return
        reset = current_sandbox.set(sandbox)
        scope["sandboxd.sandbox"] = sandbox.id  # (for the access log: telemetry/prometheus.py)
        try:
            await app(scope, receive, send)
        finally:
            current_sandbox.reset(reset)

    async def _live(self, sandbox_id: str) -> Sandbox | None:
        """The running sandbox, resumed first if it is paused with autoResume (a request to envd or to
        any of its ports wakes it, as an API connect does)."""
        sandbox = self.manager.find(sandbox_id)
        if sandbox is None:
            return None
        if not sandbox.running and sandbox.record.state == "paused" and sandbox.record.auto_resume:
            try:
                await self.manager.connect(sandbox_id, None)
            except Exception:
                return None
        if not sandbox.running:
            return None
        sandbox.last_active = time.time()  # a request for it: not idle
        return sandbox

    @staticmethod
    def _traffic_ok(scope: Scope, sandbox: Sandbox) -> bool:
        expected = sandbox.record.traffic_token
        if expected is None:
            return True
        token = _header(scope, b"e2b-traffic-access-token")
        return token is not None and hmac.compare_digest(token.encode(), expected.encode())

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, sandbox_id: str | None, port_raw: str | None
    ) -> None:
        port = int(port_raw) if port_raw and port_raw.isdigit() and 0 < int(port_raw) < 65536 else -1
        sandbox = await self._live(sandbox_id) if sandbox_id else None
        if sandbox is None or port in (-1, ENVD_PORT) or self.draining or not self._traffic_ok(scope, sandbox):
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        await proxy_websocket(self.manager, scope, receive, send, sandbox, port, self.proxy.host_for(sandbox, port))
