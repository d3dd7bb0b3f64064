"""Directory watching with inotify (via inotify_simple) on descriptors opened inside the sandbox.

The broker opens each watched directory as the requesting user; the server adds the inotify watch on
that descriptor's own inode (`/proc/self/fd/N`), so no sandbox path is ever resolved on the host.
Recursive watches follow new subdirectories as they appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import stat
from collections.abc import Callable

from inotify_simple import INotify
from inotify_simple import flags as F
from protobuf import Oneof

from sandboxd.envd import fs
from sandboxd.envd.gen.filesystem import filesystem_pb as fpb
from sandboxd.runtime.broker import Broker

# Uploads are written to a temporary name and renamed into place (files_http.py): watchers see the
# final name appear (CREATE) with its content (WRITE), never the temporary file.
HIDDEN_PREFIX = ".sandboxd-upload-"
MASK = F.CREATE | F.MODIFY | F.DELETE | F.MOVED_FROM | F.MOVED_TO | F.ATTRIB | F.DELETE_SELF | F.ONLYDIR
MAX_BUFFERED = 10_000


class WatchError(Exception):
    pass


class DirWatcher:
    def __init__(self, broker: Broker, root: str, recursive: bool, include_entry: bool, names: fs.Names) -> None:
        self.broker = broker
        self.root = root
        self.recursive = recursive
        self.include_entry = include_entry
        self.names = names
        self.inotify = INotify(nonblocking=True)
        self.dirs: dict[int, str] = {}  # watch descriptor -> directory relative to root ("" = root)
        self.listeners: list[Callable[[fpb.FilesystemEvent | None], None]] = []
        self.buffer: list[fpb.FilesystemEvent] = []  # for the polling API
        self.closed = False
        self._pending: set[asyncio.Task[None]] = set()
        self._hidden_moves: set[int] = set()  # inotify cookies of temp files being renamed into place
        self._ordered: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self._worker: asyncio.Future[None] | None = None

    async def start(self) -> None:
        try:
            fd = await self.broker.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except NotADirectoryError:
            raise WatchError(f"path '{self.root}' is not a directory") from None
        try:
            await self._add(fd, "")
        finally:
            os.close(fd)
        asyncio.get_running_loop().add_reader(self.inotify.fileno(), self._on_readable)

    async def _add(self, fd: int, rel: str) -> None:
        wd = self.inotify.add_watch(f"/proc/self/fd/{fd}", MASK)
        self.dirs[wd] = rel
        if not self.recursive:
            return
        for entry in os.scandir(fd):
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.stat(entry.name, dir_fd=fd, follow_symlinks=False).st_mode):
                    await self._add_path(posixpath.join(rel, entry.name))

    async def _add_path(self, rel: str) -> None:
        try:
            fd = await self.broker.open(posixpath.join(self.root, rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            await self._add(fd, rel)
        finally:
            os.close(fd)

    def _on_readable(self) -> None:
        try:
            events = self.inotify.read(timeout=0)
        except OSError:
            return
        for ev in events:
            base = self.dirs.get(ev.wd)
            if base is None:
                continue
            if ev.mask & F.IGNORED:
                self.dirs.pop(ev.wd, None)
                continue
            if ev.mask & F.DELETE_SELF:
                if base == "":
                    self._emit(None)  # the watched directory itself is gone
                continue
            name = posixpath.join(base, ev.name) if ev.name else base
            if ev.name.startswith(HIDDEN_PREFIX):
                if ev.mask & F.MOVED_FROM:
                    self._hidden_moves.add(ev.cookie)
                continue
            if ev.mask & F.MOVED_TO and ev.cookie in self._hidden_moves:
                self._hidden_moves.discard(ev.cookie)
                self._report(name, fpb.EventType.CREATE)
                self._report(name, fpb.EventType.WRITE)
                continue
            if ev.mask & F.CREATE or ev.mask & F.MOVED_TO:
                kind = fpb.EventType.CREATE
                if self.recursive and ev.mask & F.ISDIR:
                    self._spawn(self._add_path(name))
            elif ev.mask & F.MODIFY:
                kind = fpb.EventType.WRITE
            elif ev.mask & F.DELETE:
                kind = fpb.EventType.REMOVE
            elif ev.mask & F.MOVED_FROM:
                kind = fpb.EventType.RENAME
            elif ev.mask & F.ATTRIB:
                kind = fpb.EventType.CHMOD
            else:
                continue
            self._report(name, kind)

    def _report(self, name: str, kind: int) -> None:
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
                    entry = await fs.stat_path(self.broker, posixpath.join(self.root, name), self.names)
            self._emit(fpb.FilesystemEvent(name=name, type=kind, entry=entry))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
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
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.inotify.fileno())
        self.inotify.close()
        for listener in list(self.listeners):
            listener(None)


def start_event() -> fpb.WatchDirResponse:
    return fpb.WatchDirResponse(event=Oneof("start", fpb.WatchDirResponse.StartEvent()))


def keepalive_event() -> fpb.WatchDirResponse:
    return fpb.WatchDirResponse(event=Oneof("keepalive", fpb.WatchDirResponse.KeepAlive()))


def fs_event(event: fpb.FilesystemEvent) -> fpb.WatchDirResponse:
    return fpb.WatchDirResponse(event=Oneof("filesystem", event))
