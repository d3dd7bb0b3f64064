"""Unpack one OCI image layer into an overlay layer dir, run as its own process, chrooted into that dir.

    python -m sandboxd.templates.unpack BLOB MEDIA_TYPE DEST SHIFT

A layer is hostile input: its entries may name `..`, absolute paths, or a path through a symlink that
an earlier entry made (`etc -> /etc`, then `etc/passwd`). The process opens the blob, then chroots
into DEST, so every path it resolves, symlinks included, stays inside DEST. OCI whiteouts become
overlay whiteouts (`.wh.NAME`: a 0/0 character device; `.wh..wh..opq`: the directory is opaque).
Owners move into the template uid range (+SHIFT); devices are not created (a sandbox has its own
/dev). Prints `entries bytes` when done.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
from typing import IO

from sandboxd.templates.context import clean_name

MAX_BYTES = 64 << 30
MAX_ENTRIES = 2_000_000
NOBODY = 65534


def _clean(name: str) -> str | None:
    """An entry's path under the layer's root, or None for the root itself and names that leave it."""
    rel = clean_name(name, absolute_ok=True)
    return None if rel is None or rel == "." else "/" + rel


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _owner(uid: int, shift: int) -> int:
    return (uid if 0 <= uid < 65536 else NOBODY) + shift


def unpack(stream: IO[bytes], shift: int) -> tuple[int, int]:
    entries = total = 0
    dirs: list[tuple[str, int, float]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            entries += 1
            if entries > MAX_ENTRIES:
                raise ValueError(f"the layer has more than {MAX_ENTRIES} entries")
            path = _clean(m.name)
            if path is None:
                continue  # the root itself, or a name that leaves it
            parent, base = os.path.split(path)
            os.makedirs(parent, exist_ok=True)
            if base == ".wh..wh..opq":
                os.setxattr(parent, "trusted.overlay.opaque", b"y", follow_symlinks=False)
                continue
            if base.startswith(".wh."):
                target = os.path.join(parent, base[4:])
                _remove(target)
                os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))
                continue
            uid, gid = _owner(m.uid, shift), _owner(m.gid, shift)
            mode = m.mode & 0o7777
            if m.isdir():
                if os.path.lexists(path) and not os.path.isdir(path):
                    _remove(path)
                if not os.path.lexists(path):
                    os.mkdir(path, 0o700)
                os.lchown(path, uid, gid)
                dirs.append((path, mode, m.mtime))  # modes last: a read-only dir must still take entries
                continue
            _remove(path)
            if m.isreg():
                total += m.size
                if total > MAX_BYTES:
                    raise ValueError(f"the layer unpacks to more than {MAX_BYTES} bytes")
                src = tar.extractfile(m)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    if src is not None:
                        shutil.copyfileobj(src, out, 1 << 20)
                    os.fchown(out.fileno(), uid, gid)
                    os.fchmod(out.fileno(), mode)  # after chown, which would clear setuid
                os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
            elif m.issym():
                os.symlink(m.linkname, path)
                os.lchown(path, uid, gid)
            elif m.islnk():
                linked = _clean(m.linkname)
                if linked is None:
                    raise ValueError(f"hard link {m.name!r} points outside the layer")
                os.link(linked, path, follow_symlinks=False)
            elif m.isfifo():
                os.mkfifo(path, mode)
                os.lchown(path, uid, gid)
            # character and block devices: not created
    for path, mode, mtime in reversed(dirs):
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return entries, total


def main(argv: list[str]) -> int:
    blob, media_type, dest, shift = argv[1], argv[2], argv[3], int(argv[4])
    raw = open(blob, "rb")
    stream: IO[bytes]
    if "zstd" in media_type:
        proc = subprocess.Popen(["zstd", "-dc"], stdin=raw, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        stream = proc.stdout
    elif "gzip" in media_type or raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        import gzip

        stream = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    else:
        raw.seek(0)
        stream = raw
    os.chroot(dest)
    os.chdir("/")
    entries, total = unpack(stream, shift)
    print(entries, total)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (OSError, ValueError, tarfile.TarError, EOFError) as e:
        print(f"unpacking the layer failed: {e}", file=sys.stderr)
        sys.exit(1)
