"""Opening paths inside a sandbox's root from the host, safely.

Everything a sandbox writes is hostile. A host process that follows `/proc/<pid>/root/etc/passwd`
naively would resolve an absolute symlink planted there (`/etc/passwd -> /etc/shadow`) against the
*host's* root. `openat2(RESOLVE_IN_ROOT)` makes the kernel resolve every component, `..` and
symlinks included, as if the sandbox's root were `/`, with no race between check and use.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


EAGAIN_TRIES = 64  # openat2 attempts while renames or mounts elsewhere keep it from checking a ".." (EAGAIN)


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = RESOLVE_IN_ROOT) -> int:
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode, resolve | RESOLVE_NO_MAGICLINKS)
    for _ in range(EAGAIN_TRIES):
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), how, len(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        # EAGAIN: a rename or mount anywhere on the host during the lookup of a path with ".." in it (the kernel
        # cannot then tell that ".." stayed inside the root): the lookup is tried again, as openat2(2) says
        if err != errno.EAGAIN:
            break
    raise OSError(err, os.strerror(err), path)


def read_file_in_root(root: str, path: str, limit: int = 1 << 20) -> bytes:
    """Read a regular file at `path` as the sandbox sees it, at most `limit` bytes."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = openat2(rootfd, path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    finally:
        os.close(rootfd)
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(22, "not a regular file", path)
        return os.read(fd, limit)
    finally:
        os.close(fd)
