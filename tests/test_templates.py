"""Templates: cached builds, clear errors, and versions that never disappear under running sandboxes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from e2b import Sandbox

from sandboxd.templates.store import TemplateStore, _switch_current

from conftest import TEMPLATES_DIR, Server

SANDBOXD = str(Path(sys.executable).with_name("sandboxd"))


def test_build_is_cached_and_unknown_names_are_clear() -> None:
    r = subprocess.run(
        [SANDBOXD, "template", "build", "base", "--templates-dir", str(TEMPLATES_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "up to date" in r.stderr, r.stderr
    r = subprocess.run(
        [SANDBOXD, "template", "build", "nope", "--templates-dir", str(TEMPLATES_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unknown template 'nope'" in r.stderr and "base" in r.stderr
    r = subprocess.run(
        [SANDBOXD, "template", "list", "--templates-dir", str(TEMPLATES_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.startswith("base\t")


def _lowerdirs(server: Server, sandbox_id: str) -> str:
    from conftest import host_pids_of

    for pid in host_pids_of(server, sandbox_id):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "sandbox-init":
            return os.readlink(f"/proc/{pid}/fd/3")  # the template init holds (sbxhelper.c, TEMPLATE_FD)
    raise AssertionError("no sandbox-init")


def test_old_version_survives_while_a_sandbox_uses_it(server: Server) -> None:
    store = TemplateStore(TEMPLATES_DIR)
    home = TEMPLATES_DIR / "base"
    real = os.readlink(home / "current")
    fake = "0ldversion0000"
    shutil.rmtree(home / fake, ignore_errors=True)
    (home / fake).mkdir()
    # a cheap second version: hard links to the real one, its own template.json
    subprocess.run(["cp", "-al", str(home / real / "rootfs"), str(home / fake / "rootfs")], check=True)
    meta = json.loads((home / real / "template.json").read_text())
    (home / fake / "template.json").write_text(json.dumps({**meta, "digest": fake}))
    try:
        _switch_current(home, fake)
        old = Sandbox.create(template="base", timeout=60)  # on the soon-old version
        _switch_current(home, real)
        assert str(home / fake / "rootfs") in _lowerdirs(server, old.sandbox_id)
        assert fake not in store.prune("base"), "a version in use was pruned"
        assert (home / fake / "rootfs" / "usr" / "bin" / "python3").exists()
        assert old.commands.run("python3 -c 'print(1)'").stdout == "1\n"
        new = Sandbox.create(template="base", timeout=60)
        try:
            assert str(home / real / "rootfs") in _lowerdirs(server, new.sandbox_id)
        finally:
            new.kill()
        old.kill()
        assert store.prune("base") == [fake]
        assert not (home / fake).exists() and (home / real / "rootfs").is_dir()
    finally:
        if os.readlink(home / "current") != real:
            _switch_current(home, real)
        shutil.rmtree(home / fake, ignore_errors=True)


def test_template_exists_for_built_in_templates(server: Server) -> None:
    from e2b import Template

    assert Template.exists("base") is True
    assert Template.exists("code-interpreter-v1") is True
    assert Template.exists("no-such-template") is False


def test_httpbin_is_built_with_the_template_builder_and_serves_on_port_80(server: Server) -> None:
    """Registered by scripts/setup.sh (`sandboxd template build httpbin`, a recipe sent through a server's
    template API, as users' templates are): its service answers when create returns."""
    r = subprocess.run(
        [SANDBOXD, "template", "build", "httpbin", "--templates-dir", str(TEMPLATES_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "up to date" in r.stderr, f"run scripts/setup.sh first: {r.stderr}"
    sbx = Sandbox.create("httpbin")
    try:
        got = json.loads(sbx.commands.run("curl -s 'localhost/get?probe=1'").stdout)
        assert got["args"] == {"probe": "1"}
        assert sbx.commands.run("whoami").stdout == "user\n"  # port 80 without root, in its own namespace
        import httpx

        via = httpx.get(
            f"{server.url}/anything/x",
            headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "80", "X-Probe": "yes"},
        )
        assert via.status_code == 200 and via.json()["headers"]["X-Probe"] == "yes"
    finally:
        sbx.kill()


def test_a_rootfs_under_layers_is_kept_by_prune_until_no_layer_names_it(tmp_path: Path) -> None:
    """A rebuilt built-in template's old version stays while layers (templates built on it) sit on it."""
    store = TemplateStore(tmp_path)
    home = tmp_path / "base"
    for version in ("old", "new"):
        (home / version / "rootfs").mkdir(parents=True)
    _switch_current(home, "new")
    layer = tmp_path / ".layers" / "k1"
    (layer / "diff").mkdir(parents=True)
    meta = {"key": "k1", "parent": None, "base": str(home / "old" / "rootfs"), "step": "RUN x", "size_bytes": 0}
    (layer / "layer.json").write_text(json.dumps(meta))
    assert store.prune("base") == [] and (home / "old").is_dir()
    assert store.prune_layers() == (1, 0)  # no template version stands on the layer
    assert store.prune("base") == ["old"] and not (home / "old").exists()
