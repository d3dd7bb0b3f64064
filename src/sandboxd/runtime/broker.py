"""Client side of `sbxhelper broker`: path operations performed inside a sandbox, as one of its users.

The broker resolves every path in the sandbox's own mount namespace and root, with the user's
identity, capabilities and seccomp filter, and hands opened files back as file descriptors. The
server never resolves a sandbox path on the host: it only reads, writes and `fstat`s descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import time

(
    OP_OPEN,
    OP_MKDIR,
    OP_MKDIRS,
    OP_RENAME,
    OP_UNLINK,
    OP_REMOVE_ALL,
    OP_RMDIR,
    OP_READLINK,
    OP_REALPATH,
    OP_COUNT_DIRS,
    OP_INOTIFY,
) = range(1, 12)
_REQ = struct.Struct("IIII")
_REP = struct.Struct("ii")
CALL_TIMEOUT = 15.0


def _wake(waiter: asyncio.Future[None]) -> None:
    """Loop reader/writer callback: the fd is ready."""
    if not waiter.done():
        waiter.set_result(None)


class BrokerGone(Exception):
    """The broker process exited (the sandbox was killed, or the broker failed)."""


class BrokerTimeout(BrokerGone):
    """The broker did not answer in time (something in the sandbox may have stopped it); it was killed,
    and the next request starts a new one."""


class Broker:
    def __init__(self, argv: list[str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        try:
            self.popen = subprocess.Popen(  # vfork + exec of the small helper
                [*argv, "--sock", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                close_fds=True,
                env={},  # the broker can read its own /proc/self/environ: nothing of the server's
            )
        finally:
            theirs.close()
        self.sock.setblocking(False)
        self._lock = asyncio.Lock()
        self.last_used = time.monotonic()

    async def _call(self, op: int, path1: str, path2: str = "", flags: int = 0, mode: int = 0) -> int | None:
        fd, _text = await self._request(op, path1, path2, flags, mode)
        return fd

    async def _request(
        self, op: int, path1: str, path2: str = "", flags: int = 0, mode: int = 0
    ) -> tuple[int | None, bytes]:
        b1, b2 = os.fsencode(path1), os.fsencode(path2)
        if b"\0" in b1 or b"\0" in b2:
            raise OSError(22, "path contains a NUL byte", path1)
        if len(b1) > 4095 or len(b2) > 4095:
            raise OSError(36, "path too long", path1)
        loop = asyncio.get_running_loop()
        async with self._lock:
            self.last_used = time.monotonic()
            try:
                self.sock.send(_REQ.pack(op, flags, mode, len(b1)) + b1 + b2)
            except OSError as e:
                raise BrokerGone(str(e)) from None
            ready: asyncio.Future[None] = loop.create_future()
            fileno = self.sock.fileno()
            loop.add_reader(fileno, _wake, ready)
            try:
                await asyncio.wait_for(ready, CALL_TIMEOUT)
            except TimeoutError:
                # the reader goes first: after the close, `fileno` may already name another file's reader
                loop.remove_reader(fileno)
                self.close()
                raise BrokerTimeout(
                    f"the sandbox's file service did not answer within {CALL_TIMEOUT:.0f} s (a process in the "
                    "sandbox may have stopped it); it was restarted, try again"
                ) from None
            finally:
                if self.sock.fileno() >= 0:
                    loop.remove_reader(fileno)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, _REP.size + 4096, 1)
            except OSError as e:
                raise BrokerGone(str(e)) from None
        if not data:
            raise BrokerGone(f"the sandbox's file service exited: {self.failure() or 'no message'}")
        err, length = _REP.unpack(data[: _REP.size])
        if err:
            for fd in fds:
                os.close(fd)
            raise OSError(err, os.strerror(err), path1)
        return (fds[0] if fds else None), data[_REP.size : _REP.size + length]

    async def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = await self._call(OP_OPEN, path, flags=flags, mode=mode)
        if fd is None:
            raise OSError(5, "the broker sent no file descriptor", path)
        return fd

    async def readlink(self, path: str) -> str:
        """The target of a symlink, read inside the sandbox."""
        return os.fsdecode((await self._request(OP_READLINK, path))[1])

    async def realpath(self, path: str) -> str:
        """`path` with every symlink resolved, inside the sandbox."""
        return os.fsdecode((await self._request(OP_REALPATH, path))[1])

    async def count_dirs(self, path: str, limit: int) -> int:
        """Directories under `path` (itself included, symlinks not followed), walked inside the sandbox;
        the count stops just past `limit`."""
        return int((await self._request(OP_COUNT_DIRS, path, flags=max(0, min(limit, 2**31 - 1))))[1] or b"0")

    async def inotify_init(self) -> int:
        """A non-blocking inotify instance made inside the sandbox by the broker's user (so that it and
        its watches count against the sandbox's limits, not the server's); the caller owns the fd."""
        fd = await self._call(OP_INOTIFY, "/")
        if fd is None:
            raise OSError(5, "the broker returned no inotify descriptor")
        return fd

    async def mkdir(self, path: str, mode: int = 0o755) -> None:
        await self._call(OP_MKDIR, path, mode=mode)

    async def makedirs(self, path: str, mode: int = 0o755) -> None:
        await self._call(OP_MKDIRS, path, mode=mode)

    async def rename(self, src: str, dst: str) -> None:
        await self._call(OP_RENAME, src, dst)

    async def unlink(self, path: str) -> None:
        await self._call(OP_UNLINK, path)

    async def rmdir(self, path: str) -> None:
        await self._call(OP_RMDIR, path)

    async def remove_all(self, path: str) -> None:
        await self._call(OP_REMOVE_ALL, path)

    def failure(self) -> str:
        """What the broker said before it died (its stderr), if it has died."""
        if self.popen.poll() is None or self.popen.stderr is None:
            return ""
        try:
            return self.popen.stderr.read(4096).decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None and self.sock.fileno() >= 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()  # EOF: the broker exits
        with contextlib.suppress(Exception):
            if self.popen.stderr:
                self.popen.stderr.close()
        # The helper exits at once on EOF; reap it without blocking the event loop for long.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=0.05)
        if self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)
