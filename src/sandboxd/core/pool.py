"""The warm pool: sandboxes created ahead, idle, per template, so that a create only hands one out.

A template's pool is filled at server start (the `prewarm` templates) or after its first use, to its target
(between its limits' min and max: core/autoscaler.py moves it with demand), and refilled a little after each
hand-out (REFILL_DELAY: creating a sandbox takes kernel-wide namespace locks and most
of a CPU for a few ms, which should not land on the new sandbox's first commands). Idle pooled sandboxes
count against the host-wide limits like running ones, never take the last of a limit, and give way when
a user's create needs the room (`evict_other_than`).

A snapshot with memory is pooled too: its pooled sandboxes are restored, then frozen at once (their processes
wait, as in a pause, until the create that hands one out thaws it); what they carry (`Pooled.drop`) is let go
of with them.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sandboxd.runtime.base import Runtime, SandboxHandle
from sandboxd.templates.store import Template, TemplateStore

log = logging.getLogger("sandboxd.core")

GROWTH = 4  # a pool grows to this many times its min by default (no --pool-max): 0 stays 0
REFILL_DELAY = 0.25  # s between handing out a pooled sandbox and pre-creating its replacement


@dataclass(frozen=True)
class PoolLimits:
    """How many idle sandboxes a template's pool keeps: at least `min` once the template is in use, at most `max`."""

    min: int
    max: int

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "max": self.max}


@dataclass
class Pooled:
    sandbox_id: str
    handle: SandboxHandle
    digest: str  # of the template it was made from: a rebuilt template makes it stale
    service: subprocess.Popen[bytes] | None  # the template's service process, if it has one
    drop: Callable[[], None] | None = field(default=None, compare=False)  # let go of what it carries, unused


class WarmPool:
    def __init__(
        self,
        size: int,
        runtime: Runtime,
        templates: TemplateStore,
        make: Callable[[Template], Awaitable[Pooled]],
        fits: Callable[[Template], bool],
        max_size: int | None = None,
    ) -> None:
        """make: create an idle sandbox of a template; fits: whether one more fits the host-wide limits; size and
        max_size: a template's limits unless set for it (`limits`)."""
        self.defaults = PoolLimits(size, max(size, GROWTH * size if max_size is None else max_size))
        self.limits: dict[str, PoolLimits] = {}  # set per template (the API's PUT /pools/{template})
        self.targets: dict[str, int] = {}  # templates in use -> idle sandboxes wanted now
        self.runtime = runtime
        self.templates = templates
        self._make = make
        self._fits = fits
        self._idle: dict[str, list[Pooled]] = {}  # template name -> idle sandboxes, oldest first
        self._refilling: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        # creates that found an idle sandbox here, and those that had to make one (per template name)
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.replaced: Counter[str] = Counter()  # idle sandboxes found broken and made again (core/health.py)

    def idle(self) -> dict[str, int]:
        """Idle sandboxes per template name."""
        return {name: len(entries) for name, entries in self._idle.items() if entries}

    def idle_entries(self) -> list[tuple[str, Pooled]]:
        """(template name, idle sandbox) of every pool, oldest first."""
        return [(name, e) for name, entries in self._idle.items() for e in entries]

    def replace(self, name: str, entry: Pooled) -> bool:
        """An idle sandbox found broken (core/health.py) goes, and another is made in its place; False if it was
        handed out meanwhile."""
        entries = self._idle.get(name, [])
        if entry not in entries:
            return False
        entries.remove(entry)
        self.replaced[name] += 1
        self._in_background(self._destroy(entry))
        self.schedule_refill(name, delay=0)
        return True

    def limits_of(self, name: str) -> PoolLimits:
        return self.limits.get(name, self.defaults)

    def target_of(self, name: str) -> int:
        return self.targets.get(name, 0)

    def set_target(self, name: str, target: int) -> None:
        """Keep `target` idle sandboxes of the template (within its limits): made in the background, or the oldest
        idle ones beyond it destroyed."""
        limits = self.limits_of(name)
        self.targets[name] = min(max(target, limits.min), limits.max)
        entries = self._idle.get(name, [])
        while len(entries) > self.targets[name]:
            self._in_background(self._destroy(entries.pop(0)))
        self.schedule_refill(name, delay=0)

    def take(self, name: str, digest: str) -> Pooled | None:
        """An idle sandbox of this template version, alive; stale ones met on the way are destroyed."""
        entries = self._idle.get(name, [])
        while entries:
            entry = entries.pop(0)
            if entry.digest == digest and self.runtime.is_alive(entry.handle):
                self.hits[name] += 1
                return entry
            self._in_background(self._destroy(entry))  # template rebuilt, or it died
        self.misses[name] += 1
        return None

    def drop_stale(self) -> None:
        """Destroy idle sandboxes whose template is gone or has another current version now (a template
        removed or rebuilt, by this server or by `sandboxd template` on the host); a template gone, its pool too."""
        for name in list(self._idle.keys() | self.targets.keys()):
            try:
                digest: str | None = self.templates.get(name).digest
            except Exception:
                digest = None
                self.targets.pop(name, None)
            entries = self._idle.get(name, [])
            for e in [e for e in entries if e.digest != digest]:
                entries.remove(e)
                # in the background, as take() does: a destroy cut short by the caller's cancellation (the
                # reaper's, at shutdown) would leave the sandbox's address and uid range held
                self._in_background(self._destroy(e))

    def schedule_refill(self, name: str, delay: float = REFILL_DELAY) -> None:
        """Fill the template's pool to its target (a template's first use makes its target its min)."""
        if name not in self.targets:
            self.targets[name] = self.limits_of(name).min
        if self.targets[name] <= len(self._idle.get(name, [])) or self._closing:
            return
        task = self._refilling.get(name)
        if task is None or task.done():
            self._refilling[name] = asyncio.create_task(self._refill(name, delay), name=f"pool-{name}")

    async def evict_other_than(self, name: str) -> bool:
        """Destroy one idle sandbox of another template (to make room for a user's); False if none."""
        victim = next((entries for n, entries in self._idle.items() if entries and n != name), None)
        if victim is None:
            return False
        await self._destroy(victim.pop())
        return True

    def close(self) -> None:
        """No more refills: the server is stopping."""
        self._closing = True

    async def stop(self) -> None:
        """Cancel the refills and destroy every idle sandbox."""
        self._closing = True
        for task in self._refilling.values():
            task.cancel()
        await asyncio.gather(*self._refilling.values(), return_exceptions=True)
        idle = [e for entries in self._idle.values() for e in entries]
        self._idle.clear()
        await asyncio.gather(*(self._destroy(e) for e in idle), return_exceptions=True)
        # and the destroys of stale ones still going, before the runtime closes
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _refill(self, name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        entries = self._idle.setdefault(name, [])
        while len(entries) < self.target_of(name) and not self._closing:
            try:
                template = self.templates.get(name)
                if not self._fits(template):
                    return  # the pool never takes the last of a host-wide limit
                entry = await self._make(template)
            except Exception:
                log.exception("pre-creating a sandbox of template '%s' failed", name)
                return
            if self._closing or len(entries) >= self.target_of(name):  # (lowered meanwhile)
                await self._destroy(entry)
                return
            entries.append(entry)

    async def _destroy(self, entry: Pooled) -> None:
        if entry.drop is not None:
            entry.drop()
        await self.runtime.destroy(entry.handle)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
