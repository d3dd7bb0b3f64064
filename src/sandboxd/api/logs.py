"""E2B's sandbox logs: `GET /sandboxes/{id}/logs?start=&limit=` (v1: `logs` as lines and `logEntries`) and
`GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=` (`logs`: entries). `start` and `cursor`
are Unix times in milliseconds; v2 reads forward from its cursor (default: the first entry) or backward
(default: now). The logs themselves are core/sandbox_logs.py's; a sandbox that ended keeps its log a while."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api.serialize import rfc3339
from sandboxd.core.errors import BadRequest, NotFound
from sandboxd.core.manager import SandboxManager
from sandboxd.core.sandbox_logs import LEVELS, LogEntry

MAX_LIMIT = 1000
MAX_SEARCH = 256


def _entry(e: LogEntry) -> dict[str, Any]:
    return {"timestamp": rfc3339(e.timestamp), "level": e.level, "message": e.message, "fields": e.fields}


def _int(q: Any, name: str, default: int | None) -> int | None:
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number") from None
    if value < 0:
        raise BadRequest(f"{name} must be >= 0")
    return value


def log_routes(manager: SandboxManager) -> list[Route]:
    def sandbox_id(request: Request) -> str:
        ident = request.path_params["sandbox_id"]
        if manager.find(ident) is None and not manager.logs.known(ident):
            raise NotFound(manager.gone_message(ident))
        return str(ident)

    async def logs_v1(request: Request) -> Response:
        ident, q = sandbox_id(request), request.query_params
        start, limit = _int(q, "start", None), min(MAX_LIMIT, _int(q, "limit", MAX_LIMIT) or 0)
        found = manager.logs.entries(ident, None if start is None else start / 1000, limit)
        return JSONResponse(
            {
                "logs": [{"timestamp": rfc3339(e.timestamp), "line": e.message} for e in found],
                "logEntries": [_entry(e) for e in found],
            }
        )

    async def logs_v2(request: Request) -> Response:
        ident, q = sandbox_id(request), request.query_params
        direction, level, search = q.get("direction", "forward"), q.get("level"), q.get("search")
        if direction not in ("forward", "backward"):
            raise BadRequest("direction must be forward or backward")
        if level is not None and level not in LEVELS:
            raise BadRequest(f"level must be one of {', '.join(LEVELS)}")
        if search is not None and len(search) > MAX_SEARCH:
            raise BadRequest(f"search is at most {MAX_SEARCH} characters")
        cursor, limit = _int(q, "cursor", None), min(MAX_LIMIT, _int(q, "limit", MAX_LIMIT) or 0)
        forward = direction == "forward"
        at = cursor / 1000 if cursor is not None else (None if forward else time.time())
        found = manager.logs.entries(ident, at, limit, forward, level, search)
        return JSONResponse({"logs": [_entry(e) for e in found]})

    return [
        Route("/sandboxes/{sandbox_id:str}/logs", logs_v1, methods=["GET"]),
        Route("/v2/sandboxes/{sandbox_id:str}/logs", logs_v2, methods=["GET"]),
    ]
