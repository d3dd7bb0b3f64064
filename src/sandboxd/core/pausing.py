"""Pause and resume. Two kinds of pause, as E2B's `pause(mode=...)`:

- `full` (the default): the sandbox's processes are frozen (the cgroup freezer) and stay in memory; a
  resume thaws them, everything intact. Fast (a few ms either way); it frees no memory.
- `filesystem` (`memory: false`): every process ends, the sandbox's files stay (its writable layer or its
  disk image, its uid range, the layers it stands on, which no prune may take meanwhile); a resume boots
  it again from those files, as a reboot does (its template's start command or service start again).
  It survives server restarts.

A resume with `memory: false` (the SDK's `on_resume="reboot"`) of a `full` pause reboots the sandbox from
its files likewise.

A `full` pause goes to disk (`disk`) once the sandbox has been paused for `checkpoint_after` seconds (the
server's `--checkpoint-after`, 60 by default): its processes are written by CRIU into its state dir
(runtime/namespaces.py, `checkpoint`) and end, freeing their memory; a resume restores them, with their
memory, files, pipes, terminals and sockets on loopback, as the same PIDs. What is attached to the sandbox
from outside takes part (CheckpointPart: envd's kept commands carry their output and input over,
envd/checkpointing.py). What cannot be carried over keeps the sandbox paused in memory (a TCP connection from
outside). A sandbox on disk outlives the server (its network and UTS namespaces pinned) and a host reboot too:
then the restore makes it new namespaces (a new address) and the parts attach anew what they wrote down at
the dump (`PARTS`), as for a new sandbox from a snapshot; if even that fails, it boots from its files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sandboxd.core import volume_mounts
from sandboxd.core.errors import Conflict, SandboxdError
from sandboxd.runtime.base import Limits, RuntimeError_, SandboxSpec
from sandboxd.runtime.terminals import Terminals
from sandboxd.templates.store import TemplateError
from sandboxd.volumes.errors import VolumeError

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox, SandboxManager

log = logging.getLogger(__name__)

FULL, FILESYSTEM, DISK = "full", "filesystem", "disk"
IMAGES = "checkpoint"  # in the sandbox's state dir
PARTS = "checkpoint-parts.json"  # beside it: what the parts wrote down at the dump, for a restore after a reboot
DISCARDED = IMAGES + ".discarded-"  # images on their way out (discard_images), a random suffix each
DISK_MARGIN = 64 << 20  # bytes of the data dir's filesystem a pause to disk leaves free beyond its images


class CheckpointPart(Protocol):
    """What another layer attaches to a sandbox from outside, taken through a checkpoint and a restore."""

    async def before_dump(self, sandbox: Sandbox) -> tuple[list[str], dict[str, Any]]:
        """Raise Conflict (the sandbox stays paused in memory) if it cannot be carried over. Returns CRIU's
        names of terminals of the sandbox's processes whose masters are this part's ("tty[RDEV:DEV]": the
        restore gives new ones, `before_restore`), and what to attach anew if what it holds is gone when the
        sandbox is restored (a host reboot: `before_snapshot_restore` takes it, as a snapshot's state)."""
        ...

    async def dump_failed(self, sandbox: Sandbox) -> None: ...

    async def before_snapshot(self, sandbox: Sandbox) -> tuple[dict[str, Any], list[str]]:
        """Before a snapshot with memory (core/snapshots.py: CRIU leaves the processes running): what of this
        part to carry into the sandboxes made from it (JSON, kept with the snapshot), and CRIU's names of the
        files of the sandbox's processes it will give them anew (`before_snapshot_restore`). Raise Conflict if
        what is attached cannot be carried."""
        ...

    def before_snapshot_restore(self, state: dict[str, Any], terminals: Terminals) -> tuple[list[tuple[int, str]], Any]:
        """A new sandbox from a snapshot (`state`: this part's, from `before_snapshot`): descriptors its restored
        processes get instead of files of theirs (fd, CRIU's name; new terminals from `terminals`), and what
        `snapshot_restored` takes."""
        ...

    async def snapshot_restored(self, sandbox: Sandbox, pending: Any, host_pids: dict[int, int]) -> None:
        """The new sandbox runs (registered): attach what `before_snapshot_restore` prepared (and let go of it)."""

    def drop_snapshot_restore(self, pending: Any) -> None:
        """The new sandbox did not start: let go of what `before_snapshot_restore` prepared."""

    async def before_restore(self, sandbox: Sandbox, terminals: Terminals) -> list[tuple[int, str]]:
        """Descriptors the restored processes get instead of files of theirs: (fd, CRIU's name of the file);
        new terminals come from `terminals`."""
        ...

    async def restored(self, sandbox: Sandbox, host_pids: dict[int, int]) -> None:
        """After the restore; `host_pids`: each restored process's PID in the sandbox -> on the host."""

    async def ended(self, sandbox: Sandbox) -> None:
        """The sandbox's checkpoint is let go of (it is killed, or boots from its files instead)."""


def stopped(sandbox: Sandbox) -> bool:
    """Paused to its files: no process of it runs."""
    return sandbox.record.state == "paused" and sandbox.record.pause_mode == FILESYSTEM


def in_memory(sandbox: Sandbox) -> bool:
    """Paused with its processes frozen in memory (to be written to disk after `checkpoint_after`)."""
    return sandbox.record.state == "paused" and sandbox.record.pause_mode == FULL


def without_processes(sandbox: Sandbox) -> bool:
    """Paused to its files, or to disk: no process of it runs (its disk is not mounted anywhere)."""
    return sandbox.record.state == "paused" and sandbox.record.pause_mode in (FILESYSTEM, DISK)


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


def _spec(manager: SandboxManager, sandbox: Sandbox, binds: tuple[tuple[str, str], ...] = ()) -> SandboxSpec:
    """What booting the sandbox again takes: its ID, uid range, layers and resources."""
    rec = sandbox.record
    limits = Limits(
        memory_mb=rec.memory_mb, cpu_count=float(rec.cpu_count), pids=manager.settings.pids, disk_mb=rec.disk_mb
    )
    return SandboxSpec(
        sandbox_id=sandbox.id,
        layers=_layers(sandbox),
        hostname=sandbox.id,
        limits=limits,
        binds=binds,
        resume_uid_base=sandbox.handle.uid_base,
    )


async def boot_again(manager: SandboxManager, sandbox: Sandbox) -> None:
    """Start a stopped sandbox from its files: the same ID, uid range, layers, resources and network
    policy; a new address; its template's start command or service started again."""
    rec = sandbox.record
    try:
        template = manager.templates.get(rec.template_id)
    except TemplateError as e:
        raise SandboxdError(f"sandbox '{sandbox.id}' cannot boot again: its template is gone ({e})") from None
    handle, service = await manager.boot(_spec(manager, sandbox, template.binds), template)
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
    await run_hooks(manager.after_boot_again, sandbox, "after booting it again")  # (uploads the stop cut short)


async def run_hooks(hooks: list[Callable[[Sandbox], Awaitable[Any]]], sandbox: Sandbox, when: str) -> None:
    """What other layers asked to be told (SandboxManager.after_boot_again, after_resume); one that fails is
    logged and the others run."""
    for hook in hooks:
        try:
            await hook(sandbox)
        except Exception:
            log.exception("sandbox %s: %s", sandbox.id, when)


def volume_paths(sandbox: Sandbox, consequence: str) -> list[str]:
    """Where the sandbox's volumes are mounted, for CRIU (external mounts): a path its option syntax
    (`mnt[PATH]:KEY`) cannot carry raises Conflict (`consequence`: what then)."""
    paths = [m["path"] for m in sandbox.record.volume_mounts]
    if any(c in path for path in paths for c in "[]:"):
        raise Conflict(f"a volume mounted at a path with '[', ']' or ':' {consequence}")
    return paths


async def room_for_memory(manager: SandboxManager, sandbox: Sandbox, directory: Path, disk: str, then: str) -> int:
    """The memory the sandbox's processes use (bytes), once checked that `directory`'s filesystem (`disk`, for
    the message) has that much free and DISK_MARGIN more: CRIU's images of them are about that large, and never
    take more than a disk has to spare. Else Conflict (`then`: what happens instead)."""
    used = (await asyncio.to_thread(manager.runtime.stats, sandbox.handle)).memory_bytes
    free = shutil.disk_usage(directory).free
    if used + DISK_MARGIN > free:
        raise Conflict(
            f"sandbox '{sandbox.id}': its processes use {used >> 20} MiB of memory and {disk} has {free >> 20} MiB "
            f"free (less {DISK_MARGIN >> 20} MiB kept spare): {then}"
        )
    return used


async def to_disk(manager: SandboxManager, sandbox: Sandbox) -> None:
    """Write a sandbox paused in memory to disk (under its pause lock): CRIU writes its processes, which
    end. Raises (the sandbox then stays paused in memory, as it was) if that cannot be done."""
    criu = manager.settings.criu
    if criu is None:
        raise Conflict("this server has no CRIU (sandboxd serve --criu): a pause stays in memory")
    if not in_memory(sandbox):
        raise Conflict(f"sandbox '{sandbox.id}' is not paused in memory")
    volumes = volume_paths(sandbox, "keeps the sandbox paused in memory")
    await run_hooks(manager.before_disk_pause, sandbox, "before writing it to disk")
    images = sandbox.handle.state_dir / IMAGES
    shutil.rmtree(images, ignore_errors=True)
    used = await room_for_memory(
        manager, sandbox, sandbox.handle.state_dir, "the host's data dir", "the sandbox stays paused in memory"
    )
    done: list[CheckpointPart] = []
    external: list[str] = []
    states: dict[str, Any] = {}
    # Thawed first: CRIU stops the processes itself (a frozen task cannot be seized), and the keepers of its
    # commands, in its cgroups too, answer the parts. Its processes run for the moment in between.
    await asyncio.to_thread(manager.runtime.freeze, sandbox.handle, False)
    try:
        for part in manager.checkpoint_parts:
            done.append(part)
            names, states[type(part).__name__] = await part.before_dump(sandbox)
            external += names
        held = await manager.runtime.checkpoint(sandbox.handle, images, criu, volumes, external)
    except BaseException:
        for part in done:
            await part.dump_failed(sandbox)
        shutil.rmtree(images, ignore_errors=True)
        await asyncio.to_thread(manager.runtime.freeze, sandbox.handle, True)
        raise
    if sandbox.killed.is_set():  # killed meanwhile (a kill does not wait for the pause lock): nothing to keep
        held.release()
        shutil.rmtree(images, ignore_errors=True)
        return
    try:
        await asyncio.to_thread(_write_parts, sandbox.handle.state_dir, states)
    except OSError as e:  # (only a restore after a host reboot needs it: without, it boots from its files)
        log.warning("sandbox %s: what its checkpoint's parts hold was not written down: %s", sandbox.id, e)
    sandbox.checkpoint = held
    if sandbox.service is not None:
        sandbox.service.poll()  # its helper saw it end: the restored service is init's child alone
        sandbox.service = None
    sandbox.record.pause_mode = DISK
    manager.db.put(sandbox.record)
    log.info("sandbox %s written to disk (%d MiB of memory freed)", sandbox.id, used >> 20)


def carried_restore(
    parts: list[CheckpointPart], states: dict[str, Any], terminals: Terminals
) -> tuple[list[tuple[int, str]], list[tuple[CheckpointPart, Any]]]:
    """For processes restored without what was attached to them (a snapshot's new sandbox; a sandbox on disk after
    a host reboot): each part's descriptors they get in place of files of theirs, from its `states` entry, and
    what `attach_carried` gives it back once they run. On a failure, what was made is let go of."""
    inherit: list[tuple[int, str]] = []
    pending: list[tuple[CheckpointPart, Any]] = []
    try:
        for part in parts:
            state = states.get(type(part).__name__)
            if state:
                fds, attach = part.before_snapshot_restore(state, terminals)
                inherit += fds
                pending.append((part, attach))
    except BaseException:
        for fd, _ in inherit:
            os.close(fd)
        for part, attach in pending:
            part.drop_snapshot_restore(attach)
        raise
    return inherit, pending


async def attach_carried(
    sandbox: Sandbox, pending: list[tuple[CheckpointPart, Any]], host_pids: dict[int, int]
) -> None:
    """The restored sandbox runs (registered): each part attaches what `carried_restore` prepared."""
    for part, attach in pending:
        try:
            await part.snapshot_restored(sandbox, attach, host_pids)
        except Exception:
            log.exception("sandbox %s: attaching what its processes carried", sandbox.id)


def discard_images(state_dir: Path) -> None:
    """A sandbox's checkpoint images (as large as the memory it had) go, without holding up the caller: renamed
    out of the way at once (the next pause writes new ones) and deleted by a thread of their own (freeing a GiB of
    page cache takes a tenth of a second, which a resume or a kill would otherwise wait for, and the event loop
    with it). What a crash leaves of them goes at the next start (`sweep_discarded`)."""
    trash = state_dir / (DISCARDED + secrets.token_hex(4))
    try:
        os.rename(state_dir / IMAGES, trash)
    except FileNotFoundError:
        return
    threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True).start()


