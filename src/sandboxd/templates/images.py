"""OCI images as template bases: pulled with Debian's `skopeo` from the registry this server is configured
with (`--registry`), or imported from an OCI layout directory or a `docker save` archive (by the host's
administrator, `sandboxd template import`). Each image layer becomes one overlay layer (templates/
layers.py), unpacked by templates/unpack.py in a chroot; images that share layers share them on disk.

A client names an image; it never names where the server fetches from: a reference to any other
registry is refused, so a build cannot make the server reach an address of the client's choosing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sandboxd.templates.layers import LayerStore, layer_key
from sandboxd.templates.uids import UID_SHIFT

Progress = Callable[[str], None]
REF_RE = re.compile(r"^[a-z0-9][a-z0-9._:/@-]{0,254}$")
LAYER_TYPES = ("tar", "tar+gzip", "tar+zstd")
DEBIAN_FAMILY = {"debian": "bookworm", "python": "bookworm", "node": "bookworm"}


class ImageError(Exception):
    """An image cannot be had: what was asked, why not, and what to do."""


@dataclass(frozen=True)
class ImageConfig:
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = ""
    cmd: tuple[str, ...] = ()


@dataclass(frozen=True)
class Registry:
    host: str  # host[:port]
    insecure: bool = False  # plain HTTP (a registry on loopback, say)


def split_ref(ref: str) -> tuple[str | None, str]:
    """(registry host or None, repository[:tag|@digest]) of an image reference."""
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, ref


def source_for(ref: str, registry: Registry | None) -> str:
    """The skopeo source of `ref`: from the configured registry only."""
    if not REF_RE.match(ref) or ".." in ref:
        raise ImageError(f"'{ref[:120]}' is not an image reference")
    host, repo = split_ref(ref)
    if registry is None:
        raise ImageError(
            f"image '{ref}': this server has no registry to pull from: start it with `--registry HOST[:PORT]` "
            "(add --registry-insecure for plain HTTP), or build from the default base, from one of its templates, "
            "or import the image with `sandboxd template import`"
        )
    if host is not None and host != registry.host:
        raise ImageError(
            f"image '{ref}': this server pulls only from its registry {registry.host}, not from {host}: "
            f"push the image there, or name it without a registry"
        )
    if ":" not in repo.rpartition("/")[2] and "@" not in repo:
        repo += ":latest"
    return f"docker://{registry.host}/{repo}"


def pull(source: str, registry: Registry | None, layout: Path, progress: Progress) -> Path:
    """Copy an image into the OCI layout dir `layout` (tag `img`) with skopeo: blobs it has already are
    not fetched again."""
    if shutil.which("skopeo") is None:
        raise ImageError("skopeo is not installed: `apt-get install skopeo` (scripts/setup.sh does)")
    layout.mkdir(parents=True, exist_ok=True)
    cmd = ["skopeo", "--insecure-policy", "copy", "--quiet"]
    if registry is not None and registry.insecure and source.startswith("docker://"):
        cmd.append("--src-tls-verify=false")
    cmd += [source, f"oci:{layout}:img"]
    progress(f"pulling {source.removeprefix('docker://')}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise ImageError(f"pulling {source} failed: {res.stderr.strip()[-800:]}")
    return layout


def read_layout(layout: Path, tag: str = "img") -> tuple[list[tuple[str, str]], ImageConfig]:
    """The layers (blob digest, media type), bottom first, and the config of the image tagged `tag`."""
    index = json.loads((layout / "index.json").read_text())
    manifests = index.get("manifests", [])
    chosen = next(
        (m for m in manifests if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag),
        manifests[0] if len(manifests) == 1 else None,
    )
    if chosen is None:
        raise ImageError(f"the OCI layout {layout} has no image tagged '{tag}'")
    manifest = json.loads(_blob(layout, chosen["digest"]).read_text())
    if "manifests" in manifest:  # an index: this machine's platform
        plat = next((m for m in manifest["manifests"] if m.get("platform", {}).get("architecture") == "amd64"), None)
        if plat is None:
            raise ImageError("the image has no linux/amd64 variant")
        manifest = json.loads(_blob(layout, plat["digest"]).read_text())
    layers = []
    for layer in manifest.get("layers", []):
        media = layer.get("mediaType", "")
        if not any(media.endswith(t) for t in LAYER_TYPES):
            raise ImageError(f"layer {layer.get('digest')} has media type {media}, which sandboxd cannot unpack")
        layers.append((layer["digest"], media))
    raw = json.loads(_blob(layout, manifest["config"]["digest"]).read_text()).get("config") or {}
    env = {}
    for item in raw.get("Env") or []:
        k, sep, v = str(item).partition("=")
        if sep and k:
            env[k] = v
    cmd = tuple(str(x) for x in [*(raw.get("Entrypoint") or []), *(raw.get("Cmd") or [])])
    return layers, ImageConfig(
        env=env, user=str(raw.get("User") or ""), workdir=str(raw.get("WorkingDir") or ""), cmd=cmd
    )


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ImageError(f"unsupported blob digest {digest[:80]}")
    return layout / "blobs" / "sha256" / hexdigest


def empty_root(store: LayerStore) -> Path:
    """The (empty) root filesystem that image layers sit on."""
    root = store.dir.parent / ".empty-root"
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        os.chown(root, UID_SHIFT, UID_SHIFT)
        os.chmod(root, 0o755)
    return root


def import_layers(layout: Path, layers: list[tuple[str, str]], store: LayerStore, progress: Progress) -> str | None:
    """Make each image layer an overlay layer (unpacked once: the key is the chain of blob digests);
    returns the top layer's key."""
    base = empty_root(store)
    parent: str | None = None
    for i, (digest, media) in enumerate(layers, 1):
        key = layer_key(parent, base, {"oci": digest})
        if store.get(key) is not None:
            progress(f"layer {i}/{len(layers)} {digest[7:19]}: cached")
            parent = key
            continue
        progress(f"layer {i}/{len(layers)} {digest[7:19]}: unpacking")
        work = store.new_dir()
        try:
            (work / "diff").mkdir()
            os.chown(work / "diff", UID_SHIFT, UID_SHIFT)
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sandboxd.templates.unpack",
                    str(_blob(layout, digest)),
                    media,
                    str(work / "diff"),
                    str(UID_SHIFT),
                ],
                capture_output=True,
                text=True,
                timeout=3600,
            )
            if res.returncode != 0:
                raise ImageError(f"layer {digest}: {res.stderr.strip()[-500:]}")
            store.commit(work, key, parent, base, f"image layer {digest}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        parent = key
    return parent


# -- Debian-family images, made with mmdebstrap when there is no registry -----------------------------------
DEBIAN_TAGS = {"bookworm", "12", "stable", "latest", "bookworm-slim", "12-slim", "stable-slim"}
PYTHON_TAGS = {"3", "3.11", "latest", "3-bookworm", "3.11-bookworm", "3-slim", "3.11-slim", "3.11-slim-bookworm"}
NODE_TAGS = {"18", "18-bookworm", "18-slim", "18-bookworm-slim"}
DEBIAN_BASE = ("passwd", "ca-certificates")
DEBIAN_VERSION = 1  # bump when how a Debian root filesystem is made changes


def debian_base(ref: str) -> tuple[str, tuple[str, ...]] | None:
    """(suite, extra packages) of a Debian-family image reference sandboxd makes itself, None for other
    images. Versions Debian bookworm does not have are refused, saying which it has."""
    host, repo = split_ref(ref)
    if host is not None:
        return None
    name, _, tag = repo.removeprefix("library/").partition(":")
    tag = tag or "latest"
    if name == "debian":
        if tag not in DEBIAN_TAGS:
            raise ImageError(f"image 'debian:{tag}': without a registry sandboxd makes Debian 12 (bookworm) only")
        return "bookworm", ()
    if name == "python":
        if tag not in PYTHON_TAGS:
            raise ImageError(
                f"image 'python:{tag}': without a registry sandboxd makes Debian 12's Python (3.11): use "
                "python:3.11, or configure a registry (--registry) that has the image"
            )
        return "bookworm", ("python3", "python3-pip", "python3-venv", "python-is-python3")
    if name == "node":
        if tag not in NODE_TAGS:
            raise ImageError(
                f"image 'node:{tag}': without a registry sandboxd makes Debian 12's Node.js (18): use node:18, "
                "or configure a registry (--registry) that has the image"
            )
        return "bookworm", ("nodejs", "npm")
    if name == "ubuntu":
        raise ImageError(
            f"image 'ubuntu:{tag}': this server has no registry and makes no Ubuntu root filesystems: configure a "
            "registry (--registry), or build from_debian_image() / from_base_image()"
        )
    return None


def debian_rootfs(templates: Path, suite: str, packages: tuple[str, ...], progress: Progress) -> Path:
    """A minimal Debian root filesystem (cached under <templates>/.debian, made atomically with mmdebstrap,
    owned by the template uids)."""
    import hashlib

    from sandboxd.templates.layers import shift_ids

    wanted = (*DEBIAN_BASE, *packages)
    key = hashlib.sha256(json.dumps([suite, wanted, DEBIAN_VERSION, UID_SHIFT]).encode()).hexdigest()[:16]
    home = templates / ".debian"
    final = home / f"{suite}-{key}"
    if (final / "rootfs").is_dir():
        return final / "rootfs"
    if shutil.which("mmdebstrap") is None:
        raise ImageError("mmdebstrap is not installed: `apt-get install mmdebstrap` (scripts/setup.sh does)")
    home.mkdir(parents=True, exist_ok=True)
    work = home / f".build-{os.getpid()}-{key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        progress(f"mmdebstrap {suite} (minbase + {', '.join(wanted)}): about a minute, once")
        res = subprocess.run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=minbase",
                "--format=directory",
                "--include=" + ",".join(wanted),
                '--aptopt=Acquire::Retries "3"',
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                suite,
                str(work / "rootfs"),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if res.returncode != 0:
            raise ImageError(f"mmdebstrap {suite} failed: {res.stderr.strip()[-800:]}")
        for stale in (work / "rootfs" / "var" / "lib" / "apt" / "lists").glob("*_Packages*"):
            stale.unlink()
        shift_ids(work / "rootfs", 0, UID_SHIFT)
        os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / "rootfs"
