"""PIDs are handles: every signal and every `/proc/<pid>` object goes through a pidfd checked to be the
process meant, so that a recycled PID (pid_max is 32768 on many hosts) is never hit.

A pidfd names one process for its whole life; a number may name another process once the first is
reaped. The pattern everywhere: open the pidfd, then check that the process behind it is the one meant
(its start time, its parent, or its cgroup), then act through the pidfd only.
"""

from __future__ import annotations

import contextlib
import os
import signal

# include/uapi/linux/pidfd.h (Linux 6.9+): signal the process group the pidfd's process leads.
PIDFD_SIGNAL_PROCESS_GROUP = 1 << 2


class ProcessChanged(ProcessLookupError):
    """The PID no longer names the process that was meant."""


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def ns_pid(pid: int) -> int | None:
    """`pid`'s PID in its own (innermost) PID namespace, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def is_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
        return True
    except ProcessLookupError:
        return False


def open_checked(pid: int, *, start: int | None = None, parent: int | None = None, inside: int | None = None) -> int:
    """A pidfd for `pid`, checked after opening to be the process started at `start` (clock ticks), the
    child of `parent` and/or the one with PID `inside` in its own PID namespace. Raises ProcessChanged
    otherwise (the caller closes nothing)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise ProcessChanged(f"process {pid} is gone") from None
    ok = True
    if start is not None and start_time(pid) != start:
        ok = False
    if parent is not None and parent_of(pid) != parent:
        ok = False
    if inside is not None and ns_pid(pid) != inside:
        ok = False
    # The checks read /proc/<pid> by number: valid only if the pidfd's process still holds that number.
    if not ok or not is_alive(fd):
        os.close(fd)
        raise ProcessChanged(f"PID {pid} no longer names the process meant")
    return fd


def signal_group(pidfd: int, sig: int) -> None:
    """Signal the process group led by the pidfd's process (it leads one: setpgid/setsid at spawn)."""
    try:
        signal.pidfd_send_signal(pidfd, sig, None, PIDFD_SIGNAL_PROCESS_GROUP)
    except OSError as e:
        if isinstance(e, ProcessLookupError):
            raise
        # Kernels before 6.9 have no group flag: signal the process itself.
        signal.pidfd_send_signal(pidfd, sig)


def kill_member(pid: int, cgroup_marker: str, sig: int = signal.SIGKILL) -> None:
    """Signal `pid` only if it is (still) in a cgroup whose path contains `cgroup_marker`."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                member = cgroup_marker in f.read()
        except OSError:
            return
        if member and is_alive(fd):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def _inode_of(pid: int, fd: int | str, kind: str) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    n = len(kind) + 2
    if link.startswith(f"{kind}:[") and link.endswith("]") and link[n:-1].isdigit():
        return int(link[n:-1])
    return None


def _inodes_of(pid: int, kind: str, limit: int) -> set[int]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")[:limit]
    except OSError:
        return set()
    return {ino for fd in fds if (ino := _inode_of(pid, fd, kind)) is not None}


def pipe_of(pid: int, fd: int | str) -> int | None:
    """The inode of the pipe that the process's descriptor `fd` is; None for another kind of file (or none)."""
    return _inode_of(pid, fd, "pipe")


def pipes_of(pid: int, limit: int = 4096) -> set[int]:
    """The inodes of the pipes the process holds (among its first `limit` descriptors)."""
    return _inodes_of(pid, "pipe", limit)


def sockets_of(pid: int, limit: int = 4096) -> set[int]:
    """The inodes of the sockets the process holds (among its first `limit` descriptors)."""
    return _inodes_of(pid, "socket", limit)
