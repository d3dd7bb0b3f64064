"""Metrics of each sandbox over time, as `GET /sandboxes/{id}/metrics?start=&end=` returns them.

A sample every INTERVAL seconds per running sandbox (read from its cgroups and its disk, in a worker
thread), the last KEEP of them kept; CPU use is the CPU time the sandbox used between two samples over the
wall time and its CPUs. A request for the current window gets a fresh sample if the newest is stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sandboxd.periodic import Periodic

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

log = logging.getLogger("sandboxd.metrics")

INTERVAL = 5.0
KEEP = 720  # one hour at INTERVAL
FRESH = 1.0  # a sample younger than this serves a request for "now"


@dataclass(frozen=True)
class Sample:
    timestamp: float
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int


class MetricsSampler:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self._history: dict[str, deque[Sample]] = {}
        self._cpu: dict[str, tuple[float, int]] = {}  # sandbox -> (monotonic time, CPU ns) of the last sample
        self._rounds = Periodic("metrics-sampler", INTERVAL, self._sample_all, log)
        self.start, self.stop = self._rounds.start, self._rounds.stop

    def latest(self, sandbox_id: str) -> dict[str, Any] | None:
        """The sandbox's last sample (what is kept when it ends: core/endings.py)."""
        history = self._history.get(sandbox_id)
        return asdict(history[-1]) if history else None

    def forget(self, sandbox_id: str) -> None:
        self._history.pop(sandbox_id, None)
        self._cpu.pop(sandbox_id, None)

    def sample(self, sandbox: Sandbox) -> Sample:
        """Read the sandbox's usage now and keep it (blocking: file reads; call from a thread)."""
        st = self.manager.runtime.stats(sandbox.handle)
        self.manager.runtime.refresh_view(sandbox.handle)
        now, mono = time.time(), time.monotonic()
        cpus = sandbox.record.cpu_count
        pct = 0.0
        last = self._cpu.get(sandbox.id)
        if last is not None and mono > last[0]:
            pct = max(0.0, (st.cpu_usage_ns - last[1]) / ((mono - last[0]) * 1e9 * cpus) * 100)
        self._cpu[sandbox.id] = (mono, st.cpu_usage_ns)
        s = Sample(
            timestamp=now,
            cpu_count=cpus,
            cpu_used_pct=round(min(pct, 100.0), 2),
            mem_used=st.memory_bytes,
            mem_total=st.memory_limit_bytes,
            disk_used=st.disk_used_bytes,
            disk_total=st.disk_total_bytes,
        )
        self._history.setdefault(sandbox.id, deque(maxlen=KEEP)).append(s)
        return s

    async def window(self, sandbox: Sandbox, start: float | None, end: float | None) -> list[Sample]:
        """Samples with start <= timestamp <= end (either bound may be open), oldest first."""
        now = time.time()
        history = self._history.get(sandbox.id)
        stale = not history or now - history[-1].timestamp > FRESH
        if sandbox.running and stale and (end is None or end >= now - FRESH):
            await asyncio.to_thread(self.sample, sandbox)
        return [
            s
            for s in self._history.get(sandbox.id, ())
            if (start is None or s.timestamp >= start) and (end is None or s.timestamp <= end)
        ]

    async def _sample_all(self) -> None:
        for sandbox in [s for s in self.manager.sandboxes.values() if s.running]:
            try:
                await asyncio.to_thread(self.sample, sandbox)
            except Exception:  # gone meanwhile, or its cgroup is being removed
                log.debug("sampling %s failed", sandbox.id, exc_info=True)
