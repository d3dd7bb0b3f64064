"""Per-sandbox host identities: each sandbox gets a uid/gid range of its own.

Sandbox uid/gid 0..65535 are host ids BASE..BASE+65535, with BASE = FIRST + slot * 65536 and one slot
per live sandbox (pooled ones included). The kernel's per-user accounting (RLIMIT_NPROC, pipe buffers,
inotify, user namespaces, ...) is keyed by host uid, so separate ranges separate tenants; the sandbox's
user namespace is owned by its own BASE, so what is counted inside is charged to that uid, never to
host root. Templates are stored once, owned by the template range (UID_SHIFT..): each sandbox sees them
through an idmapped mount that maps that range onto its own (sbxhelper.c, attach_idmapped).

A slot is taken at create and given back when the sandbox is destroyed; after a restart, re-adopted
sandboxes claim theirs again (their handle records BASE) before anything new is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RANGE = 65536
# From 2^30: far above ordinary accounts and the customary /etc/subuid ranges (100000..), below 2^31.
# Servers with different data dirs on one host start in different bands (by their instance hash), so
# their sandboxes do not share ranges; --uid-base sets the start explicitly.
FIRST = 1 << 30
SLOTS = 1024  # sandboxes per server; a band is 2^26 ids
BANDS = 16


def default_first(instance: str) -> int:
    return FIRST + (int(instance.lstrip("i"), 16) % BANDS) * SLOTS * RANGE


class IdentityError(Exception):
    pass


@dataclass
class UidAllocator:
    first: int = FIRST
    slots: int = SLOTS
    _used: set[int] = field(default_factory=set)  # slot numbers

    def allocate(self) -> int:
        """The BASE of a free range (lowest slot first)."""
        for slot in range(self.slots):
            if slot not in self._used:
                self._used.add(slot)
                return self.first + slot * RANGE
        raise IdentityError(f"all {self.slots} sandbox uid ranges are in use: too many sandboxes on this host")

    def claim(self, base: int) -> None:
        """Mark a re-adopted sandbox's range as taken (ranges outside this allocator are left alone)."""
        slot = self._slot(base)
        if slot is not None:
            self._used.add(slot)

    def release(self, base: int) -> None:
        slot = self._slot(base)
        if slot is not None:
            self._used.discard(slot)

    def in_use(self) -> int:
        return len(self._used)

    def _slot(self, base: int) -> int | None:
        offset = base - self.first
        if offset < 0 or offset % RANGE or offset // RANGE >= self.slots:
            return None
        return offset // RANGE

    def check_host(self, etc: Path = Path("/etc")) -> None:
        """Refuse ranges that overlap the host's own subordinate ids (/etc/subuid, /etc/subgid), which
        belong to the host's users' containers."""
        lo, hi = self.first, self.first + self.slots * RANGE
        for name in ("subuid", "subgid"):
            try:
                lines = (etc / name).read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                parts = line.strip().split(":")
                if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                    continue
                start, count = int(parts[1]), int(parts[2])
                if start < hi and lo < start + count:
                    raise IdentityError(
                        f"sandbox uid ranges {lo}..{hi - 1} overlap /etc/{name} ({line.strip()}): "
                        "choose another start with --uid-base"
                    )
