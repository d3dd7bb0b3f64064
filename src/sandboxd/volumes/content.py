"""A volume's files, as E2B's volume content API works on them: list, stat, make a directory, read,
write, change owner and mode, remove.

Sandboxes write into volumes, so everything in one is hostile: a symlink `/x -> /etc` planted by a
sandbox must not make the server write into the host's /etc. Every path is resolved by the kernel with
`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from the volume's root (symlinks and `..` stay inside
it), and every change is made relative to a directory fd so resolved. Owners are sandbox-side ids (0 is
sandbox root): on disk they are shifted by the template uid range (templates/uids.py), as templates'
files are, so that no file of a volume belongs to a host user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandboxd.runtime.rootfs import openat2
from sandboxd.templates.uids import UID_RANGE, UID_SHIFT
from sandboxd.volumes.errors import Conflict, NoSpace, NotFound, VolumeError

MAX_PATH = 4096
MAX_DEPTH = 32
MAX_ENTRIES = 50_000  # in one listing
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
TEMP_PREFIX = ".sandboxd-upload-"  # an upload being written, renamed into place when whole


@dataclass(frozen=True)
class Owner:
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None

    def host_ids(self, default: tuple[int, int]) -> tuple[int, int]:
        """The host uid and gid to give: ours, else the sandbox-side `default` ones, shifted."""
        uid = self.uid if self.uid is not None else default[0]
        gid = self.gid if self.gid is not None else default[1]
        return uid + UID_SHIFT, gid + UID_SHIFT

    def check(self) -> None:
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if value is not None and not 0 <= value < UID_RANGE:
                raise VolumeError(f"{name} must be from 0 to {UID_RANGE - 1} (an id inside sandboxes), not {value}")
        if self.mode is not None and not 0 <= self.mode <= 0o7777:
            raise VolumeError(f"mode must be permission bits from 0 to 0o7777, not {self.mode:o}")


def parts_of(path: str) -> list[str]:
    """The components of a path in the volume ("/" and "" are its root); `..` is resolved by the kernel."""
    if len(path) > MAX_PATH:
        raise VolumeError(f"path is longer than {MAX_PATH} characters")
    if "\0" in path:
        raise VolumeError("path contains a NUL character")
    return [p for p in path.split("/") if p not in ("", ".")]


def _display(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _inside_id(host_id: int) -> int:
    inside = host_id - UID_SHIFT
    return inside if 0 <= inside < UID_RANGE else 65534  # not of the volume's range: "nobody", as overflowuid


def entry(st: os.stat_result, parts: list[str], target: str | None = None) -> dict[str, Any]:
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "unknown"
    out: dict[str, Any] = {
        "name": parts[-1] if parts else "/",
        "type": kind,
        "path": _display(parts),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": _inside_id(st.st_uid),
        "gid": _inside_id(st.st_gid),
        "atime": _time(st.st_atime),
        "mtime": _time(st.st_mtime),
        "ctime": _time(st.st_ctime),
    }
    if target is not None:
        out["target"] = target
    return out


def _errno_error(e: OSError, parts: list[str]) -> VolumeError:
    where = _display(parts)
    if e.errno == errno.ENOENT:
        return NotFound(f"path {where} not found")
    if e.errno == errno.ENOTDIR:
        return NotFound(f"path {where} not found: one of its parents is not a directory")
    if e.errno == errno.EEXIST:
        return Conflict(f"path {where} already exists")
    if e.errno == errno.EISDIR:
        return VolumeError(f"path {where} is a directory")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"the volume is full (writing {where}): remove files or use a bigger volume")
    if e.errno == errno.ELOOP:
        return VolumeError(f"path {where}: too many levels of symbolic links")
    if e.errno == errno.ENOTEMPTY:
        return Conflict(f"directory {where} is not empty")
    if e.errno == errno.ENAMETOOLONG:
        return VolumeError(f"path {where}: a name in it is too long")
    return VolumeError(f"path {where}: {e.strerror}")


class VolumeFiles:
    """The files of one mounted volume (`root`: its mount point on the host)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _open(self, parts: list[str], flags: int = os.O_PATH, follow: bool = True) -> int:
        rootfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return openat2(rootfd, _display(parts), flags | (0 if follow else os.O_NOFOLLOW))
        except OSError as e:
            raise _errno_error(e, parts) from None
        finally:
            os.close(rootfd)

    @contextlib.contextmanager
    def _fd(self, parts: list[str], flags: int = os.O_PATH, follow: bool = True) -> Iterator[int]:
        fd = self._open(parts, flags, follow)
        try:
            yield fd
        finally:
            os.close(fd)

    def _parent_parts(self, parts: list[str]) -> list[str]:
        if not parts or parts[-1] == "..":
            raise VolumeError(f"path {_display(parts)} names no entry of a directory (the volume's root or '..')")
        return parts[:-1]

    def _open_parent(self, parts: list[str], owner: Owner, force: bool) -> int:
        """An fd (O_RDONLY) of the directory `parts` go in, made first with `force` if missing."""
        above = self._parent_parts(parts)
        try:
            return self._open(above, os.O_RDONLY | os.O_DIRECTORY)
        except NotFound:
            if not force:
                raise NotFound(
                    f"the directory of {_display(parts)} does not exist: create it first, or pass force to create "
                    "missing parents"
                ) from None
        self._make_parents(above, Owner(owner.uid, owner.gid))  # (the mode asked for is the entry's own)
        return self._open(above, os.O_RDONLY | os.O_DIRECTORY)

    # -- reading ---------------------------------------------------------------------------------
    def stat(self, path: str) -> dict[str, Any]:
        parts = parts_of(path)
        with self._fd(parts, follow=False) as fd:
            st = os.fstat(fd)
            target = os.readlink("", dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None  # readlinkat(fd, "")
            return entry(st, parts, target)

    def list_dir(self, path: str, depth: int = 1) -> list[dict[str, Any]]:
        if not 1 <= depth <= MAX_DEPTH:
            raise VolumeError(f"depth must be from 1 to {MAX_DEPTH}, not {depth}")
        parts = parts_of(path)
        out: list[dict[str, Any]] = []
        with self._fd(parts, os.O_RDONLY | os.O_DIRECTORY) as fd:
            self._walk(fd, parts, depth, out)
        return out

    def _walk(self, dirfd: int, parts: list[str], depth: int, out: list[dict[str, Any]]) -> None:
        with os.scandir(dirfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if len(out) >= MAX_ENTRIES:
                raise VolumeError(
                    f"{_display(parts)} holds more than {MAX_ENTRIES} entries at this depth: list with a smaller "
                    "depth or a deeper path"
                )
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:  # removed meanwhile (a sandbox works in it)
                continue
            sub = [*parts, name]
            target = None
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    target = os.readlink(name, dir_fd=dirfd)
            out.append(entry(st, sub, target))
            if depth > 1 and stat.S_ISDIR(st.st_mode):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                except OSError:
                    continue
                try:
                    self._walk(fd, sub, depth - 1, out)
                finally:
                    os.close(fd)

    def open_read(self, path: str) -> tuple[int, int]:
        """(an fd open for reading, its size) of the regular file at `path` (symlinks followed inside)."""
        parts = parts_of(path)
        fd = self._open(parts, os.O_RDONLY | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise VolumeError(f"path {_display(parts)} is {kind}: only files can be read")
        os.set_blocking(fd, True)
        return fd, st.st_size

    # -- changing --------------------------------------------------------------------------------
    def _apply(self, fd: int, owner: Owner, default_mode: int, default_ids: tuple[int, int]) -> None:
        os.chown(f"/proc/self/fd/{fd}", *owner.host_ids(default_ids))
        os.chmod(f"/proc/self/fd/{fd}", owner.mode if owner.mode is not None else default_mode)

    def _ids_of(self, dirfd: int) -> tuple[int, int]:
        st = os.fstat(dirfd)
        return _inside_id(st.st_uid), _inside_id(st.st_gid)

    def _make_parents(self, parts: list[str], owner: Owner) -> None:
        """mkdir -p of `parts` (each new directory owned as its parent is, unless `owner` says)."""
        for i in range(len(parts)):
            try:
                with self._fd(parts[: i + 1], os.O_PATH | os.O_DIRECTORY):
                    continue
            except NotFound:
                pass
            with self._fd(parts[:i], os.O_PATH | os.O_DIRECTORY) as parent:
                try:
                    os.mkdir(parts[i], 0o700, dir_fd=parent)
                except FileExistsError:
                    continue
                except OSError as e:
                    raise _errno_error(e, parts[: i + 1]) from None
                ids = self._ids_of(parent)
            with self._fd(parts[: i + 1], os.O_PATH | os.O_DIRECTORY, follow=False) as fd:
                self._apply(fd, owner, DEFAULT_DIR_MODE, ids)

    def make_dir(self, path: str, owner: Owner, force: bool = False) -> dict[str, Any]:
        owner.check()
        parts = parts_of(path)
        dirfd = self._open_parent(parts, owner, force)
        try:
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=dirfd)
            except FileExistsError:
                st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                if force and stat.S_ISDIR(st.st_mode):
                    return entry(st, parts)
                raise Conflict(f"path {_display(parts)} already exists") from None
            except OSError as e:
                raise _errno_error(e, parts) from None
            ids = self._ids_of(dirfd)
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        finally:
            os.close(dirfd)
        try:
            self._apply(fd, owner, DEFAULT_DIR_MODE, ids)
            return entry(os.fstat(fd), parts)
        finally:
            os.close(fd)

    def begin_write(self, path: str, owner: Owner, force: bool = False) -> Upload:
        """A new file at `path`, written in a temporary file beside it and renamed into place when whole
        (an upload cut short leaves the old file as it was)."""
        owner.check()
        parts = parts_of(path)
        dirfd = self._open_parent(parts, owner, force)
        try:
            try:
                st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise VolumeError(f"path {_display(parts)} is a directory: remove it first to write a file there")
            except FileNotFoundError:
                pass
            temp = f"{TEMP_PREFIX}{os.urandom(6).hex()}"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(temp, flags, 0o600, dir_fd=dirfd)
            except OSError as e:
                raise _errno_error(e, parts) from None
            return Upload(dirfd, fd, temp, parts, owner, self._ids_of(dirfd))
        except BaseException:
            os.close(dirfd)
            raise

    def update(self, path: str, owner: Owner) -> dict[str, Any]:
        owner.check()
        parts = parts_of(path)
        with self._fd(parts) as fd:
            uid = owner.uid + UID_SHIFT if owner.uid is not None else -1
            gid = owner.gid + UID_SHIFT if owner.gid is not None else -1
            os.chown(f"/proc/self/fd/{fd}", uid, gid)
            if owner.mode is not None:
                os.chmod(f"/proc/self/fd/{fd}", owner.mode)
            return entry(os.fstat(fd), parts)

    def remove(self, path: str) -> None:
        parts = parts_of(path)
        dirfd = self._open(self._parent_parts(parts), os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(parts[-1], dir_fd=dirfd)  # fd-based: never follows a symlink out
                else:
                    os.unlink(parts[-1], dir_fd=dirfd)
            except OSError as e:
                raise _errno_error(e, parts) from None
        finally:
            os.close(dirfd)


class Upload:
    """A file being written (VolumeFiles.begin_write): `write` chunks, then `commit` or `abort`. Called
    from worker threads; an abort (a request cancelled mid-write) waits for the write in progress, so no
    write ever goes through a descriptor number the server has reused (see fdio.py)."""

    def __init__(self, dirfd: int, fd: int, temp: str, parts: list[str], owner: Owner, ids: tuple[int, int]):
        self.dirfd, self.fd, self.temp, self.parts, self.owner, self.ids = dirfd, fd, temp, parts, owner, ids
        self._lock = threading.RLock()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            if self.fd < 0:
                raise VolumeError("the upload was cancelled")
            try:
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError as e:
                raise _errno_error(e, self.parts) from None

    def commit(self) -> dict[str, Any]:
        with self._lock:
            return self._commit()

    def _commit(self) -> dict[str, Any]:
        if self.fd < 0:
            raise VolumeError("the upload was cancelled")
        try:
            os.fchown(self.fd, *self.owner.host_ids(self.ids))
            os.fchmod(self.fd, self.owner.mode if self.owner.mode is not None else DEFAULT_FILE_MODE)
            os.fsync(self.fd)
            os.rename(self.temp, self.parts[-1], src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
            os.fsync(self.dirfd)
            return entry(os.fstat(self.fd), self.parts)
        except OSError as e:
            self.abort()
            raise _errno_error(e, self.parts) from None
        finally:
            self.close()

    def abort(self) -> None:
        with self._lock:
            if self.dirfd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(self.temp, dir_fd=self.dirfd)
            self.close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for name in ("fd", "dirfd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
