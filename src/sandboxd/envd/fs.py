"""Filesystem plumbing for envd: brokers per (sandbox, user), path resolution, EntryInfo from a descriptor.

Every path a client sends is resolved by a broker *inside* the sandbox (runtime/broker.py). Here we
only turn the client's path into an absolute one (relative paths and `~` are the user's home), keep
one broker per user of a sandbox, and describe opened descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import stat
import time

from protobuf.wkt.google.protobuf import timestamp_pb

from sandboxd.core.manager import Sandbox, SandboxManager
from sandboxd.core.users import User, entries
from sandboxd.envd.gen.filesystem import filesystem_pb as fpb
from sandboxd.runtime.broker import Broker

META_PREFIX = "user.e2b."
BROKER_IDLE = 60.0


class Brokers:
    """One broker per user of a sandbox, started on first use and closed when idle or on kill."""

    def __init__(self, manager: SandboxManager, sandbox: Sandbox) -> None:
        self.manager = manager
        self.sandbox = sandbox
        self.by_uid: dict[int, Broker] = {}
        self._reaper: asyncio.TimerHandle | None = None

    def get(self, user: User) -> Broker:
        broker = self.by_uid.get(user.uid)
        if broker is None or not broker.alive:
            argv = self.manager.runtime.broker_argv(self.sandbox.handle, user.uid, user.gid, user.groups)
            broker = self.by_uid[user.uid] = Broker(argv)
            self._schedule_reap()
        return broker

    def _schedule_reap(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(BROKER_IDLE, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        for uid, broker in list(self.by_uid.items()):
            if now - broker.last_used > BROKER_IDLE and not broker._lock.locked():
                broker.close()
                del self.by_uid[uid]
        if self.by_uid:
            self._schedule_reap()

    def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for broker in self.by_uid.values():
            broker.close()
        self.by_uid.clear()


def brokers_of(manager: SandboxManager, sandbox: Sandbox) -> Brokers:
    brokers = sandbox.ext.get("brokers")
    if brokers is None:
        brokers = sandbox.ext["brokers"] = Brokers(manager, sandbox)
        sandbox.on_kill.append(brokers.close)
    return brokers


def resolve(path: str, user: User) -> str:
    """An absolute path: relative paths and `~` are the user's home. Not normalised: `..` and symlinks
    are the kernel's business, inside the sandbox."""
    if not path:
        return user.home
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    elif not path.startswith("/"):
        path = posixpath.join(user.home, path)
    return path


def display_path(path: str) -> str:
    return posixpath.normpath(path) if path != "/" else "/"


class Names:
    """uid/gid -> name from the sandbox's /etc/passwd and /etc/group, re-read at most every 2 s."""

    def __init__(self, root: str, host_base: int) -> None:
        self.root = root
        self.host_base = host_base  # host uid/gid of the sandbox's 0
        self._cache: dict[str, tuple[float, dict[int, str]]] = {}

    def _table(self, file: str) -> dict[int, str]:
        table: dict[int, str] = {}
        for parts in entries(self.root, file) or []:
            if len(parts) >= 3 and parts[2].isdigit():
                table.setdefault(int(parts[2]), parts[0])
        return table

    def lookup(self, file: str, host_id: int) -> str:
        now = time.monotonic()
        cached = self._cache.get(file)
        if cached is None or now - cached[0] > 2.0:
            cached = (now, self._table(file))
            self._cache[file] = cached
        inner = host_id - self.host_base
        return cached[1].get(inner, str(inner if inner >= 0 else host_id))


def names_of(manager: SandboxManager, sandbox: Sandbox) -> Names:
    names = sandbox.ext.get("names")
    if names is None:
        names = sandbox.ext["names"] = Names(str(manager.runtime.root_path(sandbox.handle)), sandbox.handle.uid_base)
    return names


def _metadata(path: str, follow: bool) -> dict[str, str]:
    meta: dict[str, str] = {}
    try:
        for key in os.listxattr(path, follow_symlinks=follow):
            if key.startswith(META_PREFIX):
                with contextlib.suppress(OSError):
                    value = os.getxattr(path, key, follow_symlinks=follow)
                    meta[key[len(META_PREFIX) :]] = value.decode(errors="replace")
    except OSError:
        pass
    return meta