def sweep_discarded(state_dir: Path) -> None:
    """What `discard_images` had not deleted yet when the server stopped."""
    for trash in state_dir.glob(DISCARDED + "*"):
        shutil.rmtree(trash, ignore_errors=True)


def _write_parts(state_dir: Path, states: dict[str, Any]) -> None:
    """What the parts wrote down at the dump, kept beside the images (written whole, or not at all)."""
    tmp = state_dir / f".{PARTS}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(states).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, state_dir / PARTS)


def read_parts(state_dir: Path) -> dict[str, Any] | None:
    """`_write_parts`'s, if it is there and whole."""
    try:
        states = json.loads((state_dir / PARTS).read_bytes())
    except (OSError, ValueError):
        return None
    return states if isinstance(states, dict) else None


async def volume_sources(manager: SandboxManager, mounts: list[dict[str, str]]) -> list[Path]:
    """The host directories of these volume mounts' volumes (mounted on the host if they were not), in order."""
    sources: list[Path] = []
    for m in mounts:
        if manager.volumes is None:
            raise SandboxdError("this server keeps no volumes")
        try:
            sources.append(await asyncio.to_thread(manager.volumes.mounted, manager.volumes.get(m["volumeID"])))
        except VolumeError as e:
            raise SandboxdError(f"volume {m['name']!r} cannot be mounted: {e}") from None
    return sources


