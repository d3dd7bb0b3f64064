"""Directory watching with inotify (via inotify_simple) on descriptors opened inside the sandbox.

The broker opens each watched directory as the requesting user; the server adds the inotify watch on
that descriptor's own inode (`/proc/self/fd/N`), so no sandbox path is ever resolved on the host.
Recursive watches follow new subdirectories as they appear.

inotify instances are a host-wide resource of the user that creates them (128 for root by default), so
the whole server shares one instance (`WatchHub`): a watch descriptor can serve several watchers (the
kernel gives one per inode), and the number of watched directories is capped, for the server and per
sandbox (`SandboxWatches`: its watchers and the directories they watch, `TenantLimits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import posixpath
import stat
import time
from collections.abc import Callable
from typing import Any, NoReturn

from connectrpc.code import Code
from inotify_simple import flags as F
from inotify_simple import parse_events
from protobuf import Oneof

from sandboxd.core.tenant_limits import TenantLimits
from sandboxd.core.users import User
from sandboxd.envd import fs
from sandboxd.envd.gen.filesystem import filesystem_pb as fpb
from sandboxd.runtime.broker import Broker

# Uploads are written to a temporary name and renamed into place (files_http.py): watchers see the
# final name appear (CREATE) with its content (WRITE), never the temporary file.
HIDDEN_PREFIX = ".sandboxd-upload-"
# What an upload's temporary file becomes, for the events a watch reports when it is renamed into place:
# tmp name -> (a file was replaced, bytes written, when noted). Set by files_http just before the rename.
_UPLOADS: dict[str, tuple[bool, int, float]] = {}
_UPLOAD_TTL = 60.0


def note_upload(tmp_name: str, replaced: bool, size: int) -> None:
    now = time.monotonic()
    if len(_UPLOADS) > 1024:  # uploads no watch saw: forget the old ones
        for k in [k for k, v in _UPLOADS.items() if now - v[2] > _UPLOAD_TTL]:
            del _UPLOADS[k]
    _UPLOADS[tmp_name] = (replaced, size, now)


MASK = F.CREATE | F.MODIFY | F.DELETE | F.MOVED_FROM | F.MOVED_TO | F.ATTRIB | F.DELETE_SELF | F.ONLYDIR
MAX_BUFFERED = 10_000


class WatchError(Exception):
    def __init__(self, message: str, code: Code = Code.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


class WatchHub:
    """One sandbox's inotify instance, multiplexed over its watchers. The instance is made inside the
    sandbox by its broker (Broker.inotify_init), so the kernel charges it and every watch on it to the
    sandbox's own uid: no tenant can use up an inotify budget the server or its neighbours share."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.subs: dict[int, list[tuple[DirWatcher, str]]] = {}
        self._made: asyncio.Future[None] | None = None

    async def ensure(self, broker: Broker) -> None:
        if self._made is None:
            self._made = asyncio.ensure_future(self._make(broker))
        await asyncio.shield(self._made)

    async def _make(self, broker: Broker) -> None:
        fd = await broker.inotify_init()
        os.set_inheritable(fd, False)
        self.fd = fd
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    def add(self, fd: int, watcher: DirWatcher, rel: str) -> int:
        if self.fd is None:
            raise WatchError("the sandbox's inotify instance is not ready", Code.UNAVAILABLE)
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(f"/proc/self/fd/{fd}"), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise WatchError(f"cannot watch more directories: {os.strerror(err)}", Code.RESOURCE_EXHAUSTED)
        self.subs.setdefault(wd, []).append((watcher, rel))
        return wd

    def remove(self, wd: int, watcher: DirWatcher) -> None:
        subs = [s for s in self.subs.get(wd, []) if s[0] is not watcher]
        if subs:
            self.subs[wd] = subs
            return
        self.subs.pop(wd, None)
        if self.fd is not None:
            _libc.inotify_rm_watch(self.fd, wd)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None
        self.subs.clear()

    def _on_readable(self) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, OSError):
            return
        for ev in parse_events(data):
            if ev.mask & F.IGNORED:
                for watcher, _ in self.subs.pop(ev.wd, []):
                    watcher.untrack(ev.wd)
                continue
            for watcher, rel in list(self.subs.get(ev.wd, [])):
                watcher.on_event(ev, rel)


_libc = ctypes.CDLL(None, use_errno=True)