def may_read(st: os.stat_result, user: User) -> bool:
    """Whether `user` may read the inode (its xattrs need that): sandbox root may, others by mode bits."""
    if user.uid == 0:
        return True
    if st.st_uid - user.host_base == user.uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid - user.host_base in user.groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def read_metadata(fd: int, st: os.stat_result, user: User) -> dict[str, str]:
    """`user.e2b.*` xattrs of the descriptor's own inode (the magic link is followed to the inode the
    descriptor holds; nothing is resolved by name), if the user may read the file."""
    if stat.S_ISLNK(st.st_mode) or not may_read(st, user):
        return {}
    return _metadata(f"/proc/self/fd/{fd}", follow=True)


def read_metadata_at(dirfd: int, name: str, st: os.stat_result, user: User) -> dict[str, str]:
    """xattrs of one entry of a directory we hold open: a single component, never followed."""
    if stat.S_ISLNK(st.st_mode) or not may_read(st, user):
        return {}
    return _metadata(f"/proc/self/fd/{dirfd}/{name}", follow=False)


def write_metadata(fd: int, metadata: dict[str, str]) -> None:
    path = f"/proc/self/fd/{fd}"
    for key in os.listxattr(path):
        if key.startswith(META_PREFIX):
            os.removexattr(path, key)
    for key, value in metadata.items():
        os.setxattr(path, META_PREFIX + key, value.encode())


def _file_type(mode: int) -> fpb.FileType:
    if stat.S_ISDIR(mode):
        return fpb.FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return fpb.FileType.SYMLINK
    return fpb.FileType.FILE


def timestamp(ns: int) -> timestamp_pb.Timestamp:
    return timestamp_pb.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def entry_from_stat(
    st: os.stat_result,
    path: str,
    names: Names,
    *,
    target: os.stat_result | None = None,
    link: str | None = None,
    metadata: dict[str, str] | None = None,
) -> fpb.EntryInfo:
    """EntryInfo for `path`, as envd reports it. For a symlink, `st` is the link (its size, permissions
    string with Go's 'L', owner and time) and `target`, if it resolves, gives the type and mode (else the
    type is unspecified and the mode 0); `symlink_target` is the resolved absolute path."""
    is_link = stat.S_ISLNK(st.st_mode)
    permissions = stat.filemode(st.st_mode)
    if is_link:
        permissions = "L" + permissions[1:]  # Go's os.FileMode.String() marks a symlink with 'L'
        ftype = _file_type(target.st_mode) if target is not None else fpb.FileType.UNSPECIFIED
        mode = stat.S_IMODE(target.st_mode) & 0o777 if target is not None else 0
    else:
        ftype, mode = _file_type(st.st_mode), stat.S_IMODE(st.st_mode) & 0o777
    return fpb.EntryInfo(
        name=posixpath.basename(path) or "/",
        type=ftype,
        path=path,
        size=st.st_size,
        mode=mode,
        permissions=permissions,
        owner=names.lookup("/etc/passwd", st.st_uid),
        group=names.lookup("/etc/group", st.st_gid),
        modified_time=timestamp(st.st_mtime_ns),
        symlink_target=link,
        metadata=metadata or {},
        is_symlink=is_link,
    )


async def stat_path(broker: Broker, path: str, names: Names, user: User) -> fpb.EntryInfo:
    """EntryInfo of `path` (absolute) as the broker's user sees it; OSError(ENOENT) if missing.

    A path can change kind between our open and the readlink of its target (a symlink swapped for a
    file): that is retried a few times, then reported as the entry it last was."""
    for _ in range(3):
        try:
            return await _stat_once(broker, path, names, user)
        except _Changed:
            continue
    return await _stat_once(broker, path, names, user, tolerate_change=True)


class _Changed(Exception):
    pass


async def _stat_once(
    broker: Broker, path: str, names: Names, user: User, tolerate_change: bool = False
) -> fpb.EntryInfo:
    fd = await broker.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        target = link = None
        if stat.S_ISLNK(st.st_mode):
            try:
                await broker.readlink(path)  # still a link? (a swap to another kind is retried)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    raise
                if not tolerate_change:
                    raise _Changed from None
            # envd's target is the link resolved to an absolute path, inside the sandbox (never a host
            # path); a link that does not resolve names itself.
            try:
                link = await broker.realpath(path)
            except OSError:
                link = path
            with contextlib.suppress(OSError):
                tfd = await broker.open(path, os.O_PATH)
                try:
                    target = os.fstat(tfd)
                finally:
                    os.close(tfd)
        meta = read_metadata(fd, st, user)
        return entry_from_stat(st, display_path(path), names, target=target, link=link, metadata=meta)
    finally:
        os.close(fd)
