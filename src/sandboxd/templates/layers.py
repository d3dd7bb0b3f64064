"""Content-addressed layers: what one build step changed, stacked as overlay lower dirs.

    <templates>/.layers/<key>/diff/         the step's changes (an overlay upper dir: whiteouts are 0/0
                                            character devices, opaque dirs carry trusted.overlay.opaque)
    <templates>/.layers/<key>/layer.json    {key, parent, base, step, size_bytes, created, digest}
    <templates>/.layers/.new-<pid>-<n>/     a layer being committed (removed if the build fails)

A layer's key is a digest of its parent's key and of everything the step's result depends on (the step, the
build's environment, workdir and user at that point, the hashes of copied files), so two builds that take the same
step from the same parent share one layer, and a cached step is never run again. Its `digest` is that of its
content (templates/transfer.py), computed when it is first shared with another node of a cluster, which checks it
(cluster/layers.py). The bottom layer of a stack names the root filesystem it sits on (`base`: a built template's
rootfs). Files are owned by the template uids (UID_SHIFT + uid in the sandbox), like every rootfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxd.fdio import syncfs
from sandboxd.templates.transfer import tree_digest
from sandboxd.templates.uids import UID_RANGE, UID_SHIFT

_counter = itertools.count()


def layer_key(top: str | None, base: Path, step: dict[str, Any]) -> str:
    """The key of what `step` makes on the layer `top` (None: directly on the rootfs `base`)."""
    parent = top or f"rootfs:{base}"
    body = json.dumps({"parent": parent, "step": step}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Layer:
    key: str
    path: Path
    parent: str | None  # the layer below, or None: this one sits directly on `base`
    base: str  # the root filesystem at the bottom of the stack (a path)
    step: str
    size_bytes: int
    created: float
    digest: str = ""  # of its content: computed when first told to the cluster (LayerStore.digest_of), not at commit

    @property
    def diff(self) -> Path:
        return self.path / "diff"


class LayerStore:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory) / ".layers"

    def get(self, key: str) -> Layer | None:
        path = self.dir / key
        try:
            meta = json.loads((path / "layer.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        return Layer(
            key=key,
            path=path,
            parent=meta.get("parent"),
            base=meta["base"],
            step=meta.get("step", ""),
            size_bytes=meta.get("size_bytes", 0),
            created=meta.get("created", 0.0),
            digest=meta.get("digest", ""),
        )

    def chain(self, key: str) -> list[Layer]:
        """The stack that ends in `key`, topmost first."""
        out: list[Layer] = []
        next_key: str | None = key
        while next_key is not None:
            layer = self.get(next_key)
            if layer is None:
                raise FileNotFoundError(f"layer {next_key} is missing (pruned while in use?)")
            out.append(layer)
            next_key = layer.parent
            if len(out) > 1000:
                raise ValueError(f"layer {key}: its chain does not end")
        return out

    def lowers(self, key: str | None, base: Path) -> tuple[Path, ...]:
        """Overlay lower dirs, topmost first, of the stack ending in `key` (None: `base` alone)."""
        if key is None:
            return (base,)
        chain = self.chain(key)
        return (*(layer.diff for layer in chain), Path(chain[-1].base))

    def key_of(self, path: Path) -> str | None:
        """The key of the layer whose diff dir `path` is (`<templates>/.layers/<key>/diff`), else None."""
        return path.parent.name if path.name == "diff" and path.parent.parent == self.dir else None

    def new_dir(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir.parent, 0o700)
        path = self.dir / f".new-{os.getpid()}-{next(_counter)}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        return path

    def commit(
        self, work: Path, key: str, parent: str | None, base: Path, step: str, shift_from: int | None = None
    ) -> Layer:
        """Make `work` (a dir holding `diff/`) the layer `key`. With `shift_from`, the files are owned by a
        sandbox's host uids (shift_from + uid): they move to the template uids first."""
        diff = work / "diff"
        if shift_from is not None:
            shift_ids(diff, shift_from, UID_SHIFT)
        size = tree_size(diff)
        meta = {
            "key": key,
            "parent": parent,
            "base": str(base),
            "step": step,
            "size_bytes": size,
            "created": time.time(),
        }
        (work / "layer.json").write_text(json.dumps(meta, indent=1))
        sync_tree(work)  # a layer is never half on disk after a crash
        final = self.dir / key
        if final.exists():  # built by a concurrent build in the meantime: the same content
            shutil.rmtree(work, ignore_errors=True)
        else:
            os.rename(work, final)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)  # the rename too
            finally:
                os.close(fd)
        layer = self.get(key)
        assert layer is not None
        return layer

    def digest_of(self, layer: Layer) -> str:
        """The layer's content digest, computed (once: kept in its layer.json) if it was made without one."""
        if layer.digest:
            return layer.digest
        digest = tree_digest(layer.diff)
        meta = json.loads((layer.path / "layer.json").read_text())
        tmp = layer.path / f".layer.json.{os.getpid()}"
        tmp.write_text(json.dumps({**meta, "digest": digest}, indent=1))
        os.rename(tmp, layer.path / "layer.json")
        return digest

    def adopt(self, work: Path, meta: dict[str, Any]) -> Layer:
        """Make `work` (a dir holding `diff/`, fetched from another node and checked) the layer `meta["key"]`."""
        (work / "layer.json").write_text(json.dumps(meta, indent=1))
        sync_tree(work)
        final = self.dir / meta["key"]
        if final.exists():  # (fetched meanwhile by a concurrent create)
            shutil.rmtree(work, ignore_errors=True)
        else:
            os.rename(work, final)
        layer = self.get(meta["key"])
        assert layer is not None
        return layer

    def keys(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return [p.name for p in self.dir.iterdir() if not p.name.startswith(".")]

    def clean_stale(self) -> None:
        if not self.dir.is_dir():
            return
        for p in self.dir.glob(".new-*"):
            pid = p.name.split("-")[1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue  # a build of a running server (this one's included)
            shutil.rmtree(p, ignore_errors=True)

    def remove(self, key: str) -> int:
        path = self.dir / key
        layer = self.get(key)
        size = layer.size_bytes if layer else 0
        # out of the way atomically first: a reader never sees half a layer
        doomed = self.dir / f".new-{os.getpid()}-{next(_counter)}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return 0
        shutil.rmtree(doomed, ignore_errors=True)
        return size


def drop_per_sandbox_files(diff: Path) -> None:
    """What every sandbox's start writes into its root (its name, its resolver) is no layer's content."""
    etc = diff / "etc"
    for name in ("hostname", "hosts", "resolv.conf"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (etc / name).unlink()
    with contextlib.suppress(OSError):
        if not os.listxattr(etc, follow_symlinks=False):  # not an opaque dir: its absence changes nothing
            os.rmdir(etc)


def shift_ids(root: Path, old: int, new: int, count: int = UID_RANGE) -> None:
    """Move owners in [old, old+count) to [new, new+count), keeping setuid/setgid bits (chown clears them).
    Other owners (the overlay's whiteouts: host root) stay."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, None]:
            path = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(path)
            uid = st.st_uid - old + new if old <= st.st_uid < old + count else st.st_uid
            gid = st.st_gid - old + new if old <= st.st_gid < old + count else st.st_gid
            if (uid, gid) == (st.st_uid, st.st_gid):
                continue
            os.lchown(path, uid, gid)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode))


SYNC_EACH_MAX = 512  # entries up to which a tree's files are synced one by one (else the whole filesystem)


def sync_tree(root: Path) -> None:
    """Everything under `root` on disk: each file and directory fsync'ed when there are few (what else the
    filesystem holds dirty is not this layer's business), else one syncfs."""
    entries: list[tuple[str, bool]] = []
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            entries.append((os.path.join(dirpath, name), False))
        entries.append((dirpath, True))
        if len(entries) > SYNC_EACH_MAX:
            break
    if len(entries) > SYNC_EACH_MAX:
        fd = os.open(root, os.O_RDONLY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)
        return
    for path, is_dir in entries:  # files before the directories that hold them
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_DIRECTORY if is_dir else 0))
        except OSError:  # a symlink, a FIFO, a device (a whiteout): nothing of theirs is data
            continue
        try:
            if is_dir or stat.S_ISREG(os.fstat(fd).st_mode):
                os.fsync(fd)
        finally:
            os.close(fd)


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total
