"""The warm pools, beyond E2B (extension endpoints): `GET /pools` (each template's pool: its limits, target, idle
sandboxes, hits and misses), `GET /pools/{template}`, `PUT /pools/{template}` `{"min": N, "max": M}` (kept across
restarts; the pool fills at once), `DELETE /pools/{template}` (the server's defaults again). The pools and their
autoscaler are core/pool.py's and core/autoscaler.py's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api.models import PoolLimitsBody
from sandboxd.core.errors import NotFound
from sandboxd.core.limits import RequestLimits
from sandboxd.core.manager import SandboxManager
from sandboxd.core.pool import PoolLimits
from sandboxd.templates.store import TemplateError


def pool_body(manager: SandboxManager, name: str) -> dict[str, Any]:
    pool = manager.pool
    limits = pool.limits_of(name)
    return {
        "templateID": name,
        "min": limits.min,
        "max": limits.max,
        "custom": name in pool.limits,  # (else the server's --pool-size / --pool-max)
        "target": pool.target_of(name),
        "idle": pool.idle().get(name, 0),
        "hits": pool.hits[name],
        "misses": pool.misses[name],
    }


def pool_routes(manager: SandboxManager, limits: RequestLimits, read: Callable[..., Awaitable[Any]]) -> list[Route]:
    def template(request: Request) -> str:
        name = request.path_params["template"]
        try:
            return manager.templates.get(name).name
        except TemplateError as e:
            raise NotFound(str(e)) from None

    async def list_pools(request: Request) -> Response:
        pool = manager.pool
        names = sorted(set(pool.targets) | set(pool.limits) | set(pool.idle()))
        return JSONResponse([pool_body(manager, n) for n in names])

    async def get_pool(request: Request) -> Response:
        return JSONResponse(pool_body(manager, template(request)))

    async def set_pool(request: Request) -> Response:
        name = template(request)
        b: PoolLimitsBody = await read(request, PoolLimitsBody, limits)
        manager.set_pool_limits(name, PoolLimits(b.min, b.max))
        return JSONResponse(pool_body(manager, name))

    async def reset_pool(request: Request) -> Response:
        name = template(request)
        manager.set_pool_limits(name, None)
        return JSONResponse(pool_body(manager, name))

    return [
        Route("/pools", list_pools, methods=["GET"]),
        Route("/pools/{template:str}", get_pool, methods=["GET"]),
        Route("/pools/{template:str}", set_pool, methods=["PUT"]),
        Route("/pools/{template:str}", reset_pool, methods=["DELETE"]),
    ]
