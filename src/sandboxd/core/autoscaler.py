"""The warm pools' autoscaler: each template's pool target follows demand, within the template's limits
(`PoolLimits`: min, max) and a host-wide memory budget for idle sandboxes.

Every TICK seconds it looks at what the creates of each template in use took from the pool (`WarmPool.hits`,
`misses`) since the last tick, and keeps the last WINDOW seconds of it:

- demand: the creates of the window, plus one (a pool that would have served the whole window's creates, a
  burst among them, and a spare: a burst's own rate is no measure, it is held down by its misses);
- grow fast: when a create found the pool empty (a miss) or demand is above the target, the target goes up to
  demand at once, by at most its own size plus one per tick (it at most doubles: a burst of misses does not
  commit the whole budget in one step);
- shrink slowly: when the window had no miss and demand is below the target, and nothing changed for
  `cooldown` seconds, the target goes down by a quarter (at least one), never below demand or min; the next
  step waits another cool-down;
- the budget: the pools' targets times their sandboxes' memory limits stay within `budget_mb`; above it, the
  pool with the most memory above its min gives back one sandbox at a time (mins are kept: they are what the
  operator asked for).

Each change is logged and counted (`changes`, for the exporter).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sandboxd.core.pool import WarmPool
from sandboxd.periodic import Periodic

log = logging.getLogger("sandboxd.pool")

TICK = 1.0  # s between looks
WINDOW = 10.0  # s of history a look weighs


@dataclass
class _Demand:
    seen: tuple[int, int] = (0, 0)  # hits, misses at the last look
    ticks: deque[tuple[float, int, int]] = field(default_factory=deque)  # (when, creates, misses) per tick
    changed: float = 0.0  # when the target last moved (monotonic)


class Autoscaler:
    def __init__(
        self,
        pool: WarmPool,
        memory_mb: Callable[[str], int],
        budget_mb: int,
        cooldown: float = 60.0,
    ) -> None:
        """memory_mb: a template's sandboxes' memory limit (what an idle one commits); budget_mb: all idle ones'
        limits together at most."""
        self.pool = pool
        self.memory_mb = memory_mb
        self.budget_mb = budget_mb
        self.cooldown = cooldown
        self.changes: Counter[tuple[str, str]] = Counter()  # (template, "up" | "down") -> times
        self._demand: dict[str, _Demand] = {}
        self._looks = Periodic("pool-autoscaler", TICK, self._look, log)
        self.start, self.stop = self._looks.start, self._looks.stop

    async def _look(self) -> None:
        self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        pool = self.pool
        wanted: dict[str, int] = {}
        for name in list(pool.targets):
            # (from the counters' start: the creates before its first look, its first use among them, are demand)
            d = self._demand.setdefault(name, _Demand(changed=now))
            hits, misses = pool.hits[name], pool.misses[name]
            creates, missed = hits + misses - sum(d.seen), misses - d.seen[1]
            d.seen = (hits, misses)
            d.ticks.append((now, creates, missed))
            while d.ticks and d.ticks[0][0] < now - WINDOW:
                d.ticks.popleft()
            target, limits = pool.target_of(name), pool.limits_of(name)
            demand = sum(c for _, c, _ in d.ticks) + 1 if any(c for _, c, _ in d.ticks) else 0
            new = target
            if missed or demand > target:
                new = min(limits.max, max(target + 1, min(demand, 2 * target + 1)))
            elif not any(m for _, _, m in d.ticks) and now - d.changed >= self.cooldown:
                new = max(limits.min, demand, target - max(1, target // 4))
            wanted[name] = min(max(new, limits.min), limits.max)
        self._within_budget(wanted)
        for name, new in wanted.items():
            old = pool.target_of(name)
            if new != old:
                direction = "up" if new > old else "down"
                self.changes[(name, direction)] += 1
                self._demand[name].changed = now
                log.info("pool of template '%s': %d -> %d idle sandboxes", name, old, new)
                pool.set_target(name, new)

    def _within_budget(self, wanted: dict[str, int]) -> None:
        """Lower `wanted` until its memory fits the budget: one sandbox at a time from the pool with the most
        memory above its min (mins are kept: what the operator asked for)."""
        while sum(t * self.memory_mb(n) for n, t in wanted.items()) > self.budget_mb:
            above = [(n, (t - self.pool.limits_of(n).min) * self.memory_mb(n)) for n, t in wanted.items()]
            name, spare = max(above, key=lambda a: a[1], default=("", 0))
            if spare <= 0:
                return
            wanted[name] -= 1


def default_budget_mb(committed_limit_mb: int) -> int:
    """A quarter of what all sandboxes may commit (their memory limits' sum) for idle pooled ones."""
    return max(0, math.floor(committed_limit_mb / 4))
