"""Checkpoints of a sandbox's processes (the base of pause to disk, docs/architecture.md), at the runtime's level:
a sandbox written by CRIU and restored has its processes back with their memory, as the same users, in its
own cgroups, in a user namespace owned by its own uid, with its seccomp filter and capabilities."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import glob
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import TEMPLATES_DIR

CRIUS = sorted(glob.glob("/var/lib/sandboxd/tools/criu-*/criu"))  # (scripts/build-criu.sh, which setup.sh runs)

COUNTER = (
    "import time\nn = 0\nwhile True:\n    n += 1\n    open('/tmp/count', 'w').write(str(n))\n    time.sleep(0.05)\n"
)


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _count(init: int) -> int:
    for _ in range(100):
        text = Path(f"/proc/{init}/root/tmp/count").read_text()
        if text:
            return int(text)
        time.sleep(0.01)  # (read between its truncate and its write)
    raise AssertionError("no count")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its reaper."""
    try:
        return _status(pid)["State"].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _counting(init: int) -> bool:
    return bool(_children(init)) and os.path.exists(f"/proc/{init}/root/tmp/count")


def _base_spec() -> Any:
    """A small sandbox of the base template, for the runtime alone."""
    from sandboxd.runtime.base import Limits, SandboxSpec
    from sandboxd.templates.store import TemplateStore

    return SandboxSpec(
        sandbox_id="ckpt" + secrets.token_hex(8),
        layers=TemplateStore(TEMPLATES_DIR).get("base").layers,
        hostname="ckpt",
        limits=Limits(memory_mb=256, disk_mb=256),
    )


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_checkpointed_sandbox_comes_back_with_its_processes_and_memory(tmp_path: Path) -> None:
    from sandboxd.runtime.base import ExecSpec
    from sandboxd.runtime.namespaces import NamespaceRuntime

    assert CRIUS, "no CRIU in /var/lib/sandboxd/tools: run scripts/setup.sh (it builds one)"

    async def body() -> None:
        rt = NamespaceRuntime(tmp_path / "data", network_cidr=None)
        spec = _base_spec()
        handle = await rt.create(spec)
        try:
            # a process of the user, left to the sandbox's init, counting in its memory
            run = ExecSpec(
                argv=["/bin/sh", "-c", f'python3 -c "{COUNTER}" >/dev/null 2>&1 &'],
                env={"PATH": "/usr/bin:/bin"},
                cwd="/",
                uid=1000,
                gid=1000,
            )
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                assert rt.spawn_exec(handle, run, (devnull, devnull, devnull)).wait(30) == 0
            finally:
                os.close(devnull)
            deadline = time.monotonic() + 20
            while not _counting(handle.init_pid):
                assert time.monotonic() < deadline, "the counter did not start"
                await asyncio.sleep(0.05)
            [counter] = _children(handle.init_pid)
            before = _count(handle.init_pid)

            held = await rt.checkpoint(handle, handle.state_dir / "checkpoint", Path(CRIUS[-1]))
            assert not _running(handle.init_pid) and not _running(counter)
            assert _read(str(handle.state_dir / "checkpoint" / "pages-1.img"))  # its memory, written
            await asyncio.sleep(0.3)  # (nothing of it runs meanwhile)

            restored = await rt.create(dataclasses.replace(spec, resume_uid_base=handle.uid_base), restore=held)
            assert restored.init_pid != handle.init_pid and held.uts_fd == held.netns_fd == -1
            [counter] = _children(restored.init_pid)
            after = _count(restored.init_pid)
            assert before <= after < before + 20, (before, after)  # its memory, not a new start from 0
            await asyncio.sleep(0.3)
            assert _count(restored.init_pid) > after  # and it runs on
            # the same identity, limits and confinement as before
            assert _status(counter)["Uid"].split()[0] == str(handle.uid_base + 1000)
            assert _status(restored.init_pid)["CapEff"].strip() == "0000000000000000"
            assert (
                _status(counter)["Seccomp"].strip() == "2" and _status(restored.init_pid)["NoNewPrivs"].strip() == "1"
            )
            cgroup = _read(f"/proc/{counter}/cgroup").decode()
            assert all(path.split("/sys/fs/cgroup/", 1)[-1].split("/", 1)[-1] in cgroup for path in restored.cgroups), (
                cgroup
            )
            fd = os.open(f"/proc/{restored.init_pid}/ns/user", os.O_RDONLY)
            try:
                owner = bytearray(4)
                fcntl.ioctl(fd, 0xB704, owner)  # NS_GET_OWNER_UID
            finally:
                os.close(fd)
            assert struct.unpack("I", owner)[0] == handle.uid_base  # charged to the sandbox, not to host root
            assert _read(f"/proc/{restored.init_pid}/cmdline") == b"sandbox-init\0"
            # its own cgroup namespace again (not CRIU's, the host's: it would see the host's cgroup paths)
            assert os.stat(f"/proc/{counter}/ns/cgroup").st_ino != os.stat("/proc/self/ns/cgroup").st_ino
            assert _read(f"/proc/{counter}/cgroup").decode().count(":/\n") >= 3
            handle = restored
            # and a restored sandbox is checkpointed and restored again
            held = await rt.checkpoint(handle, handle.state_dir / "checkpoint2", Path(CRIUS[-1]))
            handle = await rt.create(dataclasses.replace(spec, resume_uid_base=handle.uid_base), restore=held)
            [counter] = _children(handle.init_pid)
            assert _count(handle.init_pid) >= after
        finally:
            await rt.destroy(handle)
            rt.close()

    asyncio.run(body())


# CRIU as the helper runs it: its capabilities, written down (then it fails: nothing is dumped).
FAKE_CRIU = """#!/bin/sh
grep -E '^Cap(Eff|Bnd):' /proc/self/status > "$SBX_TEST_OUT"
exit 3
"""
DENIED = {9, 13, 16, 17, 20, 22, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39}  # sbxhelper.c, criu_denied
NEEDED = {1, 2, 6, 7, 12, 19, 21, 40}  # DAC_OVERRIDE/READ_SEARCH, SETGID/UID, NET_ADMIN, SYS_PTRACE/ADMIN, C/R


def test_criu_runs_without_the_host_capabilities_it_has_no_use_for(tmp_path: Path) -> None:
    from sandboxd.runtime.base import RuntimeError_
    from sandboxd.runtime.namespaces import NamespaceRuntime

    fake = tmp_path / "criu"
    fake.write_text(FAKE_CRIU.replace("$SBX_TEST_OUT", str(tmp_path / "caps")))
    fake.chmod(0o755)

    async def body() -> None:
        rt = NamespaceRuntime(tmp_path / "data", network_cidr=None)
        spec = _base_spec()
        handle = await rt.create(spec)
        try:
            with pytest.raises(RuntimeError_):  # (the fake CRIU fails: the checkpoint says so)
                await rt.checkpoint(handle, handle.state_dir / "checkpoint", fake)
        finally:
            await rt.destroy(handle)
            rt.close()

    asyncio.run(body())
    caps = dict(line.split(":\t") for line in (tmp_path / "caps").read_text().splitlines())
    for name in ("CapEff", "CapBnd"):
        bits = int(caps[name], 16)
        have = {n for n in range(64) if bits >> n & 1}
        assert not have & DENIED, (name, sorted(have & DENIED))
        assert NEEDED <= have, (name, sorted(NEEDED - have))
