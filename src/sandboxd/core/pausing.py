"""Pause and resume. Two kinds of pause, as E2B's `pause(mode=...)`:

- `full` (the default): the sandbox's processes are frozen (the cgroup freezer) and stay in memory; a
  resume thaws them, everything intact. Fast (a few ms either way); it frees no memory.
- `filesystem` (`memory: false`): every process ends, the sandbox's files stay (its writable layer or its
  disk image, its uid range, the layers it stands on, which no prune may take meanwhile); a resume boots
  it again from those files, as a reboot does (its template's start command or service start again).
  It survives server restarts.

A resume with `memory: false` (the SDK's `on_resume="reboot"`) of a `full` pause reboots the sandbox from
its files likewise.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.core import volume_mounts
from sandboxd.core.errors import Conflict, SandboxdError
from sandboxd.runtime.base import Limits, SandboxSpec
from sandboxd.templates.store import TemplateError

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

log = logging.getLogger(__name__)

FULL, FILESYSTEM = "full", "filesystem"


def stopped(sandbox: Sandbox) -> bool:
    """Paused to its files: no process of it runs."""
    return sandbox.record.state == "paused" and sandbox.record.pause_mode == FILESYSTEM


def _layers(sandbox: Sandbox) -> tuple[Path, ...]:
    if not sandbox.record.layers:
        raise Conflict(
            f"sandbox '{sandbox.id}' was made by an older sandboxd that did not record its layers: it can be "
            "paused with its memory (the default), not to its files alone"
        )
    return tuple(Path(p) for p in sandbox.record.layers)


async def stop(manager: SandboxManager, sandbox: Sandbox) -> None:
    """End every process of the sandbox, keeping its files; the record says so first (a crash midway is
    finished at the next start)."""
    layers = _layers(sandbox)
    manager.templates.hold(sandbox.id, layers, sandbox.handle.state_dir)  # (as it has since its create)
    sandbox.record.state, sandbox.record.pause_mode = "paused", FILESYSTEM
    manager.db.put(sandbox.record)
    manager.net.remove(sandbox)
    for hook in sandbox.on_kill:  # its process streams, file watches, brokers and proxied connections end
        try:
            hook()
        except Exception:
            log.exception("ending what was attached to sandbox %s failed", sandbox.id)
    sandbox.on_kill.clear()
    sandbox.ext.clear()
    await manager.runtime.stop(sandbox.handle)
    if sandbox.service is not None:
        sandbox.service.poll()  # its helper exited with the sandbox: collect it
        sandbox.service = None
    sandbox.handle = replace(sandbox.handle, init_pid=0, init_start_time=0, address="", address6="")
    sandbox.record.handle = {**asdict(sandbox.handle), "state_dir": str(sandbox.handle.state_dir)}
    manager.db.put(sandbox.record)


async def boot_again(manager: SandboxManager, sandbox: Sandbox) -> None:
    """Start a stopped sandbox from its files: the same ID, uid range, layers, resources and network
    policy; a new address; its template's start command or service started again."""
    rec = sandbox.record
    try:
        template = manager.templates.get(rec.template_id)
    except TemplateError as e:
        raise SandboxdError(f"sandbox '{sandbox.id}' cannot boot again: its template is gone ({e})") from None
    limits = Limits(
        memory_mb=rec.memory_mb, cpu_count=float(rec.cpu_count), pids=manager.settings.pids, disk_mb=rec.disk_mb
    )
    spec = SandboxSpec(
        sandbox_id=sandbox.id,
        layers=_layers(sandbox),
        hostname=sandbox.id,
        limits=limits,
        binds=template.binds,
        resume_uid_base=sandbox.handle.uid_base,
    )
    handle, service = await manager.boot(spec, template)
    try:
        egress = sandbox.policy.egress()
        if not egress.default:
            await manager.runtime.set_egress(handle, egress, cut=False)
        await volume_mounts.attach(manager, handle, rec.volume_mounts)
    except BaseException:
        await manager.runtime.stop(handle)
        raise
    sandbox.handle, sandbox.service = handle, service
    rec.handle = {**asdict(handle), "state_dir": str(handle.state_dir)}
    manager.net.add(sandbox)
    for hook in manager.after_boot_again:  # (uploads the stop cut short: envd/uploads.py)
        try:
            await hook(sandbox)
        except Exception:
            log.exception("after booting sandbox %s again", sandbox.id)
