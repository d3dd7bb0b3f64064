"""E2B's snapshot API: take a snapshot of a sandbox (with its memory, or of its files), list snapshots
(deleting one is `DELETE /templates/{id}`: a snapshot is a template), fork a sandbox. The snapshots themselves
are core/snapshots.py's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api import serialize
from sandboxd.api.models import ForkRequest, SnapshotRequest
from sandboxd.core import snapshots
from sandboxd.core.errors import BadRequest, SandboxdError
from sandboxd.core.limits import RequestLimits
from sandboxd.core.manager import SandboxManager

MAX_PAGE = 100


def snapshot_routes(manager: SandboxManager, limits: RequestLimits, read: Callable[..., Awaitable[Any]]) -> list[Route]:
    async def create(request: Request) -> Response:
        b: SnapshotRequest = await read(request, SnapshotRequest, limits, required=False)
        body = await snapshots.create(manager, request.path_params["sandbox_id"], b.name, b.memory)
        return JSONResponse(body, status_code=201)

    async def fork(request: Request) -> Response:
        b: ForkRequest = await read(request, ForkRequest, limits, required=False)
        made = await snapshots.fork(manager, request.path_params["sandbox_id"], b.count, b.timeout)
        return JSONResponse(
            [
                {"error": {"code": m.status, "message": str(m)}}
                if isinstance(m, SandboxdError)
                else {"sandbox": serialize.sandbox_created(m)}
                for m in made
            ],
            status_code=201,
        )

    async def list_snapshots(request: Request) -> Response:
        q = request.query_params
        try:
            limit = min(MAX_PAGE, max(1, int(q.get("limit", MAX_PAGE))))
            start = int(q.get("nextToken") or 0)
        except ValueError:
            raise BadRequest("limit and nextToken must be whole numbers") from None
        found = snapshots.listed(manager, q.get("sandboxID"), q.get("name"))
        page = found[start : start + limit]
        headers = {"X-Next-Token": str(start + limit)} if start + limit < len(found) else {}
        return JSONResponse(page, headers=headers)

    return [
        Route("/sandboxes/{sandbox_id:str}/snapshots", create, methods=["POST"]),
        Route("/sandboxes/{sandbox_id:str}/fork", fork, methods=["POST"]),
        Route("/snapshots", list_snapshots, methods=["GET"]),
    ]
