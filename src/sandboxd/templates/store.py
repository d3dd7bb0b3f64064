"""Template store: where built root filesystems live, how they are built, and how a build is kept atomic.

Layout under the templates directory:

Every template is built from steps (the E2B template API, templates/recipe.py; the built-in ones too,
templates/builtin.py): a stack of layers (templates/layers.py) on a root filesystem. It lives under its
template ID:

    <dir>/<id>/meta.json                        {templateID, names, createdAt}
    <dir>/<id>/<buildID>/template.json          a build: its top layer, the rootfs below, its config
    <dir>/<id>/current -> <buildID>             the `default` tag: what `name` alone means
    <dir>/<id>/tags/<tag> -> ../<buildID>       what `name:tag` means
    <dir>/.names/<quoted name> -> ../<id>       names (aliases) of templates

Installs made before the built-in templates were built from steps hold them as one root filesystem
per version (`<dir>/<name>/<digest>/rootfs/`, owned by the template uids, templates/uids.py); such a
version is read as before, and deleted only once no sandbox on the host mounts it and no layer sits on
it. A failed build commits nothing (templates/layers.py), so there is never a half-built template.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sandboxd.templates.builtin import CODE_DIR, FIXED_IDS, SITE_DIR
from sandboxd.templates.builtin import names as builtin_names
from sandboxd.templates.layers import LayerStore

MEMORY_DIR = "memory"  # a snapshot's processes, in its version's directory
SNAPSHOT_STEP = "snapshot of sandbox "  # a snapshot's layer's step (core/snapshots.py)
SNAPSHOT_LAYER_GRACE = 60.0  # s


class TemplateError(Exception):
    """A template is unknown, missing, or failed to build."""


@dataclass(frozen=True)
class Template:
    name: str  # its template ID
    path: Path
    digest: str  # the build (version) a sandbox is made from
    default_user: str
    default_workdir: str
    built_at: float
    size_bytes: int
    service: tuple[str, ...] = ()
    service_user: str = "user"
    memory_mb: int | None = None
    disk_mb: int | None = None
    cpu_count: float | None = None
    # Built from steps: its layers (topmost first, then the rootfs they sit on); () means path/rootfs.
    lowers: tuple[Path, ...] = ()
    top_layer: str | None = None
    base: str = ""  # the rootfs at the bottom of its layers
    env: dict[str, str] = field(default_factory=dict)
    start_cmd: str = ""
    ready_cmd: str = ""
    probe_cmd: str = ""  # its sandboxes' health probe (core/health.py), with its timeout in s
    probe_timeout: float = 5.0
    names: tuple[str, ...] = ()
    recipe: str = ""  # a built-in recipe's digest (templates/builtin.py)
    # A snapshot with memory (core/snapshots.py): its processes, in MEMORY_DIR of its version, written by CRIU for
    # a sandbox whose uid range started here.
    memory_uid_base: int | None = None
    memory_parts: dict[str, Any] = field(default_factory=dict)  # what the server's parts carry (core/pausing.py)
    memory_volume_mounts: tuple[dict[str, str], ...] = ()  # the volumes its processes had mounted (the same again)

    @property
    def memory_images(self) -> Path | None:
        return self.path / MEMORY_DIR if self.memory_uid_base is not None else None

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def layers(self) -> tuple[Path, ...]:
        """Its root filesystem as overlay lower dirs, topmost first."""
        return self.lowers or (self.rootfs,)

    @property
    def binds(self) -> tuple[tuple[str, str], ...]:
        """Host directories mounted read-only into its sandboxes: sandboxd's in-sandbox code."""
        if not self.service:
            return ()
        import sandboxd.interpreter

        return ((str(Path(sandboxd.interpreter.__file__).parent), f"{CODE_DIR}/sandboxd_interpreter"),)

    @property
    def service_env(self) -> dict[str, str]:
        return {"PYTHONPATH": f"{CODE_DIR}:{SITE_DIR}", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def new_template_id() -> str:
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20))


