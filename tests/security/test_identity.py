"""Per-sandbox identity: own host uid range, own user-namespace owner, no host paths in mountinfo."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import textwrap
import time
from pathlib import Path

import pytest
from e2b import Sandbox

import sandboxd

from conftest import TEMPLATES_DIR, Server, host_pids_of, template_file, upper_on_host

NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4)


def outside_base(sbx: Sandbox) -> int:
    inside, outside, count = sbx.commands.run("cat /proc/self/uid_map", user="root").stdout.split()
    assert inside == "0" and count == "65536"
    return int(outside)


def init_pid(server: Server, sbx: Sandbox) -> int:
    for pid in host_pids_of(server, sbx.sandbox_id):
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "sandbox-init":
                return pid
    raise AssertionError("no sandbox-init")


def test_each_sandbox_has_a_uid_range_of_its_own(server: Server, sandbox: Sandbox) -> None:
    other = Sandbox.create(template="base", timeout=60)
    try:
        a, b = outside_base(sandbox), outside_base(other)
        assert a != b and abs(a - b) >= 65536, (a, b)
        assert min(a, b) >= 1 << 30  # nowhere near host accounts or the template's stored range
        for sbx, base in ((sandbox, a), (other, b)):
            # the shared template still looks root-owned inside
            assert sbx.commands.run("stat -c %u:%g /usr/bin/env /etc/passwd").stdout.split() == ["0:0", "0:0"]
            sbx.commands.run("touch /home/user/mine")
            with upper_on_host(server, sbx.sandbox_id) as upper:
                assert (upper / "home" / "user" / "mine").stat().st_uid == base + 1000
        # processes run as the sandbox's own host ids
        for pid in host_pids_of(server, other.sandbox_id):
            with open(f"/proc/{pid}/status") as f:
                uid = next(line for line in f if line.startswith("Uid:")).split()[1]
            assert b <= int(uid) < b + 65536, (pid, uid)
    finally:
        other.kill()


def test_template_files_are_owned_by_no_sandbox_uid(sandbox: Sandbox) -> None:
    base = outside_base(sandbox)
    passwd = template_file("base", "/etc/passwd")
    st = os.stat(passwd)
    assert not base <= st.st_uid < base + 65536
    # and sandbox root cannot write through to the template
    r = sandbox.commands.run("echo x >> /etc/passwd && tail -c 2 /etc/passwd", user="root")
    assert r.stdout == "x\n"
    with open(passwd, "rb") as f:
        assert not f.read().endswith(b"x\n")


def test_the_user_namespace_is_owned_by_the_sandbox_not_host_root(server: Server, sandbox: Sandbox) -> None:
    base = outside_base(sandbox)
    fd = os.open(f"/proc/{init_pid(server, sandbox)}/ns/user", os.O_RDONLY)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, NS_GET_OWNER_UID, buf)
    finally:
        os.close(fd)
    assert struct.unpack("I", buf)[0] == base


INOTIFY_HOG = textwrap.dedent(
    """
    import ctypes, time
    libc = ctypes.CDLL(None, use_errno=True)
    fds = []
    while len(fds) < 10000:
        fd = libc.inotify_init1(0)
        if fd < 0:
            break
        fds.append(fd)
    err = ctypes.get_errno()
    with open("/tmp/hog.out", "w") as f:
        f.write(f"{len(fds)} {err}")
    time.sleep(30)
    """
)


def test_inotify_exhaustion_is_charged_to_the_sandbox_alone(server: Server, sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/hog.py", INOTIFY_HOG)
    h = sandbox.commands.run("python3 /tmp/hog.py", background=True)
    for _ in range(200):
        if sandbox.files.exists("/tmp/hog.out"):
            break
        time.sleep(0.05)
    held, err = sandbox.files.read("/tmp/hog.out").split()
    assert int(held) > 50 and err == "24", (held, err)  # EMFILE: the sandbox hit its own limit
    try:
        # host root is unaffected
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(0)
        assert fd >= 0, f"host root cannot make an inotify instance: errno {ctypes.get_errno()}"
        os.close(fd)
        # a neighbour can still watch, and the server's own watches work
        other = Sandbox.create(template="base", timeout=60)
        try:
            r = other.commands.run("python3 -c 'import ctypes; print(ctypes.CDLL(None).inotify_init1(0) >= 0)'")
            assert r.stdout.strip() == "True"
            other.files.make_dir("/tmp/watched")
            w = other.files.watch_dir("/tmp/watched")
            other.files.write("/tmp/watched/f", "x")
            time.sleep(0.3)
            assert w.get_new_events(), "the server's watch saw nothing"
            w.stop()
            # and the limit is per sandbox: the neighbour gets as many instances as the hog did
            other.files.write("/tmp/hog.py", INOTIFY_HOG.replace("time.sleep(30)", ""))
            other.commands.run("python3 /tmp/hog.py")
            # (less the one instance the server's watch above made, which counts against that sandbox)
            assert int(other.files.read("/tmp/hog.out").split()[0]) == int(held) - 1
        finally:
            other.kill()
        # and the server's own watches are charged to the sandbox they watch: the hog's sandbox has no
        # inotify instance left for a watch, while the server and the neighbour were unaffected above
        from e2b import SandboxException

        with pytest.raises(SandboxException, match="watch"):
            sandbox.files.watch_dir("/tmp")
    finally:
        h.kill()


def test_mountinfo_shows_no_host_path(server: Server, sandbox: Sandbox) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    ci = CodeSandbox.create(template="code-interpreter-v1", timeout=60)
    try:
        for sbx in (sandbox, ci):
            info = sbx.commands.run("cat /proc/self/mountinfo").stdout
            checkout = str(Path(sandboxd.__file__).resolve().parent)  # where the interpreter's code comes from
            for host_path in (str(server.data_dir), str(TEMPLATES_DIR), "/var/lib/sandboxd", checkout, "/tmp/"):
                assert host_path not in info, f"{host_path} in mountinfo:\n{info}"
            assert "/opt/sandboxd/code" not in info or "tmpfs" in info
        # the interpreter's code is still there, read-only
        assert ci.run_code("1 + 1").text == "2"
        r = ci.commands.run("touch /opt/sandboxd/code/sandboxd_interpreter/x 2>&1; echo $?", user="root")
        assert r.stdout.strip().endswith("1"), r.stdout
    finally:
        ci.kill()


def test_init_holds_no_host_file(sandbox: Sandbox, server: Server) -> None:
    # PID 1 holds nothing of the host (the template store learns which templates are in use from holds):
    # nothing a process that could reach init's descriptors (a checkpoint makes init dumpable) could use.
    pids = host_pids_of(server, sandbox.sandbox_id)
    inits = [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() == "sandbox-init"]
    assert len(inits) == 1, inits
    fds = {fd: os.readlink(f"/proc/{inits[0]}/fd/{fd}") for fd in os.listdir(f"/proc/{inits[0]}/fd")}
    # its stdio, the socket keepers ask it on (in the sandbox's network namespace) and its signalfd: no file
    assert {fds.pop(n) for n in ("0", "1", "2")} == {"/dev/null"}, fds
    assert sorted(target.split(":")[0] for target in fds.values()) == ["anon_inode", "socket"], fds
    for user in ("root", "user"):
        r = sandbox.commands.run("ls -l /proc/1/fd/ 2>&1; echo end", user=user)  # type: ignore[arg-type]
        assert "templates" not in r.stdout and "rootfs" not in r.stdout, r.stdout


def test_uid_ranges_never_overlap_the_hosts_subordinate_ids(tmp_path: Path) -> None:
    from sandboxd.runtime.identity import RANGE, IdentityError, UidAllocator

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "subuid").write_text(f"alice:{(1 << 30) + 5 * RANGE}:65536\n")
    with pytest.raises(IdentityError, match="--uid-base"):
        UidAllocator(first=1 << 30).check_host(etc)
    UidAllocator(first=(1 << 30) + 2048 * RANGE).check_host(etc)  # a start past it is fine
    a = UidAllocator(first=1 << 30, slots=2)
    first, second = a.allocate(), a.allocate()
    assert second - first == RANGE
    with pytest.raises(IdentityError):
        a.allocate()  # all ranges in use
    a.release(first)
    assert a.allocate() == first  # reused only once released
