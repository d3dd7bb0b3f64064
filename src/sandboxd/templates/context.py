"""Files a COPY step takes from the build context: the archive the SDK uploaded, read as hostile input.

The SDK uploads one tar (gzipped or not) per COPY step, with names relative to the context root
(`copy("app", "/srv")` sends `app/`, `app/main.py`, ...). `copy_stream` picks the members that the
step's `src` (a path or a glob, `**` included) names, places them under `dest` with Docker's COPY
rules, gives them the step's owner and mode, and writes a new tar of only regular files, directories,
symlinks and hard links with clean relative names. That tar is unpacked by the build sandbox's own
`tar` as its root, so the host never writes a path that a template chose.
"""

from __future__ import annotations

import fnmatch
import posixpath
import tarfile
from dataclasses import dataclass
from typing import IO

MAX_MEMBERS = 200_000
MAX_NAME = 4096


class ContextError(Exception):
    """The uploaded files cannot be copied as the step asks."""


@dataclass(frozen=True)
class CopyTarget:
    src: str
    dest: str
    uid: int
    gid: int
    mode: int | None = None


def clean_name(name: str, absolute_ok: bool = False) -> str | None:
    """A tar member's name as a relative path without `.`/`..` components (`.`: the root itself), or None
    if it leaves the root (`..`, NUL, too long; an absolute name unless `absolute_ok`, as image layers
    may have them)."""
    if len(name) > MAX_NAME or "\0" in name or (name.startswith("/") and not absolute_ok):
        return None
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            return None
        parts.append(part)
    return "/".join(parts) if parts else "."


def _match(pattern: list[str], path: list[str]) -> bool:
    """Glob match by path components; `**` spans any number of them (dotfiles match, as the SDK's glob)."""
    if not pattern:
        return not path
    head = pattern[0]
    if head == "**":
        return any(_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], head) and _match(pattern[1:], path[1:])


def copy_stream(archive: IO[bytes], target: CopyTarget, out: IO[bytes], max_bytes: int) -> int:
    """Write the tar of what `target` copies to `out`; return how many members it holds."""
    src = clean_name(target.src)
    if src is None or target.src.startswith("/"):
        raise ContextError(f"COPY source '{target.src}' must be a relative path inside the build context")
    if not target.dest.startswith("/"):
        raise ContextError(f"COPY destination '{target.dest}' must be an absolute path")
    dest = posixpath.normpath(target.dest)
    dest_is_dir = target.dest.endswith("/") or dest == "/"
    pattern = [] if src == "." else src.split("/")
    try:
        tin = tarfile.open(fileobj=archive, mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ContextError(f"the uploaded files for '{target.src}' are not a tar archive: {e}") from None
    # pass 1: names only (bounded), to know what matched and whether dest is a directory
    members: list[tuple[tarfile.TarInfo, str]] = []
    total = 0
    try:
        for m in tin:
            if len(members) >= MAX_MEMBERS:
                raise ContextError(f"the uploaded files hold more than {MAX_MEMBERS} entries")
            name = clean_name(m.name)
            if name is None:
                raise ContextError(f"the uploaded archive has an entry outside the context: {m.name[:200]!r}")
            total += m.size if m.isreg() else 0
            if total > max_bytes:
                raise ContextError(f"the uploaded files are over the limit of {max_bytes} bytes unpacked")
            members.append((m, name))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ContextError(f"the uploaded archive for '{target.src}' is damaged: {e}") from None
    # directories that only appear as the parents of entries count as directories too
    implicit = {"/".join(parts[:i]) for _, n in members for parts in [n.split("/")] for i in range(1, len(parts))}
    names = [n for _, n in members]
    candidates = names + sorted(implicit - set(names))
    roots = [n for n in candidates if (pattern == [] and n == ".") or (pattern and _match(pattern, n.split("/")))]
    if pattern == [] and "." not in roots:
        roots = ["."]
    if not roots:
        raise ContextError(f"COPY source '{target.src}' matches no file in the uploaded build context")
    many = len(roots) > 1
    dirs = {name for m, name in members if m.isdir()} | implicit
    placed: dict[str, str] = {}  # archive name -> path in the image (relative to /)
    for _m, name in members:
        for root in roots:
            if root == ".":  # the whole context: its contents go into dest
                path = posixpath.join(dest, "" if name == "." else name)
            elif name == root and root not in dirs:
                path = posixpath.join(dest, posixpath.basename(name)) if many or dest_is_dir else dest
            elif name == root or (name.startswith(root + "/") and root in dirs):
                path = posixpath.join(dest, name[len(root) + 1 :])  # a directory's contents go into dest
            else:
                continue
            placed.setdefault(name, posixpath.normpath(path).lstrip("/") or ".")
            break
    tout = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
    count = 0
    try:
        for m, name in members:
            out_path = placed.get(name)
            if out_path is None or out_path == ".":
                continue  # not copied; or the image's own root, whose owner and mode stay
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                continue  # devices and fifos are not copied
            info = tarfile.TarInfo(out_path)
            info.uid, info.gid, info.uname, info.gname = target.uid, target.gid, "", ""
            info.mtime = m.mtime
            mode = m.mode & 0o7777
            if target.mode is not None and not m.issym():
                mode = target.mode
            info.mode = mode & 0o777 if not m.isdir() else mode & 0o1777  # no setuid from a context
            if m.isreg():
                info.size = m.size
                data = tin.extractfile(m)
                tout.addfile(info, data)
            elif m.isdir():
                info.type = tarfile.DIRTYPE
                tout.addfile(info)
            elif m.issym():
                info.type, info.linkname = tarfile.SYMTYPE, m.linkname[:MAX_NAME]
                tout.addfile(info)
            else:
                linked = clean_name(m.linkname)
                if linked is None or linked not in placed:
                    raise ContextError(f"hard link {m.name[:200]!r} points at a file that is not copied")
                info.type, info.linkname = tarfile.LNKTYPE, placed[linked]
                tout.addfile(info)
            count += 1
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ContextError(f"the uploaded archive for '{target.src}' is damaged: {e}") from None
    finally:
        tout.close()
    return count
