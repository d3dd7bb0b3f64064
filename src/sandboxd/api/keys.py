"""API keys and teams, in E2B's shapes: `GET /api-keys` (the caller's team's keys; the operator's: every team's),
`POST /api-keys` (a key for the operator's team) and `POST /admin/teams/{team}/api-keys` (a key for any team,
which is made by its first key), `DELETE /api-keys/{id}` and `DELETE /admin/teams/{team}/api-keys/{id}`, `GET
/teams`; a team's limits, `GET|PUT|DELETE /admin/teams/{team}/limits` (core/quotas.py). Making and revoking keys
and setting limits need the server's own key (api/app.py's ADMIN_ONLY); the keys themselves are core/teams.py's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api.tenancy import caller_of
from sandboxd.core.limits import RequestLimits
from sandboxd.core.quotas import MAX_VALUE, TeamQuotas
from sandboxd.core.teams import MAX_KEY_NAME, Teams, check_team


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="key", max_length=MAX_KEY_NAME)


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    max_sandboxes: StrictInt | None = Field(default=None, alias="maxSandboxes", ge=0, le=MAX_VALUE)
    creates_per_minute: StrictInt | None = Field(default=None, alias="createsPerMinute", ge=0, le=MAX_VALUE)


def key_routes(
    teams: Teams, quotas: TeamQuotas, limits: RequestLimits, read: Callable[..., Awaitable[Any]]
) -> list[Route]:
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

    async def team_limits(request: Request) -> Response:
        team = request.path_params["team"]
        if request.method == "PUT":
            b: LimitsBody = await read(request, LimitsBody, limits)
            quotas.set_limits(team, b.model_dump(by_alias=True, exclude_none=True))
        elif request.method == "DELETE":
            quotas.reset(team)
        current, own = quotas.limits(team)
        return JSONResponse({"teamID": team, **asdict(current), "custom": own})

    return [
        Route("/admin/teams/{team:str}/limits", team_limits, methods=["GET", "PUT", "DELETE"]),
        Route("/api-keys", list_keys, methods=["GET"]),
        Route("/api-keys", create, methods=["POST"]),
        Route("/api-keys/{key_id:str}", revoke, methods=["DELETE"]),
        Route("/admin/teams/{team:str}/api-keys", create_for_team, methods=["POST"]),
        Route("/admin/teams/{team:str}/api-keys/{key_id:str}", revoke, methods=["DELETE"]),
        Route("/teams", list_teams, methods=["GET"]),
    ]
