"""A hostile tenant snapshots its sandbox (core/snapshots.py): what it planted (a setuid copy of a shell,
a symlink to a host secret, a hard link, a FIFO) lands in the snapshot's layer owned by the template uid
range, never followed onto the host and never owned by host root; names that try to leave their field
are refused; a snapshot of another server's sandbox ID is a plain 404. The tar of a sandbox's changes
(GET /sandboxes/{id}/diff) carries the links it planted as links, never the host files they name."""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from conftest import TEMPLATES_DIR, Server

UID_SHIFT = 100000


def test_what_a_sandbox_plants_stays_a_sandbox_file_in_its_snapshot(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    snap_id = None
    try:
        plant = (
            "cp /bin/bash /usr/local/bin/rootsh && chmod 4755 /usr/local/bin/rootsh && "
            "ln -s /etc/shadow /home/user/shadow-link && ln /etc/passwd /home/user/passwd-hard && "
            "mkfifo /home/user/fifo"
        )
        assert sbx.commands.run(plant, user="root").exit_code == 0
        headers = {"X-API-KEY": server.api_key}
        for name in ("../x", "a/../../b", ".hidden", "UPPER", "x" * 300):
            r = httpx.post(
                f"{server.url}/sandboxes/{sbx.sandbox_id}/snapshots",
                json={"name": name, "memory": False},
                headers=headers,
            )
            assert r.status_code == 400, (name, r.text)
        r = httpx.post(
            f"{server.url}/sandboxes/nosuchsandbox0000000/snapshots", json={"memory": False}, headers=headers
        )
        assert r.status_code == 404
        snap = sbx.create_snapshot(name=f"evil-{secrets.token_hex(3)}", mode="filesystem")
        snap_id = snap.snapshot_id
        meta = (TEMPLATES_DIR / snap_id / "current" / "template.json").read_text()
        diff = TEMPLATES_DIR / ".layers" / json.loads(meta)["top"] / "diff"
        rootsh = (diff / "usr/local/bin/rootsh").lstat()
        assert rootsh.st_mode & stat.S_ISUID and rootsh.st_uid == UID_SHIFT, "not the sandbox's root's file"
        link = diff / "home/user/shadow-link"
        assert link.is_symlink() and os.readlink(link) == "/etc/shadow"  # a link, never the host's file
        for path in diff.rglob("*"):
            st = path.lstat()
            assert st.st_uid >= UID_SHIFT or stat.S_ISCHR(st.st_mode), f"{path} is owned by host uid {st.st_uid}"
        assert stat.S_ISFIFO((diff / "home/user/fifo").lstat().st_mode)
        child = Sandbox.create(template=snap_id, timeout=60)
        try:
            assert child.commands.run("stat -c '%a %U' /usr/local/bin/rootsh").stdout == "4755 root\n"  # its root's
            assert child.commands.run("cat /home/user/shadow-link 2>&1 || true").stdout.startswith("cat:")
        finally:
            child.kill()
        assert not Path("/etc/shadow").is_symlink()
    finally:
        sbx.kill()
        if snap_id is not None:
            Sandbox.delete_snapshot(snap_id)


def test_a_changes_tar_carries_planted_links_as_links_never_host_files(server: Server) -> None:
    import io
    import tarfile

    sbx = Sandbox.create(template="base", timeout=60)
    try:
        plant = 'ln -s /etc/shadow /home/user/s && ln -s / /home/user/root && printf x > "/home/user/a\nb"'
        assert sbx.commands.run(plant, user="root").exit_code == 0
        r = httpx.get(
            f"{server.url}/sandboxes/{sbx.sandbox_id}/diff",
            params={"format": "tar"},
            headers={"X-API-KEY": server.api_key},
        )
        assert r.status_code == 200
        tar = tarfile.open(fileobj=io.BytesIO(r.content))
        link = tar.getmember("home/user/s")
        assert link.issym() and link.linkname == "/etc/shadow" and link.size == 0
        assert tar.getmember("home/user/root").issym()
        assert tar.extractfile("home/user/a\nb").read() == b"x"  # type: ignore[union-attr]
        assert not any(m.name.startswith(("etc/shadow", "root/")) for m in tar.getmembers())
    finally:
        sbx.kill()


def test_a_snapshot_with_memory_never_fills_the_templates_disk(tmp_path: Path) -> None:
    """A snapshot's memory is written into the templates dir: a tenant that fills its memory and snapshots it
    must not fill that disk. The templates dir here is a 160 MiB tmpfs (the base template's files bound into it
    from the real one); the sandbox holds 200 MB."""
    import shutil
    import subprocess
    import time

    from e2b import SandboxException

    from sandboxd.templates.store import TemplateStore

    from conftest import start_server

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(small)], check=True)
    try:
        templates = small / "templates"
        (templates / ".layers").mkdir(parents=True)
        for name in ("base", ".names"):
            shutil.copytree(TEMPLATES_DIR / name, templates / name, symlinks=True)
        real = TemplateStore(TEMPLATES_DIR)
        for layer in real.layers.chain(real.get("base").top_layer or ""):
            (templates / ".layers" / layer.key).mkdir()
            subprocess.run(
                ["mount", "--bind", "-o", "ro", str(layer.path), str(templates / ".layers" / layer.key)], check=True
            )
        srv = start_server(tmp_path / "data", "--pool-size", "0", "--disk-mb", "0", templates_dir=templates)
        try:
            env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
            sbx = Sandbox.create(template="base", timeout=120, metadata={"sandboxd.memory_mb": "512"}, **env)
            sbx.commands.run(
                'nohup python3 -c "import os, time; b = bytearray(200 << 20)\n'
                "for i in range(0, len(b), 1 << 20): b[i : i + (1 << 20)] = os.urandom(1 << 20)\n"
                "open('/tmp/ready', 'w').write('1'); time.sleep(3600)\" > /dev/null 2>&1 &"
            )
            deadline = time.monotonic() + 60
            while not sbx.files.exists("/tmp/ready"):
                assert time.monotonic() < deadline, "the memory holder did not start"
                time.sleep(0.1)
            with pytest.raises(SandboxException) as refused:
                sbx.create_snapshot()
            assert "MiB free" in str(refused.value) and "filesystem" in str(refused.value), refused.value
            assert shutil.disk_usage(small).free > 64 << 20
            assert not [p for p in (templates / ".layers").iterdir() if p.name.startswith(".")]  # no scratch left
            assert sbx.commands.run("pgrep -f bytearray").stdout.strip()  # it runs on, not frozen
            sbx.kill()
        finally:
            srv.stop()
    finally:
        subprocess.run(["umount", "-R", "-l", str(small)], check=False)
