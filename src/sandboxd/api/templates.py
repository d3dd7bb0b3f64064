"""E2B's template API, as the official SDKs' `Template` calls it: request a build, upload COPY files by
hash, start the build, poll its status and logs; names, tags, listing and deletion. The builds
themselves are core/builds.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandboxd.api.models import BuildStart, TagAssign, TagRemove, TemplateRequest
from sandboxd.api.serialize import rfc3339
from sandboxd.api.tenancy import TEMPLATE, caller_of, sees_template
from sandboxd.core.builds import TAG_RE, TemplateBuilds
from sandboxd.core.errors import BadRequest, Forbidden, NotFound
from sandboxd.core.limits import RequestLimits
from sandboxd.core.teams import Teams
from sandboxd.templates.recipe import HASH_RE, RecipeError, parse_recipe
from sandboxd.templates.store import TemplateError

UPLOAD_PREFIX = "/template-files/"  # PUT without X-API-KEY: a signed URL (the SDK sends no key there)
MAX_LOG_PAGE = 1000


def _empty(status: int) -> Response:
    return Response(status_code=status, headers={"Content-Length": "0"})


def template_routes(
    builds: TemplateBuilds, teams: Teams, limits: RequestLimits, read: Callable[..., Awaitable[Any]]
) -> list[Route]:
    """Templates are used by every team; a team changes (builds, tags, deletes) only those it made, and sees
    only its own snapshots (core/teams.py)."""
    store = builds.store

    def visible(request: Request, ident: str) -> bool:
        return sees_template(store, teams, caller_of(request), ident)

    def may_change(request: Request, ident: str, what: str) -> None:
        if not visible(request, ident):
            raise NotFound(f"template '{ident}' not found")
        teams.may_change(caller_of(request), TEMPLATE, ident, what)

    def shape(ident: str) -> dict[str, Any]:
        t = store.get(ident)
        meta = store.meta(ident)
        names = list(meta.get("names", [])) or [ident]
        return {
            "templateID": ident,
            "buildID": t.digest,
            "cpuCount": int(t.cpu_count or 1),
            "memoryMB": t.memory_mb or 512,
            "diskSizeMB": t.disk_mb or 0,
            "public": False,
            "aliases": names,
            "names": names,
            "createdAt": rfc3339(meta.get("createdAt", t.built_at)),
            "updatedAt": rfc3339(t.built_at),
            "createdBy": None,
            "lastSpawnedAt": None,
            "spawnCount": 0,
            "buildCount": 1,
            "envdVersion": "0.6.4",
            "buildStatus": "ready",
            "sizeBytes": t.size_bytes,
            "tags": sorted(store.tags(ident)),
        }

    async def request_build(request: Request) -> Response:
        b: TemplateRequest = await read(request, TemplateRequest, limits)
        name = b.name or b.alias
        if not name:
            raise BadRequest("name is required")
        await builds.manager.ensure_template(name)  # (a cluster's: held by another node, it is that template's build)
        existing, _ = store.resolve(name)
        catalog = builds.manager.catalog
        if existing is None and catalog is not None:  # (named in the cluster: its first build may be under way)
            existing = await asyncio.to_thread(catalog.known, store.split_tag(name)[0])
        if existing is not None:  # (another build of it: its team's)
            may_change(request, existing, "built")
        build = builds.request(name, b.tags, b.cpu_count, b.memory_mb)
        if existing is None:  # (a new template: the caller's team's — unless another team's request named it first)
            caller = caller_of(request)
            owner = await asyncio.to_thread(teams.claim_owner, TEMPLATE, build.template_id, caller.team)
            if not caller.sees(owner):
                raise Forbidden(f"template '{name[:120]}' was just made by another team: choose another name")
        body = {
            "templateID": build.template_id,
            "buildID": build.build_id,
            "public": False,
            "names": build.names,
            "aliases": build.names,
            "tags": build.tags,
        }
        return JSONResponse(body, status_code=202)

    async def file_link(request: Request) -> Response:
        ident = builds.template_id(request.path_params["template"])
        may_change(request, ident, "built")
        if store.is_builtin(ident) and not builds.builtin_builds:
            raise Forbidden(f"'{ident}' is a built-in template: files cannot be uploaded for it")
        files_hash = request.path_params["hash"]
        if not HASH_RE.match(files_hash):
            raise BadRequest("the files hash must be 64 lowercase hex digits (a sha256)")
        present = builds.has_files(ident, files_hash)
        token = builds.upload_token(ident, files_hash)
        url = f"{str(request.base_url).rstrip('/')}{UPLOAD_PREFIX}{ident}/{files_hash}?token={token}"
        return JSONResponse({"present": present, "url": url}, status_code=201)

    async def upload(request: Request) -> Response:
        ident, files_hash = request.path_params["template"], request.path_params["hash"]
        if not HASH_RE.match(files_hash) or not builds.check_upload_token(
            ident, files_hash, request.query_params.get("token", "")
        ):
            raise Forbidden("the upload URL is not valid (or expired): ask for a new one")
        await builds.receive_files(ident, files_hash, request.stream())
        return _empty(200)

    async def start_build(request: Request) -> Response:
        ident = builds.template_id(request.path_params["template"])
        may_change(request, ident, "built")
        b: BuildStart = await read(request, BuildStart, limits)
        try:
            recipe = parse_recipe(b.model_dump())
        except RecipeError as e:
            raise BadRequest(f"invalid build: {e}") from None
        builds.start(ident, request.path_params["build"], recipe)
        return _empty(202)

    async def status(request: Request) -> Response:
        ident = builds.template_id(request.path_params["template"])
        may_change(request, ident, "watched")  # (its build logs are its team's)
        build = builds.get(ident, request.path_params["build"])
        q = request.query_params
        try:
            offset = max(0, int(q.get("logsOffset", 0)))
            limit = min(MAX_LOG_PAGE, max(0, int(q.get("limit", MAX_LOG_PAGE))))
        except ValueError:
            raise BadRequest("logsOffset and limit must be whole numbers") from None
        levels = ["debug", "info", "warn", "error"]
        level = q.get("level")
        entries = build.logs[offset : offset + limit]
        if level in levels:
            entries = [e for e in entries if levels.index(e["level"]) >= levels.index(level)]
        body: dict[str, Any] = {
            "templateID": ident,
            "buildID": build.build_id,
            "status": build.status,
            "logs": [],
            "logEntries": entries,
        }
        if build.reason:
            body["reason"] = build.reason
        return JSONResponse(body)

    def _target(request: Request, name: str, change: str | None = None) -> tuple[str, str | None]:
        """(ID, tag) of the template `name`; with `change` (what a request would do to it), refused for a
        built-in template, which is every tenant's, and for another team's."""
        ident, tag = store.resolve(name)
        if ident is None or ident not in store.names() or not visible(request, ident):
            raise NotFound(f"template '{name}' not found")
        if change and store.is_builtin(ident):
            raise Forbidden(f"'{name}' is a built-in template: it cannot be {change} through the API")
        if change:
            may_change(request, ident, change)
        return ident, tag

    async def alias(request: Request) -> Response:
        ident, tag = _target(request, request.path_params["alias"])
        if tag is not None and tag not in store.tags(ident):
            raise NotFound(f"template '{ident}' has no tag '{tag}'")
        return JSONResponse({"templateID": ident, "public": False})

    async def assign_tags(request: Request) -> Response:
        b: TagAssign = await read(request, TagAssign, limits)
        await builds.manager.ensure_template(b.target)  # (a cluster's: its build as the catalog says, here)
        ident, tag = _target(request, b.target, "tagged")
        build_id = store.tags(ident).get(tag or "default")
        if build_id is None:
            raise NotFound(f"template '{b.target}' has no build tagged '{tag or 'default'}'")
        for t in b.tags:
            if not TAG_RE.match(t):
                raise BadRequest(f"tag '{t[:130]}' is not valid: letters, digits, '.', '_', '-', at most 128")
        for t in b.tags:
            store.set_tag(ident, t, build_id)
        builds.tagged(ident, b.tags, build_id)
        return JSONResponse({"tags": b.tags, "buildID": build_id}, status_code=201)

    async def remove_tags(request: Request) -> Response:
        b: TagRemove = await read(request, TagRemove, limits)
        await builds.manager.ensure_template(b.name)
        ident, _ = _target(request, b.name, "untagged")
        missing = [t for t in b.tags if t not in store.tags(ident)]
        if missing:
            raise NotFound(f"template '{b.name}' has no tag {', '.join(repr(t) for t in missing)}")
        for t in b.tags:
            store.drop_tag(ident, t)
        builds.untagged(ident, b.tags)
        return _empty(204)

    async def get_tags(request: Request) -> Response:
        ident, _ = _target(request, request.path_params["template"])
        out = []
        for tag, build_id in sorted(store.tags(ident).items()):
            try:
                built = store.get(f"{ident}:{tag}" if tag != "default" else ident).built_at
            except TemplateError:
                continue
            out.append({"tag": tag, "buildID": build_id, "createdAt": rfc3339(built)})
        return JSONResponse(out)

    async def list_templates(request: Request) -> Response:
        out = []
        for ident in store.names():
            if not visible(request, ident):
                continue
            try:
                out.append(shape(ident))
            except TemplateError:
                continue
        return JSONResponse(out)

    async def get_template(request: Request) -> Response:
        ident, _ = _target(request, request.path_params["template"])
        try:
            history = [
                {
                    "buildID": b.build_id,
                    "status": b.status,
                    "createdAt": rfc3339(b.created),
                    "updatedAt": rfc3339(b.finished or b.created),
                    **({"finishedAt": rfc3339(b.finished)} if b.finished else {}),
                    "cpuCount": int(b.cpu_count or 1),
                    "memoryMB": b.memory_mb or 512,
                }
                for b in builds.history(ident)
            ]
            return JSONResponse({**shape(ident), "builds": history})
        except TemplateError as e:
            raise NotFound(str(e)) from None

    async def delete(request: Request) -> Response:
        ident, _ = _target(request, request.path_params["template"], "deleted")
        await builds.delete(ident)
        teams.forget(TEMPLATE, ident)
        return _empty(204)

    t = "/templates/{template:str}"
    return [
        Route("/v3/templates", request_build, methods=["POST"]),
        Route("/templates", list_templates, methods=["GET"]),
        Route("/templates/aliases/{alias:path}", alias, methods=["GET"]),
        Route("/templates/tags", assign_tags, methods=["POST"]),
        Route("/templates/tags", remove_tags, methods=["DELETE"]),
        Route("/templates/{template:path}/tags", get_tags, methods=["GET"]),
        Route(t, get_template, methods=["GET"]),
        Route("/templates/{template:path}", delete, methods=["DELETE"]),
        Route(t + "/files/{hash:str}", file_link, methods=["GET"]),
        Route(UPLOAD_PREFIX + "{template:str}/{hash:str}", upload, methods=["PUT"]),
        Route("/v2/templates/{template:str}/builds/{build:str}", start_build, methods=["POST"]),
        Route(t + "/builds/{build:str}/status", status, methods=["GET"]),
    ]