class SandboxWatches:
    """One sandbox's watchers and the number of directories they watch, against its caps."""

    def __init__(self, limits: TenantLimits) -> None:
        self.limits = limits
        self.live: set[DirWatcher] = set()
        self.dirs = 0
        self.hub = WatchHub()

    def admit(self) -> None:
        cap = self.limits.watchers
        if len(self.live) >= cap:
            raise WatchError(
                f"this sandbox already has {len(self.live)} watchers (WatchDir streams and CreateWatcher), the "
                f"limit (watchers, `sandboxd serve --max-watchers`) is {cap}: stop some first",
                Code.RESOURCE_EXHAUSTED,
            )

    def add_dir(self) -> None:
        if self.dirs >= self.limits.watched_dirs:
            self.add_dir_refused()
        self.dirs += 1

    def add_dir_refused(self) -> NoReturn:
        cap = self.limits.watched_dirs
        raise WatchError(
            f"this sandbox's watches would cover more than {cap} directories (watched_dirs, "
            "`sandboxd serve --max-watched-dirs`): watch a smaller tree, watch without recursion, "
            "or stop other watchers",
            Code.RESOURCE_EXHAUSTED,
        )

    def close_all(self) -> None:
        for watcher in list(self.live):
            watcher.close()
        self.hub.close()


