"""The JSON shapes the SDK expects: Sandbox (create/connect), SandboxDetail (info), ListedSandbox (list)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sandboxd.core import pausing
from sandboxd.core.health import HEALTH_KEY
from sandboxd.core.manager import ENVD_VERSION, Sandbox
from sandboxd.core.metrics import Sample
from sandboxd.state.db import SandboxRecord


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sandbox_created(s: Sandbox) -> dict[str, Any]:
    r = s.record
    return {
        "templateID": r.template_id,
        "sandboxID": r.sandbox_id,
        "clientID": r.client_id,
        "envdVersion": ENVD_VERSION,
        "alias": r.alias,
        "envdAccessToken": r.envd_token,
        "trafficAccessToken": r.traffic_token,
        "domain": s.domain,
    }


def _volume_mounts(r: SandboxRecord) -> dict[str, Any]:
    if not r.volume_mounts:
        return {}
    return {"volumeMounts": [{"name": m["name"], "path": m["path"]} for m in r.volume_mounts]}


def _common(s: Sandbox) -> dict[str, Any]:
    r = s.record
    return {
        "templateID": r.template_id,
        "alias": r.alias,
        "sandboxID": r.sandbox_id,
        "clientID": r.client_id,
        "startedAt": rfc3339(r.started_at),
        "endAt": rfc3339(r.end_at),
        "envdVersion": ENVD_VERSION,
        "cpuCount": r.cpu_count,
        "memoryMB": r.memory_mb,
        "diskSizeMB": r.disk_mb,
        "metadata": r.metadata,
        "state": r.state,
        **_volume_mounts(r),
        **({"health": s.ext[HEALTH_KEY].to_json()} if HEALTH_KEY in s.ext else {}),
    }


def sandbox_detail(s: Sandbox) -> dict[str, Any]:
    r = s.record
    network = s.policy.to_api()
    if r.traffic_token is not None:
        network["allowPublicTraffic"] = False
    if r.mask_request_host is not None:
        network["maskRequestHost"] = r.mask_request_host
    return {
        **_common(s),
        "envdAccessToken": r.envd_token,
        "allowInternetAccess": r.allow_internet_access,
        **({"network": network} if network else {}),
        "domain": s.domain,
        "lifecycle": {"autoResume": r.auto_resume, "onTimeout": "pause" if r.auto_pause else "kill"},
        **(_pause(r.pause_mode) if r.state == "paused" and r.pause_mode else {}),
    }


def _pause(mode: str) -> dict[str, str]:
    """E2B's `pauseMode` (what the pause saved: "full" or "filesystem", an enum the SDK checks), and where a
    full pause keeps the memory (extension `pausedTo`: "memory", frozen; "disk", written by CRIU)."""
    if mode == pausing.FILESYSTEM:
        return {"pauseMode": pausing.FILESYSTEM}
    return {"pauseMode": pausing.FULL, "pausedTo": "disk" if mode == pausing.DISK else "memory"}


def listed_sandbox(s: Sandbox) -> dict[str, Any]:
    return _common(s)


def metric(s: Sample) -> dict[str, Any]:
    return {
        "timestamp": rfc3339(s.timestamp),
        "timestampUnix": int(s.timestamp),
        "cpuCount": s.cpu_count,
        "cpuUsedPct": s.cpu_used_pct,
        "memUsed": s.mem_used,
        "memTotal": s.mem_total,
        "memCache": 0,
        "diskUsed": s.disk_used,
        "diskTotal": s.disk_total,
    }


def ended_sandbox(e: dict[str, Any]) -> dict[str, Any]:
    """An ended sandbox (core/endings.py) in E2B's listing shape, `state: killed`, with why and when."""
    return {
        "templateID": e["templateID"],
        "alias": e.get("alias"),
        "sandboxID": e["sandboxID"],
        "clientID": e.get("clientID", "sandboxd"),
        "startedAt": rfc3339(e["startedAtUnix"]),
        "endAt": rfc3339(e["endAtUnix"]),
        "envdVersion": ENVD_VERSION,
        "cpuCount": e["cpuCount"],
        "memoryMB": e["memoryMB"],
        "diskSizeMB": e["diskSizeMB"],
        "metadata": e.get("metadata", {}),
        "state": "killed",
        "endedAt": e["endedAt"],
        "endReason": e["endReason"],
        "lastMetrics": metric(Sample(**e["lastMetrics"])) if e.get("lastMetrics") else None,
    }
