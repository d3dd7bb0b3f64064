"""Templates: cached builds, clear errors, and versions that never disappear under running sandboxes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from e2b import Sandbox

from sandboxd.templates.store import TemplateStore, _switch_current

from conftest import TEMPLATES_DIR, Server, held_top_layer

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
    return held_top_layer(sandbox_id)


def test_an_old_build_survives_while_a_sandbox_uses_it(server: Server) -> None:
    """A template rebuilt under running sandboxes: they keep their build's layers (and new sandboxes get the
    new build); the old build's record goes at the next prune, its layers once no sandbox stands on them."""
    store = TemplateStore(TEMPLATES_DIR)
    home = TEMPLATES_DIR / "base"
    real = os.readlink(home / "current")
    base = store.get("base")
    work = store.layers.new_dir()  # a cheap old build: one more layer on base, with a file of its own
    (work / "diff" / "etc").mkdir(parents=True)
    (work / "diff" / "etc" / "old-build").write_text("old\n")
    key = "0ldbuild" + secrets.token_hex(8)
    layer = store.layers.commit(work, key, base.top_layer, Path(base.base), "test: an old build", shift_from=0)
    fake = "0ldbuild-" + secrets.token_hex(4)
    meta = json.loads((home / real / "template.json").read_text())
    (home / fake).mkdir()
    (home / fake / "template.json").write_text(json.dumps({**meta, "build_id": fake, "top": key}))
    try:
        _switch_current(home, fake)
        old = Sandbox.create(template="base", timeout=60)  # on the soon-old build
        _switch_current(home, real)
        assert _lowerdirs(server, old.sandbox_id) == str(layer.diff)
        assert fake in store.prune("base") and not (home / fake).exists()
        assert key in store.referenced_layers(), "the layer a running sandbox stands on is not kept"
        assert old.commands.run("cat /etc/old-build").stdout == "old\n"
        new = Sandbox.create(template="base", timeout=60)
        try:
            assert new.commands.run("test -e /etc/old-build || echo new").stdout == "new\n"
        finally:
            new.kill()
        old.kill()
        assert key not in store.referenced_layers()
    finally:
        if os.readlink(home / "current") != real:
            _switch_current(home, real)
        shutil.rmtree(home / fake, ignore_errors=True)
        store.layers.remove(key)


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
        (home / version / "template.json").write_text(json.dumps({"name": "base", "digest": version}))
    _switch_current(home, "new")
    layer = tmp_path / ".layers" / "k1"
    (layer / "diff").mkdir(parents=True)
    meta = {"key": "k1", "parent": None, "base": str(home / "old" / "rootfs"), "step": "RUN x", "size_bytes": 0}
    (layer / "layer.json").write_text(json.dumps(meta))
    assert store.prune("base") == [] and (home / "old").is_dir()
    assert store.prune_layers() == (1, 0)  # no template version stands on the layer
    assert store.prune("base") == ["old"] and not (home / "old").exists()


def test_a_stopped_sandboxs_hold_keeps_its_layers_until_its_state_dir_is_gone(tmp_path: Path) -> None:
    """A sandbox paused to its files holds its layers from prune (<templates>/.holds); once its state dir
    is gone (its server's data dir removed), the hold holds nothing and is dropped."""
    store = TemplateStore(tmp_path / "templates")
    work = store.layers.new_dir()
    (work / "diff").mkdir()
    layer = store.layers.commit(work, "k1", None, tmp_path / "rootfs", "RUN x")
    state = tmp_path / "data" / "sandboxes" / "s1"
    state.mkdir(parents=True)
    store.hold("s1", (layer.diff, tmp_path / "rootfs"), state)
    assert "k1" in store.referenced_layers()
    assert store.prune_layers() == (0, 0)
    shutil.rmtree(tmp_path / "data")
    assert "k1" not in store.referenced_layers()
    assert not (store.dir / ".holds" / "s1").exists()
    assert store.prune_layers()[0] == 1