async def from_disk(manager: SandboxManager, sandbox: Sandbox) -> None:
    """Restore a sandbox written to disk (under its pause lock): its processes again, as they were. After a host
    reboot (its namespaces gone with the keepers of its commands): in new namespaces, what the parts wrote down
    attached anew; if that cannot be, it boots from its files."""
    held = sandbox.checkpoint
    if held is None:
        raise SandboxdError(f"sandbox '{sandbox.id}' has no checkpoint this server holds")
    rec = sandbox.record
    spec = _spec(manager, sandbox)  # (no read-only copies: CRIU restores the mounts it dumped, theirs among them)
    rebooted = not held.namespaces_held
    states = read_parts(sandbox.handle.state_dir) if rebooted else None
    inherit: list[tuple[int, str]] = []
    pending: list[tuple[CheckpointPart, Any]] = []  # (after a reboot: as for a snapshot's new sandbox)
    terminals = Terminals()
    # The namespaces stay pinned until the record names the restored sandbox: a crash before that finds the
    # checkpoint whole again (and ends what of the restored tree ran, then restores it again).
    unpin, held.on_release = held.on_release, None
    try:
        volumes = await volume_sources(manager, sandbox.record.volume_mounts)
        if rebooted and states is None:
            raise RuntimeError_("what was attached to its processes was not written down")
        if states is not None:
            inherit, pending = carried_restore(manager.checkpoint_parts, states, terminals)
        else:
            for part in manager.checkpoint_parts:
                inherit += await part.before_restore(sandbox, terminals)
        handle = await manager.runtime.restore(spec, held, inherit, volumes, terminals)
    except BaseException as e:  # (what was attached stays ready for the next try: the keepers make new pipes)
        held.on_release = unpin
        for part, attach in pending:
            part.drop_snapshot_restore(attach)
        if isinstance(e, RuntimeError_) and rebooted:
            log.warning("sandbox %s, paused to disk, resumes from its files: %s", sandbox.id, e)
            await manager.drop_checkpoint(sandbox)
            rec.pause_mode = FILESYSTEM
            manager.db.put(rec)
            await boot_again(manager, sandbox)
            return
        if isinstance(e, RuntimeError_):
            raise SandboxdError(
                f"sandbox '{sandbox.id}' could not be restored from disk ({e}): it stays paused on disk; try again"
            ) from e
        raise
    finally:
        for fd, _ in inherit:
            os.close(fd)
        terminals.close()
    sandbox.checkpoint = None
    sandbox.handle = handle
    rec.handle = {**asdict(handle), "state_dir": str(handle.state_dir)}
    rec.pause_mode = FULL  # (running again; until the connect records it so, a crash finds it paused in memory)
    manager.db.put(rec)
    if unpin is not None:
        unpin()
    (handle.state_dir / PARTS).unlink(missing_ok=True)
    if rebooted:  # a new address: its policy there, and found by it
        egress = sandbox.policy.egress()
        if not egress.default:
            await manager.runtime.set_egress(handle, egress, cut=False)
        manager.net.add(sandbox)
    host_pids = await asyncio.to_thread(manager.runtime.host_pids, handle)
    for part in manager.checkpoint_parts:
        try:
            await part.restored(sandbox, host_pids)
        except Exception:
            log.exception("sandbox %s: after its restore", sandbox.id)
    await attach_carried(sandbox, pending, host_pids)
    discard_images(handle.state_dir)
    log.info("sandbox %s restored from disk%s", sandbox.id, " (after a host reboot)" if rebooted else "")
