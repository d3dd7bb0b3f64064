"""Each sandbox's log: what happened to it (created, paused, resumed, health, ended, from core/events.py) and
what was done in it through envd (processes started and ended, files written), as E2B's
`GET /sandboxes/{id}/logs` and `/v2/sandboxes/{id}/logs` serve them (api/logs.py).

Bounded: the last KEEP entries of a sandbox (a message is cut at MAX_MESSAGE characters, a field value at
MAX_FIELD), and the logs of the last ENDED sandboxes that ended. In memory: a server restart starts them anew.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from sandboxd.core.events import Event, Events

KEEP = 1000
ENDED = 256
MAX_MESSAGE = 1000
MAX_FIELD = 256
LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True)
class LogEntry:
    timestamp: float
    level: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)


class SandboxLogs:
    def __init__(self, events: Events) -> None:
        self._live: dict[str, deque[LogEntry]] = {}
        self._ended: OrderedDict[str, deque[LogEntry]] = OrderedDict()
        events.listen(self.on_event)

    def add(self, sandbox_id: str, level: str, message: str, **fields: object) -> None:
        entries = self._live.get(sandbox_id) or self._ended.get(sandbox_id)  # (a process's end after its sandbox's)
        if entries is None:
            entries = self._live[sandbox_id] = deque(maxlen=KEEP)
        values = {k: str(v)[:MAX_FIELD] for k, v in fields.items()}
        entries.append(LogEntry(time.time(), level, message[:MAX_MESSAGE], values))

    def known(self, sandbox_id: str) -> bool:
        return sandbox_id in self._live or sandbox_id in self._ended

    def entries(
        self,
        sandbox_id: str,
        cursor: float | None = None,
        limit: int = 1000,
        forward: bool = True,
        level: str | None = None,
        search: str | None = None,
    ) -> list[LogEntry]:
        """Entries at or after `cursor` (a Unix time, s) oldest first, or (not `forward`) at or before it newest
        first; at `level` or above; whose message holds `search` (case-insensitive); at most `limit`."""
        found = list(self._live.get(sandbox_id) or self._ended.get(sandbox_id) or ())
        least = LEVELS.index(level) if level in LEVELS else 0
        needle = search.lower() if search else None
        if not forward:
            found.reverse()
        out = []
        for e in found:
            if cursor is not None and (e.timestamp < cursor if forward else e.timestamp > cursor):
                continue
            if LEVELS.index(e.level) < least or (needle is not None and needle not in e.message.lower()):
                continue
            out.append(e)
            if len(out) >= limit:
                break
        return out

    def on_event(self, e: Event) -> None:
        if not e.sandbox_id:
            return  # (a create that failed: no sandbox to log it in)
        ms = f"{e.seconds * 1000:.0f} ms"
        if e.kind == "create":
            how = "from the warm pool" if e.mode == "pool" else "made anew"
            self.add(e.sandbox_id, "info", f"created from template {e.template} ({how}) in {ms}", template=e.template)
        elif e.kind in ("pause", "resume"):
            verb = "paused" if e.kind == "pause" else "resumed"
            where = {"memory": "in memory", "disk": "to disk" if e.kind == "pause" else "from disk"}.get(
                e.mode, "its files only" if e.kind == "pause" else "booted from its files"
            )
            if e.outcome == "ok":
                self.add(e.sandbox_id, "info", f"{verb} ({where}) in {ms}", mode=e.mode)
            else:
                self.add(e.sandbox_id, "warn", f"not {verb} ({where}): {e.outcome}", mode=e.mode, outcome=e.outcome)
        elif e.kind == "health":
            healthy = e.outcome == "healthy"
            why = f": {e.detail}" if e.detail else ""
            self.add(e.sandbox_id, "info" if healthy else "warn", f"health: {e.outcome}{why}", status=e.outcome)
        elif e.kind == "end":
            self.add(
                e.sandbox_id, "info", f"ended: it {e.detail}" if e.detail else f"ended: {e.outcome}", reason=e.outcome
            )
            entries = self._live.pop(e.sandbox_id, None)
            if entries is not None:
                self._ended[e.sandbox_id] = entries
                while len(self._ended) > ENDED:
                    self._ended.popitem(last=False)
