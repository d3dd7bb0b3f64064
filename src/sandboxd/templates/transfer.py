"""A layer's content, moved between nodes: its digest, and the tar stream it travels as.

The digest is a SHA-256 over a canonical listing of the tree (each entry's path, type, mode, owner, size and
content, link target, device number and extended attributes, in path order; no times): two trees with the same
digest hold the same files, whatever tool wrote them. A node that receives a layer unpacks it beside its layers
and keeps it only when the unpacked tree's digest is the one the state recorded for the layer's key (told by the
node that made it), so a truncated, damaged or altered transfer is never used.

The stream is GNU tar's (numeric owners, extended attributes: overlay whiteouts are 0/0 character devices and
opaque directories carry `trusted.overlay.opaque`, both of which tar keeps).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

DIGEST_PREFIX = "sha256:"  # (a new way of computing it would take a new prefix: digests are kept in layer.json)
CHUNK = 1 << 20
TAR_XATTRS = ("--xattrs", "--xattrs-include=*", "--numeric-owner")


def tree_digest(root: Path) -> str:
    """The digest of `root` and everything under it."""
    h = hashlib.sha256()
    for rel, st, path in _walk(root):
        mode = st.st_mode
        fields = [rel, f"{stat.S_IFMT(mode):o}", f"{stat.S_IMODE(mode):o}", str(st.st_uid), str(st.st_gid)]
        if stat.S_ISREG(mode):
            with open(path, "rb") as f:
                fields += [str(st.st_size), hashlib.file_digest(f, "sha256").hexdigest()]
        elif stat.S_ISLNK(mode):
            fields.append(os.readlink(path))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            fields.append(f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}")
        for name in sorted(_xattrs(path)):
            value = os.getxattr(path, name, follow_symlinks=False)
            fields.append(f"{name}={value.hex()}")
        h.update("\0".join(fields).encode("utf-8", "surrogateescape") + b"\n")
    return DIGEST_PREFIX + h.hexdigest()


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result, str]]:
    yield ".", os.lstat(root), str(root)
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        entries = sorted(os.listdir(os.path.join(root, rel_dir) if rel_dir else root))
        subdirs = []
        for name in entries:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = os.path.join(root, rel)
            st = os.lstat(path)
            yield rel, st, path
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(rel)
        stack.extend(reversed(subdirs))  # (depth first, in name order)


def _xattrs(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:  # (a filesystem without them; a symlink where they are not supported)
        return []


def pack(root: Path) -> subprocess.Popen[bytes]:
    """tar of the tree under `root`, on the process's stdout (the caller reads it to its end, then waits)."""
    return subprocess.Popen(
        ["tar", "--create", *TAR_XATTRS, "--sort=name", "--directory", str(root), "--file", "-", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def unpacker(dest: Path) -> subprocess.Popen[bytes]:
    """tar unpacking what is written to its stdin into `dest` (owners and modes as they were)."""
    return subprocess.Popen(
        [
            "tar",
            "--extract",
            *TAR_XATTRS,
            "--same-owner",
            "--same-permissions",
            "--directory",
            str(dest),
            "--file",
            "-",
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
