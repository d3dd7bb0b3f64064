"""One HTTP/1.1 request forwarded over a connection that may be kept alive (h11), its answer streamed back to an
ASGI client as it arrives: the node's port proxy (routing/proxy.py: to a service in a sandbox) and the cluster's API
replicas (cluster/replica.py: to a node) both forward this way. Bodies stream both ways; if the client goes away
the upstream connection is closed at once, so the far end sees the disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from enum import Enum

import h11
from starlette.types import Receive, Scope, Send

# Never passed on, either way (per hop: HTTP/1.1's hop-by-hop headers, the framing this hop makes again).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)


# Reuse an idle connection only while it is fresh: well inside any server's keep-alive timeout (uvicorn's default is
# 5 s), so the far end never closes it under us.
IDLE_REUSE_S = 2.0


class UpstreamClosed(ConnectionError):
    """The far end closed the connection in the middle of its answer."""


class Outcome(Enum):
    DONE = "done"  # answered whole; the connection may carry another request
    NOT_STARTED = "not started"  # no answer began (the far end refused or closed): nothing sent to the client
    CLIENT_GONE = "client gone"


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    def reset(self) -> None:
        """Close with a reset: the far end's side is closed at once (not half-closed until it reads on)."""
        with contextlib.suppress(Exception):
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()

    def reusable(self) -> bool:
        """Fresh enough to send another request on (idle less than IDLE_REUSE_S, still open)."""
        fresh = time.monotonic() - self.idle_since < IDLE_REUSE_S
        return fresh and not self.reader.at_eof() and not self.writer.is_closing()

    def release(self) -> bool:
        """After an answer: ready for the next request (True), or not reusable (closed)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            self.idle_since = time.monotonic()
            return True
        self.close()
        return False


def framing(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The body framed as the client framed it: a request without a body gets no framing headers (a bare "chunked"
    would leave a terminator that servers without chunked support read as the next request)."""
    for k, v in scope["headers"]:
        if k.lower() == b"transfer-encoding":
            return [(b"transfer-encoding", b"chunked")]
        if k.lower() == b"content-length":
            return [(b"content-length", v)]
    return []


async def forward(
    scope: Scope,
    receive: Receive,
    send: Send,
    up: Upstream,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None = None,
    drop: frozenset[bytes] = HOP_BY_HOP,
) -> Outcome:
    """Forward one request on `up` with these `headers` (Host and framing included), its body `body` if given, else
    read from the client as it comes. Raises UpstreamClosed if the far end closed mid-answer."""
    conn, reader, writer = up.conn, up.reader, up.writer
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    disconnected = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    started = False
    try:
        writer.write(conn.send(h11.Request(method=scope["method"], target=target, headers=headers)))
        if body is not None:
            if body:
                writer.write(conn.send(h11.Data(data=body)))
        else:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return Outcome.CLIENT_GONE
                chunk = message.get("body", b"")
                if chunk:
                    writer.write(conn.send(h11.Data(data=chunk)))
                    await writer.drain()
                if not message.get("more_body", False):
                    break
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()
            writer.close()  # (the far end sees the client leave)

        watcher = asyncio.ensure_future(watch())
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if disconnected.is_set():
                    return Outcome.CLIENT_GONE
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                out = [(k, v) for k, v in event.headers if k.lower() not in drop]
                await send({"type": "http.response.start", "status": event.status_code, "headers": out})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return Outcome.CLIENT_GONE if disconnected.is_set() else Outcome.DONE
            elif isinstance(event, h11.ConnectionClosed):
                break
    except (ConnectionError, h11.ProtocolError, OSError):
        pass
    finally:
        if watcher is not None:
            watcher.cancel()
    if disconnected.is_set():
        return Outcome.CLIENT_GONE
    if not started:
        return Outcome.NOT_STARTED
    raise UpstreamClosed("the far end closed the connection in the middle of its answer")
