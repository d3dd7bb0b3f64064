"""Typed end of life: every sandbox that ends records why — `killed` (and by whom), `timeout` (its end
time, or its idle timeout), `oom` (its memory limit), `error` (what failed), `host_restart` (its processes
were gone when the server started), `lost` (in a cluster, its node stopped answering: cluster/membership.py)
— with the time and its last metrics, kept for a while
(`--ended-retention`). A later call about it says why it is gone: the control plane's 404 message, the
data plane's 502 (whose message the SDKs put in their exceptions), and `GET /v2/sandboxes?state=killed`
lists them (E2B's listing shape, with `state: killed` and an `endReason` of sandboxd's own).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandboxd.state.db import SandboxRecord

KILLED, TIMEOUT, OOM, ERROR, HOST_RESTART, LOST = "killed", "timeout", "oom", "error", "host_restart", "lost"


@dataclass(frozen=True)
class End:
    kind: str
    message: str  # what happened, as the end of "it ...": "was killed by an API request"
    by: str = ""
    memory_limit_mb: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.by:
            out["by"] = self.by
        if self.memory_limit_mb is not None:
            out["memoryLimitMB"] = self.memory_limit_mb
        return out


def killed(by: str) -> End:
    return End(KILLED, f"was killed by {by}", by=by)


def timed_out(idle_seconds: int | None = None) -> End:
    if idle_seconds:
        return End(TIMEOUT, f"was idle for {idle_seconds} s (its idle timeout)")
    return End(TIMEOUT, "reached its timeout (its end time)")


def out_of_memory(limit_mb: int) -> End:
    message = f"ran out of memory (its limit is {limit_mb} MiB) and its processes were killed"
    return End(OOM, message, memory_limit_mb=limit_mb)


def failed(message: str) -> End:
    return End(ERROR, message)


def host_restart() -> End:
    return End(HOST_RESTART, "was gone when the server started (the host restarted, or its processes were killed)")


def lost(node: str, silent_seconds: float) -> End:
    return End(
        LOST,
        f"was lost: its node {node} stopped answering (no heartbeat for {silent_seconds:.0f} s); if the node comes "
        "back, so does the sandbox",
        by=node,
    )


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def body(rec: SandboxRecord, end: End, last_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """What is kept of an ended sandbox (api/serialize.py lists it): who it was, why and when it ended, its
    last metrics."""
    now = time.time()
    return {
        "sandboxID": rec.sandbox_id,
        "templateID": rec.template_id,
        "alias": rec.alias,
        "clientID": rec.client_id,
        "team": rec.team,  # (never listed: who may see it, core/teams.py)
        "startedAtUnix": rec.started_at,
        "endAtUnix": rec.end_at,
        "cpuCount": rec.cpu_count,
        "memoryMB": rec.memory_mb,
        "diskSizeMB": rec.disk_mb,
        "metadata": rec.metadata,
        "endedAt": _iso(now),
        "endedAtUnix": now,
        "endReason": end.to_json(),
        "lastMetrics": last_metrics,
    }


def explain(ended: dict[str, Any]) -> str:
    """ "it was killed by an API request at 2026-11-30T08:00:00Z" """
    reason = ended.get("endReason", {})
    return f"it {reason.get('message', 'ended')} at {ended.get('endedAt', '?')}"