class DirWatcher:
    def __init__(
        self,
        broker: Broker,
        root: str,
        recursive: bool,
        include_entry: bool,
        names: fs.Names,
        user: User,
        owner: SandboxWatches | None = None,
    ) -> None:
        self.owner = owner or SandboxWatches(TenantLimits())
        self.owner.admit()
        self.owner.live.add(self)
        self.error: WatchError | None = None  # why the watch ended, if it failed after it started
        self.broker = broker
        self.root = root
        self.recursive = recursive
        self.include_entry = include_entry
        self.names = names
        self.user = user
        self.wds: set[int] = set()
        self.listeners: list[Callable[[fpb.FilesystemEvent | None], None]] = []
        self.buffer: list[fpb.FilesystemEvent] = []  # for the polling API
        self.closed = False
        self._pending: set[asyncio.Future[Any]] = set()
        # inotify cookies of upload temp files being renamed into place -> their temp name
        self._hidden_moves: dict[int, str] = {}
        self._ordered: asyncio.Queue[tuple[str, fpb.EventType]] = asyncio.Queue()
        self._worker: asyncio.Future[None] | None = None

    async def start(self) -> None:
        try:
            await self.owner.hub.ensure(self.broker)
        except OSError as e:
            raise WatchError(f"cannot watch: {e.strerror or e}", Code.RESOURCE_EXHAUSTED) from None
        try:
            fd = await self.broker.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except NotADirectoryError:
            raise WatchError(f"path '{self.root}' is not a directory") from None
        try:
            if self.recursive:
                # Too big a tree is refused at once: counted inside the sandbox, on its CPU, not walked
                # here one broker round trip per directory.
                room = self.owner.limits.watched_dirs - self.owner.dirs
                if await self.broker.count_dirs(self.root, room) > room:
                    self.owner.add_dir_refused()
            await self._add(fd, "")
        finally:
            os.close(fd)

    async def _add(self, fd: int, rel: str, announce: bool = False) -> None:
        """Watch the directory `fd` (at `rel`); with `announce` (a directory that appeared while we
        watch), also report what it already holds: it may have been filled before its watch existed."""
        if self.closed:
            return
        self.owner.add_dir()
        try:
            wd = self.owner.hub.add(fd, self, rel)
        except BaseException:
            self.owner.dirs -= 1
            raise
        if wd in self.wds:  # already ours (the same directory reached twice)
            self.owner.dirs -= 1
        self.wds.add(wd)
        if not self.recursive:
            return
        entries = await asyncio.to_thread(_entries, fd)
        for name, is_dir in entries:
            if announce:
                self._report(posixpath.join(rel, name), fpb.EventType.CREATE)
            if is_dir:
                await self._add_path(posixpath.join(rel, name), announce)

    async def _add_path(self, rel: str, announce: bool = False) -> None:
        try:
            fd = await self.broker.open(posixpath.join(self.root, rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            await self._add(fd, rel, announce)
        finally:
            os.close(fd)

    def on_event(self, ev: Any, base: str) -> None:
        if self.closed:
            return
        if ev.mask & F.DELETE_SELF:
            if base == "":
                self._emit(None)  # the watched directory itself is gone
            return
        name = posixpath.join(base, ev.name) if ev.name else base
        if ev.name.startswith(HIDDEN_PREFIX):
            if ev.mask & F.MOVED_FROM:
                self._hidden_moves[ev.cookie] = ev.name
            return
        if ev.mask & F.MOVED_TO and ev.cookie in self._hidden_moves:
            # An upload landed: the events envd's write makes (it opens the file, sets its owner, writes):
            # a new file is CREATE, CHMOD, WRITE; a replaced one CHMOD, WRITE (no WRITE for no bytes).
            replaced, size, _ = _UPLOADS.pop(self._hidden_moves.pop(ev.cookie), (False, 1, 0.0))
            if not replaced:
                self._report(name, fpb.EventType.CREATE)
            self._report(name, fpb.EventType.CHMOD)
            if size or replaced:
                self._report(name, fpb.EventType.WRITE)
            return
        if ev.mask & F.CREATE or ev.mask & F.MOVED_TO:
            kind = fpb.EventType.CREATE
            if self.recursive and ev.mask & F.ISDIR:
                self._spawn(self._follow(name))
        elif ev.mask & F.MODIFY:
            kind = fpb.EventType.WRITE
        elif ev.mask & F.DELETE:
            kind = fpb.EventType.REMOVE
        elif ev.mask & F.MOVED_FROM:
            kind = fpb.EventType.RENAME
        elif ev.mask & F.ATTRIB:
            kind = fpb.EventType.CHMOD
        else:
            return
        self._report(name, kind)

    async def _follow(self, rel: str) -> None:
        """Watch a directory that appeared in a recursive watch; past the sandbox's cap, the watch fails."""
        try:
            await self._add_path(rel, announce=True)
        except WatchError as e:
            self.fail(e)

    def fail(self, error: WatchError) -> None:
        self.error = error
        self.close()

    def untrack(self, wd: int) -> None:
        if wd in self.wds:
            self.wds.discard(wd)
            self.owner.dirs -= 1

    def _report(self, name: str, kind: fpb.EventType) -> None:
        if not self.include_entry:
            self._emit(fpb.FilesystemEvent(name=name, type=kind))
            return
        # Entries are looked up through the broker: one worker, so events keep their order.
        self._ordered.put_nowait((name, kind))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._emit_with_entries())

    async def _emit_with_entries(self) -> None:
        while not self._ordered.empty():
            name, kind = self._ordered.get_nowait()
            entry = None
            if kind not in (fpb.EventType.REMOVE, fpb.EventType.RENAME):
                with contextlib.suppress(OSError):
                    entry = await fs.stat_path(self.broker, posixpath.join(self.root, name), self.names, self.user)
            self._emit(fpb.FilesystemEvent(name=name, type=kind, entry=entry))

    async def settle(self) -> None:
        """Wait (briefly) for entry lookups in progress, so a poll returns complete events."""
        if self._worker is not None and not self._worker.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._worker), 1.0)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _emit(self, event: fpb.FilesystemEvent | None) -> None:
        if event is not None and len(self.buffer) < MAX_BUFFERED:
            self.buffer.append(event)
        for listener in list(self.listeners):
            listener(event)

    def drain(self) -> list[fpb.FilesystemEvent]:
        events, self.buffer = self.buffer, []
        return events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self._pending:
            task.cancel()
        if self._worker is not None:
            self._worker.cancel()
        for wd in list(self.wds):
            self.owner.hub.remove(wd, self)
        self.owner.dirs -= len(self.wds)
        self.wds.clear()
        self.owner.live.discard(self)
        for listener in list(self.listeners):
            listener(None)


def _entries(fd: int) -> list[tuple[str, bool]]:
    """(name, is a directory) of each entry, symlinks not followed."""
    out = []
    for name in sorted(os.listdir(fd)):
        if name.startswith(HIDDEN_PREFIX):
            continue
        with contextlib.suppress(OSError):
            out.append((name, stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)))
    return out


def start_event() -> fpb.WatchDirResponse:
    return fpb.WatchDirResponse(event=Oneof("start", fpb.WatchDirResponse.StartEvent()))  # type: ignore[arg-type]


def keepalive_event() -> fpb.WatchDirResponse:
    return fpb.WatchDirResponse(event=Oneof("keepalive", fpb.WatchDirResponse.KeepAlive()))  # type: ignore[arg-type]


def fs_event(event: fpb.FilesystemEvent) -> fpb.WatchDirResponse:
    return fpb.WatchDirResponse(event=Oneof("filesystem", event))  # type: ignore[arg-type]
