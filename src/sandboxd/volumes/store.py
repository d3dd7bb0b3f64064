"""Volumes: named, persistent file trees that outlive sandboxes (E2B's volumes).

How they are kept
    Each volume is its own sparse ext4 image, `<data>/volumes/<id>/volume.img`, of the volume's size: its
    quota is the filesystem's size (the kernel says ENOSPC to whoever fills it, sandbox or API client), and
    nothing a sandbox writes into it can touch the host's disk beyond it (runtime/quota.py explains why
    no per-directory quota works on this kernel). Unlike a sandbox's disk, it has a journal: it is data
    kept for a long time. Its files are owned by sandbox-side ids shifted by the template uid range
    (templates/uids.py), as templates' files are.
    While something uses it, the image is mounted on the host at `<data>/volumes/<id>/mnt` (mode 0700
    dirs above: host users cannot walk in), once: every sandbox that mounts the volume gets an idmapped bind
    of that mount (runtime `attach_volume`), and the content API works on it (volumes/content.py). One
    filesystem mounted once, so several sandboxes and the API see the same files at once. A volume
    mounted by a server that crashed stays mounted and is used again; `mount -o loop` uses the loop device
    already attached to the image (a sandbox's bind may still hold it), never a second one.

In a cluster
    The records are the cluster's (its state), the files one node's: a volume names the node that made it
    (`node`), where its image is. An API replica sends its content API, its delete and every sandbox that mounts
    it to that node (cluster/replica.py); another node asked for its files says where they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import string
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sandboxd.runtime import quota
from sandboxd.state.sql import State
from sandboxd.templates.uids import UID_SHIFT
from sandboxd.volumes.content import VolumeFiles
from sandboxd.volumes.errors import Conflict, Elsewhere, NotFound, TooMany, VolumeError

log = logging.getLogger("sandboxd.volumes")

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
IMAGE = "volume.img"
MOUNT = "mnt"
MIN_SIZE_MB = 16
MAX_SIZE_MB = 1024 * 1024
DEFAULT_SIZE_MB = 10 * 1024
MAX_VOLUMES = 256
OWNER = 1000  # the volume's root belongs to `user` (uid 1000 in sandboxd's templates), as /home/user does
_ID_CHARS = string.ascii_lowercase + string.digits
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class Volume:
    volume_id: str
    name: str
    token: str
    size_mb: int
    created_at: float
    node: str = ""  # the cluster node whose disk holds it ("": a single server's)

    def to_json(self) -> dict:
        return {
            "volume_id": self.volume_id,
            "name": self.name,
            "token": self.token,
            "size_mb": self.size_mb,
            "created_at": self.created_at,
            **({"node": self.node} if self.node else {}),
        }


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise VolumeError(
            f"invalid volume name {name[:80]!r}: 1 to 63 letters, digits, '.', '_' or '-', starting with a letter "
            "or a digit"
        )


class VolumeStore:
    def __init__(
        self, root: Path, db: State, default_size_mb: int = DEFAULT_SIZE_MB, max_volumes: int = MAX_VOLUMES
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.db = db
        self.default_size_mb = default_size_mb
        self.max_volumes = max_volumes
        self._lock = threading.Lock()  # creates, deletes and mounts
        for stale in self.root.glob(".new-*"):  # a create interrupted by a crash
            shutil.rmtree(stale, ignore_errors=True)

    # -- records ---------------------------------------------------------------------------------
    def all(self) -> list[Volume]:
        return [Volume(**v) for v in self.db.all_volumes()]

    def get(self, ref: str) -> Volume:
        """A volume by its ID or its name."""
        found = self.db.volume(ref)
        if found is None:
            raise NotFound(f"volume {ref[:80]!r} not found")
        return Volume(**found)

    def create(self, name: str, size_mb: int | None = None) -> Volume:
        check_name(name)
        size = self.default_size_mb if size_mb is None else size_mb
        if not MIN_SIZE_MB <= size <= MAX_SIZE_MB:
            raise VolumeError(f"a volume's size must be from {MIN_SIZE_MB} to {MAX_SIZE_MB} MiB, not {size}")
        with self._lock:
            volumes = self.all()
            if any(v.name == name for v in volumes):
                raise Conflict(f"a volume named {name!r} already exists")
            if len(volumes) >= self.max_volumes:  # each is a host mount and a loop device while it exists
                raise TooMany(
                    f"this server keeps at most {self.max_volumes} volumes (--max-volumes) and has that many: "
                    "delete one first"
                )
            vid = "".join(secrets.choice(_ID_CHARS) for _ in range(20))
            scratch = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
            try:
                quota.format_ext4(scratch / IMAGE, size, journal=True, root_owner=UID_SHIFT + OWNER)
                (scratch / MOUNT).mkdir(mode=0o700)
                os.rename(scratch, self.root / vid)  # whole, or not at all
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
            vol = Volume(vid, name, secrets.token_urlsafe(32), size, time.time(), self.db.node)
            self.db.put_volume(vol.to_json())
        # The volume starts empty: no lost+found (e2fsck makes one again if it ever needs one).
        with contextlib.suppress(OSError):
            os.rmdir(self.mounted(vol) / "lost+found")
        log.info("volume %s (%s, %d MiB) created", vid, name, size)
        return vol

    def delete(self, vol: Volume, users: list[str]) -> None:
        """Remove the volume and its files. Refused while sandboxes (running or paused) mount it."""
        self._here(vol)
        if users:
            shown = ", ".join(sorted(users)[:5]) + (" ..." if len(users) > 5 else "")
            raise Conflict(f"volume {vol.name!r} is mounted by {len(users)} sandbox(es) ({shown}): kill them first")
        with self._lock:
            self._unmount(vol)
            self.db.delete_volume(vol.volume_id)
            shutil.rmtree(self.root / vol.volume_id, ignore_errors=True)
        log.info("volume %s (%s) deleted", vol.volume_id, vol.name)

    def _here(self, vol: Volume) -> None:
        if vol.node and vol.node != self.db.node:
            raise Elsewhere(
                f"volume {vol.name!r} is kept on node {vol.node} (its files are on that node's disk): its files are "
                "read, its sandboxes run and it is deleted there (an API replica sends each there)"
            )

    # -- the host mount --------------------------------------------------------------------------
    def mounted(self, vol: Volume) -> Path:
        """The volume's files on the host (mounted now if they were not)."""
        mnt, image = self.root / vol.volume_id / MOUNT, self.root / vol.volume_id / IMAGE
        self._here(vol)
        with self._lock:
            if not os.path.ismount(mnt):
                if not image.is_file():
                    raise VolumeError(f"volume {vol.name!r} has lost its image ({image})")
                mnt.mkdir(mode=0o700, exist_ok=True)
                res = subprocess.run(
                    ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(mnt)],
                    capture_output=True,
                    env=_ENV,
                )
                if res.returncode != 0:
                    raise VolumeError(
                        f"mounting volume {vol.name!r} failed: {res.stderr.decode(errors='replace').strip()}"
                    )
        return mnt

    def files(self, vol: Volume) -> VolumeFiles:
        return VolumeFiles(self.mounted(vol))

    def _unmount(self, vol: Volume) -> None:
        mnt = self.root / vol.volume_id / MOUNT
        if os.path.ismount(mnt):
            # A detach: an upload still writing ends when its file closes. The loop device goes with the
            # last mount of the filesystem (a sandbox's bind keeps it until the sandbox ends).
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, env=_ENV)

    def close(self) -> None:
        """Unmount every volume from the host (sandboxes that mount one keep it through their bind)."""
        with self._lock:
            for vol in self.all():
                self._unmount(vol)
