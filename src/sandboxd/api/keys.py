"""API keys and teams, in E2B's shapes: `GET /api-keys` (the caller's team's keys; the operator's: every team's),
`POST /api-keys` (a key for the operator's team) and `POST /admin/teams/{team}/api-keys` (a key for any team,
which is made by its first key), `DELETE /api-keys/{id}` and `DELETE /admin/teams/{team}/api-keys/{id}`, `GET
/teams`. Making and revoking keys needs the server's own key (api/app.py's ADMIN_ONLY); the keys themselves
are core/teams.py's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api.tenancy import caller_of
from sandboxd.core.limits import RequestLimits
from sandboxd.core.teams import MAX_KEY_NAME, Teams, check_team


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="key", max_length=MAX_KEY_NAME)


def key_routes(teams: Teams, limits: RequestLimits, read: Callable[..., Awaitable[Any]]) -> list[Route]:
    async def list_keys(request: Request) -> Response:
        caller = caller_of(request)
        team = request.query_params.get("team") if caller.admin else caller.team
        return JSONResponse(teams.keys(check_team(team) if team else None))

    async def create(request: Request) -> Response:
        b: NewKey = await read(request, NewKey, limits, required=False)
        return JSONResponse(teams.create_key(caller_of(request).team, b.name), status_code=201)

    async def create_for_team(request: Request) -> Response:
        b: NewKey = await read(request, NewKey, limits, required=False)
        return JSONResponse(teams.create_key(check_team(request.path_params["team"]), b.name), status_code=201)

    async def revoke(request: Request) -> Response:
        teams.revoke(request.path_params["key_id"], request.path_params.get("team"))
        return Response(status_code=204)

    async def list_teams(request: Request) -> Response:
        caller = caller_of(request)
        names = teams.teams() if caller.admin else [caller.team]
        return JSONResponse([{"teamID": t, "name": t, "isDefault": t == caller.team} for t in names])

    return [
        Route("/api-keys", list_keys, methods=["GET"]),
        Route("/api-keys", create, methods=["POST"]),
        Route("/api-keys/{key_id:str}", revoke, methods=["DELETE"]),
        Route("/admin/teams/{team:str}/api-keys", create_for_team, methods=["POST"]),
        Route("/admin/teams/{team:str}/api-keys/{key_id:str}", revoke, methods=["DELETE"]),
        Route("/teams", list_teams, methods=["GET"]),
    ]
