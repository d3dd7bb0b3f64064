"""Snapshots of a sandbox's files (E2B's `create_snapshot(mode="filesystem")`): a template made of the
sandbox's layers plus one more, a copy of what it changed (its overlay upper dir, taken while its
processes are frozen). `Sandbox.create(<snapshot ID or name>)` starts new sandboxes from it, which
share its layers (no copy per sandbox); the sandbox goes on running. A snapshot keeps its template's
start command, service, user, working directory and environment, and the sandbox's resources.

Memory is not captured: a snapshot with memory (E2B's default) is refused with 409, saying to ask for a
filesystem snapshot. Snapshots are templates: listed by `GET /snapshots`, deleted by `DELETE
/templates/{id}`, their layers pruned once nothing stands on them.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxd.core import pausing
from sandboxd.core.builds import NAME_RE
from sandboxd.core.errors import BadRequest, Conflict
from sandboxd.templates.layers import drop_per_sandbox_files, layer_key
from sandboxd.templates.store import TemplateError

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

MEMORY_REFUSED = (
    "this server cannot snapshot a sandbox's memory yet: take a filesystem snapshot "
    "(Python: create_snapshot(mode='filesystem'); the API: memory: false); sandboxes made from it start "
    "fresh from its files"
)
# sandboxd's own code, copied into sandboxes with a service at every start (templates/store.py binds)
PER_START_DIRS = ("opt/sandboxd/code",)


async def create(manager: SandboxManager, sandbox_id: str, name: str | None, memory: bool) -> dict[str, Any]:
    """Snapshot the sandbox's files as a template (named `name`, or a new one); its info for the API."""
    if memory:
        raise Conflict(MEMORY_REFUSED)
    if name is not None and not NAME_RE.match(name):
        raise BadRequest(f"snapshot name '{name[:120]}' is not valid: lowercase letters, digits, '.', '_', '-'")
    sandbox = manager.get(sandbox_id)
    store = manager.templates
    top, base = _stack(manager, sandbox)
    async with manager.pause_lock(sandbox_id):
        if pausing.without_processes(sandbox):
            raise Conflict(f"sandbox '{sandbox_id}' is paused to its files or to disk: resume it, then snapshot it")
        running = sandbox.record.state == "running"
        work = store.layers.new_dir()
        try:
            if running:  # a consistent copy: nothing of it writes meanwhile
                await _freeze(manager, sandbox, True)
            try:
                await manager.runtime.copy_upper(sandbox.handle, work / "diff")
            finally:
                if running:
                    await _freeze(manager, sandbox, False)
            drop_per_sandbox_files(work / "diff")
            for rel in PER_START_DIRS:
                _remove(work / "diff" / rel)
            step = f"snapshot of sandbox {sandbox_id}"
            key = layer_key(top, base, {"snapshot": sandbox_id, "id": uuid.uuid4().hex})
            layer = await _commit(manager, work, key, top, base, step, sandbox.handle.uid_base)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    extra = {"snapshot": {"sandboxID": sandbox_id, "createdAt": time.time()}}
    version = _version(manager, sandbox, layer.key, base)
    try:
        ident = store.publish(
            name or f"snapshot-{sandbox_id}-{uuid.uuid4().hex[:8]}", extra, str(uuid.uuid4()), version
        )
    except TemplateError as e:
        raise BadRequest(str(e)) from None
    return info(store, ident)


def info(store: Any, ident: str) -> dict[str, Any]:
    return {"snapshotID": ident, "names": list(store.meta(ident).get("names", []))}


def listed(manager: SandboxManager, sandbox_id: str | None, name: str | None) -> list[dict[str, Any]]:
    """The snapshots (newest first), of one sandbox or with one name when asked."""
    store = manager.templates
    found = []
    for ident in store.names():
        meta = store.meta(ident)
        snap = meta.get("snapshot")
        if not snap or (sandbox_id and snap.get("sandboxID") != sandbox_id):
            continue
        if name and name not in meta.get("names", []):
            continue
        found.append((snap.get("createdAt", 0.0), ident))
    return [info(store, ident) for _, ident in sorted(found, reverse=True)]


def _stack(manager: SandboxManager, sandbox: Sandbox) -> tuple[str | None, Path]:
    """(top layer key, root filesystem below) the sandbox stands on."""
    layers = [Path(p) for p in sandbox.record.layers]
    if not layers:
        raise Conflict(f"sandbox '{sandbox.id}' was made by an older sandboxd that did not record its layers")
    key = manager.templates.layers.key_of(layers[0])
    if key is not None:
        return key, layers[-1]
    return None, layers[0]  # a single root filesystem (a template of an older install)


def _version(manager: SandboxManager, sandbox: Sandbox, top: str, base: Path) -> dict[str, Any]:
    rec = sandbox.record
    try:
        t = manager.templates.get(rec.template_id)
        kept = {
            "env": t.env,
            "start_cmd": t.start_cmd,
            "ready_cmd": t.ready_cmd,
            "service": list(t.service),
            "service_user": t.service_user,
        }
    except TemplateError:  # its template is gone: the files alone
        kept = {"env": {}, "start_cmd": "", "ready_cmd": "", "service": [], "service_user": "user"}
    size = sum(layer.size_bytes for layer in manager.templates.layers.chain(top))
    return {
        "top": top,
        "base": str(base),
        **kept,
        "default_user": rec.default_user,
        "default_workdir": rec.default_workdir,
        "memory_mb": rec.memory_mb,
        "cpu_count": rec.cpu_count,
        "built_at": time.time(),
        "size_bytes": size,
    }


async def _freeze(manager: SandboxManager, sandbox: Sandbox, frozen: bool) -> None:
    await asyncio.to_thread(manager.runtime.freeze, sandbox.handle, frozen)


async def _commit(
    manager: SandboxManager, work: Path, key: str, top: str | None, base: Path, step: str, uid_base: int
) -> Any:
    return await asyncio.to_thread(manager.templates.layers.commit, work, key, top, base, step, uid_base)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
