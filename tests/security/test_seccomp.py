"""The seccomp policy (sbxhelper.c, apply_seccomp): families, io_uring, uevents, other syscall ABIs.

Each attack runs as sandbox root (the strongest identity a tenant has) and as the default user.
"""

from __future__ import annotations

import socket

import pytest
from e2b import Sandbox

from conftest import run_as
from conftest import run_python as py

USERS = ["root", "user"]


@pytest.mark.parametrize("user", USERS)
def test_vsock_is_refused_and_the_hosts_vsock_ports_stay_free(sandbox: Sandbox, user: str) -> None:
    port = 47000 + (hash(user) % 1000)
    out = py(
        sandbox,
        f"""
        import socket
        try:
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.bind((socket.VMADDR_CID_ANY, {port}))
            s.listen()
            print("BOUND")
            import time; time.sleep(3)
        except OSError as e:
            print("refused", e.errno)
        """,
        user=user,
    )
    assert out == "refused 97", out  # EAFNOSUPPORT
    # The host can bind the same port: the sandbox holds nothing of the host's vsock space.
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError:
        pytest.skip("no vsock on this host")
    with s:
        s.bind((socket.VMADDR_CID_ANY, port))


def test_unneeded_socket_families_are_refused(sandbox: Sandbox) -> None:
    out = py(
        sandbox,
        """
        import socket
        fams = {"AF_PACKET": 17, "AF_KEY": 15, "AF_ALG": 38, "AF_VSOCK": 40, "AF_BLUETOOTH": 31, "AF_XDP": 44,
                "AF_TIPC": 30, "AF_RDS": 21, "AF_APPLETALK": 5, "AF_X25": 9, "AF_MAX+": 63}
        for name, fam in fams.items():
            for typ in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET):
                try:
                    socket.socket(fam, typ).close()
                    print("OPENED", name, typ)
                except OSError as e:
                    pass
        # the families a sandbox needs still work
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()  # NETLINK_ROUTE
        a, b = socket.socketpair()
        print("ok")
        """,
    )
    assert out == "ok", out


def test_high_bits_in_the_family_argument_do_not_slip_past(sandbox: Sandbox) -> None:
    # The kernel reads socket()'s family as a 32-bit int: 0x1_0000_0028 is AF_VSOCK to it.
    out = py(
        sandbox,
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        res = []
        for fam, proto in ((0x100000028, 0), (0xFFFFFFFF00000011, 0), (0x100000010, 0x10000000F)):
            fd = libc.syscall(41, ctypes.c_long(fam), ctypes.c_long(1 if proto == 0 else 3), ctypes.c_long(proto))
            res.append("OPENED" if fd >= 0 else "refused")
        print(" ".join(res))
        """,
    )
    assert out == "refused refused refused", out


@pytest.mark.parametrize("user", USERS)
def test_io_uring_is_refused(sandbox: Sandbox, user: str) -> None:
    out = py(
        sandbox,
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)
        fd = libc.syscall(425, 8, params)  # io_uring_setup
        e1 = ctypes.get_errno()
        r2 = libc.syscall(426, 0, 0, 0, 0, 0, 0)  # io_uring_enter
        e2 = ctypes.get_errno()
        r3 = libc.syscall(427, 0, 0, 0, 0)  # io_uring_register
        e3 = ctypes.get_errno()
        print(fd, e1, r2, e2, r3, e3)
        """,
        user=user,
    )
    assert out == "-1 1 -1 1 -1 1", out  # EPERM each


def test_host_uevents_do_not_reach_the_sandbox(sandbox: Sandbox) -> None:
    out = py(
        sandbox,
        """
        import socket
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)  # NETLINK_KOBJECT_UEVENT
            s.bind((0, 1))
            print("OPENED")
        except OSError as e:
            print("refused", e.errno)
        """,
    )
    assert out == "refused 93", out  # EPROTONOSUPPORT


C_I386 = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    long ret;
    /* i386 ABI: eax = 20 (getpid), through int 0x80 -- numbers a filter for x86-64 would not match */
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    printf("i386 getpid returned %ld\n", ret);
    return 0;
}
"""

C_X32 = r"""
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    /* x32 ABI: x86-64 numbers with bit 30 set. 0x40000000 + 425 = io_uring_setup */
    long r = syscall(0x40000000L + 425, 8, 0);
    printf("x32 returned %ld\n", r);
    return 0;
}
"""


@pytest.mark.parametrize(("name", "source"), [("i386", C_I386), ("x32", C_X32)])
def test_other_syscall_abis_are_killed(sandbox: Sandbox, name: str, source: str) -> None:
    sandbox.files.write(f"/tmp/{name}.c", source)
    code, _, err = run_as(sandbox, f"gcc -O0 -o /tmp/{name} /tmp/{name}.c", user="user", timeout=120)
    assert code == 0, err
    code, out, _ = run_as(sandbox, f"/tmp/{name}; echo status=$?", user="root")
    assert "returned" not in out, out  # the syscall never ran
    assert "status=159" in out, out  # 128 + SIGSYS: killed by the filter


def test_denied_syscall_groups(sandbox: Sandbox) -> None:
    # One representative of each group of the policy, as sandbox root: every one is EPERM.
    out = py(
        sandbox,
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        calls = {"bpf": (321, 0, 0, 0), "perf_event_open": (298, 0, 0, -1, -1, 0), "userfaultfd": (323, 0),
                 "keyctl": (250, 0, 0), "add_key": (248, 0, 0, 0, 0, 0), "kexec_load": (246, 0, 0, 0, 0),
                 "init_module": (175, 0, 0, 0), "open_by_handle_at": (304, 0, 0, 0), "setns": (308, 0, 0),
                 "unshare": (272, 0x10000000), "mount": (165, 0, 0, 0, 0, 0), "pivot_root": (155, 0, 0),
                 "fsopen": (430, 0, 0), "open_tree": (428, 0, 0, 0), "move_pages": (279, 0, 0, 0, 0, 0, 0),
                 "memfd_secret": (447, 0), "pidfd_getfd": (438, 0, 0, 0), "clock_settime": (227, 0, 0),
                 "swapon": (167, 0, 0), "reboot": (169, 0, 0, 0, 0), "quotactl": (179, 0, 0, 0, 0),
                 "iopl": (172, 3), "ioperm": (173, 0, 1, 1), "syslog": (103, 3, 0, 0), "acct": (163, 0),
                 "fanotify_init": (300, 0, 0), "sethostname": (170, 0, 0), "lsm_set_self_attr": (460, 0, 0, 0, 0)}
        bad = []
        for name, (nr, *args) in calls.items():
            r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
            err = ctypes.get_errno()
            if r != -1 or err != 1:
                bad.append(f"{name}: r={r} errno={err}")
        print("; ".join(bad) or "all denied")
        """,
    )
    assert out == "all denied", out
