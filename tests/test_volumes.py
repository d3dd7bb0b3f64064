"""Volumes (volumes/, api/volumes.py, core/volume_mounts.py) with the official SDK: created, listed,
their files written and read through the volume content API, mounted by several sandboxes at once (the
same files, each sandbox's own ids), kept with a quota of their own, across a filesystem pause and a
server restart; deleted only when no sandbox mounts them."""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, Volume
from e2b.exceptions import NotFoundException, SandboxException, VolumeException

from conftest import Server, keeping_server, loop_devices_under, start_server


def _name() -> str:
    return f"vol-{secrets.token_hex(4)}"


def test_files_through_the_api_and_two_sandboxes_sharing_a_volume(server: Server) -> None:
    vol = Volume.create(_name())
    a = b = None
    try:
        assert vol.volume_id in [v.volume_id for v in Volume.list()]
        assert Volume.get_info(vol.volume_id).token == vol.token
        assert Volume.connect(vol.volume_id).name == vol.name

        assert vol.list("/") == [], "a new volume is empty (no lost+found)"
        made = vol.write_file("/notes/today.txt", "from the API\n", force=True)
        assert (made.path, made.size, made.uid, made.mode) == ("/notes/today.txt", 13, 1000, 0o644)
        with pytest.raises(NotFoundException):
            vol.write_file("/missing/dir/x", "x")  # no force: the parent must exist
        d = vol.make_dir("/deep/er/dir", force=True, mode=0o750)
        assert (d.type.value, d.mode) == ("directory", 0o750)
        with pytest.raises(VolumeException):
            vol.make_dir("/deep/er/dir")  # exists
        assert vol.read_file("/notes/today.txt") == "from the API\n"
        assert b"".join(vol.read_file("/notes/today.txt", format="stream")) == b"from the API\n"
        assert [e.path for e in vol.list("/", depth=3)] == [
            "/deep",
            "/deep/er",
            "/deep/er/dir",
            "/notes",
            "/notes/today.txt",
        ]
        assert vol.exists("/deep/er") and not vol.exists("/nope")
        updated = vol.update_metadata("/notes/today.txt", uid=0, gid=0, mode=0o600)
        assert (updated.uid, updated.gid, updated.mode) == (0, 0, 0o600)

        a = Sandbox.create(template="base", timeout=120, volume_mounts={"/data": vol})
        b = Sandbox.create(template="base", timeout=120, volume_mounts={"/mnt/shared": vol.name})
        assert [(m["name"], m["path"]) for m in a.get_info().volume_mounts] == [(vol.name, "/data")]
        # each sandbox sees the volume's owners as its own ids: `user` owns the root, root owns what root made
        assert a.commands.run("stat -c '%U %a' /data").stdout == "user 755\n"
        assert a.commands.run("stat -c '%U %a' /data/notes/today.txt", user="root").stdout == "root 600\n"
        a.commands.run("echo from-a > /data/a.txt && mkdir /data/by-a")
        assert b.commands.run("cat /mnt/shared/a.txt; stat -c %U /mnt/shared/by-a").stdout == "from-a\nuser\n"
        b.commands.run("echo from-b >> /mnt/shared/a.txt")
        assert a.files.read("/data/a.txt") == "from-a\nfrom-b\n"  # the envd file API reaches it too
        assert vol.read_file("/a.txt") == "from-a\nfrom-b\n"
        vol.write_file("/a.txt", "replaced by the API\n")
        assert b.commands.run("cat /mnt/shared/a.txt").stdout == "replaced by the API\n"

        with pytest.raises(VolumeException) as busy:
            Volume.destroy(vol.volume_id)
        assert "mounted by 2 sandbox" in str(busy.value)
        vol.remove("/deep")
        assert not vol.exists("/deep/er/dir")
        assert b.commands.run("test -e /mnt/shared/deep || echo gone").stdout == "gone\n"
    finally:
        for s in (a, b):
            if s is not None:
                s.kill()
    assert Volume.destroy(vol.volume_id) is True
    assert Volume.destroy(vol.volume_id) is False
    assert vol.volume_id not in [v.volume_id for v in Volume.list()]
    assert not (server.data_dir / "volumes" / vol.volume_id).exists()


