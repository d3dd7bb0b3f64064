"""Users inside a sandbox, read from the sandbox's own /etc/passwd and /etc/group (safely, in its root)."""

from __future__ import annotations

from dataclasses import dataclass

from sandboxd.runtime.rootfs import read_file_in_root

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]


_FALLBACK = {
    "root": User("root", 0, 0, "/root", (0,)),
    "user": User("user", 1000, 1000, "/home/user", (1000,)),
}


def lookup_user(root: str, name: str) -> User | None:
    try:
        passwd = read_file_in_root(root, "/etc/passwd").decode(errors="replace")
    except OSError:
        return _FALLBACK.get(name)
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[0] == name:
            try:
                uid, gid = int(parts[2]), int(parts[3])
            except ValueError:
                return None
            groups = {gid}
            try:
                group = read_file_in_root(root, "/etc/group").decode(errors="replace")
                for gline in group.splitlines():
                    g = gline.split(":")
                    if len(g) >= 4 and name in g[3].split(","):
                        try:
                            gid_ = int(g[2])
                        except ValueError:
                            continue
                        if 0 <= gid_ < 65536 and len(groups) < 64:  # the user namespace maps 0..65535
                            groups.add(gid_)
            except OSError:
                pass
            if not (0 <= uid < 65536 and 0 <= gid < 65536):
                return None
            return User(name, uid, gid, parts[5] or "/", tuple(sorted(groups)))
    return None
