"""Small packages that tests and benchmarks install in sandboxes with no outside network."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

from netlab import WEB

# Points apt at the lab's flat repository only (as root, in a template step).
APT_SOURCES = (
    "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* && "
    f"echo 'deb [trusted=yes] http://{WEB}/files/debian ./' > /etc/apt/sources.list.d/lab.list"
)
PIP_ENV = {"PIP_INDEX_URL": f"http://{WEB}/files/simple/", "PIP_TRUSTED_HOST": WEB}
NPM_ENV = {"npm_config_registry": f"http://{WEB}/files/npm/", "npm_config_audit": "false", "npm_config_fund": "false"}


def make_wheel(directory: Path, name: str = "sbxdemo", body: str = "ANSWER = 42\n") -> Path:
    """A minimal pure-Python wheel `<name>-1.0-py3-none-any.whl` (pip installs it from a file or an index)."""
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{name}/__init__.py", body)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: sandboxd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return wheel


def prepare_repos(lab_dir: Path) -> None:
    """In the lab's /files/ (tests/lab_server.py): a flat apt repository with the package `sbx-hello`, a
    PEP 503 index with the wheel `sbxdemo`, and an npm registry with the package `sbxdemo`."""
    files = lab_dir / "files"
    debian, simple, npm = files / "debian", files / "simple" / "sbxdemo", files / "npm"
    for d in (debian, simple, npm):
        d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "pkg"
        (pkg / "DEBIAN").mkdir(parents=True)
        (pkg / "usr" / "bin").mkdir(parents=True)
        (pkg / "DEBIAN" / "control").write_text(
            "Package: sbx-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: tests <t@localhost>\n"
            "Description: a package of the lab\n"
        )
        script = pkg / "usr" / "bin" / "sbx-hello"
        script.write_text("#!/bin/sh\necho hello from apt\n")
        script.chmod(0o755)
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(debian / "sbx-hello_1.0_all.deb")],
            check=True,
            capture_output=True,
        )
    packages = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "."], cwd=debian, check=True, capture_output=True, text=True
    ).stdout
    (debian / "Packages").write_text(packages)
    wheel = make_wheel(simple)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (simple / "index.html").write_text(f'<a href="{wheel.name}#sha256={digest}">sbxdemo</a>\n')
    (files / "simple" / "index.html").write_text('<a href="sbxdemo/">sbxdemo</a>\n')
    # npm: the packument at /files/npm/sbxdemo (served from sbxdemo/index.html), the tarball beside it
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in (
            ("package/package.json", json.dumps({"name": "sbxdemo", "version": "1.0.0", "main": "index.js"})),
            ("package/index.js", "module.exports = { answer: 42 };\n"),
        ):
            data = body.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    tgz = buf.getvalue()
    (npm / "sbxdemo").mkdir(exist_ok=True)
    (npm / "sbxdemo" / "sbxdemo-1.0.0.tgz").write_bytes(tgz)
    import base64

    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()
    packument = {
        "name": "sbxdemo",
        "dist-tags": {"latest": "1.0.0"},
        "versions": {
            "1.0.0": {
                "name": "sbxdemo",
                "version": "1.0.0",
                "main": "index.js",
                "dist": {
                    "tarball": f"http://{WEB}/files/npm/sbxdemo/sbxdemo-1.0.0.tgz",
                    "shasum": hashlib.sha1(tgz).hexdigest(),
                    "integrity": integrity,
                },
            }
        },
    }
    (npm / "sbxdemo" / "index.html").write_text(json.dumps(packument))
