"""The TCP connections of a sandbox's network namespace, as a checkpoint sees them (runtime/namespaces.py).

CRIU carries an established connection over a checkpoint with TCP repair (`--tcp-established`: its sequence
numbers, queues and options are written, and the socket made again in repair mode, then let go) when both of
its ends are in the dumped tree: a kernel and the interpreter, an app and its database, in the same sandbox.
One whose other end is elsewhere (the server's port proxy, a host outside) would come back talking to nothing,
so it keeps the sandbox from going to disk (and refuses a snapshot with memory), as before. A new sandbox from a
snapshot has another address: its connections must also be on loopback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ESTABLISHED, TIME_WAIT, CLOSE, LISTEN = 0x01, 0x06, 0x07, 0x0A
MAX_LINES = 65536  # per table read (a sandbox's own sockets are bounded by its pids and files limits)


@dataclass(frozen=True)
class Conn:
    local: str  # /proc/net/tcp's hex "ADDR:PORT"
    remote: str
    inode: int
    state: int


def _table(path: Path) -> list[Conn]:
    conns: list[Conn] = []
    try:
        with path.open() as f:
            next(f, None)  # (its header)
            for n, line in enumerate(f):
                if n >= MAX_LINES:
                    break
                parts = line.split()
                if len(parts) < 10:
                    continue
                state, inode = int(parts[3], 16), int(parts[9])
                if state in (LISTEN, CLOSE, TIME_WAIT) or not inode:  # (no inode: an orphan, which no process holds)
                    continue
                conns.append(Conn(parts[1], parts[2], inode, state))
    except (OSError, ValueError):
        pass
    return conns


def connections(init_pid: int) -> list[Conn]:
    """The connected TCP sockets (v4 and v6) of the network namespace of `init_pid`."""
    return _table(Path(f"/proc/{init_pid}/net/tcp")) + _table(Path(f"/proc/{init_pid}/net/tcp6"))


def _loopback(addr: str) -> bool:
    host = addr.rpartition(":")[0]
    if len(host) == 8:  # IPv4, little-endian: 127.0.0.0/8
        return host[6:8] == "7F"
    if len(host) == 32:  # IPv6 in 32-bit little-endian words: ::1, or ::ffff:127.x.y.z
        return host == "0" * 24 + "01000000" or (host[:24] == "0000000000000000FFFF0000" and host[30:32] == "7F")
    return False


def not_carried(conns: list[Conn], held: set[int], loopback_only: bool) -> list[Conn]:
    """The connections held by the dumped tree (`held`: its socket inodes) that a restore cannot make whole: one
    established whose other end is not in the tree (the server's, another host's: one closing or half-closed goes
    along, its peer gone already), or (`loopback_only`) any not on loopback."""
    by_ends = {(c.local, c.remote): c for c in conns}
    bad = []
    for c in conns:
        if c.inode not in held:
            continue
        peer = by_ends.get((c.remote, c.local))
        outside = c.state == ESTABLISHED and (peer is None or peer.inode not in held)
        if outside or (loopback_only and not (_loopback(c.local) and _loopback(c.remote))):
            bad.append(c)
    return bad


def show(addr: str) -> str:
    """ "0100007F:1F90" -> "127.0.0.1:8080" (IPv6 shown as its hex words)."""
    host, _, port = addr.rpartition(":")
    if len(host) == 8:
        return ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)) + f":{int(port, 16)}"
    return f"[{host}]:{int(port, 16)}"
