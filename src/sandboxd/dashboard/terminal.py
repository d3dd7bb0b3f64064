"""The dashboard's terminal: a WebSocket to a PTY in a sandbox, bridged through the server's own API and envd
with the official SDK (no back door: the key the page sends is checked as any client's, so a team's key reaches
only its team's sandboxes, and the PTY is a process of the sandbox, charged to it).

The protocol: the page's first message is text, `{"apiKey": ..., "cols": C, "rows": R}` (within 10 s); then
its binary messages are keystrokes and its text messages `{"resize": {"cols": C, "rows": R}}`. The server sends
the PTY's output as binary messages and the text "ready" once the shell runs, and closes with the shell's end
(1000, "exited N") or what went wrong (4400 a bad first message, 4401 a key refused, 4404 no such sandbox,
1013 too many terminals, 1011 anything else), its reason in words.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from e2b import AsyncSandbox, PtySize
from e2b.exceptions import AuthenticationException, NotFoundException
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

log = logging.getLogger("sandboxd.dashboard")

MAX_TERMINALS = 64  # open at once, on this server
FIRST_MESSAGE_BYTES = 4096
MAX_INPUT_BYTES = 64 * 1024  # one message of keystrokes (a paste)
HELLO_SECONDS = 10.0


def _size(cols: Any, rows: Any) -> PtySize:
    if not (isinstance(cols, int) and isinstance(rows, int) and 1 <= cols <= 1000 and 1 <= rows <= 1000):
        raise ValueError("cols and rows must be whole numbers from 1 to 1000")
    return PtySize(rows=rows, cols=cols)


class TerminalBridge:
    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ws = WebSocket(scope, receive, send)
        await ws.accept()
        if self.open >= MAX_TERMINALS:
            await ws.close(1013, f"this server has {MAX_TERMINALS} terminals open, its limit: close one")
            return
        self.open += 1
        try:
            await self._serve(ws, scope["path_params"]["sandbox_id"])
        except WebSocketDisconnect:
            pass
        finally:
            self.open -= 1

    async def _hello(self, ws: WebSocket) -> tuple[str, PtySize] | None:
        try:
            raw = await asyncio.wait_for(ws.receive_text(), HELLO_SECONDS)
        except (TimeoutError, KeyError, RuntimeError):
            await ws.close(4400, "send {apiKey, cols, rows} as the first (text) message")
            return None
        try:
            if len(raw) > FIRST_MESSAGE_BYTES:
                raise ValueError(f"the first message is over {FIRST_MESSAGE_BYTES} bytes")
            hello = json.loads(raw)
            if not isinstance(hello, dict) or not isinstance(hello.get("apiKey"), str) or not hello["apiKey"]:
                raise ValueError("apiKey is missing")
            return hello["apiKey"], _size(hello.get("cols", 80), hello.get("rows", 24))
        except ValueError as e:
            await ws.close(4400, f"bad first message: {str(e)[:80]}")
            return None

    async def _serve(self, ws: WebSocket, sandbox_id: str) -> None:
        hello = await self._hello(ws)
        if hello is None:
            return
        api_key, size = hello
        try:
            sandbox = await AsyncSandbox.connect(
                sandbox_id, api_key=api_key, api_url=self.api_url, sandbox_url=self.api_url
            )
        except AuthenticationException:
            await ws.close(4401, "the API key was refused")
            return
        except NotFoundException:
            await ws.close(4404, f"sandbox '{sandbox_id[:60]}' not found")
            return

        async def output(data: bytes) -> None:
            with contextlib.suppress(Exception):  # (the page went away: the read loop below ends it)
                await ws.send_bytes(data)

        try:
            handle = await sandbox.pty.create(size, on_data=output, timeout=0)
        except Exception as e:
            await ws.close(1011, f"could not start a shell: {str(e)[:80]}")
            return
        await ws.send_text("ready")
        ended = asyncio.ensure_future(handle.wait())
        typed = asyncio.ensure_future(self._keys(ws, sandbox, handle.pid))
        try:
            done, _ = await asyncio.wait({ended, typed}, return_when=asyncio.FIRST_COMPLETED)
            if ended in done:
                code = getattr(ended.exception(), "exit_code", None) if ended.exception() else ended.result().exit_code
                await ws.close(1000, f"exited {code}")
        finally:
            for task in (ended, typed):
                task.cancel()
            with contextlib.suppress(Exception):
                await handle.kill()

    async def _keys(self, ws: WebSocket, sandbox: AsyncSandbox, pid: int) -> None:
        """The page's messages into the PTY, until the page goes away."""
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                if len(data) > MAX_INPUT_BYTES:
                    await ws.close(1009, f"a message of keystrokes is over {MAX_INPUT_BYTES} bytes")
                    return
                await sandbox.pty.send_stdin(pid, data)
            elif text is not None and len(text) <= FIRST_MESSAGE_BYTES:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    resize = json.loads(text).get("resize") or {}
                    await sandbox.pty.resize(pid, _size(resize.get("cols"), resize.get("rows")))
