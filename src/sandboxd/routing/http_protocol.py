"""uvicorn's httptools protocol with two bounds it lacks: the size of a request's head and the time a
client may take to send it.

httptools accumulates a header's name and value until the header is complete, with no limit: a client
sending one endless header (measured: 100 MB) grows the server without bound, and a client sending a
head one byte at a time holds its connection forever (slowloris). Bodies are bounded where they are
parsed (core/limits.py); this bounds what comes before them.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line + headers: the SDKs send well under 2 KiB (core/limits.py)
HEAD_TIMEOUT_S = 30.0  # from the head's first byte to its last
_END = b"\r\n\r\n"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT_S

    _in_head = True
    _head_bytes = 0
    _tail = b""
    _head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)
            window = self._tail + data
            end = window.find(_END)
            counted = (end + len(_END) - len(self._tail)) if end >= 0 else len(data)
            self._head_bytes += max(0, counted)
            self._tail = window[-3:]
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, f"request head over {self.max_head_bytes} bytes")
                return
            if end >= 0:
                self._head_done()
        super().data_received(data)

    def _head_done(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # whatever comes next on this connection is the next request's head

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"request head not received within {self.head_timeout:.0f} s")

    def _refuse(self, status: int, message: str) -> None:
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = message.encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()
        self._in_head = False  # nothing more is parsed on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)
