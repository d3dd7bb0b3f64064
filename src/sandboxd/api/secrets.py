"""E2B's /secrets API (the SDK's `Secret`): create, update (a new version), get, list, destroy. Values go
in and never come out; the egress proxy uses them for `${e2b.secrets.NAME}` in network rules."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api.models import NewSecret, SecretUpdate
from sandboxd.api.serialize import rfc3339
from sandboxd.core.errors import BadRequest, NotFound
from sandboxd.core.limits import RequestLimits
from sandboxd.core.secrets import SecretInfo, Secrets

MAX_LIMIT = 100


def _shape(s: SecretInfo) -> dict:
    return {
        "secretID": s.secret_id,
        "name": s.name,
        "currentVersion": s.version,
        "metadata": s.metadata,
        "createdAt": rfc3339(s.created_at),
        "updatedAt": rfc3339(s.updated_at),
    }


def secret_routes(secrets: Secrets, limits: RequestLimits, read: Callable[..., Awaitable[Any]]) -> list[Route]:
    """`read(request, model, limits)` reads and checks a request body (api/app.py's `_body`)."""

    async def create(request: Request) -> Response:
        b: NewSecret = await read(request, NewSecret, limits)
        return JSONResponse(_shape(secrets.create(b.name, b.value, b.metadata)), status_code=201)

    async def update(request: Request) -> Response:
        b: SecretUpdate = await read(request, SecretUpdate, limits)
        return JSONResponse(_shape(secrets.update(request.path_params["secret"], b.value, b.metadata)))

    async def get(request: Request) -> Response:
        return JSONResponse(_shape(secrets.get(request.path_params["secret"])))

    async def destroy(request: Request) -> Response:
        if not secrets.destroy(request.path_params["secret"]):
            raise NotFound(f"secret '{request.path_params['secret']}' not found")
        return Response(status_code=204)

    async def list_(request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", MAX_LIMIT))
            start = int(base64.urlsafe_b64decode(q["nextToken"]).decode()) if q.get("nextToken") else 0
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise BadRequest("limit must be a whole number, and nextToken one this server issued") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        items = secrets.list()
        page = items[start : start + limit]
        headers = {}
        if start + limit < len(items):
            headers["X-Next-Token"] = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
        return JSONResponse([_shape(s) for s in page], headers=headers)

    return [
        Route("/secrets", create, methods=["POST"]),
        Route("/secrets", list_, methods=["GET"]),
        Route("/secrets/{secret:str}", get, methods=["GET"]),
        Route("/secrets/{secret:str}", update, methods=["POST"]),
        Route("/secrets/{secret:str}", destroy, methods=["DELETE"]),
    ]
