"""Isolation: attacks from inside a sandbox, each asserted to fail, with the host checked afterwards."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest
from e2b import CommandExitException, Sandbox

from conftest import (
    TEMPLATES_DIR,
    Server,
    cgroup_dir,
    host_pids_of,
    run_as,
    template_file,
    template_layers,
    upper_on_host,
)

PY = "python3 -c"


def run_root(sbx: Sandbox, cmd: str, timeout: float = 60) -> tuple[int, str, str]:
    return run_as(sbx, cmd, "root", timeout)


def test_host_processes_invisible_and_pid1_is_the_sandboxs(sandbox: Sandbox) -> None:
    _, out, _ = run_root(sandbox, "ps -eo pid,args")
    assert "sandboxd" not in out and "pytest" not in out
    procs = [line for line in out.splitlines()[1:] if line.strip()]
    assert len(procs) < 10, out
    _, cmdline, _ = run_root(sandbox, "tr '\\0' ' ' < /proc/1/cmdline")
    assert cmdline.strip() == "sandbox-init"
    # the server's own PID means nothing inside
    code, _, _ = run_root(sandbox, f"kill -0 {os.getpid()}")
    assert code != 0 or os.getpid() < 10


def test_root_inside_is_not_root_outside(sandbox: Sandbox, server: Server) -> None:
    _, out, _ = run_root(sandbox, "cat /proc/self/uid_map; touch /root/made-by-root")
    inside, outside, count = out.split()
    assert inside == "0" and int(outside) >= 1 << 30 and int(count) > 0
    with upper_on_host(server, sandbox.sandbox_id) as upper:
        assert (upper / "root" / "made-by-root").stat().st_uid == int(outside)
    for pid in host_pids_of(server, sandbox.sandbox_id):
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] != "0", f"host PID {pid} runs as host root"


def test_hardening_flags(sandbox: Sandbox) -> None:
    for user in ("user", "root"):
        r = sandbox.commands.run("grep -E 'NoNewPrivs|Seccomp:|CapBnd' /proc/self/status", user=user)  # type: ignore[arg-type]
        fields = dict(line.split(":\t") for line in r.stdout.strip().splitlines())
        # commands run without no_new_privs (sudo works, as on E2B): seccomp and the bounding set hold
        assert fields["NoNewPrivs"] == "0" and fields["Seccomp"] == "2"
        caps = int(fields["CapBnd"], 16)
        assert not caps & (1 << 21), "CAP_SYS_ADMIN must not be in the bounding set"
        assert not caps & (1 << 16) and not caps & (1 << 17), "no CAP_SYS_MODULE / CAP_SYS_RAWIO"


def test_host_filesystem_unreachable(sandbox: Sandbox, server: Server) -> None:
    marker = Path(f"/tmp/host-marker-{uuid.uuid4().hex}")
    marker.write_text("host secret")
    try:
        code, _, _ = run_root(sandbox, f"cat {marker}")
        assert code != 0
        for path in (str(server.data_dir), "/work", str(TEMPLATES_DIR), "/proc/1/root" + str(marker)):
            code, _, _ = run_root(sandbox, f"ls {path}")
            assert code != 0, path
        # climbing out through .. and /proc/self/root stays inside
        code, out, _ = run_root(sandbox, f"cat /../../..{marker} /proc/self/root/..{marker}")
        assert code != 0 and "host secret" not in out
    finally:
        marker.unlink()


def test_other_sandboxes_files_unreachable(server: Server) -> None:
    a = Sandbox.create(template="base", timeout=60)
    b = Sandbox.create(template="base", timeout=60)
    try:
        a.commands.run("echo a-secret > /tmp/secret", user="root")
        code, out, _ = run_root(b, "cat /tmp/secret; ls /proc/*/root/tmp/secret")
        assert code != 0 and "a-secret" not in out
        a_pids = host_pids_of(server, a.sandbox_id)
        for pid in a_pids:  # host PIDs of A mean nothing in B
            code, out, _ = run_root(b, f"cat /proc/{pid}/root/tmp/secret")
            assert "a-secret" not in out
    finally:
        a.kill()
        b.kill()


def test_writes_never_reach_the_template(server: Server) -> None:
    os_release = template_file("base", "/etc/os-release")
    before = os_release.read_bytes()
    sbx = Sandbox.create(template="base", timeout=60)
    try:
        run_root(sbx, "echo tampered >> /etc/os-release; touch /etc/new-file; rm -f /usr/bin/python3")
        assert sbx.commands.run("test -e /usr/bin/python3 || echo gone").stdout == "gone\n"
    finally:
        sbx.kill()
    assert os_release.read_bytes() == before
    assert not any((layer / "etc" / "new-file").exists() for layer in template_layers("base"))
    assert template_file("base", "/usr/bin/python3").exists()
    fresh = Sandbox.create(template="base", timeout=60)
    try:
        assert fresh.commands.run("test -x /usr/bin/python3 && echo ok").stdout == "ok\n"
    finally:
        fresh.kill()


def test_mount_module_devices_and_namespaces_denied(sandbox: Sandbox) -> None:
    attacks = {
        "mount tmpfs": "mount -t tmpfs none /mnt",
        "bind mount": "mount --bind / /mnt",
        "remount root": "mount -o remount,rw /",
        "mknod block dev": "mknod /tmp/sda b 8 0",
        "raw disk": "cat /dev/vda /dev/sda /dev/mem 2>&1 | head -c 1; test -e /dev/mem || test -e /dev/vda",
        "init_module": f'{PY} "import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); '
        f"sys.exit(0 if l.syscall(175, b'x', 1, b'') == 0 else 1)\"",
        "finit_module": f'{PY} "import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); '
        f"sys.exit(0 if l.syscall(313, 0, b'', 0) == 0 else 1)\"",
        "unshare user ns": "unshare -U true",
        "unshare mount ns": "unshare -m true",
        "new net ns": "unshare -n true",
        "pivot_root": "mkdir -p /tmp/nr && pivot_root /tmp/nr /tmp/nr",
        "kexec": f'{PY} "import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); '
        f'sys.exit(0 if l.syscall(246, 0, 0, 0, 0) == 0 else 1)"',
        "sysrq": "echo b > /proc/sysrq-trigger",
        "kernel sysctl": "echo 1 > /proc/sys/kernel/sysrq",
        "iptables-style net config": "ip link add dummy0 type dummy",
        "set time": "date -s '2001-01-01'",
        # the mount, IPC, cgroup and PID namespaces belong to the sandbox's user namespace: still nothing
        "unmount a view": "umount /proc/meminfo",
        "unmount /sys": "umount -l /sys",
        "unmount /dev": "umount -l /dev",
        "mount proc": "mount -t proc proc /mnt",
        "mount cgroup2": "mount -t cgroup2 none /mnt",
        "enter init's namespaces": "nsenter -t 1 -m -p -i true",
        "new pid ns": "unshare -p -f true",
        # init's program, shared by all of a server's sandboxes (a read-only tmpfs of host root's)
        "replace init's program": "cp /bin/true /dev/.sandboxd/init",
        "add to init's dir": "touch /dev/.sandboxd/x",
        "unmount init's program": "umount -l /dev/.sandboxd",
    }
    for name, cmd in attacks.items():
        code, out, err = run_root(sandbox, cmd)
        assert code != 0, f"attack '{name}' succeeded: {out} {err}"
    # and the sandbox still works
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


def test_ptrace_outside_fails(sandbox: Sandbox, server: Server) -> None:
    ptrace = (
        f'{PY} "import ctypes,sys; l=ctypes.CDLL(None,use_errno=True); '
        'r=l.ptrace(16, int(sys.argv[1]), 0, 0); sys.exit(0 if r == 0 else 1)"'
    )
    # PID 1 (the sandbox's init, the only thing between the sandbox and the host) and a host PID
    for target in (1, server.proc.pid, os.getpid()):
        code, _, _ = run_root(sandbox, f"{ptrace} {target}")
        assert code != 0, f"ptrace of {target} succeeded"


def test_hostname_of_host_unchanged(sandbox: Sandbox) -> None:
    host_before = socket.gethostname()
    code, _, _ = run_root(sandbox, "hostname hacked")
    assert code != 0
    code, _, _ = run_root(sandbox, f"{PY} \"import socket; socket.sethostname('hacked')\"")
    assert code != 0
    assert socket.gethostname() == host_before
    assert sandbox.commands.run("hostname").stdout.strip() == sandbox.sandbox_id


def test_network_is_its_own(sandbox: Sandbox, server: Server) -> None:
    """Its own loopback and one link to the host (tests/security/test_network_escape.py attacks the link)."""
    _, out, _ = run_root(sandbox, "ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1")
    assert out.split() == ["lo", "eth0"]
    port = int(server.url.rsplit(":", 1)[1])
    code, _, _ = run_root(sandbox, f"curl -s -m 2 http://127.0.0.1:{port}/health")
    assert code != 0, "the host's loopback services must not be reachable"
    # loopback inside the sandbox works
    cmd = f"{PY} \"import socket; s=socket.socket(); s.bind(('127.0.0.1', 8123)); s.listen(); print('ok')\""
    assert sandbox.commands.run(cmd).stdout == "ok\n"


def test_memory_hog_is_oom_killed_and_server_keeps_serving(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    try:
        hog = f'{PY} "b=[]\nwhile True: b.append(bytearray(50*1024*1024))"'
        with pytest.raises(CommandExitException) as exc:
            sbx.commands.run(hog, timeout=60)
        assert exc.value.exit_code != 0
        mem = cgroup_dir("memory", sbx.sandbox_id) / "memory.oom_control"
        if mem.exists():
            assert "oom_kill 1" in mem.read_text() or "oom_kill 2" in mem.read_text()
        assert httpx.get(server.url + "/health").status_code == 204
        assert server.proc.poll() is None
        assert sbx.commands.run("echo still-here").stdout == "still-here\n"
    finally:
        sbx.kill()


def test_fork_bomb_is_contained(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    try:
        sbx.commands.run("bomb() { bomb | bomb & }; bomb", background=True, user="root")
        time.sleep(3)
        pids = cgroup_dir("pids", sbx.sandbox_id) / "pids.current"
        pids_max = cgroup_dir("pids", sbx.sandbox_id) / "pids.max"
        if pids.exists():
            assert int(pids.read_text()) <= int(pids_max.read_text())
        # the host and other sandboxes are unaffected
        other = Sandbox.create(template="base", timeout=60)
        try:
            assert other.commands.run("echo fine", timeout=30).stdout == "fine\n"
        finally:
            other.kill()
    finally:
        start = time.monotonic()
        assert sbx.kill() is True
        assert time.monotonic() - start < 15
    assert not host_pids_of(server, sbx.sandbox_id)


def test_cpu_hog_gets_only_its_quota(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=60)
    try:
        usage = cgroup_dir("cpuacct", sbx.sandbox_id) / "cpuacct.usage"
        if not usage.exists():
            pytest.skip("no cpuacct controller on this host")
        sbx.commands.run("for i in 1 2 3; do (while :; do :; done) & done; sleep 30", background=True)
        time.sleep(0.5)
        u0, t0 = int(usage.read_text()), time.monotonic()
        time.sleep(3)
        u1, t1 = int(usage.read_text()), time.monotonic()
        cpus_used = (u1 - u0) / 1e9 / (t1 - t0)
        # three busy loops on a 2-CPU host, a quota of 1 CPU: ~1.0 used
        assert 0.5 < cpus_used < 1.25, cpus_used
    finally:
        sbx.kill()


def test_file_broker_has_the_users_credentials_only(sandbox: Sandbox, server: Server) -> None:
    base = int(sandbox.commands.run("cat /proc/self/uid_map").stdout.split()[1])
    sandbox.files.write("cred-check.txt", "x")  # starts the broker for `user`
    sandbox.files.write("/root/cred-check.txt", "x", user="root")  # and one for root
    found = {}
    for pid in host_pids_of(server, sandbox.sandbox_id):
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("Name") == "sandbox-files":
            found[fields["Uid"].split()[0]] = fields
    assert set(found) == {str(base + 1000), str(base)}, found
    user, root = found[str(base + 1000)], found[str(base)]
    assert int(user["CapEff"], 16) == 0 and int(user["CapPrm"], 16) == 0
    assert not int(root["CapEff"], 16) & (1 << 21)  # no CAP_SYS_ADMIN, even for sandbox root
    for fields in (user, root):
        assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
