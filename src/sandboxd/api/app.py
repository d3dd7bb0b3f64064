"""Control-plane routes: E2B's REST API as the official SDKs call it. Each handler validates, calls the
manager, serializes."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sandboxd.api import openapi, serialize, tenancy
from sandboxd.api.changes import change_routes
from sandboxd.api.keys import key_routes
from sandboxd.api.logs import log_routes
from sandboxd.api.models import ConnectBody, NetworkUpdate, NewSandbox, PauseBody, TimeoutBody
from sandboxd.api.pools import pool_routes
from sandboxd.api.secrets import secret_routes
from sandboxd.api.snapshots import snapshot_routes
from sandboxd.api.templates import UPLOAD_PREFIX, template_routes
from sandboxd.api.tenancy import CALLER, caller_of
from sandboxd.api.volumes import CONTENT_PREFIX, volume_routes
from sandboxd.core.builds import TemplateBuilds
from sandboxd.core.errors import BadRequest, NotFound, PayloadTooLarge, SandboxdError
from sandboxd.core.limits import BadJSON, LimitExceeded, RequestLimits, load_bounded_json
from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.core.quotas import TeamLimitReached, TeamQuotas
from sandboxd.core.teams import Caller, Teams
from sandboxd.telemetry.prometheus import CONTENT_TYPE, Exporter

MAX_LIMIT = 100
# Without X-API-KEY: the health check, and what relying parties need to verify workload identity tokens.
PUBLIC_PATHS = frozenset({"/health", "/.well-known/jwks.json", "/.well-known/openid-configuration", "/openapi.json"})
# Prometheus' scrapes: the API key as X-API-KEY, or as a bearer token (what Prometheus' `authorization` sends)
METRICS_PATH = "/metrics"


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it goes over `limit` bytes: never read whole first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client went away before sending the whole request body") from None
    return b"".join(chunks)


async def _body(request: Request, model: type[BaseModel], limits: RequestLimits, required: bool = True) -> Any:
    raw = await _read_capped(request, limits.max_body_bytes)
    if not raw.strip():
        if required:
            raise BadRequest("request body is required (JSON)")
        raw = b"{}"
    try:
        data = load_bounded_json(raw, limits.max_json_depth)
    except BadJSON as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except LimitExceeded as e:
        raise BadRequest(f"request body refused: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise BadRequest(f"invalid request body: {problems}") from None


# Routes only the operator's key (the server's own) may call: every team's figures and the server's settings.
ADMIN_ONLY: tuple[tuple[str, frozenset[str] | None], ...] = (
    (METRICS_PATH, None),
    ("/secrets", None),
    ("/admin/", None),
    ("/pools/", frozenset({"PUT", "DELETE"})),
    ("/api-keys", frozenset({"POST", "PATCH", "DELETE"})),
)
# The dashboard's page and bundle hold no data (the key is typed into the page); its terminal's WebSocket checks
# the key the page sends (dashboard/terminal.py)
DASHBOARD_PREFIX = "/dashboard"
SANDBOX_PATH = re.compile(r"^/(?:v2/)?sandboxes/([^/]+)")


class ApiKeyAuth:
    """`X-API-KEY` on every control-plane route except `/health`, the public keys of workload identity,
    template file uploads (their URLs are signed: api/templates.py) and the volume content API (each
    volume's own bearer token: api/volumes.py). The key says who calls (core/teams.py): a team's key is refused
    the operator's routes (403) and does not see another team's sandboxes (404, as if there were none)."""

    def __init__(self, app: ASGIApp, teams: Teams, manager: SandboxManager) -> None:
        self.app = app
        self.teams = teams
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path not in PUBLIC_PATHS
            and not path.startswith(UPLOAD_PREFIX)
            and not path.startswith(CONTENT_PREFIX)
            and not (path == DASHBOARD_PREFIX or path.startswith(DASHBOARD_PREFIX + "/"))
        ):
            given = next((v for k, v in scope["headers"] if k == b"x-api-key"), None)
            if given is None and path == METRICS_PATH:
                bearer = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
                given = bearer[7:] if bearer[:7].lower() == b"bearer " else None
            if given is None:
                hint = " (or, for /metrics, as Authorization: Bearer)" if path == METRICS_PATH else ""
                await error(401, f"missing API key: send it in the X-API-KEY header{hint}")(scope, receive, send)
                return
            caller = self.teams.caller(given)
            if caller is None:
                await error(401, "invalid API key")(scope, receive, send)
                return
            refused = None if caller.admin else self._refused(caller, path, scope["method"])
            if refused is not None:
                await refused(scope, receive, send)
                return
            scope[CALLER] = caller
        await self.app(scope, receive, send)

    def _refused(self, caller: Caller, path: str, method: str) -> Response | None:
        for prefix, methods in ADMIN_ONLY:
            if path.startswith(prefix) and (methods is None or method in methods):
                return error(
                    403,
                    f"{method} {path[:200]} needs the server's own API key (`sandboxd api-key` on the server): "
                    f"this key is team '{caller.team}''s",
                )
        m = SANDBOX_PATH.match(path)
        if m and not (path == "/sandboxes/metrics" and method == "GET"):
            sandbox_id = m.group(1)
            team = self.manager.team_of(sandbox_id)
            if team is not None and not caller.sees(team):
                return error(404, f"sandbox '{sandbox_id[:80]}' not found")
        return None


def _parse_metadata_filter(raw: str) -> dict[str, str]:
    # The SDK url-encodes `k=v&k2=v2` (each key and value quoted) and the HTTP client encodes it again.
    return {unquote(k): unquote(v) for k, v in parse_qsl(raw, keep_blank_values=True)}


def _encode_token(s: Sandbox) -> str:
    return base64.urlsafe_b64encode(f"{s.record.started_at!r}|{s.id}".encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        started, _, sid = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return float(started), sid
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("nextToken is not a token this server issued") from None


MAX_METRICS_IDS = 100


def build_control_plane(
    manager: SandboxManager,
    teams: Teams,
    limits: RequestLimits,
    builds: TemplateBuilds | None = None,
    exporter: Exporter | None = None,
    extra_routes: list[BaseRoute] | None = None,
    quotas: TeamQuotas | None = None,
    enforce_quotas: bool = True,
) -> ASGIApp:
    """`quotas`: teams' limits (set through /admin/teams/{team}/limits; enforced at create unless not
    `enforce_quotas`: a cluster's nodes leave that to its API replicas)."""
    quotas = quotas or TeamQuotas(manager.db)

    async def health(request: Request) -> Response:
        return Response(status_code=204)

    schema: dict[str, Any] = {}

    async def openapi_json(request: Request) -> Response:
        """This API's OpenAPI document"""
        if not schema:
            schema.update(openapi.document(routes, PUBLIC_PATHS, frozenset({METRICS_PATH})))
        return JSONResponse(schema)

    async def prometheus(request: Request) -> Response:
        if exporter is None:
            raise NotFound("this server exports no metrics")
        return Response(exporter.exposition(), media_type=CONTENT_TYPE)

    async def create(request: Request) -> Response:
        body: NewSandbox = await _body(request, NewSandbox, limits)
        caller = caller_of(request)
        if not caller.admin:
            await manager.ensure_template(body.template_id)  # (a node of a cluster: its owner is then known here)
            tenancy.check_create(manager, teams, caller, body.template_id, body.volume_mounts)
            if enforce_quotas:
                quotas.admit(caller)
        sandbox = await manager.create(
            body.template_id,
            timeout=body.timeout,
            metadata=body.metadata,
            env_vars=body.env_vars,
            auto_pause=body.auto_pause,
            auto_pause_memory=body.auto_pause_memory,
            disk_mb=body.disk_mb,
            network=body.network,
            allow_internet_access=body.allow_internet_access,
            auto_resume=bool((body.auto_resume or {}).get("enabled")),
            iam=body.iam,
            volume_mounts=body.volume_mounts,
            team=caller.team,
        )
        request.scope["sandboxd.sandbox"] = sandbox.id  # (the access log names the sandbox it made)
        return JSONResponse(serialize.sandbox_created(sandbox), status_code=201)

    async def jwks(request: Request) -> Response:
        return JSONResponse(manager.net.identity.jwks() if manager.net.identity else {"keys": []})

    async def discovery(request: Request) -> Response:
        if manager.net.identity is None:
            return error(404, "this server issues no workload identity tokens")
        return JSONResponse(manager.net.identity.discovery())

    async def update_network(request: Request) -> Response:
        body: NetworkUpdate = await _body(request, NetworkUpdate, limits)
        await manager.update_network(request.path_params["sandbox_id"], body.as_network(), body.allow_internet_access)
        return Response(status_code=204)

    async def get_info(request: Request) -> Response:
        return JSONResponse(serialize.sandbox_detail(manager.get(request.path_params["sandbox_id"])))

    async def kill(request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        if not await manager.kill(sandbox_id):
            return error(404, f"sandbox '{sandbox_id}' not found")
        return Response(status_code=204)

    async def set_timeout(request: Request) -> Response:
        body: TimeoutBody = await _body(request, TimeoutBody, limits)
        manager.set_timeout(request.path_params["sandbox_id"], body.timeout)
        return Response(status_code=204)

    async def connect(request: Request) -> Response:
        body: ConnectBody = await _body(request, ConnectBody, limits, required=False)
        sandbox, resumed = await manager.connect(request.path_params["sandbox_id"], body.timeout, body.memory)
        return JSONResponse(serialize.sandbox_created(sandbox), status_code=201 if resumed else 200)

    async def pause(request: Request) -> Response:
        body: PauseBody = await _body(request, PauseBody, limits, required=False)
        if body.to_disk and not body.memory:
            raise BadRequest("toDisk is for a pause with memory (memory: true): a filesystem pause keeps no memory")
        await manager.pause(request.path_params["sandbox_id"], memory=body.memory, to_disk=body.to_disk)
        return Response(status_code=204)

    async def metrics_many(request: Request) -> Response:
        """The latest sample of each of the sandboxes asked for (`sandbox_ids`, comma-separated or repeated;
        unknown IDs are left out)."""
        ids = [i for raw in request.query_params.getlist("sandbox_ids") for i in raw.split(",") if i]
        if not ids:
            raise BadRequest("sandbox_ids is required (comma-separated sandbox IDs)")
        if len(ids) > MAX_METRICS_IDS:
            raise BadRequest(f"at most {MAX_METRICS_IDS} sandbox_ids, {len(ids)} given")
        out: dict[str, Any] = {}
        caller = caller_of(request)
        for sandbox_id in dict.fromkeys(ids):
            sandbox = manager.find(sandbox_id)
            if sandbox is None or not caller.sees(sandbox.record.team):
                continue
            samples = await manager.metrics.window(sandbox, None, None)
            if samples:
                out[sandbox_id] = serialize.metric(samples[-1])
        return JSONResponse({"sandboxes": out})

    async def metrics(request: Request) -> Response:
        sandbox = manager.get(request.path_params["sandbox_id"])
        bounds = []
        for name in ("start", "end"):
            raw = request.query_params.get(name)
            if raw is not None and not raw.lstrip("-").isdigit():
                raise BadRequest(f"{name} must be a unix timestamp in seconds, got {raw!r}")
            bounds.append(int(raw) if raw is not None else None)
        start, end = bounds
        if start is not None and end is not None and start > end:
            raise BadRequest(f"start ({start}) is after end ({end})")
        # `end` is a whole second: a sample taken within it belongs to the window
        samples = await manager.metrics.window(sandbox, start, end + 1 if end is not None else None)
        return JSONResponse([serialize.metric(s) for s in samples])

    def _filtered(request: Request, default_states: set[str]) -> list[Sandbox]:
        q = request.query_params
        states = _states(q, default_states) - {"killed"}
        meta = _parse_metadata_filter(q["metadata"]) if q.get("metadata") else {}
        template = q.get("template")
        after = None
        if q.get("startedAfter"):
            try:
                after = datetime.fromisoformat(q["startedAfter"].replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise BadRequest(f"startedAfter must be an RFC 3339 time, got {q['startedAfter']!r}") from None
        result = []
        caller = caller_of(request)
        for s in manager.sandboxes.values():
            r = s.record
            if r.state not in states or not caller.sees(r.team):
                continue
            if template and template not in (r.template_id, r.alias):
                continue
            if after is not None and r.started_at < after:
                continue
            if any(r.metadata.get(k) != v for k, v in meta.items()):
                continue
            result.append(s)
        return result

    def _states(q: Any, default_states: set[str]) -> set[str]:
        states = {s for part in q.getlist("state") for s in part.split(",") if s} or default_states
        bad = states - {"running", "paused", "killed"}
        if bad:
            raise BadRequest(f"unknown state(s) {sorted(bad)}: use running, paused and/or killed")
        return states

    def _ended(request: Request) -> list[dict[str, Any]]:
        """Ended sandboxes (state=killed, sandboxd's own), filtered as the live ones are."""
        q = request.query_params
        if "killed" not in _states(q, {"running", "paused"}):
            return []
        meta = _parse_metadata_filter(q["metadata"]) if q.get("metadata") else {}
        template = q.get("template")
        caller = caller_of(request)
        return [
            serialize.ended_sandbox(e)
            for e in manager.ended()
            if caller.sees(e.get("team"))
            and (not template or template in (e["templateID"], e.get("alias")))
            and all(e.get("metadata", {}).get(k) == v for k, v in meta.items())
        ]

    async def list_v2(request: Request) -> Response:
        q = request.query_params
        order = q.get("order", "desc").lower()
        if order not in ("asc", "desc"):
            raise BadRequest(f"order must be 'asc' or 'desc', got {order!r}")
        try:
            limit = int(q.get("limit", MAX_LIMIT))
        except ValueError:
            raise BadRequest(f"limit must be a whole number, got {q.get('limit')!r}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        items = _filtered(request, {"running", "paused"})
        reverse = order == "desc"
        items.sort(key=lambda s: (s.record.started_at, s.id), reverse=reverse)
        if q.get("nextToken"):
            cursor = _decode_token(q["nextToken"])
            items = [
                s
                for s in items
                if ((s.record.started_at, s.id) < cursor if reverse else (s.record.started_at, s.id) > cursor)
            ]
        page = items[:limit]
        caller = caller_of(request)
        running = sum(
            1 for s in manager.sandboxes.values() if s.record.state == "running" and caller.sees(s.record.team)
        )
        headers = {"X-Total-Running": str(running)}
        if len(items) > limit:
            headers["X-Next-Token"] = _encode_token(page[-1])
            return JSONResponse([serialize.listed_sandbox(s) for s in page], headers=headers)
        # the live ones first (paginated), then the ended ones asked for (state=killed), newest first
        ended = _ended(request)[: limit - len(page)]
        return JSONResponse([*(serialize.listed_sandbox(s) for s in page), *ended], headers=headers)

    async def list_v1(request: Request) -> Response:
        items = _filtered(request, {"running"})
        items.sort(key=lambda s: (s.record.started_at, s.id), reverse=True)
        return JSONResponse([serialize.listed_sandbox(s) for s in items])

    async def on_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SandboxdError)
        if isinstance(exc, PayloadTooLarge):
            # answered before the body was read to its end: the connection cannot carry another request
            return error(exc.status, str(exc), headers={"Connection": "close"})
        if isinstance(exc, TeamLimitReached):
            return error(exc.status, str(exc), headers={"Retry-After": str(exc.retry_after)})
        return error(exc.status, str(exc))

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no such endpoint: {request.method} {request.url.path}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, f"method {request.method} is not allowed on {request.url.path}")

    sid = "/{sandbox_id:str}"
    routes = [
        Route("/health", health, methods=["GET"]),
        Route(METRICS_PATH, prometheus, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/sandboxes", create, methods=["POST"]),
        Route("/v2/sandboxes", create, methods=["POST"]),
        Route("/sandboxes", list_v1, methods=["GET"]),
        Route("/v2/sandboxes", list_v2, methods=["GET"]),
        Route("/sandboxes/metrics", metrics_many, methods=["GET"]),
        Route("/sandboxes" + sid, get_info, methods=["GET"]),
        Route("/sandboxes" + sid, kill, methods=["DELETE"]),
        Route("/sandboxes" + sid + "/timeout", set_timeout, methods=["POST"]),
        Route("/sandboxes" + sid + "/connect", connect, methods=["POST"]),
        Route("/v2/sandboxes" + sid + "/connect", connect, methods=["POST"]),
        Route("/sandboxes" + sid + "/resume", connect, methods=["POST"]),
        Route("/sandboxes" + sid + "/pause", pause, methods=["POST"]),
        Route("/sandboxes" + sid + "/metrics", metrics, methods=["GET"]),
        Route("/sandboxes" + sid + "/network", update_network, methods=["PUT"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
        Route("/.well-known/openid-configuration", discovery, methods=["GET"]),
        *secret_routes(manager.net.secrets, limits, _body),
        *snapshot_routes(manager, teams, limits, _body),
        *change_routes(manager),
        *volume_routes(manager, teams, limits, _body),
        *pool_routes(manager, limits, _body),
        *log_routes(manager),
        *key_routes(teams, quotas, limits, _body),
        *(template_routes(builds, teams, limits, _body) if builds is not None else []),
        *(extra_routes or []),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={SandboxdError: on_error, 404: not_found, 405: method_not_allowed},
    )
    return ApiKeyAuth(app, teams, manager)
