"""Users inside a sandbox, read from the sandbox's own /etc/passwd and /etc/group (safely, in its root)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from sandboxd.runtime.rootfs import read_file_in_root

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]
    host_base: int = 0  # the host uid/gid of this sandbox's uid/gid 0 (each sandbox has its own range)


_FALLBACK = {
    "root": User("root", 0, 0, "/root", (0,)),
    "user": User("user", 1000, 1000, "/home/user", (1000,)),
}


def entries(root: str, file: str) -> list[list[str]] | None:
    """The colon-separated records of /etc/passwd or /etc/group as the sandbox has them (None if it
    cannot be read)."""
    try:
        data = read_file_in_root(root, file).decode(errors="replace")
    except OSError:
        return None
    return [line.split(":") for line in data.splitlines()]


def lookup_user(root: str, name: str, host_base: int = 0) -> User | None:
    passwd = entries(root, "/etc/passwd")
    if passwd is None:
        fallback = _FALLBACK.get(name)
        return replace(fallback, host_base=host_base) if fallback else None
    for parts in passwd:
        if len(parts) >= 7 and parts[0] == name:
            try:
                uid, gid = int(parts[2]), int(parts[3])
            except ValueError:
                return None
            groups = {gid}
            for g in entries(root, "/etc/group") or []:
                if len(g) >= 4 and name in g[3].split(","):
                    try:
                        gid_ = int(g[2])
                    except ValueError:
                        continue
                    if 0 <= gid_ < 65536 and len(groups) < 64:  # the user namespace maps 0..65535
                        groups.add(gid_)
            if not (0 <= uid < 65536 and 0 <= gid < 65536):
                return None
            return User(name, uid, gid, parts[5] or "/", tuple(sorted(groups)), host_base)
    return None
