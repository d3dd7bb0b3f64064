"""WebSocket to a port on a sandbox's own loopback: the client's ASGI WebSocket on one side, a client
connection (the `websockets` library) over a socket made in the sandbox's network namespace on the
other, messages pumped both ways until either side closes. Credentials meant for sandboxd are not
passed on; the Host the service sees is `localhost` (or the sandbox's maskRequestHost)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sandboxd.core.manager import Sandbox, SandboxManager

MAX_MESSAGE = 16 * 1024 * 1024
# a WebSocket's handshake is each hop's own (relay() makes the far end's)
HANDSHAKE = frozenset(
    {
        b"host",
        b"connection",
        b"upgrade",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)
# ...and credentials meant for sandboxd never reach a sandbox's service
_SKIP = HANDSHAKE | {
    b"x-access-token",
    b"e2b-traffic-access-token",
    b"x-api-key",
    b"e2b-sandbox-id",
    b"e2b-sandbox-port",
}


async def proxy_websocket(
    manager: SandboxManager, scope: Scope, receive: Receive, send: Send, sandbox: Sandbox, port: int, host: str
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    try:
        sock = await manager.runtime.connect_tcp(sandbox.handle, port)
    except (ConnectionRefusedError, OSError):
        await send({"type": "websocket.close", "code": 1011, "reason": f"port is not open: {port}"})
        return
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k.lower() not in _SKIP]
    await relay(scope, receive, send, host, headers, sock=sock, far="the sandbox's service")


async def relay(
    scope: Scope,
    receive: Receive,
    send: Send,
    host: str,
    headers: list[tuple[str, str]],
    sock: socket.socket | None = None,
    far: str = "the far end",
    tls: ssl.SSLContext | None = None,
) -> None:
    """The client's WebSocket (its connect already received) relayed to ws://`host` (wss:// with `tls`) at the same
    path, over `sock` when given: accepted once the far end accepted, messages pumped both ways until either side
    closes. The port proxy's (above) and the cluster's API replicas' (to a node)."""
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    try:
        upstream = await connect(
            f"{'wss' if tls else 'ws'}://{host}{target.decode('latin-1')}",
            sock=sock,
            ssl=tls,
            additional_headers=headers,
            subprotocols=scope.get("subprotocols") or None,
            max_size=MAX_MESSAGE,
            open_timeout=10,
            compression=None,
        )
    except (InvalidStatus, InvalidHandshake, OSError, TimeoutError) as e:
        if sock is not None:
            sock.close()
        await send({"type": "websocket.close", "code": 1011, "reason": f"{far} refused: {e}"[:120]})
        return
    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

    async def client_to_far() -> None:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                await upstream.close(code=msg.get("code", 1000))
                return
            if msg.get("bytes") is not None:
                await upstream.send(msg["bytes"])
            elif msg.get("text") is not None:
                await upstream.send(msg["text"])

    async def far_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, bytes):
                    await send({"type": "websocket.send", "bytes": data})
                else:
                    await send({"type": "websocket.send", "text": data})
        except ConnectionClosed:
            pass
        code = upstream.close_code or 1000
        with contextlib.suppress(Exception):
            await send({"type": "websocket.close", "code": code, "reason": upstream.close_reason or ""})

    tasks = [asyncio.ensure_future(client_to_far()), asyncio.ensure_future(far_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await upstream.close()
