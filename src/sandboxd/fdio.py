"""File descriptors: syncfs(2); descriptors that worker threads read or write while the event loop may
close them; a request body piped to a file by worker threads while it is still arriving.

A request whose handler is cancelled (its client went away) closes its file while a worker thread may be
in the middle of a `pread` or `write` on it (`asyncio.to_thread` cannot stop a thread). A plain
`os.close` then frees the number for the next `open`, `socket` or `epoll_create` in the server, and the
thread's next call reads from or writes into *that*: another sandbox's file, a netlink socket, the event
loop's own epoll. `ThreadFd` makes the close wait for the call in progress and every later call fail with
EBADF instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable

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


async def pipe_chunks(
    chunks: AsyncIterator[bytes], write: Callable[[bytes], None], batch: int = 1 << 20, depth: int = 4
) -> None:
    """Receive and write at the same time: batches of `batch` bytes go through a queue of `depth` to a
    writer task that calls `write` (blocking: disk writes) in a worker thread, so the socket is read while
    the disk is written, with at most (depth + 2) * batch bytes in memory. An error of `write` (a full
    disk) ends the receiving at once. If we are cancelled, `write` may still be running in its thread:
    it must hold its descriptor safely (ThreadFd.write_all, or a lock its close takes as well)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)

    async def writer() -> None:
        while (data := await queue.get()) is not None:
            await asyncio.to_thread(write, data)

    task = asyncio.ensure_future(writer())
    try:
        pending: list[bytes] = []
        size = 0
        async for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size >= batch:
                await _put(queue, task, b"".join(pending))
                pending, size = [], 0
        if pending:
            await _put(queue, task, b"".join(pending))
        await _put(queue, task, None)
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _put(queue: asyncio.Queue[bytes | None], task: asyncio.Future[None], item: bytes | None) -> None:
    """queue.put, but fail at once if the writer died (a full disk) instead of waiting forever."""
    put = asyncio.ensure_future(queue.put(item))
    done, _ = await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
    error = task.exception() if task in done else None
    if error is not None:
        put.cancel()
        raise error
    await put
