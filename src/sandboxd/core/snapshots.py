"""Snapshots of a sandbox (E2B's `create_snapshot`): a template made of the sandbox's layers plus one more, a
copy of what it changed (its overlay upper dir). `Sandbox.create(<snapshot ID or name>)` starts new sandboxes
from it, which share its layers (no copy per sandbox); the sandbox goes on running. A snapshot keeps its
template's start command, service, user, working directory and environment, and the sandbox's resources.

- With memory (E2B's default): CRIU writes the sandbox's processes too (runtime `snapshot`: they are stopped
  while it does, and its files are copied at that instant, so files and memory agree), into the snapshot's
  version directory; a sandbox made from it runs those processes, with their memory, from where they were (its
  own uid range, address and name: runtime `create_from`), instead of booting. The commands envd keeps go along
  (a new keeper for each in each new sandbox: envd/checkpointing.py), terminals too (a new one each:
  runtime/terminals.py), and the volumes (the same ones). What cannot be carried refuses the snapshot (409,
  saying what): a TCP connection from outside, a command past
  the kept-processes cap, other pipes to outside the sandbox, a templates disk without room for its memory.
- Filesystem only (`mode="filesystem"`): the files, copied while the processes are frozen; sandboxes made from
  it boot.

Snapshots are templates: listed by `GET /snapshots`, deleted by `DELETE /templates/{id}` (their memory with
them), their layers pruned once nothing stands on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxd.core import pausing
from sandboxd.core.builds import NAME_RE, tell_tagged
from sandboxd.core.errors import BadRequest, Conflict, SandboxdError
from sandboxd.runtime.base import RuntimeError_
from sandboxd.templates.layers import drop_per_sandbox_files, layer_key, sync_tree
from sandboxd.templates.store import MEMORY_DIR, SNAPSHOT_STEP, TemplateError, new_template_id

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

FILESYSTEM_HINT = (
    "take a filesystem snapshot instead (Python: create_snapshot(mode='filesystem'); the API: memory: false): "
    "sandboxes made from it start fresh from its files"
)
MAX_FORKS = 20  # E2B's
# sandboxd's own code, copied into sandboxes with a service at every start (templates/store.py binds)
PER_START_DIRS = ("opt/sandboxd/code",)


async def create(
    manager: SandboxManager,
    sandbox_id: str,
    name: str | None,
    memory: bool,
    fork: bool = False,
    paused: bool = False,
) -> dict[str, Any]:
    """Snapshot the sandbox's files as a template (named `name`, or a new one); its info for the API. `fork`: the
    snapshot of a fork (below), listed by no one. `paused`: the image of a sandbox being paused to its files, for a
    cluster's other nodes should its node go (cluster/moving.py): listed by no one, taken under the pause's lock
    (held by the caller)."""
    if name is not None and not NAME_RE.match(name):
        raise BadRequest(f"snapshot name '{name[:120]}' is not valid: lowercase letters, digits, '.', '_', '-'")
    sandbox = manager.get(sandbox_id)
    store = manager.templates
    top, base = _stack(manager, sandbox)
    criu = manager.settings.criu
    if memory and criu is None:
        raise Conflict(f"this server has no CRIU (sandboxd serve --criu): it cannot snapshot memory; {FILESYSTEM_HINT}")
    async with contextlib.nullcontext() if paused else manager.pause_lock(sandbox_id):
        if pausing.without_processes(sandbox):
            raise Conflict(f"sandbox '{sandbox_id}' is paused to its files or to disk: resume it, then snapshot it")
        running = sandbox.record.state == "running"
        work = store.layers.new_dir()
        held = store.layers.new_dir() if memory else None  # (the memory's scratch dir: moved into the snapshot)
        try:
            parts: dict[str, Any] = {}
            if held is not None and criu is not None:
                parts = await _with_memory(manager, sandbox, work / "diff", held / MEMORY_DIR, criu, running)
            else:
                if running:  # a consistent copy: nothing of it writes meanwhile
                    await _freeze(manager, sandbox, True)
                try:
                    await manager.runtime.copy_upper(sandbox.handle, work / "diff")
                finally:
                    if running:
                        await _freeze(manager, sandbox, False)
            drop_per_sandbox_files(work / "diff")
            for rel in PER_START_DIRS if held is None else ():  # (with memory: its mount points, restored there)
                _remove(work / "diff" / rel)
            step = f"{SNAPSHOT_STEP}{sandbox_id}"
            key = layer_key(top, base, {"snapshot": sandbox_id, "id": uuid.uuid4().hex})
            layer = await _commit(manager, work, key, top, base, step, sandbox.handle.uid_base)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            if held is not None:
                shutil.rmtree(held, ignore_errors=True)
            raise
    rec_mounts = [dict(m) for m in sandbox.record.volume_mounts]
    snap: dict[str, Any] = {"sandboxID": sandbox_id, "createdAt": time.time(), "memory": held is not None}
    if fork:  # (hidden from lists; deleted at once, or at the next start if this process dies first)
        snap.update(fork=True, pid=os.getpid())
    if paused:  # (hidden from lists; deleted once the sandbox runs again or ends: cluster/moving.py)
        snap.update(paused=True)
    extra = {"snapshot": snap}
    version = _version(manager, sandbox, layer.key, base)
    if held is not None:
        # (its volumes, mounted where they were in the sandboxes made from it: the same volumes)
        version["memory"] = {"uid_base": sandbox.handle.uid_base, "parts": parts, "volume_mounts": rec_mounts}
    name = name or f"snapshot-{sandbox_id}-{uuid.uuid4().hex[:8]}"
    build_id = str(uuid.uuid4())
    catalog = manager.catalog if not (fork or paused) else None  # (a cluster's: one template per name)
    try:
        ident_for_new = None
        if catalog is not None and store.resolve(name)[0] is None:
            ident_for_new = await asyncio.to_thread(catalog.name, name, new_template_id())
        ident = store.publish(
            name,
            extra,
            build_id,
            version,
            memory=held / MEMORY_DIR if held is not None else None,
            ident_for_new=ident_for_new,
        )
    except TemplateError as e:
        raise BadRequest(str(e)) from None
    finally:
        if held is not None:
            shutil.rmtree(held, ignore_errors=True)
    if catalog is not None:
        await asyncio.to_thread(tell_tagged, manager, ident, ["default"], build_id)
    return info(store, ident)


async def _with_memory(
    manager: SandboxManager, sandbox: Sandbox, diff: Path, images: Path, criu: Path, running: bool
) -> dict[str, Any]:
    """CRIU writes the sandbox's processes into `images`, leaving them running; while they are stopped, its
    files are copied into `diff`. A sandbox paused in memory is thawed for CRIU to seize it (its processes run
    for that moment), and frozen again after. Returns what the checkpoint parts carry (by part)."""
    volumes = pausing.volume_paths(sandbox, f"refuses a snapshot with memory; {FILESYSTEM_HINT}")
    await pausing.room_for_memory(
        manager, sandbox, images.parent, "the templates' disk", f"no snapshot with memory; {FILESYSTEM_HINT}"
    )
    parts: dict[str, Any] = {}
    carried: list[str] = []
    for part in manager.checkpoint_parts:
        state, names = await part.before_snapshot(sandbox)
        if state:
            parts[type(part).__name__] = state
        carried += names
    if not running:
        await _freeze(manager, sandbox, False)
    try:

        async def copy_files() -> None:
            await manager.runtime.copy_upper(sandbox.handle, diff)

        await manager.runtime.snapshot(sandbox.handle, images, criu, copy_files, carried, volumes)
        await asyncio.to_thread(sync_tree, images)  # (published once whole: its pages on disk first)
    except RuntimeError_ as e:
        raise Conflict(
            f"sandbox '{sandbox.id}' could not be snapshotted with its memory: {e}; {FILESYSTEM_HINT}"
        ) from None
    finally:
        if not running:
            await _freeze(manager, sandbox, True)
    return parts


def info(store: Any, ident: str) -> dict[str, Any]:
    return {"snapshotID": ident, "names": list(store.meta(ident).get("names", []))}


def listed(manager: SandboxManager, sandbox_id: str | None, name: str | None) -> list[dict[str, Any]]:
    """The snapshots (newest first), of one sandbox or with one name when asked."""
    store = manager.templates
    found = []
    for ident in store.names():
        meta = store.meta(ident)
        snap = meta.get("snapshot")
        if not snap or snap.get("fork") or snap.get("paused") or (sandbox_id and snap.get("sandboxID") != sandbox_id):
            continue
        if name and name not in meta.get("names", []):
            continue
        found.append((snap.get("createdAt", 0.0), ident))
    return [info(store, ident) for _, ident in sorted(found, reverse=True)]


async def fork(manager: SandboxManager, sandbox_id: str, count: int, timeout: int) -> list[Sandbox | SandboxdError]:
    """E2B's fork: a snapshot with memory of the sandbox (which runs on: briefly stopped while CRIU writes it),
    then `count` new sandboxes from it, each a sandbox of the source's template that runs the source's processes
    from that instant and diverges on its own (its own uid range, address and name). Each succeeds or fails on
    its own. The snapshot goes once they are made (their files stay: they stand on its layer)."""
    if not 1 <= count <= MAX_FORKS:
        raise BadRequest(f"count must be from 1 to {MAX_FORKS}")
    source = manager.get(sandbox_id)
    rec = source.record
    ident = (await create(manager, sandbox_id, f"fork-{sandbox_id}-{uuid.uuid4().hex[:8]}", True, fork=True))[
        "snapshotID"
    ]
    try:

        async def one() -> Sandbox | SandboxdError:
            try:
                child = await manager.create(
                    ident,
                    timeout=timeout,
                    metadata=dict(rec.metadata),
                    env_vars=dict(rec.env_vars),
                    auto_pause=rec.auto_pause,
                    auto_pause_memory=rec.auto_pause_memory,
                    auto_resume=rec.auto_resume,
                    policy_of=source,
                    # a sandbox of the source's template (a reboot from its files starts that template's service),
                    # standing on the snapshot's layers (the snapshot goes: a crash meanwhile too, at the next start)
                    recorded_as=(rec.template_id, rec.alias or rec.template_id),
                    pool=False,  # (its snapshot goes once the forks are made)
                    team=rec.team,
                )
            except SandboxdError as e:
                return e
            return child

        return list(await asyncio.gather(*(one() for _ in range(count))))
    finally:
        await asyncio.to_thread(manager.templates.delete, ident)


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
