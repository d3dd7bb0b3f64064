"""Signed `/files` URLs through an API replica. The SDKs sign a file's URL with the sandbox's envd token and put no
sandbox ID in it (`sandbox.download_url(path)`, `upload_url(path)`): a replica asks its nodes which of their
sandboxes a signature belongs to (each node checks it against its own sandboxes' tokens, which never leave it),
remembers the answer, and sends the request there.

A node's side is `GET /admin/cluster/signed?<the URL's query>&method=GET|POST` (the operator's key; the cluster's
token when there is one): `{"sandboxID": ...}`, or 404 when none of its sandboxes made it.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sandboxd.core.errors import NotFound
from sandboxd.core.manager import SandboxManager
from sandboxd.envd.files_http import operation_of, signature_matches

PATH = "/admin/cluster/signed"
MAX_QUERY = 8192


def signature_routes(manager: SandboxManager) -> list[BaseRoute]:
    async def signed(request: Request) -> Response:
        raw = request.scope.get("query_string", b"")[:MAX_QUERY].decode("latin-1")
        query = dict(parse_qsl(raw, keep_blank_values=True))
        operation = operation_of(query.pop("method", "GET"))
        if query.get("signature"):
            for sandbox in list(manager.sandboxes.values()):
                if signature_matches(query, operation, sandbox.record.envd_token):
                    return JSONResponse({"sandboxID": sandbox.id})
        raise NotFound("no sandbox of this node signed that URL")

    return [Route(PATH, signed, methods=["GET"])]
