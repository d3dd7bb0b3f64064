"""Disk and inode quota (issue 7, scope 6): a sandbox that fills its disk hurts only itself.

Each sandbox's writable layer is its own sparse ext4 image (src/sandboxd/runtime/quota.py). These tests
run a server with 64 MiB disks, so that filling one is quick, and attack it as the sandbox's `user`.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from e2b import NotEnoughSpaceException, Sandbox

from conftest import Server, host_pids_of, loop_devices_under, run_as, start_server

DISK_MB = 64
MAX_DISK_MB = 128
INODES = DISK_MB * 1024 * 1024 // (16 * 1024)  # one inode per 16 KiB (runtime/quota.py)
MiB = 1024 * 1024


def _env(srv: Server) -> dict[str, str]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}


@pytest.fixture(scope="module")
def quota_server() -> Iterator[Server]:
    tmp = Path(tempfile.mkdtemp(prefix="sandboxd-quota-"))
    srv = start_server(tmp / "data", "--disk-mb", str(DISK_MB), "--max-disk-mb", str(MAX_DISK_MB), "--pool-size", "0")
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()
        assert not list((srv.data_dir / "sandboxes").iterdir())
        assert not loop_devices_under(srv.data_dir)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def small(quota_server: Server) -> Iterator[Sandbox]:
    sbx = Sandbox.create(template="base", timeout=120, **_env(quota_server))
    try:
        yield sbx
    finally:
        sbx.kill()


_run = functools.partial(run_as, user="user")  # (exit code, stdout, stderr), as the sandbox's user


def _host_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _wait_for(cond: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_filling_the_disk_stops_at_the_limit_and_spares_the_host(small: Sandbox, quota_server: Server) -> None:
    free_before = _host_free(quota_server.data_dir)
    # 4x the quota: without one, all 256 MiB would land on the host's disk.
    code, _, err = _run(small, "dd if=/dev/zero of=$HOME/fill bs=1M count=256 conv=fsync")
    assert code != 0 and "No space left on device" in err, err
    size = int(_run(small, "stat -c %s $HOME/fill")[1])
    assert 32 * MiB < size <= DISK_MB * MiB, size
    # Sandbox root is held to the same limit (no reserved blocks, no CAP_SYS_RESOURCE).
    code, _, err = _run(small, "head -c 4M /dev/zero > /root/more && sync -f /root/more", user="root")
    assert code != 0 and "No space left on device" in err, err
    # The host lost at most the sandbox's disk (plus slack for whatever else runs on this machine).
    dropped = free_before - _host_free(quota_server.data_dir)
    assert dropped < DISK_MB * MiB + 32 * MiB, f"host free space dropped by {dropped / MiB:.0f} MiB"
    # Freeing space inside makes the disk usable again.
    assert _run(small, "rm $HOME/fill && echo ok > $HOME/after && cat $HOME/after")[1] == "ok\n"


def test_creating_files_stops_at_the_inode_limit(small: Sandbox) -> None:
    # Without a limit it would stop by itself at 3x the limit.
    script = (
        "import os, errno\n"
        "os.makedirs('/home/user/many')\n"
        "n = 0\n"
        "try:\n"
        f"    while n < {3 * INODES}:\n"
        "        open(f'/home/user/many/f{n}', 'w').close()\n"
        "        n += 1\n"
        "    print(n, 'no-error')\n"
        "except OSError as e:\n"
        "    print(n, errno.errorcode[e.errno])\n"
    )
    small.files.write("/home/user/inodes.py", script)
    _, out, err = _run(small, "python3 /home/user/inodes.py", timeout=120)
    n, what = out.split()
    assert what == "ENOSPC", (out, err)
    # The image's own files (root, lost+found, upper, work, the overlay's work files) use a few dozen.
    assert INODES - 100 < int(n) < INODES, n
    assert int(_run(small, "df --output=iavail / | tail -1")[1]) == 0


def test_df_inside_shows_the_sandbox_disk(small: Sandbox, quota_server: Server) -> None:
    out = _run(small, "df -B1 --output=size,itotal / | tail -1")[1].split()
    size, itotal = int(out[0]), int(out[1])
    # ext4 keeps its metadata (inode tables, bitmaps) inside the image: a little under the limit.
    assert DISK_MB * MiB * 0.9 < size <= DISK_MB * MiB, size
    assert itotal == INODES
    host = os.statvfs(quota_server.data_dir)
    assert size < host.f_blocks * host.f_frsize // 100, "df shows the host's disk"
    with quota_server.api() as api:
        metrics = api.get(f"/sandboxes/{small.sandbox_id}/metrics").json()[0]
    assert metrics["diskTotal"] == size
    assert 0 < metrics["diskUsed"] < size


def test_default_disk_is_10_gib_also_for_pooled_sandboxes(sandbox: Sandbox, server: Server) -> None:
    # The session server keeps a warm pool: this sandbox was created before anyone asked for it.
    size = int(_run(sandbox, "df -B1 --output=size / | tail -1")[1])
    assert 9.5 * 1024 * MiB < size <= 10 * 1024 * MiB, size
    assert int(_run(sandbox, "df --output=itotal / | tail -1")[1]) == 655_360
    with server.api() as api:
        assert api.get(f"/sandboxes/{sandbox.sandbox_id}").json()["diskSizeMB"] == 10 * 1024


def test_a_neighbour_writes_while_one_sandbox_is_full(quota_server: Server) -> None:
    full = Sandbox.create(template="base", timeout=120, **_env(quota_server))
    other = Sandbox.create(template="base", timeout=120, **_env(quota_server))
    try:
        code, _, err = _run(full, "dd if=/dev/zero of=$HOME/fill bs=1M count=256")
        assert code != 0 and "No space left on device" in err
        code, out, err = _run(other, "head -c 16M /dev/urandom > $HOME/x && sync -f $HOME/x && stat -c %s $HOME/x")
        assert code == 0 and out == f"{16 * MiB}\n", err
        # and the full one is still full (ext4 keeps a few clusters for metadata: under 2 MiB left)
        assert int(_run(full, "df --output=avail / | tail -1")[1]) < 2048
    finally:
        full.kill()
        other.kill()


def test_disk_size_is_reported_as_diskSizeMB(small: Sandbox, quota_server: Server) -> None:
    with quota_server.api() as api:
        assert api.get(f"/sandboxes/{small.sandbox_id}").json()["diskSizeMB"] == DISK_MB
        listed = {s["sandboxID"]: s for s in api.get("/v2/sandboxes").json()}
        assert listed[small.sandbox_id]["diskSizeMB"] == DISK_MB
    # and it is what the sandbox really has
    size = int(_run(small, "df -B1 --output=size / | tail -1")[1])
    assert DISK_MB * MiB * 0.9 < size <= DISK_MB * MiB, size


def test_create_may_ask_for_a_disk_size_up_to_the_maximum(quota_server: Server) -> None:
    with quota_server.api() as api:
        r = api.post("/sandboxes", json={"templateID": "base", "timeout": 60, "diskSizeMB": 32})
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        try:
            assert api.get(f"/sandboxes/{sid}").json()["diskSizeMB"] == 32
            sbx = Sandbox.connect(sid, **_env(quota_server))
            size = int(_run(sbx, "df -B1 --output=size / | tail -1")[1])
            assert 28 * MiB < size <= 32 * MiB, size
        finally:
            api.delete(f"/sandboxes/{sid}")
        r = api.post("/sandboxes", json={"templateID": "base", "diskSizeMB": MAX_DISK_MB + 1})
        assert r.status_code == 400 and "diskSizeMB" in r.json()["message"], r.text


def test_sandbox_files_never_appear_on_the_host(small: Sandbox, quota_server: Server) -> None:
    _run(small, "echo secret > $HOME/marker && sync -f $HOME/marker")
    state = quota_server.data_dir / "sandboxes" / small.sandbox_id
    # The upper layer lives in the image, mounted only in the sandbox's mount namespace.
    assert list((state / "disk").iterdir()) == []
    assert not list(state.glob("**/marker"))
    assert (state / "disk.img").stat().st_mode & 0o777 == 0o600


def test_kill_releases_the_loop_device_and_the_image(quota_server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120, **_env(quota_server))
    state = quota_server.data_dir / "sandboxes" / sbx.sandbox_id
    assert len(loop_devices_under(state)) == 1
    assert (state / "disk.img").exists()
    sbx.kill()
    assert _wait_for(lambda: not loop_devices_under(state)), loop_devices_under(state)
    assert not state.exists()


def test_disk_survives_a_server_crash_and_is_released_by_the_next_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, "--disk-mb", str(DISK_MB), "--pool-size", "0")
    kept = Sandbox.create(template="base", timeout=120, **_env(srv))
    dead = Sandbox.create(template="base", timeout=120, **_env(srv))
    _run(kept, "echo kept > $HOME/state")
    port = int(srv.url.rsplit(":", 1)[1])
    srv.stop(signal.SIGKILL)
    for pid in host_pids_of(srv, dead.sandbox_id):  # one dies while the server is down
        os.kill(pid, signal.SIGKILL)
    assert _wait_for(lambda: not loop_devices_under(data / "sandboxes" / dead.sandbox_id))
    srv2 = start_server(data, "--disk-mb", str(DISK_MB), "--pool-size", "0", port=port)
    try:
        again = Sandbox.connect(kept.sandbox_id, **_env(srv2))
        assert _run(again, "cat $HOME/state")[1] == "kept\n"
        assert int(_run(again, "df --output=itotal / | tail -1")[1]) == INODES
        assert not (data / "sandboxes" / dead.sandbox_id).exists(), "the dead sandbox's image is swept"
        assert loop_devices_under(data) == loop_devices_under(data / "sandboxes" / kept.sandbox_id)
        with httpx.Client(base_url=srv2.url, headers={"X-API-KEY": srv2.api_key}) as api:
            assert api.get(f"/sandboxes/{kept.sandbox_id}").json()["diskSizeMB"] == DISK_MB
    finally:
        assert srv2.stop() == 0
    assert _wait_for(lambda: not loop_devices_under(data))
    assert not list((data / "sandboxes").iterdir())


def test_an_upload_bigger_than_the_disk_fails_and_leaves_nothing(small: Sandbox) -> None:
    free_kib = int(_run(small, "df --output=avail / | tail -1")[1])
    with pytest.raises(NotEnoughSpaceException):  # the SDK's class for a 507
        small.files.write("/home/user/big.bin", b"\0" * ((DISK_MB + 16) * MiB))
    assert not small.files.exists("/home/user/big.bin")
    # nothing partial is left behind: the free space is back
    assert int(_run(small, "df --output=avail / | tail -1")[1]) >= free_kib - 1024