class TemplateStore:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    # -- reading ---------------------------------------------------------------------------------
    def get(self, name: str) -> Template:
        """A template by ID, name or `name:tag` (its `default` tag when none is given)."""
        ident, tag = self.resolve(name)
        if ident is None:
            raise TemplateError(self.unknown_message(name))
        self._migrate_legacy(ident)
        home = self.dir / ident
        version = home / "current" if tag is None else home / "tags" / tag
        try:
            meta = json.loads((version / "template.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            if tag is not None and (home / "meta.json").is_file():
                raise TemplateError(f"template '{ident}' has no tag '{tag}'") from None
            raise TemplateError(self.unknown_message(name)) from None
        if meta.get("kind") == "layers":
            return self._layered(ident, home / os.readlink(version) if version.is_symlink() else version, meta)
        return Template(  # a single-rootfs version (an install from before built-ins had layers)
            name=meta["name"],
            path=home / os.readlink(version),
            digest=meta["digest"],
            default_user=meta.get("default_user", "user"),
            default_workdir=meta.get("default_workdir", "/home/user"),
            built_at=meta.get("built_at", 0.0),
            size_bytes=meta.get("size_bytes", 0),
            service=tuple(meta.get("service", ())),
            service_user=meta.get("service_user", "user"),
            memory_mb=meta.get("memory_mb"),
            disk_mb=meta.get("disk_mb"),
            names=(ident,),
        )

    def version(self, ident: str, build_id: str) -> Template:
        """One build of a layered template, whatever its tags."""
        try:
            meta = json.loads((self.dir / ident / build_id / "template.json").read_text())
        except (OSError, ValueError):
            raise TemplateError(f"template '{ident}' has no build '{build_id}'") from None
        if meta.get("kind") != "layers":
            raise TemplateError(f"template '{ident}' build '{build_id}' is not a layered build")
        return self._layered(ident, self.dir / ident / build_id, meta)

    def has_version(self, ident: str, build_id: str) -> bool:
        return (self.dir / ident / build_id / "template.json").is_file()

    def _layered(self, ident: str, path: Path, meta: dict) -> Template:
        try:
            lowers = self.layers.lowers(meta.get("top"), Path(meta["base"]))
        except (FileNotFoundError, ValueError) as e:
            raise TemplateError(f"template '{ident}' is damaged: {e}; build it again") from None
        return Template(
            name=ident,
            path=path,
            digest=meta["build_id"],
            default_user=meta.get("default_user", "user"),
            default_workdir=meta.get("default_workdir", "/home/user"),
            built_at=meta.get("built_at", 0.0),
            size_bytes=meta.get("size_bytes", 0),
            memory_mb=meta.get("memory_mb"),
            disk_mb=meta.get("disk_mb"),
            cpu_count=meta.get("cpu_count"),
            service=tuple(meta.get("service", ())),
            service_user=meta.get("service_user", "user"),
            lowers=lowers,
            top_layer=meta.get("top"),
            base=meta["base"],
            env=dict(meta.get("env", {})),
            start_cmd=meta.get("start_cmd", ""),
            ready_cmd=meta.get("ready_cmd", ""),
            probe_cmd=meta.get("probe_cmd", ""),
            probe_timeout=meta.get("probe_timeout") or 5.0,
            names=tuple(self.meta(ident).get("names", [])),
            recipe=meta.get("recipe", ""),
            memory_uid_base=(meta.get("memory") or {}).get("uid_base"),
            memory_parts=dict((meta.get("memory") or {}).get("parts") or {}),
            memory_volume_mounts=tuple((meta.get("memory") or {}).get("volume_mounts") or ()),
        )

    @property
    def layers(self) -> LayerStore:
        return LayerStore(self.dir)

    # -- names, tags -----------------------------------------------------------------------------
    @staticmethod
    def split_tag(name: str) -> tuple[str, str | None]:
        base, sep, tag = name.rpartition(":")
        if not sep or "/" in tag:
            return name, None
        return base, tag

    def resolve(self, name: str) -> tuple[str | None, str | None]:
        """(template ID, tag) that `name` means, or (None, tag) when nothing has that name."""
        base, tag = self.split_tag(name)
        if not base or len(base) > 256 or "\0" in base:
            return None, tag
        link = self.dir / ".names" / quote(base, safe="")
        if link.is_symlink():
            return os.readlink(link).rpartition("/")[2], tag
        if "/" not in base and not base.startswith(".") and (self.dir / base).is_dir():
            return base, tag
        return None, tag

    def meta(self, ident: str) -> dict:
        try:
            return json.loads((self.dir / ident / "meta.json").read_text())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return {"templateID": ident, "names": [ident] if ident in FIXED_IDS else []}

    def write_meta(self, ident: str, meta: dict) -> None:
        (self.dir / ident).mkdir(parents=True, exist_ok=True)
        write_json(self.dir / ident / "meta.json", meta)

    def set_name(self, name: str, ident: str) -> None:
        (self.dir / ".names").mkdir(parents=True, exist_ok=True)
        replace_symlink(self.dir / ".names" / quote(name, safe=""), f"../{ident}")

    def drop_name(self, name: str) -> None:
        (self.dir / ".names" / quote(name, safe="")).unlink(missing_ok=True)

    def tags(self, ident: str) -> dict[str, str]:
        """tag -> build ID (`default`: the current build)."""
        home = self.dir / ident
        out: dict[str, str] = {}
        if (home / "current").is_symlink():
            out["default"] = os.readlink(home / "current")
        if (home / "tags").is_dir():
            for link in (home / "tags").iterdir():
                if link.is_symlink():
                    out[link.name] = os.readlink(link).rpartition("/")[2]
        return out

    def set_tag(self, ident: str, tag: str, build_id: str) -> None:
        home = self.dir / ident
        if tag == "default":
            _switch_current(home, build_id)
            return
        (home / "tags").mkdir(exist_ok=True)
        replace_symlink(home / "tags" / tag, f"../{build_id}")

    def is_builtin(self, ident: str) -> bool:
        """A built-in template (templates/builtin.py): every tenant's, made by `sandboxd template build`."""
        return ident in FIXED_IDS or bool(self.meta(ident).get("builtin"))

    def claim(self, name: str, builtin: bool = False, ident_for_new: str | None = None) -> str:
        """The ID of the template called `name`, made (with no build yet) if there is none — under `ident_for_new`
        when given (the cluster's catalog's: cluster/catalog.py). Only a build of a built-in template (`builtin`) may
        claim a built-in name."""
        ident, _ = self.resolve(name)
        if not builtin and (name in builtin_names() or (ident is not None and self.is_builtin(ident))):
            raise TemplateError(f"'{name}' is a built-in template: give your template another name")
        if ident is not None and (self.dir / ident / "meta.json").is_file():
            if builtin and not self.meta(ident).get("builtin"):
                self.write_meta(ident, {**self.meta(ident), "builtin": True})
            return ident
        if ident is None or not builtin:
            ident = ident_for_new or new_template_id()
        if builtin and name in FIXED_IDS:
            ident = name  # its name is its ID, as it always was
        self.write_meta(ident, {"templateID": ident, "names": [name], "createdAt": time.time(), "builtin": builtin})
        self.set_name(name, ident)
        return ident

    def publish(
        self,
        name: str,
        extra: dict,
        build_id: str,
        version: dict,
        memory: Path | None = None,
        ident_for_new: str | None = None,
    ) -> str:
        """A new version of the template called `name` (made if there is none, under `ident_for_new` when given: a
        cluster's catalog's), its default; its ID. A new template is assembled in a scratch dir and renamed into place
        whole, then named: a crash leaves a scratch dir (`clean_scratch`) or a whole template, never one without its
        version. `memory`: a snapshot's processes (a directory, moved into the version)."""
        ident, _ = self.resolve(name)
        if name in builtin_names() or (ident is not None and self.is_builtin(ident)):
            raise TemplateError(f"'{name}' is a built-in template: give yours another name")
        if ident is not None and (self.dir / ident / "meta.json").is_file():
            self.write_meta(ident, {**self.meta(ident), **extra})
            self._add_built(ident, build_id, version, ["default"], memory)
            return ident
        ident = ident_for_new or new_template_id()
        meta = {"templateID": ident, "names": [name], "createdAt": time.time(), "builtin": False, **extra}
        self._assemble(ident, meta, build_id, version, memory)
        self.set_name(name, ident)
        return ident

    def _add_built(self, ident: str, build_id: str, version: dict, tags: list[str], memory: Path | None) -> None:
        """A new version of a template here, its processes (`memory`) moved in first: a version is whole once its
        template.json is written."""
        if memory is not None:
            (self.dir / ident / build_id).mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / ident / build_id / MEMORY_DIR, ignore_errors=True)
            os.rename(memory, self.dir / ident / build_id / MEMORY_DIR)
        self.add_version(ident, build_id, version, tags)

    def _assemble(
        self, ident: str, meta: dict, build_id: str, version: dict, memory: Path | None, record: dict | None = None
    ) -> None:
        """A new template with its first build (its default), assembled in a scratch dir and renamed into place whole:
        a crash leaves a scratch dir (`clean_scratch`) or a whole template."""
        scratch = self.dir / f".new-template-{ident}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / build_id).mkdir(parents=True)
        if memory is not None:
            os.rename(memory, scratch / build_id / MEMORY_DIR)
        if record is not None:
            (scratch / "builds").mkdir()
            write_json(scratch / "builds" / f"{build_id}.json", record)
        write_json(scratch / "meta.json", meta)
        write_json(
            scratch / build_id / "template.json", {"kind": "layers", "name": ident, "build_id": build_id, **version}
        )
        (scratch / "current").symlink_to(build_id)
        os.rename(scratch, self.dir / ident)

    def adopt(
        self,
        ident: str,
        meta: dict,
        build_id: str,
        version: dict,
        record: dict | None = None,
        memory: Path | None = None,
        tags: tuple[str, ...] = ("default",),
    ) -> None:
        """A template fetched from another node of a cluster (cluster/layers.py), its layers here already: its
        build under its ID (`tags`: the default unless told), its build's record (`record`), its processes
        (`memory`: a snapshot's, a directory moved into the build), and its names. A new one is assembled in a
        scratch dir and renamed into place whole, as publish() does."""
        home = self.dir / ident
        if (home / "meta.json").is_file():
            if record is not None:
                (home / "builds").mkdir(exist_ok=True)
                write_json(home / "builds" / f"{build_id}.json", record)
            self._add_built(ident, build_id, version, list(tags), memory)
        else:
            self._assemble(ident, {**meta, "templateID": ident}, build_id, version, memory, record)
            for tag in tags:
                self.set_tag(ident, tag, build_id)
        for name in meta.get("names") or []:
            if isinstance(name, str) and 0 < len(name) <= 256 and "\0" not in name:
                if self.resolve(name)[0] in (None, ident):  # (a name this node gave another template stays)
                    self.set_name(name, ident)

    def clean_forks(self) -> None:
        """The snapshots of forks (core/snapshots.py: deleted once the forks are made) that a crash left: those of
        no running server process (the templates dir may be shared by several servers)."""
        for ident in self.names():
            snap = self.meta(ident).get("snapshot") or {}
            pid = snap.get("pid")
            if snap.get("fork") and not (isinstance(pid, int) and pid > 0 and Path(f"/proc/{pid}").exists()):
                self.delete(ident)

    def clean_scratch(self) -> None:
        """Scratch dirs of `publish`, and templates half deleted, that a crashed process left (those of running
        processes stay)."""
        for p in [*self.dir.glob(".new-template-*"), *self.dir.glob(".deleted-*")] if self.dir.is_dir() else []:
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue
            shutil.rmtree(p, ignore_errors=True)

    def delete(self, ident: str) -> None:
        """Remove a template: its names, builds, tags and uploaded files, and the layers of its versions that
        nothing else stands on (no other template's version, no sandbox, running or stopped)."""
        own: set[str] = set()
        for version in (self.dir / ident).iterdir() if (self.dir / ident).is_dir() else []:
            with contextlib.suppress(OSError, ValueError, FileNotFoundError):
                top = json.loads((version / "template.json").read_text()).get("top")
                if top and not version.is_symlink():
                    own.update(layer.key for layer in self.layers.chain(top))
        for name in self.meta(ident).get("names", []):
            self.drop_name(name)
        doomed = self.dir / f".deleted-{ident}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.dir / ident, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        if own:
            for key in own - self.referenced_layers():
                self.layers.remove(key)

    def _versions(self) -> Iterator[dict]:
        """The template.json of every version of every template (the `current` and tag links skipped)."""
        for home in self.dir.iterdir() if self.dir.is_dir() else []:
            if home.name.startswith(".") or not home.is_dir():
                continue
            for version in home.iterdir():
                if version.is_symlink():
                    continue
                with contextlib.suppress(ValueError, OSError):
                    yield json.loads((version / "template.json").read_text())

    def _layer_bases(self) -> set[str]:
        """The root filesystems at the bottom of layers (resolved paths): kept while a layer names them."""
        bases = {meta["base"] for meta in self._versions() if meta.get("base")}
        for key in self.layers.keys():
            layer = self.layers.get(key)
            if layer is not None and layer.parent is None:
                bases.add(layer.base)
        return {str(Path(base).resolve()) for base in bases}

    # -- sandboxes stopped with their files kept (a filesystem-only pause) ----------------------------
    def hold(self, sandbox_id: str, lowers: tuple[Path, ...], state_dir: Path) -> None:
        """Keep a sandbox's root filesystem (its layers, topmost first) from any prune, from its create on
        (no process of a sandbox holds a host file), until `release` or until its state dir is gone (the
        sandbox destroyed, or its server's data dir removed): then the hold holds nothing any more."""
        (self.dir / ".holds").mkdir(parents=True, exist_ok=True)
        hold = {"lowers": [str(p) for p in lowers], "state_dir": str(state_dir)}
        write_json(self.dir / ".holds" / sandbox_id, hold)

    def release(self, sandbox_id: str) -> None:
        path = self.dir / ".holds" / sandbox_id
        lowers: list[str] = []
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            lowers = list(json.loads(path.read_text())["lowers"])
        path.unlink(missing_ok=True)
        keys = [self.layers.key_of(Path(p)) for p in lowers]
        self.prune_snapshot_layers({k for k in keys if k is not None})

    def prune_snapshot_layers(self, among: set[str] | None = None) -> int:
        """Remove the layers of deleted snapshots that nothing stands on any more (of `among`, or all): a
        snapshot deleted while sandboxes from it ran (a fork's, always: deleted once its forks are made) leaves
        its layer to the last of them. A build's layers stay (they are its cache). Of all, one younger than
        SNAPSHOT_LAYER_GRACE is left alone: between its commit and its publish it is nobody's yet (another
        server may be making it: the templates dir may be shared); `among` those a sandbox stood on, none is."""
        candidates = []
        for key in among if among is not None else self.layers.keys():
            layer = self.layers.get(key)
            if layer is None or not layer.step.startswith(SNAPSHOT_STEP):
                continue
            if among is not None or time.time() - layer.created > SNAPSHOT_LAYER_GRACE:
                candidates.append(key)
        if not candidates:
            return 0
        keep = self.referenced_layers()
        doomed = [key for key in candidates if key not in keep]
        for key in doomed:
            self.layers.remove(key)
        return len(doomed)

    def _held_lower_dirs(self) -> set[str]:
        held: set[str] = set()
        for path in (self.dir / ".holds").glob("*"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                hold = json.loads(path.read_text())
                if not Path(hold["state_dir"]).is_dir():
                    path.unlink(missing_ok=True)  # its sandbox is gone with its data dir
                    continue
                held.update(str(p) for p in hold["lowers"])
        return held

    def referenced_layers(self) -> set[str]:
        """Layers that a version of a template, or a sandbox on this host (running or stopped), stands on."""
        tops = {meta["top"] for meta in self._versions() if meta.get("top")}
        for lower in _mounted_lower_dirs() | self._held_lower_dirs():  # <templates>/.layers/<key>/diff
            key = self.layers.key_of(Path(lower))
            if key is not None:
                tops.add(key)
        keep: set[str] = set()
        for top in tops:
            with contextlib.suppress(FileNotFoundError, ValueError):
                keep.update(layer.key for layer in self.layers.chain(top))
        return keep

    def prune_layers(self) -> tuple[int, int]:
        """Remove the layers nothing stands on; (how many, bytes)."""
        self.layers.clean_stale()
        keep = self.referenced_layers()
        count = size = 0
        for key in self.layers.keys():
            if key not in keep:
                size += self.layers.remove(key)
                count += 1
        return count, size

    def add_version(self, ident: str, build_id: str, meta: dict, tags: list[str]) -> None:
        """Record a built version of a layered template and point `tags` at it (the first build of a
        template also becomes its default)."""
        home = self.dir / ident
        (home / build_id).mkdir(parents=True, exist_ok=True)
        write_json(home / build_id / "template.json", {"kind": "layers", "name": ident, "build_id": build_id, **meta})
        for tag in tags:
            self.set_tag(ident, tag, build_id)
        if not (home / "current").exists():
            self.set_tag(ident, "default", build_id)

    def tag(self, ident: str, tag: str) -> str | None:
        """The build `tag` of the template means here (one link read), if it has that tag."""
        try:
            return os.readlink(self._tag_link(ident, tag)).rpartition("/")[2]
        except OSError:
            return None

    def drop_tag(self, ident: str, tag: str) -> bool:
        link = self._tag_link(ident, tag)
        if not link.is_symlink():
            return False
        link.unlink()
        return True

    def _tag_link(self, ident: str, tag: str) -> Path:
        home = self.dir / ident
        return home / "current" if tag == "default" else home / "tags" / tag

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.dir.iterdir()
            if (p / "current" / "template.json").is_file() or (p / "template.json").is_file()
        )

    def _migrate_legacy(self, name: str) -> None:
        """Builds of sandboxd 0.1 kept one unversioned copy in <dir>/<name>/: move it to its digest."""
        legacy = self.dir / name / "template.json"
        if not legacy.is_file():
            return
        digest = json.loads(legacy.read_text())["digest"]
        version = self.dir / name / digest
        version.mkdir(exist_ok=True)
        (self.dir / name / "rootfs").rename(version / "rootfs")  # running overlays keep their dentries
        legacy.rename(version / "template.json")
        _switch_current(self.dir / name, digest)

    def unknown_message(self, name: str) -> str:
        available = ", ".join(self.names()) or "none (build one with `sandboxd template build base`)"
        return f"template '{name}' not found; available templates: {available}"

    def link_into(self, other: Path, names: tuple[str, ...]) -> None:
        """Make templates of this store usable from the templates dir `other` (of a server of its own: a
        test's, a benchmark's): their directories and their layers are linked there, so what a server on
        `other` builds stays in `other`."""
        (other / ".layers").mkdir(parents=True, exist_ok=True)
        for name in (*names, ".debian"):  # .debian: the root filesystems from_debian_image() builds on
            if (self.dir / name).exists() and not (other / name).is_symlink():
                (other / name).symlink_to(self.dir / name)
        for name in names:
            top = self.get(name).top_layer
            for layer in self.layers.chain(top) if top else []:
                link = other / ".layers" / layer.key
                if not link.is_symlink():
                    link.symlink_to(layer.path)

    def prune(self, name: str) -> list[str]:
        """Delete the versions of `name` that no tag names and no sandbox on the host mounts (a layered
        version's layers stay until a prune of layers finds nothing standing on them)."""
        home = self.dir / name
        tagged = set(self.tags(name).values())
        # mounted by a sandbox, or the rootfs under layers (which templates and sandboxes stand on)
        in_use = _mounted_lower_dirs() | self._held_lower_dirs() | self._layer_bases()
        removed = []
        for version in home.iterdir():
            if version.name in tagged or version.is_symlink() or not (version / "template.json").is_file():
                continue  # (builds/, files/, tags/ are no versions)
            rootfs = str((version / "rootfs").resolve())
            if any(lower == rootfs or lower.startswith(rootfs + "/") for lower in in_use):
                continue
            shutil.rmtree(version, ignore_errors=True)
            removed.append(version.name)
        return removed


def _switch_current(home: Path, digest: str) -> None:
    replace_symlink(home / "current", digest)


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: a reader sees the old target or the new one."""
    tmp = link.with_name(f".{link.name}.new-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.rename(link)


def write_json(path: Path, data: Any) -> None:
    """Write `path` atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.rename(path)


def _mounted_lower_dirs() -> set[str]:
    """Template root filesystems of sandboxes made by older sandboxd versions, which do not record holds: their
    PID 1 holds the template open as fd 3, or (older still) their overlay's options name it."""
    lowers: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "sandbox-init":
                    continue
            with contextlib.suppress(OSError):
                lowers.add(os.readlink(f"/proc/{pid}/fd/3"))
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    _, _, opts = line.partition(" - overlay ")
                    for opt in opts.split(","):
                        if opt.startswith("lowerdir="):
                            lowers.update(opt[len("lowerdir=") :].split(":"))
        except OSError:
            continue
    return lowers
