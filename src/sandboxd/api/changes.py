"""`GET /sandboxes/{id}/diff` (beyond E2B): what the sandbox changed in its filesystem against the template
or snapshot it was made from (templates/changes.py) — `{"added", "modified", "deleted", "truncated"}`,
or with `format=tar` a tar of the changes, streamed as it is made (a slow reader holds a thread, not
the server's memory)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sandboxd.core import pausing
from sandboxd.core.errors import BadRequest, Conflict
from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.runtime.identity import RANGE
from sandboxd.templates.changes import changes, write_tar

DEFAULT_LIMIT, MAX_LIMIT = 10_000, 100_000
CHUNKS = 8  # tar chunks in flight between the thread that makes them and the response


class _ClientGone(Exception):
    pass


def change_routes(manager: SandboxManager) -> list[Route]:
    async def diff(request: Request) -> Response:
        sandbox = manager.get(request.path_params["sandbox_id"])
        q = request.query_params
        try:
            limit = min(MAX_LIMIT, max(1, int(q.get("limit", DEFAULT_LIMIT))))
        except ValueError:
            raise BadRequest("limit must be a whole number") from None
        fmt = q.get("format", "json")
        if fmt not in ("json", "tar"):
            raise BadRequest("format must be json or tar")
        if pausing.without_processes(sandbox):
            raise Conflict(f"sandbox '{sandbox.id}' is paused to its files or to disk: resume it to see its changes")
        lowers = tuple(Path(p) for p in sandbox.record.layers)
        if not lowers:
            raise Conflict(f"sandbox '{sandbox.id}' was made by an older sandboxd that did not record its layers")
        if fmt == "json":

            def listing() -> dict[str, Any]:
                with manager.runtime.upper_dir(sandbox.handle) as upper:
                    return changes(upper, lowers, limit).to_json()

            return JSONResponse(await asyncio.to_thread(listing))
        headers = {"Content-Disposition": f'attachment; filename="{sandbox.id}-changes.tar"'}
        return StreamingResponse(_tar(manager, sandbox, lowers, limit), media_type="application/x-tar", headers=headers)

    return [Route("/sandboxes/{sandbox_id:str}/diff", diff, methods=["GET"])]


async def _tar(manager: SandboxManager, sandbox: Sandbox, lowers: tuple[Path, ...], limit: int) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=CHUNKS)
    gone = threading.Event()

    def put(item: bytes | BaseException | None) -> None:
        future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while True:
            try:
                future.result(timeout=1)
                return
            except concurrent.futures.TimeoutError:
                if gone.is_set():  # the client left: stop making the tar
                    future.cancel()
                    raise _ClientGone from None

    class Sink:
        def write(self, data: bytes) -> int:
            put(bytes(data))
            return len(data)

    def make() -> None:
        try:
            with manager.runtime.upper_dir(sandbox.handle) as upper:
                found = changes(upper, lowers, limit)
                write_tar(Sink(), upper, found, sandbox.handle.uid_base, RANGE)  # type: ignore[arg-type]
            put(None)
        except _ClientGone:
            pass
        except Exception as e:
            if not gone.is_set():
                put(e)

    worker = loop.run_in_executor(None, make)
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        gone.set()
        while not queue.empty():
            queue.get_nowait()
        await asyncio.shield(worker)
