"""envd's HTTP surface for one request already routed to a sandbox: Connect services + plain endpoints."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxd.core.limits import RequestLimits
from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.envd import context
from sandboxd.envd.codec import envd_codecs
from sandboxd.envd.files_http import FilesEndpoint
from sandboxd.envd.filesystem_service import FilesystemService
from sandboxd.envd.gen.filesystem.filesystem_connect import FilesystemASGIApplication
from sandboxd.envd.gen.process.process_connect import ProcessASGIApplication
from sandboxd.envd.process_service import ProcessService

# Long-lived streams with caps of their own (process_streams, watchers): not counted as requests.
CAPPED_STREAMS = frozenset({"/process.Process/Start", "/process.Process/Connect", "/filesystem.Filesystem/WatchDir"})
# Never refused: a tenant at its cap can always stop the processes that hold its requests.
UNCOUNTED = CAPPED_STREAMS | {"/process.Process/SendSignal", "/health"}


class SandboxGone(Exception):
    """Raised instead of a stream's last message when its sandbox was killed meanwhile: the connection is
    cut, as when envd disappears with its sandbox, so the SDKs probe the sandbox and report it killed
    ("killed or reached its end of life") rather than pass on an error text of ours."""


def abort_if_killed(sandbox: Sandbox, send: Send) -> Send:
    async def checked(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False) and sandbox.killed.is_set():
            raise SandboxGone(f"sandbox {sandbox.id} was killed: connection cut")
        await send(message)

    return checked


async def too_many_requests(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    """`resource_exhausted` in the form the caller speaks: a Connect end-of-stream message for Connect
    streams, a Connect error (HTTP 429) for unary Connect calls, a 429 JSON body for plain HTTP."""
    content_type = ""
    for k, v in scope["headers"]:
        if k == b"content-type":
            content_type = v.decode("latin-1").lower()
    path: str = scope["path"]
    connect = path.startswith(("/process.Process/", "/filesystem.Filesystem/"))
    if connect and content_type.startswith("application/connect+"):
        body = json.dumps({"error": {"code": "resource_exhausted", "message": message}}).encode()
        payload = struct.pack(">BI", 2, len(body)) + body
        await Response(payload, status_code=200, media_type=content_type)(scope, receive, send)
    elif connect:
        await JSONResponse({"code": "resource_exhausted", "message": message}, status_code=429)(scope, receive, send)
    else:
        await JSONResponse({"code": 429, "message": message}, status_code=429)(scope, receive, send)


def build_envd_app(manager: SandboxManager, limits: RequestLimits) -> ASGIApp:
    # Every message is bounded in size (after decompression) and JSON depth before protobuf reads it.
    bounds = {"read_max_bytes": limits.max_message_bytes, "codecs": envd_codecs(limits)}
    process_app = ProcessASGIApplication(ProcessService(manager), **bounds)  # type: ignore[arg-type]
    filesystem_app = FilesystemASGIApplication(FilesystemService(manager), **bounds)  # type: ignore[arg-type]
    files = FilesEndpoint(manager)
    cap = manager.settings.tenant.concurrent_requests

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in UNCOUNTED:
            if scope["path"] not in CAPPED_STREAMS:
                await dispatch(scope, receive, send)
                return
            callbacks: list[Callable[[], None]] = []

            async def watched_receive() -> Message:
                message = await receive()
                if message["type"] == "http.disconnect":
                    for callback in list(callbacks):
                        callback()
                return message

            token = context.client_gone.set(callbacks)
            try:
                await dispatch(scope, watched_receive, abort_if_killed(context.sandbox(), send))
            finally:
                context.client_gone.reset(token)
            return
        # Requests in flight for this sandbox: one tenant's flood is refused, nobody else's requests.
        ext = context.sandbox().ext
        in_flight = ext.get("requests_in_flight", 0)
        if in_flight >= cap:
            message = (
                f"this sandbox already has {in_flight} envd requests in flight, the limit (concurrent_requests, "
                f"`sandboxd serve --max-concurrent-requests`) is {cap}: wait for some to finish and retry"
            )
            await too_many_requests(scope, receive, send, message)
            return
        ext["requests_in_flight"] = in_flight + 1
        try:
            await dispatch(scope, receive, send)
        finally:
            ext["requests_in_flight"] -= 1

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/process.Process/"):
            await process_app(scope, receive, send)
        elif path.startswith("/filesystem.Filesystem/"):
            await filesystem_app(scope, receive, send)
        elif path == "/files":
            await files(scope, receive, send, context.sandbox())
        elif path == "/health":
            await Response(status_code=204)(scope, receive, send)
        elif path == "/envs" and scope["method"] == "GET":
            await JSONResponse(dict(context.sandbox().record.env_vars))(scope, receive, send)
        else:
            await JSONResponse(
                {"code": 404, "message": f"envd has no endpoint {scope['method']} {path}"}, status_code=404
            )(scope, receive, send)

    return app
