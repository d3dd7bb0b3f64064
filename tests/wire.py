"""A minimal Connect (JSON codec) client for tests that need what the SDK does not expose: tags, keepalives."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx


def envd_headers(sandbox: Any, streaming: bool = True, **extra: str) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sandbox._envd_access_token,
        "Content-Type": "application/connect+json" if streaming else "application/json",
        "Connect-Protocol-Version": "1",
        **extra,
    }


def envelope(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack(">BI", 0, len(body)) + body


def messages(resp: httpx.Response) -> Iterator[tuple[int, dict[str, Any]]]:
    """(flags, payload) for each envelope of a streamed response; flags 2 = end of stream."""
    buf = b""
    for chunk in resp.iter_bytes():
        buf += chunk
        while len(buf) >= 5:
            flags, n = struct.unpack(">BI", buf[:5])
            if len(buf) < 5 + n:
                break
            payload, buf = json.loads(buf[5 : 5 + n]), buf[5 + n :]
            yield flags, payload
