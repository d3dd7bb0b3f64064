"""File descriptors: syncfs(2), and descriptors that worker threads read or write while the event loop
may close them.

A request whose handler is cancelled (its client went away) closes its file while a worker thread may be
in the middle of a `pread` or `write` on it (`asyncio.to_thread` cannot stop a thread). A plain
`os.close` then frees the number for the next `open`, `socket` or `epoll_create` in the server, and the
thread's next call reads from or writes into *that*: another sandbox's file, a netlink socket, the event
loop's own epoll. `ThreadFd` makes the close wait for the call in progress and every later call fail with
EBADF instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2): everything dirty on the filesystem `fd` is on, written out (an OSError if it could not be)."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class ThreadFd:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def _live(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, "the file was closed (its request ended)")
        return self._fd

    def read(self, n: int) -> bytes:
        with self._lock:
            return os.read(self._live(), n)

    def pread(self, n: int, offset: int) -> bytes:
        with self._lock:
            return os.pread(self._live(), n, offset)

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            fd = self._live()
            while view:
                view = view[os.write(fd, view) :]

    def close(self) -> None:
        """Close now, or as soon as the call in progress returns (a disk read or write: milliseconds)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
