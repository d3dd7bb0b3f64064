"""envd's HTTP surface for one request already routed to a sandbox: Connect services + plain endpoints."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from sandboxd.core.limits import RequestLimits
from sandboxd.core.manager import SandboxManager
from sandboxd.envd import context
from sandboxd.envd.codec import envd_codecs
from sandboxd.envd.files_http import FilesEndpoint
from sandboxd.envd.filesystem_service import FilesystemService
from sandboxd.envd.gen.filesystem.filesystem_connect import FilesystemASGIApplication
from sandboxd.envd.gen.process.process_connect import ProcessASGIApplication
from sandboxd.envd.process_service import ProcessService


def build_envd_app(manager: SandboxManager, limits: RequestLimits) -> ASGIApp:
    # Every message is bounded in size (after decompression) and JSON depth before protobuf reads it.
    bounds = {"read_max_bytes": limits.max_message_bytes, "codecs": envd_codecs(limits)}
    process_app = ProcessASGIApplication(ProcessService(manager), **bounds)  # type: ignore[arg-type]
    filesystem_app = FilesystemASGIApplication(FilesystemService(manager), **bounds)  # type: ignore[arg-type]
    files = FilesEndpoint(manager)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
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
