"""Sizing a client-side pool (`AsyncSandboxPool`) from its sandboxes' load, by the seed's rule: every `interval`
seconds the average CPU use of the pool's sandboxes (their latest metrics, `get_metrics()`) is read;

- above `high` (70 %) for a whole `window` (60 s): grow by up to `grow_by` (50 %, at least one sandbox);
- below `low` (30 %) for a whole `window` while at most `short_queue` callers wait for a sandbox: shrink by up to
  `shrink_by` (30 %, at least one);

always within `min_size`..`max_size` (default: the pool's min and max). After a step the window starts again (a
step is judged on the load after it). A sandbox that does not answer its metrics is left out of the average; with
none answering, nothing changes. `decide()` is the rule alone, for a caller that has its own figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from sandboxd.fleet.pool import AsyncSandboxPool
from sandboxd.periodic import Periodic

log = logging.getLogger("sandboxd.fleet")


@dataclass
class Rule:
    high: float = 70.0
    low: float = 30.0
    window: float = 60.0
    grow_by: float = 0.5
    shrink_by: float = 0.3
    short_queue: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"the thresholds need 0 <= low < high (got low={self.low}, high={self.high})")
        if not (0 < self.grow_by <= 10 and 0 < self.shrink_by < 1):
            raise ValueError(
                f"grow_by is a fraction above 0 and shrink_by one in (0, 1) (got {self.grow_by}, {self.shrink_by})"
            )
        if self.window < 0 or self.short_queue < 0:
            raise ValueError("window and short_queue cannot be negative")


@dataclass
class Decision:
    size: int  # the size to keep (the same when nothing changes)
    reason: str  # why, in words ("" when nothing changes)


@dataclass
class _Since:  # since when the average CPU has been above high, below low (None: it is not)
    high: float | None = None
    low: float | None = None


class AutoScaler:
    def __init__(
        self,
        pool: AsyncSandboxPool,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        interval: float = 10.0,
        rule: Rule | None = None,
    ) -> None:
        self.pool = pool
        self.min_size = pool.min if min_size is None else min_size
        self.max_size = pool.max if max_size is None else max_size
        if not 0 <= self.min_size <= self.max_size <= pool.max or self.max_size < 1:
            raise ValueError(
                f"an autoscaler needs 0 <= min_size <= max_size <= the pool's max ({pool.max}) "
                f"(got min_size={self.min_size}, max_size={self.max_size})"
            )
        self.rule = rule or Rule()
        self.steps: list[tuple[float, int, int, str]] = []  # (when, from, to, why): the last 100
        self._since = _Since()
        self._loop = Periodic("sandboxd-fleet-autoscaler", interval, self._round, log)

    def decide(self, now: float, cpu: float, size: int, queue: int) -> Decision:
        """The rule: the size to keep, given the average CPU % now, the pool's size and the callers waiting."""
        r, since = self.rule, self._since
        since.high = (since.high if since.high is not None else now) if cpu > r.high else None
        since.low = (since.low if since.low is not None else now) if cpu < r.low else None
        if since.high is not None and now - since.high >= r.window and size < self.max_size:
            to = min(self.max_size, size + max(1, math.floor(size * r.grow_by)))
            return Decision(to, f"average CPU {cpu:.0f} % above {r.high:g} % for {r.window:g} s")
        if since.low is not None and now - since.low >= r.window and queue <= r.short_queue and size > self.min_size:
            to = max(self.min_size, size - max(1, math.floor(size * r.shrink_by)))
            return Decision(to, f"average CPU {cpu:.0f} % below {r.low:g} % for {r.window:g} s, {queue} waiting")
        if size < self.min_size or size > self.max_size:
            return Decision(min(self.max_size, max(self.min_size, size)), "outside min_size..max_size")
        return Decision(size, "")

    async def average_cpu(self) -> float | None:
        """The pool's sandboxes' average CPU use (%), from their latest metrics; None when none answered."""
        sandboxes = self.pool.sandboxes()
        got = await asyncio.gather(*(_latest_cpu(s) for s in sandboxes))
        figures = [c for c in got if c is not None]
        return sum(figures) / len(figures) if figures else None

    async def step(self) -> Decision | None:
        """One look at the pool: resized when the rule says so. Returns the decision (None: no figures)."""
        cpu = await self.average_cpu()
        if cpu is None:
            return None
        size = self.pool.size - self.pool.stats()["making"]
        decision = self.decide(time.monotonic(), cpu, max(size, self.pool.min), self.pool.stats()["waiting"])
        if decision.reason:
            before = self.pool.min
            await self.pool.resize(decision.size)
            self.steps = [*self.steps[-99:], (time.time(), before, decision.size, decision.reason)]
            self._since.high = self._since.low = None  # (the next step is judged on the load after this one)
            log.info("pool %s: %d -> %d sandboxes (%s)", self.pool.id, before, decision.size, decision.reason)
        return decision

    async def _round(self) -> None:
        await self.step()

    def start(self) -> AutoScaler:
        """Look every `interval` seconds in the background (on the running event loop) until `stop()`."""
        self._loop.start()
        return self

    async def stop(self) -> None:
        await self._loop.stop()

    async def __aenter__(self) -> AutoScaler:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _latest_cpu(sandbox: Any) -> float | None:
    with contextlib.suppress(Exception):
        samples = await sandbox.get_metrics()
        if samples:
            return float(getattr(samples[-1], "cpu_used_pct", 0.0) or 0.0)
    return None
