"""The code interpreter's HTTP API (the API e2b-code-interpreter's `run_code` and contexts call), served
on the sandbox's own 127.0.0.1:49999.

    GET  /health                  "OK"
    POST /execute                 NDJSON stream: number_of_executions, stdout, stderr, result, error,
                                  keepalive (every 5 s of silence), end_of_execution
    POST /contexts, GET /contexts, POST /contexts/{id}/restart, DELETE /contexts/{id}

Executions in one context run one at a time. If the client goes away mid-execution (a timeout, a
disconnect), the kernel is interrupted so that the next execution starts on a quiet kernel. The
sandbox's environment variables come from the host in the X-Sandboxd-Env header (base64 JSON) and
are applied once per context; a request's `env_vars` apply to that execution only.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .kernels import Context, Kernels, UnknownLanguage, decode_env_header

PORT = int(os.environ.get("SANDBOXD_INTERPRETER_PORT", "49999"))


class NDJSONStream(Response):
    """An execution's events as they come (NDJSON), over plain asyncio; a client that disconnects ends
    the stream, and the generator's cleanup then interrupts the kernel. (Starlette's StreamingResponse
    does the same through anyio's task groups, whose asyncio backend is imported on first use: ~20-40 ms
    of a sandbox's first run_code, and 1.2 MiB.)"""

    media_type = "application/json"

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streaming = asyncio.ensure_future(stream())
        watching = asyncio.ensure_future(until_disconnect())
        try:
            await asyncio.wait((streaming, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watching, streaming):  # a disconnect cancels the stream inside the generator
                task.cancel()
            await asyncio.gather(watching, streaming, return_exceptions=True)
            await self.chunks.aclose()
        if not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()  # type: ignore[misc]


def build_app() -> Starlette:
    kernels = Kernels()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Python is warm before the first request (the common case, ~40 MiB); every other kernel (Deno for
        # JavaScript/TypeScript, ~180 MiB; bash) starts on the first use of its language, so an idle
        # sandbox does not pay for it.
        kernels.default_for("python")
        yield
        await kernels.shutdown()

    async def health(request: Request) -> Response:
        return JSONResponse("OK")

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise ValueError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return body

    async def execute(request: Request) -> Response:
        try:
            body = await body_of(request)
        except ValueError as e:
            return PlainTextResponse(str(e), status_code=400)
        code, context_id, language = body.get("code"), body.get("context_id"), body.get("language")
        if not isinstance(code, str):
            return PlainTextResponse("'code' must be a string", status_code=400)
        if context_id and language:
            return PlainTextResponse("give either 'context_id' or 'language', not both", status_code=400)
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict):
            return PlainTextResponse("'env_vars' must be an object", status_code=400)
        try:
            if context_id:
                ctx = kernels.contexts.get(context_id)
                if ctx is None:
                    return PlainTextResponse(f"context '{context_id}' not found", status_code=404)
            else:
                ctx = kernels.default_for(language)
        except UnknownLanguage as e:
            return PlainTextResponse(str(e), status_code=400)
        sandbox_env = decode_env_header(request.headers.get("x-sandboxd-env"))
        env = {str(k): str(v) for k, v in env_vars.items()}
        return NDJSONStream(_stream(ctx, code, env, sandbox_env))

    async def _stream(
        ctx: Context, code: str, env: dict[str, str], sandbox_env: dict[str, str]
    ) -> AsyncGenerator[bytes, None]:
        await ctx.lock.acquire()
        finished = False
        try:
            async for event in kernels.execute(ctx, code, env, sandbox_env):
                yield (json.dumps(event) + "\n").encode()
            yield b'{"type": "end_of_execution"}\n'
            finished = True
        finally:
            if finished:
                ctx.lock.release()
            else:
                # the client left: interrupt, then free the context (in the background, holding the lock)
                async def cleanup() -> None:
                    try:
                        await kernels.interrupt(ctx)
                    finally:
                        ctx.lock.release()

                asyncio.get_running_loop().create_task(cleanup())

    async def create_context(request: Request) -> Response:
        try:
            body = await body_of(request)
            ctx = kernels.create(body.get("language"), body.get("cwd"))
        except (ValueError, UnknownLanguage) as e:
            return PlainTextResponse(str(e), status_code=400)
        return JSONResponse(ctx.describe())

    async def list_contexts(request: Request) -> Response:
        return JSONResponse([c.describe() for c in kernels.contexts.values()])

    def find(request: Request) -> Context | Response:
        ctx = kernels.contexts.get(request.path_params["context_id"])
        if ctx is None:
            return PlainTextResponse(f"context '{request.path_params['context_id']}' not found", status_code=404)
        return ctx

    async def restart_context(request: Request) -> Response:
        ctx = find(request)
        if isinstance(ctx, Response):
            return ctx
        try:
            await kernels.restart(ctx)
        except Exception as e:
            return PlainTextResponse(f"restarting the kernel failed: {e}", status_code=500)
        return JSONResponse(None)

    async def delete_context(request: Request) -> Response:
        ctx = find(request)
        if isinstance(ctx, Response):
            return ctx
        try:
            await kernels.remove(ctx)
        except Exception as e:
            return PlainTextResponse(f"removing the context failed: {e}", status_code=500)
        return JSONResponse(None)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/execute", execute, methods=["POST"]),
            Route("/contexts", create_context, methods=["POST"]),
            Route("/contexts", list_contexts, methods=["GET"]),
            Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
            Route("/contexts/{context_id}", delete_context, methods=["DELETE"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    import sys

    import uvicorn

    # jupyter_client loads psutil (when it starts a kernel) only to list this machine's addresses, and
    # falls back on `ip addr` without it: ~1.3 MiB of every code-interpreter sandbox, for nothing used.
    sys.modules.setdefault("psutil", None)  # type: ignore[arg-type]

    # asyncio, not uvloop: measured, zmq.asyncio's kernel round trip is ~0.3 ms slower on uvloop;
    # httptools (when installed) parses HTTP faster than h11.
    uvicorn.run(
        build_app(),
        host="127.0.0.1",
        port=PORT,
        log_level="warning",
        timeout_keep_alive=640,
        access_log=False,
        loop="asyncio",
        http="auto",
    )


if __name__ == "__main__":
    main()
