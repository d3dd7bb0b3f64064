"""Calls that survive a server restart or a network cut, without ever doing twice what must happen once.

`retrying(call, idempotent=...)` (and `retrying_sync`) runs `call` again, up to `attempts` times with a growing
pause, when it failed in a way worth another try:
- the request never reached the server (the connection was refused or could not be made): always, since
  nothing happened;
- the connection broke after the request was sent, or the server answered "not found" for a sandbox it had
  just been told of (E2B's "Sandbox not found" during a refresh) or 502/503 while restarting: only when the call
  is `idempotent` (a read, a kill, a set_timeout): a create or a command might have happened already.
Anything else is raised at once; the last failure is raised when the tries run out, with the number of tries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from sandboxd.fleet.errors import FleetError

T = TypeVar("T")
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError)
CUT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ReadTimeout, ConnectionResetError)


class RetriesExhausted(FleetError):
    """A call failed every time it was tried."""


def _worth_retrying(e: BaseException, idempotent: bool) -> bool:
    for inner in _chain(e):
        if isinstance(inner, NOT_SENT):
            return True
        if idempotent and isinstance(inner, CUT):
            return True
    if idempotent:
        text = str(e).lower()
        return ("not found" in text and "sandbox" in text) or any(f"{code}:" in text for code in ("502", "503"))
    return False


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


async def retrying(call: Callable[[], Awaitable[T]], *, idempotent: bool, attempts: int = 5, pause: float = 0.2) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as e:
            if not _worth_retrying(e, idempotent):
                raise
            if attempt == attempts:
                raise RetriesExhausted(f"failed {attempts} times, the last: {e}") from e
            await asyncio.sleep(pause * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def retrying_sync(call: Callable[[], T], *, idempotent: bool, attempts: int = 5, pause: float = 0.2) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if not _worth_retrying(e, idempotent):
                raise
            if attempt == attempts:
                raise RetriesExhausted(f"failed {attempts} times, the last: {e}") from e
            time.sleep(pause * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
