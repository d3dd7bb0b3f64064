"""Watching the user's own sandboxes from the client: `HealthMonitor` looks at each sandbox of a `LoadBalancer`
every `interval` seconds (or when `check()` is awaited): running (`is_running()`), and, given a `probe`, that
command exits 0 within `probe_timeout`. One that fails is reported (`on_unhealthy(sandbox, reason)`) and, given
`replace` (an async function making a new sandbox), swapped for a new one in the balancer, the old one killed
(`on_replaced(old, new)`). The sandboxes are `e2b.AsyncSandbox` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sandboxd.fleet.balancer import LoadBalancer
from sandboxd.periodic import Periodic

log = logging.getLogger("sandboxd.fleet")


class HealthMonitor:
    def __init__(
        self,
        balancer: LoadBalancer,
        *,
        probe: str | None = None,
        probe_timeout: float = 5.0,
        interval: float = 10.0,
        replace: Callable[[Any], Awaitable[Any]] | None = None,
        on_unhealthy: Callable[[Any, str], Any] | None = None,
        on_replaced: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.balancer, self.probe, self.probe_timeout, self.interval = balancer, probe, probe_timeout, interval
        self.replace, self.on_unhealthy, self.on_replaced = replace, on_unhealthy, on_replaced
        self._rounds = Periodic("fleet-health-monitor", interval, self._round, log)
        self.start, self.stop = self._rounds.start, self._rounds.stop

    async def why_unhealthy(self, sandbox: Any) -> str | None:
        """None when the sandbox is healthy, else why not."""
        try:
            if not await sandbox.is_running():
                return "it is not running"
        except Exception as e:
            return f"it does not answer: {e}"
        if self.probe is None:
            return None
        try:
            result = await sandbox.commands.run(self.probe, timeout=self.probe_timeout)
        except Exception as e:  # (a non-zero exit raises in the SDK, as does a timeout)
            return f"the probe `{self.probe}` failed: {e}"
        return None if result.exit_code == 0 else f"the probe `{self.probe}` exited with {result.exit_code}"

    async def check(self) -> dict[str, str]:
        """One look at every sandbox; returns the unhealthy ones' IDs with why (before any replacement)."""
        sandboxes = list(self.balancer._sandboxes)
        reasons = await asyncio.gather(*(self.why_unhealthy(s) for s in sandboxes))
        bad = {s.sandbox_id: r for s, r in zip(sandboxes, reasons, strict=True) if r is not None}
        for sandbox in [s for s in sandboxes if s.sandbox_id in bad]:
            await _call(self.on_unhealthy, sandbox, bad[sandbox.sandbox_id])
            if self.replace is None:
                continue
            try:
                new = await self.replace(sandbox)
            except Exception:
                log.exception("replacing sandbox %s failed", sandbox.sandbox_id)
                continue
            self.balancer.remove(sandbox)
            self.balancer.add(new)
            with contextlib.suppress(Exception):
                await sandbox.kill()
            await _call(self.on_replaced, sandbox, new)
        return bad

    async def _round(self) -> None:
        await self.check()


async def _call(fn: Callable[..., Any] | None, *args: Any) -> None:
    if fn is None:
        return
    result = fn(*args)
    if asyncio.iscoroutine(result):
        await result
