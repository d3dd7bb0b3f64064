"""E2B's volumes: the control plane (`/volumes`, X-API-KEY) and the volume content API
(`/volumecontent/{id}/...`, `Authorization: Bearer <the volume's token>`), which the SDKs reach at
`E2B_VOLUME_API_URL` or `https://api.<domain>`: this same server."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sandboxd.api.tenancy import VOLUME, caller_of
from sandboxd.core.errors import BadRequest, NotFound, SandboxdError
from sandboxd.core.limits import RequestLimits
from sandboxd.core.manager import SandboxManager
from sandboxd.core.teams import Teams
from sandboxd.fdio import ThreadFd, pipe_chunks
from sandboxd.volumes.content import Owner, Upload, VolumeFiles
from sandboxd.volumes.errors import Elsewhere, VolumeError
from sandboxd.volumes.store import Volume, VolumeStore

CONTENT_PREFIX = "/volumecontent/"
CHUNK = 1 << 20


class NewVolume(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    size_mb: int | None = Field(default=None, alias="sizeMB")  # sandboxd's own: the volume's quota


class MetadataPatch(BaseModel):
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None


class Failed(SandboxdError):
    """A volume error, or a refused token, with its own status (404 not found, 409 exists, 507 full...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def of(cls, e: VolumeError) -> Failed:
        return cls(e.status, str(e))


def _with_token(v: Volume) -> dict[str, Any]:
    return {"volumeID": v.volume_id, "name": v.name, "token": v.token, "sizeMB": v.size_mb}


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, got {raw[:40]!r}") from None


def _bool_param(request: Request, name: str) -> bool:
    raw = (request.query_params.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BadRequest(f"{name} must be true or false, got {raw[:40]!r}")
    return raw in ("true", "1")


def _path_param(request: Request) -> str:
    path = request.query_params.get("path")
    if path is None:
        raise BadRequest("the path query parameter is required")
    return path


def volume_routes(
    manager: SandboxManager, teams: Teams, limits: RequestLimits, body: Callable[..., Awaitable[Any]]
) -> list[Route]:
    def store() -> VolumeStore:
        if manager.volumes is None:
            raise NotFound("this server keeps no volumes")
        return manager.volumes

    async def create(request: Request) -> Response:
        new: NewVolume = await body(request, NewVolume, limits)
        try:
            vol = await asyncio.to_thread(store().create, new.name, new.size_mb)
        except VolumeError as e:
            raise Failed.of(e) from None
        teams.set_owner(VOLUME, vol.volume_id, caller_of(request).team)
        return JSONResponse(_with_token(vol), status_code=201)

    async def list_all(request: Request) -> Response:
        caller = caller_of(request)
        mine = [v for v in store().all() if caller.sees(teams.owner(VOLUME, v.volume_id))]
        return JSONResponse([{"volumeID": v.volume_id, "name": v.name} for v in mine])

    def _get(request: Request) -> Volume:
        ref = request.path_params["volume_id"]
        try:
            vol = store().get(ref)
        except VolumeError as e:
            raise Failed.of(e) from None
        if not caller_of(request).sees(teams.owner(VOLUME, vol.volume_id)):  # (another team's: not found)
            raise Failed(404, f"volume {ref[:80]!r} not found")
        return vol

    async def get(request: Request) -> Response:
        return JSONResponse(_with_token(_get(request)))

    async def delete(request: Request) -> Response:
        vol = _get(request)
        try:
            await asyncio.to_thread(store().delete, vol, manager.volume_users(vol.volume_id))
        except VolumeError as e:
            raise Failed.of(e) from None
        teams.forget(VOLUME, vol.volume_id)
        return Response(status_code=204)

    # -- content -------------------------------------------------------------------------------
    async def files_of(request: Request) -> VolumeFiles:
        """The volume's files, if the request carries its token (401 otherwise, for unknown volumes too:
        a token holder learns nothing about other volumes)."""
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Failed(401, "missing volume token: send it as 'Authorization: Bearer <token>'")
        vid = request.path_params["volume_id"]
        try:
            vol: Volume | None = store().get(vid)
        except VolumeError:
            vol = None
        if vol is None or vol.volume_id != vid or not hmac.compare_digest(token.strip().encode(), vol.token.encode()):
            raise Failed(401, "the token is not valid for this volume (was the volume deleted?)")
        try:
            return await asyncio.to_thread(store().files, vol)
        except Elsewhere as e:  # (a cluster's: another node's files)
            raise Failed.of(e) from None
        except VolumeError as e:
            raise Failed(500, str(e)) from None

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except VolumeError as e:
            raise Failed.of(e) from None

    def owner(request: Request) -> Owner:
        return Owner(_int_param(request, "uid"), _int_param(request, "gid"), _int_param(request, "mode"))

    async def list_dir(request: Request) -> Response:
        files = await files_of(request)
        depth = _int_param(request, "depth")
        return JSONResponse(await run(files.list_dir, _path_param(request), 1 if depth is None else depth))

    async def make_dir(request: Request) -> Response:
        files = await files_of(request)
        made = await run(files.make_dir, _path_param(request), owner(request), _bool_param(request, "force"))
        return JSONResponse(made, status_code=201)

    async def stat_path(request: Request) -> Response:
        files = await files_of(request)
        return JSONResponse(await run(files.stat, _path_param(request)))

    async def patch_path(request: Request) -> Response:
        files = await files_of(request)
        patch: MetadataPatch = await body(request, MetadataPatch, limits)
        return JSONResponse(await run(files.update, _path_param(request), Owner(patch.uid, patch.gid, patch.mode)))

    async def remove_path(request: Request) -> Response:
        files = await files_of(request)
        await run(files.remove, _path_param(request))
        return Response(status_code=204)

    async def read_file(request: Request) -> Response:
        files = await files_of(request)
        fd, size = await run(files.open_read, _path_param(request))
        guard = ThreadFd(fd)  # a download cut short closes it only once its read in progress is done

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    data = await asyncio.to_thread(guard.read, CHUNK)
                    if not data:
                        return
                    yield data
            finally:
                guard.close()

        return StreamingResponse(chunks(), media_type="application/octet-stream", headers={"Content-Length": str(size)})

    async def write_file(request: Request) -> Response:
        files = await files_of(request)
        force = _bool_param(request, "force")
        upload: Upload = await run(files.begin_write, _path_param(request), owner(request), force)
        try:
            try:  # (the upload's own lock keeps a write still running from a cancelled request safe)
                await pipe_chunks(request.stream(), upload.write)
            except VolumeError as e:
                raise Failed.of(e) from None
            written = await run(upload.commit)
        except ClientDisconnect:
            await asyncio.to_thread(upload.abort)
            raise BadRequest("the client went away before sending the whole file: nothing was written") from None
        except BaseException:
            await asyncio.to_thread(upload.abort)
            raise
        return JSONResponse(written, status_code=201)

    vid = "/{volume_id:str}"
    return [
        Route("/volumes", create, methods=["POST"]),
        Route("/volumes", list_all, methods=["GET"]),
        Route("/volumes" + vid, get, methods=["GET"]),
        Route("/volumes" + vid, delete, methods=["DELETE"]),
        Route("/volumecontent" + vid + "/dir", list_dir, methods=["GET"]),
        Route("/volumecontent" + vid + "/dir", make_dir, methods=["POST"]),
        Route("/volumecontent" + vid + "/path", stat_path, methods=["GET"]),
        Route("/volumecontent" + vid + "/path", patch_path, methods=["PATCH"]),
        Route("/volumecontent" + vid + "/path", remove_path, methods=["DELETE"]),
        Route("/volumecontent" + vid + "/file", read_file, methods=["GET"]),
        Route("/volumecontent" + vid + "/file", write_file, methods=["PUT"]),
    ]
