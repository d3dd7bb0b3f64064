"""The `filesystem.Filesystem` Connect service (envd's, as the SDKs' `files` call it), over brokers inside
the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import os
import posixpath
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from sandboxd.core.manager import SandboxManager
from sandboxd.core.users import User
from sandboxd.envd import context, fs
from sandboxd.envd.gen.filesystem import filesystem_pb as fpb
from sandboxd.envd.watch import DirWatcher, SandboxWatches, WatchError, fs_event, keepalive_event, start_event
from sandboxd.runtime.broker import Broker, BrokerGone, BrokerTimeout

MAX_LIST_ENTRIES = 100_000


def connect_error(e: OSError, path: str) -> ConnectError:
    """One table from errno to Connect code and a message that names the path."""
    shown = fs.display_path(path)
    match e.errno:
        case errno.ENOENT:
            return ConnectError(Code.NOT_FOUND, f"path '{shown}' does not exist")
        case errno.EACCES | errno.EPERM:
            return ConnectError(Code.PERMISSION_DENIED, f"permission denied: '{shown}'")
        case errno.EEXIST:
            return ConnectError(Code.ALREADY_EXISTS, f"path '{shown}' already exists")
        case errno.ENOTDIR:
            return ConnectError(Code.INVALID_ARGUMENT, f"path '{shown}' is not a directory")
        case errno.EISDIR:
            return ConnectError(Code.INVALID_ARGUMENT, f"path '{shown}' is a directory")
        case errno.ENOTEMPTY:
            return ConnectError(Code.FAILED_PRECONDITION, f"directory '{shown}' is not empty")
        case errno.ENOSPC | errno.EDQUOT:
            return ConnectError(Code.RESOURCE_EXHAUSTED, f"no space left on the sandbox's disk writing '{shown}'")
        case errno.ELOOP:
            return ConnectError(Code.INVALID_ARGUMENT, f"too many levels of symbolic links in '{shown}'")
        case errno.ENAMETOOLONG:
            return ConnectError(Code.INVALID_ARGUMENT, f"path '{shown[:200]}…' is too long")
        case errno.EINVAL | errno.EXDEV | errno.EBUSY:
            return ConnectError(Code.INVALID_ARGUMENT, f"invalid path or operation: '{shown[:200]}' ({e.strerror})")
        case _:
            return ConnectError(Code.INTERNAL, f"{e.strerror or e}: '{shown}'")


def broker_error(e: BrokerGone) -> ConnectError:
    if isinstance(e, BrokerTimeout):
        return ConnectError(Code.DEADLINE_EXCEEDED, str(e))
    sandbox = context.sandbox()
    if sandbox.killed.is_set():
        return ConnectError(Code.UNAVAILABLE, "the sandbox was killed: the sandbox was not found")
    return ConnectError(Code.INTERNAL, str(e))


F = TypeVar("F", bound=Callable[..., Any])


def broker_errors(fn: F) -> F:
    """A failing broker is the file service's error, never 'sandbox not found' while it runs."""

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(*args: Any, **kwargs: Any) -> Any:
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except BrokerGone as e:
                raise broker_error(e) from None

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except BrokerGone as e:
            raise broker_error(e) from None

    return wrapper  # type: ignore[return-value]


class _Request:
    """What every filesystem call needs: sandbox, user, broker, names."""

    def __init__(self, manager: SandboxManager, ctx: RequestContext) -> None:
        self.sandbox = context.sandbox()
        self.user: User = context.resolve_user(manager, self.sandbox, ctx.request_headers.get("authorization"))
        self.broker: Broker = fs.brokers_of(manager, self.sandbox).get(self.user)
        self.names = fs.names_of(manager, self.sandbox)

    def path(self, raw: str) -> str:
        return fs.resolve(raw, self.user)

    async def stat(self, path: str) -> fpb.EntryInfo:
        return await fs.stat_path(self.broker, path, self.names, self.user)


