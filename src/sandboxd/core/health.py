"""The health monitor: every `interval` seconds, each sandbox is looked at.

- Idle pooled sandboxes: their init alive, and their template's probe passing (below). One that fails is
  destroyed and made again, silently (nobody has it yet): `WarmPool.replace`.
- Users' running sandboxes of a template with a probe (`probeCmd`, sandboxd's extension of a template build,
  with `probeTimeout`, 5 s by default): the probe runs in the sandbox as the template's user, to its end or its
  timeout. FAILURES failures in a row mark the sandbox unhealthy, with the reason (its exit status or the
  timeout, and its last output line); a pass marks it healthy again. An unhealthy sandbox is never replaced
  or ended: it is the user's, and the user is told (the `health` extension field of get/list, an event, the
  `sandboxd_sandboxes_unhealthy` gauge). A sandbox whose init is gone is the reaper's (core/reaper.py: it
  ends, saying why).

Probes run at most CONCURRENT at a time: one that hangs until its timeout holds up no other sandbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sandboxd.core import startup
from sandboxd.core.events import Event
from sandboxd.core.pool import Pooled
from sandboxd.periodic import Periodic
from sandboxd.runtime.base import SandboxHandle
from sandboxd.templates.store import Template, TemplateError

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

log = logging.getLogger("sandboxd.health")

INTERVAL = 10.0
FAILURES = 2  # failed probes in a row that make a sandbox unhealthy
CONCURRENT = 8
HEALTH_KEY = "health"  # Sandbox.ext: its Health, once a probe has run


@dataclass
class Health:
    healthy: bool = True
    reason: str = ""
    since: float = 0.0  # when it became what it is (time.time())
    failures: int = 0  # failed probes in a row

    def to_json(self) -> dict[str, object]:
        return {
            "status": "healthy" if self.healthy else "unhealthy",
            **({"reason": self.reason} if self.reason else {}),
            "since": self.since,
        }


class HealthMonitor:
    def __init__(self, manager: SandboxManager, interval: float = INTERVAL) -> None:
        self.manager = manager
        self.interval = interval
        self.probes: Counter[str] = Counter()  # outcome ("pass", "fail", "timeout") -> probes run
        self._slots = asyncio.Semaphore(CONCURRENT)
        self._rounds = Periodic("health-monitor", interval, self.check_all, log)
        self.start, self.stop = self._rounds.start, self._rounds.stop

    async def check_all(self) -> None:
        m = self.manager
        work = [self._check_pooled(name, entry) for name, entry in m.pool.idle_entries()]
        work += [self._check(s) for s in list(m.sandboxes.values()) if s.record.state == "running"]
        await asyncio.gather(*work)

    def _template(self, name: str) -> Template | None:
        try:
            return self.manager.templates.get(name)
        except TemplateError:
            return None

    async def _check_pooled(self, name: str, entry: Pooled) -> None:
        why = None
        if not self.manager.runtime.is_alive(entry.handle):
            why = "its init is gone"
        else:
            template = self._template(name)
            if template is not None and template.probe_cmd and template.memory_images is None:
                ok, why = await self._probe(entry.handle, template)
                why = None if ok else why
        if why is not None and self.manager.pool.replace(name, entry):
            log.warning("pooled sandbox %s of template '%s' replaced: %s", entry.sandbox_id, name, why)

    async def _check(self, sandbox: Sandbox) -> None:
        template = self._template(sandbox.record.template_id)
        if template is None or not template.probe_cmd or not self.manager.runtime.is_alive(sandbox.handle):
            return
        stats = self.manager.runtime.stats
        before = (await asyncio.to_thread(stats, sandbox.handle)).cpu_usage_ns if sandbox.record.idle_timeout else 0
        ok, why = await self._probe(sandbox.handle, template)
        if sandbox.record.idle_timeout:  # the probe's CPU time is no sign of life (core/reaper.py's idle timeout)
            with contextlib.suppress(Exception):
                sandbox.idle_mark += (await asyncio.to_thread(stats, sandbox.handle)).cpu_usage_ns - before
        if sandbox.record.state != "running" or sandbox.killed.is_set():
            return  # (paused or ended meanwhile: what the probe saw says nothing)
        health = sandbox.ext.setdefault(HEALTH_KEY, Health(since=time.time()))
        if ok:
            health.failures = 0
            if not health.healthy:
                self._became(sandbox, health, True, "")
            return
        health.failures += 1
        if health.healthy and health.failures >= FAILURES:
            self._became(sandbox, health, False, why)
        elif not health.healthy:
            health.reason = why  # (the latest failure's)

    def _became(self, sandbox: Sandbox, health: Health, healthy: bool, reason: str) -> None:
        health.healthy, health.reason, health.since = healthy, reason, time.time()
        outcome = "healthy" if healthy else "unhealthy"
        (log.info if healthy else log.warning)(
            "sandbox %s is %s%s", sandbox.id, outcome, f": {reason}" if reason else ""
        )
        self.manager.events.emit(
            Event("health", sandbox.record.template_id, outcome, sandbox_id=sandbox.id, detail=reason)
        )

    async def _probe(self, handle: SandboxHandle, template: Template) -> tuple[bool, str]:
        """(passed, why not)."""
        async with self._slots:
            try:
                who = startup.identity(self.manager.runtime, handle, template.default_user, template.env, "")
            except startup.StartError as e:
                self.probes["fail"] += 1
                return False, f"the probe cannot run: {e}"
            lines: list[str] = []
            code = await startup.run(
                self.manager.runtime, handle, who, template.probe_cmd, lines.append, timeout=template.probe_timeout
            )
        last = f"; its last output: {lines[-1][:200]}" if lines else ""
        if code == -1:
            self.probes["timeout"] += 1
            return (
                False,
                f"the probe `{template.probe_cmd[:100]}` did not end within {template.probe_timeout:g} s{last}",
            )
        if code != 0:
            self.probes["fail"] += 1
            return False, f"the probe `{template.probe_cmd[:100]}` exited with status {code}{last}"
        self.probes["pass"] += 1
        return True, ""
