"""Per-request context for envd handlers: which sandbox (set by the router) and which user."""

from __future__ import annotations

import base64
import contextlib
import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from sandboxd.core.users import DEFAULT_PATH, User, lookup_user

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

current_sandbox: contextvars.ContextVar[Sandbox] = contextvars.ContextVar("current_sandbox")
# Callbacks run when the client of the current (streaming) request goes away: a stream waiting for the
# next event learns it at once, not at its next event or keepalive, and frees its slot.
client_gone: contextvars.ContextVar[list[Callable[[], None]]] = contextvars.ContextVar("client_gone")


def on_client_gone(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` if the client disconnects; returns a function that cancels that."""
    callbacks = client_gone.get(None)
    if callbacks is None:
        return lambda: None
    callbacks.append(callback)

    def cancel() -> None:
        with contextlib.suppress(ValueError):
            callbacks.remove(callback)

    return cancel


def sandbox() -> Sandbox:
    return current_sandbox.get()


def username_from_header(value: str | None, default: str) -> str:
    """`Authorization: Basic base64(<user>:)` selects the user; the password is ignored."""
    if not value:
        return default
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "basic":
        raise ConnectError(Code.UNAUTHENTICATED, "authorization must use the Basic scheme: 'Basic base64(<user>:)'")
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise ConnectError(Code.UNAUTHENTICATED, "authorization header is not valid base64") from None
    return decoded.partition(":")[0] or default


def resolve_user(manager: SandboxManager, sbx: Sandbox, header: str | None) -> User:
    name = username_from_header(header, sbx.record.default_user)
    root = str(manager.runtime.root_path(sbx.handle))
    user = lookup_user(root, name, sbx.handle.uid_base)
    if user is None:
        raise ConnectError(Code.UNAUTHENTICATED, f"invalid username: '{name}'")
    return user


def keepalive_interval(headers: object, default: float = 90.0) -> float:
    """Seconds of silence before a stream sends a keepalive (`Keepalive-Ping-Interval`, min 1 s)."""
    raw = headers.get("keepalive-ping-interval")  # type: ignore[attr-defined]
    try:
        return max(1.0, float(raw)) if raw else default
    except ValueError:
        return default


def base_env(sbx: Sandbox, user: User) -> dict[str, str]:
    """PATH, HOME, USER, then the sandbox's envVars (a request's envs go on top)."""
    env = {"PATH": DEFAULT_PATH, "HOME": user.home, "USER": user.name, "LOGNAME": user.name}
    env.update(sbx.record.env_vars)
    return env