def _scan(fd: int, directory: str, names: fs.Names, user: User) -> list[tuple[Any, str | None]]:
    """One directory, in a worker thread, in name order: (entry or a symlink's path to resolve, the path
    if it is a directory to descend into)."""
    out: list[tuple[Any, str | None]] = []
    for name in sorted(os.listdir(fd)):
        path = posixpath.join(directory, name)
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while listing
        if stat.S_ISLNK(st.st_mode):
            out.append((path, None))  # the broker resolves it (its target, inside the sandbox)
            continue
        meta = fs.read_metadata_at(fd, name, st, user)
        entry = fs.entry_from_stat(st, fs.display_path(path), names, metadata=meta)
        out.append((entry, path if stat.S_ISDIR(st.st_mode) else None))
        if len(out) > MAX_LIST_ENTRIES:
            break
    return out


class FilesystemService:
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    def _req(self, ctx: RequestContext) -> _Request:
        return _Request(self.manager, ctx)

    @broker_errors
    async def stat(self, request: fpb.StatRequest, ctx: RequestContext) -> fpb.StatResponse:
        r = self._req(ctx)
        path = r.path(request.path)
        try:
            return fpb.StatResponse(entry=await r.stat(path))
        except OSError as e:
            raise connect_error(e, path) from None

    @broker_errors
    async def make_dir(self, request: fpb.MakeDirRequest, ctx: RequestContext) -> fpb.MakeDirResponse:
        r = self._req(ctx)
        path = r.path(request.path)
        try:
            existing = await r.stat(path)
        except FileNotFoundError:
            existing = None
        except OSError as e:
            raise connect_error(e, path) from None
        if existing is not None:
            if existing.type == fpb.FileType.DIRECTORY:
                raise ConnectError(Code.ALREADY_EXISTS, f"directory '{fs.display_path(path)}' already exists")
            raise ConnectError(Code.INVALID_ARGUMENT, f"path '{fs.display_path(path)}' exists and is not a directory")
        try:
            await r.broker.makedirs(path)
            return fpb.MakeDirResponse(entry=await r.stat(path))
        except OSError as e:
            raise connect_error(e, path) from None

    @broker_errors
    async def move(self, request: fpb.MoveRequest, ctx: RequestContext) -> fpb.MoveResponse:
        r = self._req(ctx)
        src, dst = r.path(request.source), r.path(request.destination)
        try:
            await r.broker.makedirs(posixpath.dirname(dst) or "/")
            await r.broker.rename(src, dst)
            return fpb.MoveResponse(entry=await r.stat(dst))
        except OSError as e:
            raise connect_error(e, src if e.errno == errno.ENOENT else dst) from None

    @broker_errors
    async def list_dir(self, request: fpb.ListDirRequest, ctx: RequestContext) -> fpb.ListDirResponse:
        r = self._req(ctx)
        root = r.path(request.path)
        depth = request.depth or 1
        entries: list[fpb.EntryInfo] = []
        try:
            info = await r.stat(root)
            if info.type != fpb.FileType.DIRECTORY:
                raise ConnectError(Code.INVALID_ARGUMENT, f"path '{fs.display_path(root)}' is not a directory")
            await self._list(r, root, depth, entries)
        except OSError as e:
            raise connect_error(e, root) from None
        return fpb.ListDirResponse(entries=entries)

    async def _list(self, r: _Request, directory: str, depth: int, out: list[fpb.EntryInfo]) -> None:
        fd = await r.broker.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # listdir and one stat per entry: in a thread, so a huge directory holds up no one else
            found = await asyncio.to_thread(_scan, fd, directory, r.names, r.user)
        finally:
            os.close(fd)
        # Depth first, as envd (Go's filepath.WalkDir): a directory's entries follow it; symlinks are
        # listed, never descended into.
        for item, subdir in found:
            if len(out) >= MAX_LIST_ENTRIES:
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED, f"more than {MAX_LIST_ENTRIES} entries: use a smaller depth"
                )
            if isinstance(item, str):
                with contextlib.suppress(OSError):
                    out.append(await r.stat(item))
            else:
                out.append(item)
            if subdir is not None and depth > 1:
                with contextlib.suppress(PermissionError, FileNotFoundError):
                    await self._list(r, subdir, depth - 1, out)

    @broker_errors
    async def remove(self, request: fpb.RemoveRequest, ctx: RequestContext) -> fpb.RemoveResponse:
        r = self._req(ctx)
        path = r.path(request.path)
        try:
            await r.broker.remove_all(path)
        except OSError as e:
            raise connect_error(e, path) from None
        return fpb.RemoveResponse()

    def _watches(self, r: _Request) -> SandboxWatches:
        watches = r.sandbox.ext.get("watches")
        if watches is None:
            watches = r.sandbox.ext["watches"] = SandboxWatches(self.manager.settings.tenant)
            r.sandbox.on_kill.append(watches.close_all)
        return watches

    async def _watcher(self, r: _Request, path: str, recursive: bool, include_entry: bool) -> DirWatcher:
        try:
            watcher = DirWatcher(r.broker, path, recursive, include_entry, r.names, r.user, self._watches(r))
        except WatchError as e:
            raise ConnectError(e.code, str(e)) from None
        try:
            await watcher.start()
        except WatchError as e:
            watcher.close()
            raise ConnectError(e.code, str(e)) from None
        except OSError as e:
            watcher.close()
            raise connect_error(e, path) from None
        except BaseException:
            watcher.close()
            raise
        return watcher

    @broker_errors
    async def watch_dir(self, request: fpb.WatchDirRequest, ctx: RequestContext) -> AsyncIterator[fpb.WatchDirResponse]:
        r = self._req(ctx)
        path = r.path(request.path)
        watcher = await self._watcher(r, path, request.recursive, request.include_entry)
        queue: asyncio.Queue[fpb.FilesystemEvent | None] = asyncio.Queue()
        watcher.listeners.append(queue.put_nowait)
        keepalive = context.keepalive_interval(ctx.request_headers)
        forget = context.on_client_gone(lambda: queue.put_nowait(None))  # ends the stream, frees its watcher
        try:
            yield start_event()
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), keepalive)
                except TimeoutError:
                    yield keepalive_event()
                    continue
                if event is None:
                    if r.sandbox.killed.is_set():
                        raise ConnectError(Code.UNAVAILABLE, "the sandbox was killed: the sandbox was not found")
                    if watcher.error is not None:
                        raise ConnectError(watcher.error.code, str(watcher.error))
                    return
                yield fs_event(event)
        finally:
            forget()
            watcher.close()

    @broker_errors
    async def create_watcher(self, request: fpb.CreateWatcherRequest, ctx: RequestContext) -> fpb.CreateWatcherResponse:
        r = self._req(ctx)
        path = r.path(request.path)
        watcher = await self._watcher(r, path, request.recursive, request.include_entry)
        watcher_id = secrets.token_hex(8)
        r.sandbox.ext.setdefault("watchers", {})[watcher_id] = watcher
        return fpb.CreateWatcherResponse(watcher_id=watcher_id)

    def _find_watcher(self, watcher_id: str) -> DirWatcher:
        watcher = context.sandbox().ext.get("watchers", {}).get(watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher '{watcher_id}' not found")
        return watcher

    async def get_watcher_events(
        self, request: fpb.GetWatcherEventsRequest, ctx: RequestContext
    ) -> fpb.GetWatcherEventsResponse:
        watcher = self._find_watcher(request.watcher_id)
        await watcher.settle()
        if watcher.error is not None:
            raise ConnectError(watcher.error.code, str(watcher.error))
        return fpb.GetWatcherEventsResponse(events=watcher.drain())

    async def remove_watcher(self, request: fpb.RemoveWatcherRequest, ctx: RequestContext) -> fpb.RemoveWatcherResponse:
        watcher = self._find_watcher(request.watcher_id)
        watcher.close()
        context.sandbox().ext["watchers"].pop(request.watcher_id, None)
        return fpb.RemoveWatcherResponse()