def test_create_refuses_bad_mounts_with_a_reason(server: Server) -> None:
    vol = Volume.create(_name())
    try:
        for mounts, says in (
            ({"/data": "no-such-volume"}, "not found"),
            ({"relative": vol.name}, "absolute"),
            ({"/data/../etc": vol.name}, "normalized"),
            ({"/": vol.name}, "cannot be mounted"),
            ({"/proc/x": vol.name}, "cannot be mounted"),
            ({f"/m{i}": vol.name for i in range(17)}, "at most 16"),
        ):
            with pytest.raises(SandboxException) as refused:
                Sandbox.create(template="base", timeout=30, volume_mounts=mounts)
            assert says in str(refused.value), (mounts, str(refused.value))
        with httpx.Client(base_url=server.url, headers={"X-API-KEY": server.api_key}) as api:
            assert api.post("/volumes", json={"name": vol.name}).status_code == 409
            bad = api.post("/volumes", json={"name": "../x"})
            assert bad.status_code == 400 and "invalid volume name" in bad.json()["message"]
            assert api.post("/volumes", json={"name": "x", "sizeMB": 1}).status_code == 400
    finally:
        Volume.destroy(vol.volume_id)


def test_the_volume_quota_is_kernel_enforced_and_an_upload_cut_short_changes_nothing(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers={"X-API-KEY": server.api_key}) as api:
        made = api.post("/volumes", json={"name": _name(), "sizeMB": 32})
    assert made.status_code == 201, made.text
    vol = Volume.connect(made.json()["volumeID"])
    sbx = Sandbox.create(template="base", timeout=120, volume_mounts={"/data": vol})
    try:
        vol.write_file("/keep.txt", "precious\n")
        r = sbx.commands.run("dd if=/dev/zero of=/data/fill bs=1M count=64 2>&1; df -m --output=size /data", timeout=60)
        assert "No space left on device" in r.stdout, r.stdout
        assert int(r.stdout.split()[-1]) <= 32
        sbx.commands.run("rm /data/fill")
        with pytest.raises(VolumeException) as full:
            vol.write_file("/keep.txt", b"\0" * (48 << 20))  # bigger than the volume
        assert "507" in str(full.value) and "full" in str(full.value)
        assert vol.read_file("/keep.txt") == "precious\n", "a failed write left the old file as it was"
        assert [e.name for e in vol.list("/")] == ["keep.txt"], "no temporary file left behind"
    finally:
        sbx.kill()
        Volume.destroy(vol.volume_id)


def test_a_volume_outlives_pauses_and_restarts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    with keeping_server(data) as (srv, port):
        env = {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}
        monkeypatch.setenv("E2B_VOLUME_API_URL", srv.url)
        vol = Volume.create(_name(), **env)
        sbx = Sandbox.create(template="base", timeout=300, volume_mounts={"/work": vol}, **env)
        sbx.commands.run("echo one > /work/f")
        # a filesystem pause ends its processes and unmounts everything; booting again mounts the volume again
        sbx.pause(mode="filesystem")
        sbx = Sandbox.connect(sbx.sandbox_id, **env)
        assert sbx.commands.run("cat /work/f; stat -c %U /work").stdout == "one\nuser\n"
        srv.stop(signal.SIGKILL)  # a crash: the volume stays mounted on the host and in the sandbox
        srv2 = start_server(data, port=port)
        try:
            sbx = Sandbox.connect(sbx.sandbox_id, **env)
            sbx.commands.run("echo two >> /work/f")
            assert vol.read_file("/f") == "one\ntwo\n"  # the API mounts the same filesystem, not a second one
            image = data / "volumes" / vol.volume_id
            assert len(loop_devices_under(image)) == 1, loop_devices_under(image)
            sbx.kill()
        finally:
            assert srv2.stop() == 0
        deadline = time.monotonic() + 10
        while loop_devices_under(data) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not loop_devices_under(data), "the volume's loop device went with its last mount"
        srv3 = start_server(data, port=port)
        try:
            assert vol.read_file("/f") == "one\ntwo\n", "the files outlive every sandbox and server"
            assert Volume.destroy(vol.volume_id, **env)
        finally:
            assert srv3.stop() == 0
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
        assert str(data) not in mounts
