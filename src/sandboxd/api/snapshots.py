"""E2B's snapshot API: take a snapshot of a sandbox (with its memory, or of its files), list snapshots
(deleting one is `DELETE /templates/{id}`: a snapshot is a template), fork a sandbox. The snapshots themselves
are core/snapshots.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api import serialize, tenancy
from sandboxd.api.models import ForkRequest, SnapshotRequest
from sandboxd.api.tenancy import TEMPLATE, caller_of
from sandboxd.core import snapshots
from sandboxd.core.errors import BadRequest, Forbidden, SandboxdError
from sandboxd.core.limits import RequestLimits
from sandboxd.core.manager import SandboxManager
from sandboxd.core.teams import Teams
from sandboxd.templates.store import new_template_id

MAX_PAGE = 100


def snapshot_routes(
    manager: SandboxManager, teams: Teams, limits: RequestLimits, read: Callable[..., Awaitable[Any]]
) -> list[Route]:
    async def create(request: Request) -> Response:
        b: SnapshotRequest = await read(request, SnapshotRequest, limits, required=False)
        sandbox_id = request.path_params["sandbox_id"]
        caller = caller_of(request)
        if b.name:  # (a cluster's: a snapshot of that name on another node is fetched first, and checked as here)
            await manager.ensure_template(b.name)
        existing = manager.templates.resolve(b.name)[0] if b.name else None
        if existing is not None and existing not in manager.templates.names():
            existing = None  # (a name claimed here, never built)
        catalog = manager.catalog
        if existing is None and b.name and catalog is not None:  # (named in the cluster: maybe being taken elsewhere)
            existing = await asyncio.to_thread(catalog.known, b.name)
        if existing is not None:  # (a new version of it)
            if not tenancy.visible_template(manager, teams, caller, existing):
                raise Forbidden(f"snapshot name '{b.name}' is another team's: choose another name")
            teams.may_change(caller, TEMPLATE, existing, "snapshotted over")
        sandbox = manager.find(sandbox_id)  # (the snapshot is the sandbox's team's)
        team = sandbox.record.team if sandbox else caller.team
        if b.name and existing is None and catalog is not None:  # (a new name: named and owned before it is written)
            ident = await asyncio.to_thread(catalog.name, b.name, new_template_id())
            if not caller.sees(await asyncio.to_thread(teams.claim_owner, TEMPLATE, ident, team)):
                raise Forbidden(f"snapshot name '{b.name}' was just taken by another team: choose another name")
        body = await snapshots.create(manager, sandbox_id, b.name, b.memory)
        teams.set_owner(TEMPLATE, body["snapshotID"], team)
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
        caller = caller_of(request)
        found = [
            s
            for s in snapshots.listed(manager, q.get("sandboxID"), q.get("name"))
            if caller.sees(teams.owner(TEMPLATE, s["snapshotID"]))
        ]
        page = found[start : start + limit]
        headers = {"X-Next-Token": str(start + limit)} if start + limit < len(found) else {}
        return JSONResponse(page, headers=headers)

    return [
        Route("/sandboxes/{sandbox_id:str}/snapshots", create, methods=["POST"]),
        Route("/sandboxes/{sandbox_id:str}/fork", fork, methods=["POST"]),
        Route("/snapshots", list_snapshots, methods=["GET"]),
    ]
