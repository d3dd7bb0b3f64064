"""Builds and locates the small C helper (`sbxhelper`) that creates sandboxes and execs into them.

The binary is compiled on first use from the source next to this file and cached by the hash of that
source, so an upgrade of sandboxd rebuilds it and nothing stale is ever run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("sbxhelper.c")


class HelperBuildError(RuntimeError):
    pass


def helper_path(cache_dir: Path) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = Path(cache_dir) / f"sbxhelper-{digest}"
    if target.exists():
        return target
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HelperBuildError("no C compiler found: install build-essential (scripts/setup.sh does)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    # Static: a sandbox that looks at the helper's /proc/PID/maps must find no host library paths.
    cmd = [cc, "-O2", "-static", "-Wall", "-Wno-format-truncation", "-o", str(tmp), str(SOURCE), "-lseccomp"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        missing = "seccomp" in res.stderr or "-lc" in res.stderr
        hint = " (are libseccomp-dev and libc6-dev installed?)" if missing else ""
        raise HelperBuildError(f"building sbxhelper failed{hint}:\n{res.stderr}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    for old in target.parent.glob("sbxhelper-*"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def sealed_copy(path: Path) -> int:
    """A sealed, read-only in-memory copy of the helper, to execute as /proc/<server pid>/fd/N.

    Processes that stay inside a sandbox (its init, file brokers) then have an executable that is no
    host file: their /proc/PID/exe and maps show `/memfd:sbxhelper (deleted)`, not a host path, and
    there is no host file to open through them.
    """
    return _sealed("sbxhelper", path.read_bytes())


def compiled_filter(helper: str) -> int:
    """The sandboxes' seccomp filter, compiled to BPF once by the helper, in a sealed memfd.

    Every create and exec names it (`--seccomp /proc/<server pid>/fd/N`) instead of compiling the same
    filter again with libseccomp, which costs more than a millisecond each time.
    """
    res = subprocess.run([helper, "seccomp-bpf"], capture_output=True, env={}, check=False)
    if res.returncode != 0 or not res.stdout or len(res.stdout) % 8:
        raise HelperBuildError(f"sbxhelper could not compile the seccomp filter: {res.stderr.decode(errors='replace')}")
    return _sealed("seccomp-filter", res.stdout)


def _sealed(name: str, data: bytes) -> int:
    import fcntl

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    return fd


def init_mount(helper: Path) -> int:
    """A read-only tmpfs holding a copy of the helper as `init`, detached (no path on the host): every sandbox's
    init runs it from a clone of this mount at /dev/.sandboxd (`sbxhelper create --init-mount`). One copy for all
    of a server's sandboxes (they share its pages); a file CRIU can restore init's program from (it cannot from
    a memfd); a tmpfs root, so the sandbox's mountinfo names no host path. The returned fd holds it."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)

    def call(nr: int, *args: object) -> int:
        res = libc.syscall(ctypes.c_long(nr), *args)
        if res < 0:
            err = ctypes.get_errno()
            raise HelperBuildError(f"making sandbox init's tmpfs failed (syscall {nr}): {os.strerror(err)}")
        return int(res)

    fs = call(_SYS_FSOPEN, ctypes.c_char_p(b"tmpfs"), ctypes.c_uint(1))  # FSOPEN_CLOEXEC
    try:
        for key, value in ((b"mode", b"755"), (b"size", b"8m"), (b"nr_inodes", b"8")):
            call(_SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(1), ctypes.c_char_p(key), ctypes.c_char_p(value), 0)
        call(_SYS_FSCONFIG, ctypes.c_int(fs), ctypes.c_uint(6), None, None, 0)  # FSCONFIG_CMD_CREATE
        mnt = call(_SYS_FSMOUNT, ctypes.c_int(fs), ctypes.c_uint(1), ctypes.c_uint(0))  # FSMOUNT_CLOEXEC
    finally:
        os.close(fs)
    try:
        fd = os.open("init", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o555, dir_fd=mnt)
        try:
            os.fchmod(fd, 0o555)  # (whatever the umask: the server's is 077; sandbox users run it)
            view = memoryview(helper.read_bytes())
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        attr = struct.pack("QQQQ", 0x1 | 0x2 | 0x4, 0, 0, 0)  # MOUNT_ATTR_RDONLY | NOSUID | NODEV
        call(_SYS_MOUNT_SETATTR, ctypes.c_int(mnt), ctypes.c_char_p(b""), ctypes.c_uint(0x1000), attr, len(attr))
    except BaseException:
        os.close(mnt)
        raise
    return mnt


_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_MOUNT_SETATTR = 430, 431, 432, 442  # x86-64
