"""A background task: a step every `interval` seconds (the first after one interval), until stopped; a step that
fails is logged, and the next one runs. The server's (the metrics sampler, the pool autoscaler, the health
monitor) and the client library's (fleet/health.py): it needs nothing but asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


class Periodic:
    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[None]], log: logging.Logger) -> None:
        self.name = name
        self.interval = interval
        self._step = step
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._step()
            except Exception:
                self._log.exception("%s: a round failed", self.name)
