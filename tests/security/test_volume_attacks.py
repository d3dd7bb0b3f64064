"""Volumes as a hostile tenant uses them: a sandbox plants symlinks in a volume for the server's content
API to follow out of it; a client walks paths out of a volume or uses one volume's token on another; a
sandbox turns its mount point into a symlink before the volume is mounted again; sandbox root tries to
unmount the volume, or to plant setuid programs and device nodes in it for another sandbox."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, Volume
from e2b.exceptions import NotFoundException, SandboxException, VolumeException

from conftest import Server, loop_devices_under, run_as


def _volume() -> Volume:
    return Volume.create(f"attack-{secrets.token_hex(4)}")


def test_symlinks_planted_by_a_sandbox_stay_inside_the_volume(server: Server, tmp_path: Path) -> None:
    victim = tmp_path / "host-secret"
    victim.write_text("host only\n")
    vol = _volume()
    sbx = Sandbox.create(template="base", timeout=120, volume_mounts={"/data": vol})
    try:
        run_as(
            sbx,
            f"ln -s {tmp_path} /data/abs && ln -s ../../../../../../../{tmp_path} /data/rel && "
            f"ln -s /etc /data/hostetc && ln -s {victim} /data/file && mkdir /data/d && ln -s / /data/d/root",
        )
        # reading through them resolves inside the volume (where nothing of the host is)
        for path in ("/abs/host-secret", "/rel/host-secret", "/file", "/d/root" + str(victim)):
            with pytest.raises(NotFoundException):
                vol.read_file(path)
        with pytest.raises(NotFoundException):
            vol.list("/hostetc")  # -> the volume's /etc: none
        # writing through them writes inside the volume, never on the host
        with pytest.raises(NotFoundException):
            vol.write_file("/abs/host-secret", "overwritten")
        with pytest.raises(NotFoundException):
            vol.write_file("/abs/planted", "x", force=True)  # a dangling link: as `mkdir -p` through it, refused
        vol.make_dir(str(tmp_path), force=True)  # where the link leads *in the volume*
        vol.write_file("/abs/planted", "x")
        assert not (tmp_path / "planted").exists()
        assert victim.read_text() == "host only\n"
        assert run_as(sbx, f"test -e /data{tmp_path}/planted && echo inside")[1] == "inside\n"
        # metadata changes and removal act on the volume's own entries
        with pytest.raises(NotFoundException):
            vol.update_metadata("/file", mode=0o777)
        assert oct(victim.stat().st_mode & 0o777) != oct(0o777)
        vol.remove("/file")  # the link goes, not what it named
        assert victim.exists()
        vol.remove("/d")  # a directory holding a link to /: the walk never leaves it
        assert Path("/etc/passwd").exists() and victim.exists()
        stat = vol.get_info("/hostetc")
        assert (stat.type.value, stat.target) == ("symlink", "/etc")
    finally:
        sbx.kill()
        Volume.destroy(vol.volume_id)


def test_paths_and_tokens_cannot_reach_other_volumes_or_the_host(server: Server) -> None:
    a, b = _volume(), _volume()
    try:
        b.write_file("/b-only.txt", "b's\n")
        with httpx.Client(base_url=server.url) as http:
            for path in ("../../../../etc/passwd", "/../" + b.volume_id + "/b-only.txt", "/%2e%2e/etc/passwd"):
                r = http.get(
                    f"/volumecontent/{a.volume_id}/file",
                    params={"path": path},
                    headers={"Authorization": f"Bearer {a.token}"},
                )
                assert r.status_code == 404, (path, r.status_code, r.text)
            # a's token is not b's; no token, the API key or a wrong scheme are not tokens at all
            for headers in (
                {"Authorization": f"Bearer {a.token}"},
                {},
                {"X-API-KEY": server.api_key},
                {"Authorization": f"Basic {b.token}"},
            ):
                r = http.get(f"/volumecontent/{b.volume_id}/file", params={"path": "/b-only.txt"}, headers=headers)
                assert r.status_code == 401, (headers.keys(), r.status_code)
            # an unknown volume answers as a wrong token does: a token tells nothing about other volumes
            r = http.get("/volumecontent/nosuchvolume/dir", params={"path": "/"}, headers={"Authorization": "Bearer x"})
            assert r.status_code == 401
            # the control plane stays behind the API key
            assert http.get("/volumes").status_code == 401
            assert (
                http.get(f"/volumes/{a.volume_id}", headers={"Authorization": f"Bearer {a.token}"}).status_code == 401
            )
            bad = http.get(
                f"/volumecontent/{a.volume_id}/dir",
                params={"path": "/", "depth": "100000"},
                headers={"Authorization": f"Bearer {a.token}"},
            )
            assert bad.status_code == 400
        with pytest.raises(VolumeException):
            a.write_file("/x", "x", uid=70000)  # not an id of the sandboxes' range
    finally:
        Volume.destroy(a.volume_id)
        Volume.destroy(b.volume_id)


def test_a_mount_point_that_is_a_symlink_mounts_inside_the_sandbox(server: Server) -> None:
    """The mount point is looked up in the sandbox's own root: a snapshot whose /data is a symlink to /etc
    gets the volume on *its* /etc, and one through a /proc magic link gets no mount at all."""
    vol = _volume()
    name = f"sandboxd-attack-{secrets.token_hex(4)}"
    vol.write_file(f"/{name}", "from the volume\n")
    src = Sandbox.create(template="base", timeout=120)
    snapshot_id = None
    try:
        run_as(src, "ln -s /etc /data && ln -s /proc/1/root /magic && ln -s /proc/self/cwd /cwd")
        snapshot_id = src.create_snapshot(mode="filesystem").snapshot_id
        child = Sandbox.create(template=snapshot_id, timeout=60, volume_mounts={"/data": vol})
        try:
            assert run_as(child, f"cat /etc/{name}")[1] == "from the volume\n"
            assert not os.path.exists(f"/etc/{name}"), "the volume was mounted on the host's /etc"
            code, _, _ = run_as(child, "umount /etc")
            assert code != 0, "sandbox root unmounted its volume"
        finally:
            child.kill()
        for where in ("/magic/x", "/cwd/x"):
            with pytest.raises(SandboxException) as refused:
                Sandbox.create(template=snapshot_id, timeout=60, volume_mounts={where: vol})
            assert "mounting a volume" in str(refused.value), str(refused.value)
        mounts = Path("/proc/self/mountinfo").read_text()
        assert f"/{vol.volume_id}/" not in mounts.replace(f"volumes/{vol.volume_id}/mnt", "")
    finally:
        src.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)
        Volume.destroy(vol.volume_id)
    assert not os.path.exists(f"/etc/{name}")


def test_no_setuid_programs_or_devices_through_a_shared_volume(server: Server) -> None:
    vol = _volume()
    a = Sandbox.create(template="base", timeout=120, volume_mounts={"/data": vol})
    b = Sandbox.create(template="base", timeout=120, volume_mounts={"/data": vol})
    try:
        opts = run_as(a, "grep ' /data ' /proc/self/mountinfo")[1]
        assert "nosuid" in opts and "nodev" in opts, opts
        run_as(a, "cp /usr/bin/id /data/rootid && chmod 4755 /data/rootid")
        assert run_as(b, "stat -c '%U %a' /data/rootid")[1] == "root 4755\n"
        assert run_as(b, "/data/rootid -u", user="user")[1] == "1000\n", "a setuid program of a volume ran as root"
        code, _, _ = run_as(a, "mknod /data/sda b 8 0")
        if code == 0:  # the kernel may allow the node itself: it must be useless
            assert run_as(b, "head -c1 /data/sda")[0] != 0
        # what sandbox root made is the volume's root, not a host uid of either sandbox's range
        info = vol.get_info("/rootid")
        assert (info.uid, info.gid) == (0, 0)
    finally:
        a.kill()
        b.kill()
        Volume.destroy(vol.volume_id)


def test_a_client_cannot_make_volumes_without_end(tmp_path: Path) -> None:
    """Each volume is a host mount and a loop device while it exists: their number is capped."""
    from conftest import start_server

    srv = start_server(tmp_path / "data", "--max-volumes", "3", "--pool-size", "0")
    try:
        with httpx.Client(base_url=srv.url, headers={"X-API-KEY": srv.api_key}) as api:
            made = [api.post("/volumes", json={"name": f"v{i}", "sizeMB": 16}) for i in range(3)]
            assert [r.status_code for r in made] == [201, 201, 201]
            refused = api.post("/volumes", json={"name": "v3", "sizeMB": 16})
            assert refused.status_code == 429 and "--max-volumes" in refused.json()["message"]
            assert api.delete(f"/volumes/{made[0].json()['volumeID']}").status_code == 204
            assert api.post("/volumes", json={"name": "v3", "sizeMB": 16}).status_code == 201
    finally:
        assert srv.stop() == 0
    assert not loop_devices_under(tmp_path / "data"), "volumes' loop devices outlived their server"


def test_renames_hammered_by_a_sandbox_do_not_break_the_content_apis_lookups(server: Server) -> None:
    # Every rename on the host makes a lookup with ".." under RESOLVE_IN_ROOT fail with EAGAIN while it runs: a
    # sandbox renaming in a loop must not make the server's path lookups in a volume fail (they are retried).
    vol = _volume()
    sbx = Sandbox.create(template="base", timeout=120, volume_mounts={"/data": vol})
    try:
        run_as(sbx, "mkdir -p /data/a/b && echo found > /data/a/target && ln -s ../../a/target /data/a/b/up")
        churn = sbx.commands.run(
            'python3 -c \'import os, time\nopen("/tmp/x", "w").close()\nend = time.time() + 60\n'
            'while time.time() < end:\n    os.rename("/tmp/x", "/tmp/y"); os.rename("/tmp/y", "/tmp/x")\'',
            background=True,
        )
        try:
            for _ in range(300):
                assert vol.read_file("/a/b/up") == "found\n"
        finally:
            churn.kill()
    finally:
        sbx.kill()
        Volume.destroy(vol.volume_id)
