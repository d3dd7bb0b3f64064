"""Spreading work over the user's own sandboxes: `LoadBalancer.use()` lends the sandbox a strategy picks and
counts the work in flight on each until it is given back.

- "round_robin": each in turn;
- "least_connections": the one with the least work in flight (ties: the earliest added);
- "metrics": the lowest CPU use in its latest metrics (`get_metrics()`, refreshed when older than `metrics_ttl`
  seconds), then the least work in flight.

The sandboxes are the SDK's (`e2b.Sandbox` or `e2b.AsyncSandbox`); `use()` is an async context manager,
`use_sync()` its synchronous twin (metrics then fetched synchronously).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from sandboxd.fleet.errors import FleetError

Strategy = Literal["round_robin", "least_connections", "metrics"]


class NoSandboxes(FleetError):
    """The balancer has no sandbox to lend."""


class LoadBalancer:
    def __init__(
        self, sandboxes: list[Any] | None = None, strategy: Strategy = "least_connections", metrics_ttl: float = 5.0
    ) -> None:
        if strategy not in ("round_robin", "least_connections", "metrics"):
            raise ValueError(f"strategy is round_robin, least_connections or metrics, not {strategy!r}")
        self.strategy, self.metrics_ttl = strategy, metrics_ttl
        self._sandboxes: list[Any] = []
        self.in_flight: dict[str, int] = {}
        self.cpu: dict[str, float] = {}  # sandbox ID -> its latest CPU use (%)
        self._fetched = 0.0
        self._turn = itertools.count()
        for s in sandboxes or []:
            self.add(s)

    def add(self, sandbox: Any) -> None:
        if sandbox.sandbox_id not in self.in_flight:
            self._sandboxes.append(sandbox)
            self.in_flight[sandbox.sandbox_id] = 0

    def remove(self, sandbox: Any) -> None:
        self._sandboxes = [s for s in self._sandboxes if s.sandbox_id != sandbox.sandbox_id]
        self.in_flight.pop(sandbox.sandbox_id, None)
        self.cpu.pop(sandbox.sandbox_id, None)

    def pick(self) -> Any:
        """The sandbox the strategy picks now (its work is not counted: `use()` does that)."""
        if not self._sandboxes:
            raise NoSandboxes("the balancer has no sandboxes: add() some first")
        if self.strategy == "round_robin":
            return self._sandboxes[next(self._turn) % len(self._sandboxes)]
        if self.strategy == "least_connections":
            return min(self._sandboxes, key=lambda s: self.in_flight[s.sandbox_id])
        return min(self._sandboxes, key=lambda s: (self.cpu.get(s.sandbox_id, 0.0), self.in_flight[s.sandbox_id]))

    def _stale(self) -> bool:
        return self.strategy == "metrics" and time.monotonic() - self._fetched >= self.metrics_ttl

    def _record(self, sandbox: Any, samples: Any) -> None:
        if samples:
            latest = samples[-1]
            self.cpu[sandbox.sandbox_id] = float(getattr(latest, "cpu_used_pct", 0.0) or 0.0)

    async def refresh(self) -> None:
        """Each sandbox's latest metrics (async sandboxes awaited, sync ones called)."""
        for s in list(self._sandboxes):
            with contextlib.suppress(Exception):  # (one that does not answer keeps its last figure)
                got = s.get_metrics()
                self._record(s, await got if inspect.isawaitable(got) else got)
        self._fetched = time.monotonic()

    def refresh_sync(self) -> None:
        for s in list(self._sandboxes):
            with contextlib.suppress(Exception):
                self._record(s, s.get_metrics())
        self._fetched = time.monotonic()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Any]:
        if self._stale():
            await self.refresh()
        with self._counted() as sandbox:
            yield sandbox

    @contextlib.contextmanager
    def use_sync(self) -> Iterator[Any]:
        if self._stale():
            self.refresh_sync()
        with self._counted() as sandbox:
            yield sandbox

    @contextlib.contextmanager
    def _counted(self) -> Iterator[Any]:
        sandbox = self.pick()
        self.in_flight[sandbox.sandbox_id] += 1
        try:
            yield sandbox
        finally:
            if sandbox.sandbox_id in self.in_flight:
                self.in_flight[sandbox.sandbox_id] -= 1
