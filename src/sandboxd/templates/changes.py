"""What a sandbox changed in its filesystem, against the template (or snapshot) it was made from: the
paths it added, modified and deleted, read from its overlay's upper dir (whiteouts are deletions,
opaque directories replaced what was below them), and a tar of the changes. Beyond E2B.

Read while the sandbox runs: a live view, not a frozen one. Per-start files (its hostname, hosts and
resolver files, sandboxd's own code) are left out. Owners in the tar are the sandbox's own uids.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PER_START = {"etc/hostname", "etc/hosts", "etc/resolv.conf"}
PER_START_TREES = ("opt/sandboxd/code",)
MANIFEST = ".sandboxd-changes.json"  # in the tar: what it cannot hold (the deleted paths)
OPAQUE = "trusted.overlay.opaque"
NOBODY = 65534


class TooManyChanges(Exception):
    pass


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    truncated: bool = False

    def count(self) -> int:
        return len(self.added) + len(self.modified) + len(self.deleted)

    def to_json(self) -> dict:
        return {
            "added": self.added,
            "modified": self.modified,
            "deleted": self.deleted,
            "truncated": self.truncated,
        }


def _whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) in (b"y", b"x")
    except OSError:
        return False


def _skipped(rel: str) -> bool:
    return rel in PER_START or any(rel == t or rel.startswith(t + "/") for t in PER_START_TREES)


def in_lowers(lowers: tuple[Path, ...], rel: str) -> bool:
    """Whether `rel` exists in the stack of lower dirs (topmost first), whiteouts and opaque dirs heeded."""
    parts = rel.split("/")
    for layer in lowers:
        cur = layer
        hidden_below = False
        for i, part in enumerate(parts):
            cur = cur / part
            try:
                st = os.lstat(cur)
            except (FileNotFoundError, NotADirectoryError):
                break
            if _whiteout(st):
                return False
            if i < len(parts) - 1:
                if not stat.S_ISDIR(st.st_mode):
                    return False  # a file where a directory of the path should be: it hides the rest
                if _opaque(cur):
                    hidden_below = True
        else:
            return True
        if hidden_below:
            return False
    return False


def _lower_entries(lowers: tuple[Path, ...], rel: str, limit: int) -> list[str]:
    """Paths under the directory `rel` as the lower stack has them (for a directory replaced above)."""
    found: set[str] = set()
    for layer in lowers:
        root = layer / rel
        if not root.is_dir() or root.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                sub = os.path.relpath(os.path.join(dirpath, name), layer)
                if in_lowers(lowers, sub):
                    found.add(sub)
                    if len(found) > limit:
                        raise TooManyChanges
    return sorted(found)


def changes(upper: Path, lowers: tuple[Path, ...], limit: int) -> Changes:
    out = Changes()
    try:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            for name in [*sorted(dirnames), *sorted(filenames)]:
                path = Path(dirpath) / name
                rel = str(path.relative_to(upper))
                if _skipped(rel):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                st = os.lstat(path)
                if _whiteout(st):
                    out.deleted.append("/" + rel)
                elif stat.S_ISDIR(st.st_mode):
                    if not in_lowers(lowers, rel):
                        out.added.append("/" + rel)
                    elif _opaque(path):
                        kept = {
                            os.path.relpath(os.path.join(d, n), upper) for d, ds, fs in os.walk(path) for n in ds + fs
                        }
                        for sub in _lower_entries(lowers, rel, limit):
                            if sub not in kept:
                                out.deleted.append("/" + sub)
                elif in_lowers(lowers, rel):
                    out.modified.append("/" + rel)
                else:
                    out.added.append("/" + rel)
                if out.count() > limit:
                    raise TooManyChanges
    except TooManyChanges:
        out.truncated = True
    for paths in (out.added, out.modified, out.deleted):
        paths.sort()
        del paths[limit:]
    return out


def write_tar(out: IO[bytes], upper: Path, found: Changes, uid_base: int, uid_range: int) -> None:
    """A tar (stream) of what was added and modified, as the sandbox sees it (its own uids), and a
    manifest member that lists what was deleted."""

    def owners(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.uid - uid_base if uid_base <= info.uid < uid_base + uid_range else NOBODY
        info.gid = info.gid - uid_base if uid_base <= info.gid < uid_base + uid_range else NOBODY
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        manifest = json.dumps({"deleted": found.deleted, "truncated": found.truncated}).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode = len(manifest), 0o644
        tar.addfile(info, io.BytesIO(manifest))
        for path in sorted([*found.added, *found.modified]):
            with contextlib.suppress(FileNotFoundError):  # gone since the listing: a live sandbox
                tar.add(upper / path.lstrip("/"), arcname=path.lstrip("/"), recursive=False, filter=owners)
