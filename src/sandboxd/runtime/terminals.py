"""Terminals (PTYs) of sandboxes' processes, made by the host.

A terminal a command gets through envd is a pair of the sandbox's own devpts instance (its /dev/pts): `tty`
inside shows /dev/pts/N. Its keeper (envd/kept.py) holds the master, outside the sandbox; the command and its
children hold the slave. A checkpoint cannot write what is outside, so CRIU takes such a slave as external
(`tty[RDEV:DEV]`) and a restore gives the processes a new slave in its place (CRIU's `--inherit-fd`, which also
makes it their controlling terminal again, with its settings, size and foreground group): `Terminals` makes
those new pairs, from a devpts instance made for the restore (a detached mount: mounted nowhere on the host),
which becomes the restored sandbox's /dev/pts (sbxhelper.c, restore_tree). Their keepers get the new masters.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

from sandboxd.runtime.rootfs import openat2

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432
FSOPEN_CLOEXEC = 0x1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NOEXEC = 0x2, 0x8

DEVPTS_SUPER_MAGIC = 0x1CD1
TIOCGPTPEER = 0x5441
TIOCSPTLCK = 0x40045431


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def new_devpts() -> int:
    """A devpts instance of its own, mounted nowhere: the descriptor of its (detached) mount. Its options (the
    sandbox's group tty) are set by the restore that mounts it in a sandbox."""
    fs = _check(_libc.syscall(_SYS_FSOPEN, b"devpts", FSOPEN_CLOEXEC), "fsopen devpts")
    try:
        _check(_libc.syscall(_SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig devpts")
        attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC
        return _check(_libc.syscall(_SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, attrs), "fsmount devpts")
    finally:
        os.close(fs)


def _pair(master: int) -> tuple[int, int]:
    """(master, slave) of a master just opened from a devpts's ptmx (checked to be on devpts: a sandbox cannot
    mount one, so it is ours); the slave comes from TIOCGPTPEER, never from a path."""
    try:
        buf = ctypes.create_string_buffer(120)
        if _libc.fstatfs(master, buf) != 0 or struct.unpack_from("l", buf.raw)[0] != DEVPTS_SUPER_MAGIC:
            raise OSError(22, "the terminal's ptmx is not on devpts")
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlock the slave
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if not isinstance(slave, int):  # ioctl with an int arg returns the result code
            raise OSError(22, "TIOCGPTPEER failed")
    except BaseException:
        os.close(master)
        raise
    return master, slave


def open_in_root(root: str) -> tuple[int, int]:
    """A terminal from the devpts instance mounted at `<root>/dev/pts` (the sandbox's own). The master is opened
    with openat2(RESOLVE_IN_ROOT): no path the sandbox planted leads elsewhere."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        master = openat2(rootfd, "/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_NOFOLLOW)
    finally:
        os.close(rootfd)
    return _pair(master)


class Terminals:
    """New terminals for one restore (see above): `open_pair` makes the devpts on first use; `devpts` is then its
    mount's descriptor (None: none was needed), for the restore to mount. Close once the restore is done."""

    def __init__(self) -> None:
        self.devpts: int | None = None

    def open_pair(self) -> tuple[int, int]:
        if self.devpts is None:
            self.devpts = new_devpts()
        return _pair(os.open("ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=self.devpts))

    def close(self) -> None:
        if self.devpts is not None:
            os.close(self.devpts)
            self.devpts = None


def key(rdev: int, dev: int) -> str:
    """CRIU's name of a terminal (its slave's st_rdev and st_dev): what `--external`/`--inherit-fd` name."""
    return f"tty[{rdev:x}:{dev:x}]"
