"""More than one uvicorn listener in one event loop (the plain port, the TLS one of --domain, a node's cluster
port): the first owns the signals and the lifespan; the others follow it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn


class Listener(uvicorn.Server):
    """Another listener in the same loop: it installs no signal handlers (the main server's stop it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MainListener(uvicorn.Server):
    """The first listener: it owns the signals and the lifespan, and stops `others` with it."""

    def __init__(self, config: uvicorn.Config, others: list[uvicorn.Server] | None = None) -> None:
        super().__init__(config)
        self.others = others or []

    def handle_exit(self, sig: int, frame: Any) -> None:
        for other in self.others:
            other.should_exit = True
        super().handle_exit(sig, frame)
