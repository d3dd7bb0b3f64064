"""The reaper: sandboxes whose end time has come are killed (or paused, with auto-pause), and sandboxes
whose init died on its own are cleaned up; sandboxes paused in memory for `checkpoint_after` seconds are
written to disk (core/pausing.py). It sleeps until the nearest end time (at most a second), and
wakes at once when an end time changes (`wake`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from sandboxd.core import endings, pausing

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

ACTIVE_CPU_NS = 5_000_000  # CPU time of its processes since it was last active that makes it active again

log = logging.getLogger("sandboxd.core")

MAX_SLEEP = 1.0  # s: dead inits are noticed within this
DISK_RETRY = 60.0  # s: after a sandbox could not be written to disk (a terminal open, say), it is tried again


class Reaper:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sandbox-reaper")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def wake(self) -> None:
        """An end time changed: look again now."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._pass()
            except Exception:  # the reaper must outlive any one failure, or nothing would expire any more
                log.exception("reaping sandboxes failed; trying again")
                await asyncio.sleep(MAX_SLEEP)

    async def _worked(self, sandbox: Sandbox) -> bool:
        """Whether the sandbox's processes used the CPU since it was last seen active (then it is, now)."""
        try:
            cpu = (await asyncio.to_thread(self.manager.runtime.stats, sandbox.handle)).cpu_usage_ns
        except Exception:
            return False
        if cpu - sandbox.idle_mark <= ACTIVE_CPU_NS:
            return False
        sandbox.last_active, sandbox.idle_mark = time.time(), cpu
        return True

    async def _pass(self) -> None:
        """One look at every sandbox, then sleep until the next end time (or a wake)."""
        m = self.manager
        now = time.time()
        for sandbox in [s for s in m.sandboxes.values() if s.record.state == "running"]:
            idle = bool(sandbox.record.idle_timeout) and now - sandbox.last_active >= sandbox.record.idle_timeout
            if idle and await self._worked(sandbox):
                idle = False
            if sandbox.record.end_at <= now or idle:
                action = "pausing" if sandbox.record.auto_pause else "killing"
                why = f"was idle for {sandbox.record.idle_timeout} s" if idle else "reached its end time"
                log.info("sandbox %s %s: %s it", sandbox.id, why, action)
                try:
                    if sandbox.record.auto_pause:
                        await m.pause(sandbox.id, memory=sandbox.record.auto_pause_memory)
                    else:
                        await m.kill(sandbox.id, endings.timed_out(sandbox.record.idle_timeout if idle else None))
                except Exception:
                    log.exception("%s expired sandbox %s failed", action, sandbox.id)
        gone = [
            s for s in m.sandboxes.values() if not pausing.without_processes(s) and not m.runtime.is_alive(s.handle)
        ]
        for sandbox in gone:
            log.warning("sandbox %s's init process is gone: cleaning up", sandbox.id)
            try:
                oom = await asyncio.to_thread(m.runtime.oom_kills, sandbox.handle)
                end = (
                    endings.out_of_memory(sandbox.record.memory_mb)
                    if oom
                    else endings.failed("stopped running: its init process exited")
                )
                await m.kill(sandbox.id, end)
            except Exception:
                log.exception("cleaning up dead sandbox %s failed", sandbox.id)
        after = m.settings.checkpoint_after
        if after is not None and m.settings.criu is not None:  # paused in memory long enough: to disk
            for sandbox in [s for s in m.sandboxes.values() if pausing.in_memory(s) and s.paused_at + after <= now]:
                try:
                    await m.pause_to_disk(sandbox.id)
                except Exception as e:
                    sandbox.paused_at = time.time() + DISK_RETRY - after  # (tried again in DISK_RETRY s)
                    log.warning("sandbox %s stays paused in memory: %s", sandbox.id, e)
        m.pool.drop_stale()  # idle sandboxes of templates removed or rebuilt since
        m.db.forget_ended(time.time() - m.settings.ended_retention)  # what ended long enough ago
        running = [s for s in m.sandboxes.values() if s.record.state == "running"]
        pending = [s.record.end_at for s in running]
        pending += [s.last_active + s.record.idle_timeout for s in running if s.record.idle_timeout]
        if after is not None and m.settings.criu is not None:
            pending += [s.paused_at + after for s in m.sandboxes.values() if pausing.in_memory(s)]
        delay = min([MAX_SLEEP, *(max(0.0, t - time.time()) for t in pending)])
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=delay)
        except TimeoutError:
            pass
