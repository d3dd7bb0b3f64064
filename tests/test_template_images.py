"""Templates from OCI images: a real registry (Debian's docker-registry, the CNCF distribution server) on
loopback, an image built by the test (two layers, whiteouts, an opaque directory, config env and workdir)
pushed to it with skopeo, then `Template().from_image(...)` with the official SDK; the same image
imported from an OCI layout directory and from a `docker save`-style archive with the CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, Template
from e2b.exceptions import BuildException

from conftest import SANDBOXD, Server, builder_server, free_port

BINARIES = (
    "/bin/sh",
    "/bin/dash",
    "/bin/bash",
    "/usr/bin/whoami",
    "/usr/bin/test",
    "/bin/cat",
    "/bin/ls",
    "/bin/mkdir",
    "/bin/chown",
    "/bin/echo",
    "/bin/sleep",
)


def _libs(binary: str) -> set[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                libs.add(p)
    return libs


def _tar(entries: list[tuple[str, bytes | None, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kw in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            for k, v in kw.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _mini_layers() -> tuple[bytes, bytes]:
    """Layer 1: a tiny userland (dash, coreutils, libc) and files; layer 2: deletes and replaces some."""
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}  # merged /usr, as Debian: /bin -> usr/bin, and the paths binaries ask for

    def want(path: str) -> None:
        real = os.path.realpath(path)
        files[real] = Path(real).read_bytes()
        usr = path if path.startswith("/usr/") else "/usr" + path
        if usr != real:
            links[usr] = real

    for b in BINARIES:
        want(b)
        for lib in _libs(os.path.realpath(b)):
            want(lib)
    entries: list[tuple[str, bytes | None, dict]] = []
    dirs = {"tmp", "data", "home", "etc", "old-dir", "opq", "usr/bin", "usr/lib", "usr/lib64", "usr/sbin"}
    for path in [*files, *links]:
        parts = path.strip("/").split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for d in sorted(dirs):
        entries.append((d, None, {"type": tarfile.DIRTYPE, "mode": 0o1777 if d == "tmp" else 0o755}))
    for top in ("bin", "lib", "lib64", "sbin"):
        entries.append((top, None, {"type": tarfile.SYMTYPE, "linkname": f"usr/{top}"}))
    for path, data in sorted(files.items()):
        entries.append((path.lstrip("/"), data, {"mode": 0o755}))
    for path, target in sorted(links.items()):
        if path not in files:
            entries.append((path.lstrip("/"), None, {"type": tarfile.SYMTYPE, "linkname": target}))
    entries += [
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", {"mode": 0o644}),
        ("etc/group", b"root:x:0:\n", {"mode": 0o644}),
        ("old.txt", b"deleted by layer 2\n", {"mode": 0o644}),
        ("opq/a", b"hidden by layer 2\n", {"mode": 0o644}),
        ("old-dir/x", b"x\n", {"mode": 0o644}),
        ("data/from-layer-1", b"one\n", {"mode": 0o644, "uid": 1000, "gid": 1000}),
    ]
    layer2 = [
        (".wh.old.txt", b"", {}),
        (".wh.old-dir", b"", {}),
        ("opq", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
        ("opq/.wh..wh..opq", b"", {}),
        ("opq/b", b"new in layer 2\n", {"mode": 0o644}),
        ("hello.txt", b"hello from the image\n", {"mode": 0o644}),
    ]
    return _tar(entries), _tar(layer2)


def _write_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def make_oci_layout(layout: Path, tag: str) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    raw_layers = _mini_layers()
    layers, diff_ids = [], []
    for raw in raw_layers:
        gz = gzip.compress(raw, mtime=0)
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _write_blob(layout, gz),
                "size": len(gz),
            }
        )
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "IMG_VAR=from-image"], "WorkingDir": "/data"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _write_blob(layout, config),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _write_blob(layout, manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(root / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (root / "registry.log").read_text()
            time.sleep(0.1)
        layout = root / "layout"
        make_oci_layout(layout, "v1")
        subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                f"oci:{layout}:v1",
                f"docker://127.0.0.1:{port}/mini:v1",
            ],
            check=True,
        )
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def iserver(tmp_path_factory: pytest.TempPathFactory, registry: str, lab: object) -> Iterator[Server]:
    with builder_server(tmp_path_factory.mktemp("timages"), "--registry", registry, "--registry-insecure") as srv:
        yield srv


CHECK = (
    "cat /hello.txt; test -e /old.txt || echo old-gone; test -e /old-dir || echo old-dir-gone; ls /opq; "
    "echo $IMG_VAR; cat /data/from-layer-1"
)
WANT = ["hello from the image", "old-gone", "old-dir-gone", "b", "from-image", "one"]


def test_an_image_from_the_servers_registry(iserver: Server, registry: str) -> None:
    name = f"img-{secrets.token_hex(3)}"
    lines: list[str] = []
    t = Template().from_image(f"{registry}/mini:v1").run_cmd("echo step > /tmp/step; pwd", user="root")
    Template.build(t, name, on_build_logs=lambda e: lines.append(e.message))
    assert any("unpacking" in line for line in lines), lines
    sbx = Sandbox.create(name)
    try:
        r = sbx.commands.run(CHECK + "; cat /tmp/step; whoami", user="root")
        assert r.stdout.splitlines() == [*WANT, "step", "root"], r.stdout
        assert sbx.commands.run("echo $HOME; pwd").stdout.splitlines() == ["/home/user", "/data"]
    finally:
        sbx.kill()
    # the same image again: its layers are not unpacked twice; a name without the registry means it too
    lines.clear()
    Template.build(
        Template().from_image("mini:v1").run_cmd("true"), f"{name}-2", on_build_logs=lambda e: lines.append(e.message)
    )
    assert not any("unpacking" in line for line in lines) and any("cached" in line for line in lines), lines


def test_images_from_other_registries_or_missing_ones_fail_clearly(iserver: Server) -> None:
    with pytest.raises(BuildException, match="pulls only from its registry"):
        Template.build(Template().from_image("ghcr.io/someone/x:1"), f"other-{secrets.token_hex(3)}")
    with pytest.raises(BuildException, match="failed"):
        Template.build(Template().from_image("not-there:v9"), f"missing-{secrets.token_hex(3)}")


def test_import_from_an_oci_layout_and_a_docker_archive(iserver: Server, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    make_oci_layout(layout, "v1")
    archive = tmp_path / "mini.tar"
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:v1", f"docker-archive:{archive}:mini:v1"],
        check=True,
    )
    templates: Path = iserver.templates  # type: ignore[attr-defined]
    for source, name in ((f"oci:{layout}:v1", "from-layout"), (f"docker-archive:{archive}", "from-archive")):
        res = subprocess.run(
            [SANDBOXD, "template", "import", source, "--name", name, "--templates-dir", str(templates)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        sbx = Sandbox.create(name)
        try:
            assert sbx.commands.run(CHECK, user="root").stdout.splitlines() == WANT
        finally:
            sbx.kill()
    shutil.rmtree(layout)
