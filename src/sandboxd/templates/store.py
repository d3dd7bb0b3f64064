"""Template store: where built root filesystems live, how they are built, and how a build is kept atomic.

Layout under the templates directory:

    <dir>/<name>/current -> <digest>            the version new sandboxes get (a symlink, switched atomically)
    <dir>/<name>/<digest>/rootfs/               a root filesystem (owned by shifted uids, see specs.UID_SHIFT)
    <dir>/<name>/<digest>/template.json         what was built: spec, digest, size, build time
    <dir>/.build-<name>-<pid>/                  a build in progress; moved into place only when complete

Templates built from steps (the E2B template API, templates/recipe.py) are stacks of layers
(templates/layers.py) instead of one rootfs; they live under their template ID:

    <dir>/<id>/meta.json                        {templateID, names, createdAt}
    <dir>/<id>/<buildID>/template.json          a build: its top layer, the rootfs below, its config
    <dir>/<id>/current -> <buildID>             the `default` tag: what `name` alone means
    <dir>/<id>/tags/<tag> -> ../<buildID>       what `name:tag` means
    <dir>/.names/<quoted name> -> ../<id>       names (aliases) of templates

A failed or interrupted build leaves only a `.build-*` folder, which the next build removes, so there
is never a half-built template under a real name. A rebuild never pulls the floor from under running
sandboxes: an old version is deleted only once no sandbox on the host (of any server) mounts it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sandboxd.templates.layers import LayerStore, shift_ids, tree_size
from sandboxd.templates.specs import BUILTIN, CODE_DIR, SITE_DIR, UID_SHIFT, TemplateSpec

Progress = Callable[[str], None]


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
    names: tuple[str, ...] = ()
    recipe: str = ""  # a built-in recipe's digest (templates/builtin.py)

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


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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
        # a build's digest names its spec exactly: fields an older build did not record come from it
        builtin = BUILTIN.get(ident)
        if builtin is not None and builtin.digest() != meta["digest"]:
            builtin = None
        return Template(
            name=meta["name"],
            path=home / os.readlink(version),
            digest=meta["digest"],
            default_user=meta.get("default_user", "user"),
            default_workdir=meta.get("default_workdir", "/home/user"),
            built_at=meta.get("built_at", 0.0),
            size_bytes=meta.get("size_bytes", 0),
            service=tuple(meta.get("service", builtin.service if builtin else ())),
            service_user=meta.get("service_user", builtin.service_user if builtin else "user"),
            memory_mb=meta.get("memory_mb", builtin.memory_mb if builtin else None),
            disk_mb=meta.get("disk_mb", builtin.disk_mb if builtin else None),
            names=(ident,),
        )

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
            names=tuple(self.meta(ident).get("names", [])),
            recipe=meta.get("recipe", ""),
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
            return {"templateID": ident, "names": [ident] if ident in BUILTIN else []}

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

    def claim(self, name: str) -> str:
        """The ID of the template called `name`, made (with no build yet) if there is none."""
        ident, _ = self.resolve(name)
        if ident is not None and (self.dir / ident / "meta.json").is_file():
            return ident
        if ident is not None:
            raise TemplateError(f"'{name}' is a built-in template: give your template another name")
        ident = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(20))
        self.write_meta(ident, {"templateID": ident, "names": [name], "createdAt": time.time()})
        self.set_name(name, ident)
        return ident

    def delete(self, ident: str) -> None:
        """Remove a template: its names, builds, tags and uploaded files (its layers stay until a prune
        finds no template and no sandbox using them)."""
        for name in self.meta(ident).get("names", []):
            self.drop_name(name)
        doomed = self.dir / f".deleted-{ident}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.dir / ident, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

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

    def referenced_layers(self) -> set[str]:
        """Layers that a version of a template, or a sandbox on this host, stands on."""
        tops = {meta["top"] for meta in self._versions() if meta.get("top")}
        for lower in _mounted_lower_dirs():  # a sandbox's topmost layer: <templates>/.layers/<key>/diff
            path = Path(lower)
            if path.name == "diff" and path.parent.parent == self.layers.dir:
                tops.add(path.parent.name)
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

    def drop_tag(self, ident: str, tag: str) -> bool:
        home = self.dir / ident
        link = home / "current" if tag == "default" else home / "tags" / tag
        if not link.is_symlink():
            return False
        link.unlink()
        return True

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

    def is_current(self, spec: TemplateSpec) -> bool:
        try:
            return self.get(spec.name).digest == spec.digest()
        except (TemplateError, KeyError, ValueError):
            return False

    # -- building --------------------------------------------------------------------------------
    def clean_stale_builds(self) -> None:
        if not self.dir.is_dir():
            return
        for p in self.dir.glob(".build-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
                continue  # another build is running
            shutil.rmtree(p, ignore_errors=True)

    def ensure(self, name: str, progress: Progress = _print_progress, force: bool = False) -> Template:
        spec = BUILTIN.get(name)
        if spec is None:
            return self.get(name)
        if not force and self.is_current(spec):
            return self.get(name)
        return self.build(spec, progress)

    def build(self, spec: TemplateSpec, progress: Progress = _print_progress) -> Template:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Root filesystems are owned by the shifted sandbox uids: host users must not reach them
        # (a setuid file in one would run as a sandbox uid; its files would be writable by that uid).
        os.chmod(self.dir, 0o700)
        self.clean_stale_builds()
        work = self.dir / f".build-{spec.name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        rootfs = work / "rootfs"
        started = time.monotonic()
        try:
            if spec.parent:
                parent = self.ensure(spec.parent, progress)
                progress(f"[{spec.name}] copying parent template '{spec.parent}'")
                subprocess.run(["cp", "-a", "--reflink=auto", str(parent.rootfs), str(rootfs)], check=True)
                shift_ids(rootfs, UID_SHIFT, 0)  # back to plain uids while it is built
                if spec.packages:
                    self._chroot(
                        rootfs,
                        spec,
                        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                        "apt-get install -y --no-install-recommends " + " ".join(spec.packages),
                        progress,
                    )
            else:
                self._debootstrap(spec, rootfs, progress)
            if spec.pip:
                self._pip(rootfs, spec, progress)
            for i, step in enumerate(spec.steps, 1):
                progress(f"[{spec.name}] step {i}/{len(spec.steps)}: {step}")
                self._chroot(rootfs, spec, step, progress)
            progress(f"[{spec.name}] shifting ownership into the sandbox uid range (+{UID_SHIFT})")
            shift_ids(rootfs, 0, UID_SHIFT)
            size = tree_size(rootfs)
            meta = {
                "name": spec.name,
                "digest": spec.digest(),
                "default_user": spec.default_user,
                "default_workdir": spec.default_workdir,
                "built_at": time.time(),
                "size_bytes": size,
                "packages": list(spec.packages),
                "steps": list(spec.steps),
                "pip": list(spec.pip),
                "service": list(spec.service),
                "service_user": spec.service_user,
                "memory_mb": spec.memory_mb,
                "disk_mb": spec.disk_mb,
            }
            (work / "template.json").write_text(json.dumps(meta, indent=2))
            self._migrate_legacy(spec.name)
            home = self.dir / spec.name
            home.mkdir(exist_ok=True)
            final = home / spec.digest()
            if final.exists():
                shutil.rmtree(final)  # a previous version with this digest that `current` does not name
            work.rename(final)
            _switch_current(home, spec.digest())
            removed = self.prune(spec.name)
            if removed:
                progress(f"[{spec.name}] removed {len(removed)} old version(s) no sandbox uses")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        progress(f"[{spec.name}] built in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
        return self.get(spec.name)

    def _debootstrap(self, spec: TemplateSpec, rootfs: Path, progress: Progress) -> None:
        if shutil.which("mmdebstrap") is None:
            raise TemplateError("mmdebstrap is not installed: run `apt-get install mmdebstrap` (or scripts/setup.sh)")
        cmd = [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--format=directory",
            "--include=" + ",".join(spec.packages),
            '--aptopt=Acquire::Retries "3"',
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            spec.suite,
            str(rootfs),
        ]
        progress(f"[{spec.name}] mmdebstrap {spec.suite} with {len(spec.packages)} packages (a few minutes)")
        _run_with_progress(cmd, progress, spec.name)

    def prune(self, name: str) -> list[str]:
        """Delete the versions of `name` other than the current one that no sandbox on the host mounts."""
        home = self.dir / name
        current = os.readlink(home / "current") if (home / "current").is_symlink() else None
        # mounted by a sandbox, or the rootfs under layers (which templates and sandboxes stand on)
        in_use = _mounted_lower_dirs() | self._layer_bases()
        removed = []
        for version in home.iterdir():
            if version.name == current or not version.is_dir() or version.is_symlink():
                continue
            rootfs = str((version / "rootfs").resolve())
            if any(lower == rootfs or lower.startswith(rootfs + "/") for lower in in_use):
                continue
            shutil.rmtree(version, ignore_errors=True)
            removed.append(version.name)
        return removed

    def _pip(self, rootfs: Path, spec: TemplateSpec, progress: Progress) -> None:
        inner = subprocess.run(
            ["chroot", str(rootfs), "/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if inner != ours:
            raise TemplateError(
                f"template '{spec.name}': its python3 is {inner} but the builder runs {ours}: run the build with "
                f"the Python of the template's Debian release (scripts/setup.sh uses /usr/bin/python3)"
            )
        target = rootfs / SITE_DIR.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        progress(f"[{spec.name}] pip: {len(spec.pip)} packages into {SITE_DIR} (a few minutes)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *spec.pip,
        ]
        _run_with_progress(cmd, progress, spec.name, keep=("Collecting", "Downloading", "Successfully"))

    def _chroot(self, rootfs: Path, spec: TemplateSpec, script: str, progress: Progress) -> None:
        # Package scripts may want /proc and /dev; run in a private mount namespace so nothing leaks.
        inner = (
            f"mount -t proc proc {rootfs}/proc && mount --rbind /dev {rootfs}/dev && "
            f'mount --make-rslave {rootfs}/dev && exec chroot {rootfs} /bin/sh -c "$1"'
        )
        cmd = ["unshare", "--mount", "--pid", "--fork", "sh", "-c", inner, "sh", script]
        _run_with_progress(cmd, progress, spec.name)


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
    """Template root filesystems of every sandbox on the host: each sandbox's PID 1 holds its template open
    as fd 3 (sbxhelper.c, TEMPLATE_FD); sandboxes made before that name it in their overlay's options."""
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


DEFAULT_PROGRESS_KEYS = ("I: ", "E: ", "W: ", "Unpacking", "Setting up")


def _run_with_progress(
    cmd: list[str],
    progress: Progress,
    name: str,
    keep: tuple[str, ...] = ("I: ", "E: ", "W: ", "Unpacking", "Setting up"),
) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue
        tail = ([*tail, line])[-30:]
        if any(line.startswith(k) or k in line for k in keep):
            progress(f"[{name}] {line}")
    if proc.wait() != 0:
        raise TemplateError(
            f"template '{name}': `{' '.join(cmd[:3])} …` failed (exit {proc.returncode}):\n" + "\n".join(tail)
        )
