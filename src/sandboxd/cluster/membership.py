"""Membership: a server whose state is shared (PostgreSQL, `--database`) is a node. Every `beat` seconds it renews
its lease in the database (for `lease` seconds, by the database's clock) with its address and capacity, and
declares lost each other node whose lease ran out: that node's live sandboxes end with the reason `lost` (so any
server answers a call about them with why, not "not found"), each record kept beside. A node that comes back
revives its lost sandboxes before its manager re-adopts (those whose processes still run are running again; the
others end as any sandbox gone at a restart), and so does a node that finds it was declared lost while it ran (a
stall longer than its lease): a sandbox runs on its node only, never twice.

With the defaults (a 6 s lease, a beat every 2 s) a node that stops is declared lost within 8 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from sandboxd.cluster import BEAT_SECONDS, LEASE_SECONDS
from sandboxd.core import endings
from sandboxd.core.manager import SandboxManager
from sandboxd.periodic import Periodic
from sandboxd.state.records import SandboxRecord
from sandboxd.state.sql import State

log = logging.getLogger("sandboxd.cluster")

MAX_TEMPLATES_TOLD = 500  # templates a lease names (placement's locality); more are not told


def _available_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


class Membership:
    def __init__(
        self,
        manager: SandboxManager,
        state: State,
        url: str,
        lease: float = LEASE_SECONDS,
        beat: float = BEAT_SECONDS,
    ) -> None:
        if not 0 < beat < lease:
            raise ValueError(f"the heartbeat ({beat} s) must come more often than the lease lasts ({lease} s)")
        self.manager, self.state, self.url = manager, state, url
        self.node = state.node
        self.lease, self.beat = lease, beat
        self._loop = Periodic("sandboxd-membership", beat, self._round, log)

    def capacity(self) -> dict[str, Any]:
        """What placement weighs (cluster/placement.py): load, room, and which templates are here and warm (by every
        name and ID they answer to)."""
        store, idle = self.manager.templates, self.manager.pool.idle()
        templates: set[str] = set()
        pinned: set[str] = set()  # snapshots: placed here first (cluster/placement.py)
        warm: dict[str, int] = {}
        for ident in store.names()[:MAX_TEMPLATES_TOLD]:
            meta = store.meta(ident)
            names = {ident, *meta.get("names", [])}
            templates |= names
            if meta.get("snapshot"):
                pinned |= names
            if idle.get(ident):
                warm.update(dict.fromkeys(names, idle[ident]))
        return {
            "sandboxes": len(self.manager.sandboxes),
            "cpus": os.cpu_count() or 1,
            "memoryAvailableMB": _available_mb(),
            "templates": sorted(templates),
            "pinned": sorted(pinned),
            "warm": warm,
        }

    def revive(self) -> list[str]:
        """At start, before the manager re-adopts: the lease taken (no other node declares this one lost meanwhile),
        and this node's sandboxes declared lost its own again."""
        self.state.heartbeat(self.node, self.url, self.capacity(), self.lease)
        back = self.state.revive(self.node)
        if back:
            log.info("node %s is back: %d sandbox(es) it had were declared lost: re-adopting", self.node, len(back))
        return [r.sandbox_id for r in back]

    async def start(self) -> None:
        await asyncio.to_thread(self.step)
        self._loop.start()

    async def stop(self, release: bool) -> None:
        """`release`: the node leaves (its sandboxes gone with it); else its lease runs out by itself (a restart
        within it is not a loss)."""
        await self._loop.stop()
        if release:
            await asyncio.to_thread(self.state.release, self.node)

    async def _round(self) -> None:
        await asyncio.to_thread(self.step)

    def step(self) -> None:
        """One beat: the lease renewed, lost nodes declared, this node's own lost sandboxes taken back."""
        beat = self.state.beat(self.node, self.url, self.capacity(), self.lease)  # (one transaction)
        now = beat.now
        for node in beat.lost:  # (only those with sandboxes left: a beat reads no other lease)
            silent = now - node.lease_until + self.lease

            def body(rec: SandboxRecord, node_id: str = node.node_id, silent: float = silent) -> dict[str, Any]:
                return endings.body(rec, endings.lost(node_id, silent), None)

            gone = self.state.lose(node.node_id, now, body)
            if gone:
                log.warning(
                    "node %s is lost (no heartbeat for %.0f s): %d sandbox(es) lost", node.node_id, silent, len(gone)
                )
        if beat.declared_lost:  # (while it ran: a stall longer than its lease)
            for rec in self.state.revive(self.node):
                sandbox = self.manager.sandboxes.get(rec.sandbox_id)
                if sandbox is not None:
                    self.state.put(sandbox.record)  # (what it is now, not what was kept)
                else:
                    self.state.delete(rec.sandbox_id)
