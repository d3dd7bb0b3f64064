"""sudo works inside a sandbox (as on E2B), and gives the sandbox's root: nothing of the host.

Commands run without no_new_privs so that setuid programs of the sandbox work. What sudo yields is
exactly `commands.run(user="root")`: host uid BASE, Docker's capabilities inside the sandbox's user
namespace, the same seccomp filter. These attacks check that nothing more opens up."""

from __future__ import annotations

import pytest
from e2b import Sandbox

from conftest import Server, host_pids_of, run_as


def sudo(sbx: Sandbox, cmd: str) -> tuple[int, str]:
    code, out, _ = run_as(sbx, f"sudo {cmd} 2>&1", user="user")
    return code, out


def test_sudo_gives_the_sandboxs_root(sandbox: Sandbox) -> None:
    assert sudo(sandbox, "whoami") == (0, "root\n")
    code, out = sudo(sandbox, "sh -c 'apt-get --version | head -1; id -u'")
    assert code == 0 and out.strip().endswith("0")
    assert sandbox.commands.run("sudo -E env", envs={"MYVAR": "hello"}).stdout.count("MYVAR=hello") == 1
    assert sandbox.commands.run("sudo env", envs={"MYVAR": "hello"}).stdout.count("MYVAR=hello") == 1
    assert sudo(sandbox, "touch /root/by-sudo")[0] == 0
    assert sandbox.commands.run("ls -l /root/by-sudo", user="root").stdout.split()[2] == "root"


def test_sudo_root_has_what_sandbox_root_has_and_no_more(server: Server, sandbox: Sandbox) -> None:
    _, via_sudo = sudo(sandbox, "grep -E 'CapEff|CapBnd|Seccomp:' /proc/self/status")
    direct = sandbox.commands.run("grep -E 'CapEff|CapBnd|Seccomp:' /proc/self/status", user="root").stdout
    assert via_sudo == direct, (via_sudo, direct)
    caps = int(next(line for line in via_sudo.splitlines() if line.startswith("CapEff")).split()[1], 16)
    for cap in (21, 16, 17, 12, 19, 25):  # SYS_ADMIN, SYS_MODULE, SYS_RAWIO, NET_ADMIN, SYS_PTRACE, SYS_TIME
        assert not caps & (1 << cap), cap
    # and a sudo'ed process is a sandbox uid on the host
    h = sandbox.commands.run("sudo sleep 30", background=True)
    try:
        base = int(sandbox.commands.run("cat /proc/self/uid_map").stdout.split()[1])
        uids = set()
        for pid in host_pids_of(server, sandbox.sandbox_id):
            with open(f"/proc/{pid}/status") as f:
                status = f.read().splitlines()
            if status[0].split()[1] == "sandbox-exec":  # sandboxd's host-side helper waiting for it
                continue
            uids.add(int(next(line for line in status if line.startswith("Uid:")).split()[2]))
        assert uids and all(base <= u < base + 65536 for u in uids), (base, uids)
    finally:
        h.kill()


@pytest.mark.parametrize(
    "cmd",
    [
        "mount -t tmpfs x /mnt",
        "unshare -m true",
        "insmod /nonexistent.ko",
        "sysctl -w kernel.hostname=evil",
        "hostname evil",
        "ip link add dummy0 type dummy",
        "chroot /proc/1/root true",
        "cat /proc/kcore",
        "nsenter -t 1 -m true",
    ],
)
def test_sudo_cannot_reach_the_kernel(sandbox: Sandbox, cmd: str) -> None:
    code, out = sudo(sandbox, cmd)
    assert code != 0, (cmd, out)
