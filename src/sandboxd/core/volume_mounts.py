"""`volumeMounts` of a create: E2B's `[{name, path}]`, checked, and the volumes mounted in the sandbox
(at create, and again each time it boots from its files after a filesystem pause)."""

from __future__ import annotations

import asyncio
import posixpath
from typing import TYPE_CHECKING, Any

from sandboxd.core.errors import BadRequest
from sandboxd.runtime.base import RuntimeError_
from sandboxd.volumes.errors import VolumeError

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager
    from sandboxd.runtime.base import SandboxHandle

MAX_MOUNTS = 16
MAX_PATH = 1024
# Where a volume may not go: the kernel's own trees in the sandbox (its /proc, /sys and /dev).
RESERVED = ("/proc", "/sys", "/dev")


def check(manager: SandboxManager, raw: Any) -> list[dict[str, str]]:
    """The mounts asked for, each with its volume's ID, parents before children."""
    if not raw:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_MOUNTS:
        raise BadRequest(f"volumeMounts must be a list of at most {MAX_MOUNTS} {{name, path}} objects")
    if manager.volumes is None:
        raise BadRequest("volumeMounts: this server keeps no volumes")
    out: list[dict[str, str]] = []
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(m.get("path"), str):
            raise BadRequest("each of volumeMounts must be an object with a string name and path")
        name, path = m["name"], m["path"]
        if len(path) > MAX_PATH or not path.startswith("/") or "\0" in path:
            raise BadRequest(f"volume mount path {path[:80]!r} must be absolute (and at most {MAX_PATH} characters)")
        if posixpath.normpath(path) != path or path.startswith("//"):
            raise BadRequest(f"volume mount path {path[:80]!r} must be normalized (no '..', '.', '//' or trailing '/')")
        if path == "/" or any(path == r or path.startswith(r + "/") for r in RESERVED):
            raise BadRequest(f"a volume cannot be mounted at {path!r} (not at /, nor in /proc, /sys or /dev)")
        if any(o["path"] == path for o in out):
            raise BadRequest(f"two volumes are mounted at {path!r}")
        try:
            vol = manager.volumes.get(name)
        except VolumeError:
            raise BadRequest(f"volumeMounts: volume {name[:80]!r} not found (create it first)") from None
        out.append({"name": vol.name, "path": path, "volumeID": vol.volume_id})
    return sorted(out, key=lambda o: o["path"])


async def attach(manager: SandboxManager, handle: SandboxHandle, mounts: list[dict[str, str]]) -> None:
    """Mount each volume in the sandbox (the volume itself first mounted on the host if it was not)."""
    if not mounts:
        return
    assert manager.volumes is not None
    for m in mounts:
        try:
            vol = manager.volumes.get(m["volumeID"])
            source = await asyncio.to_thread(manager.volumes.mounted, vol)
        except VolumeError as e:
            raise BadRequest(f"volume {m['name']!r} cannot be mounted at {m['path']}: {e}") from None
        try:
            await manager.runtime.attach_volume(handle, source, m["path"])
        except RuntimeError_ as e:  # the path, as the sandbox's own files resolve it, takes no mount
            raise BadRequest(str(e)) from None


def users(manager: SandboxManager, volume_id: str) -> list[str]:
    """The sandboxes (running or paused, or being created right now) that mount the volume."""
    live = [s.id for s in manager.sandboxes.values() if _mounts(s, volume_id)]
    return live + ["a sandbox being created"] * manager.creating_with.get(volume_id, 0)


def _mounts(sandbox: Sandbox, volume_id: str) -> bool:
    return any(m.get("volumeID") == volume_id for m in sandbox.record.volume_mounts)
