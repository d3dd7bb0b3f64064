"""The classic container escapes and resource attacks not covered elsewhere, each as sandbox root where that
is the stronger identity, each asserting containment and that the host and the neighbours are unchanged."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
from e2b import Sandbox

from conftest import Server, run_as
from conftest import run_python as py


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_no_process_executable_can_be_overwritten(sandbox: Sandbox) -> None:
    # CVE-2019-5736: overwrite the runtime's binary through /proc/PID/exe. Every process a sandbox can see
    # runs either a sandbox file or sandboxd's helper from a sealed memfd.
    out = py(
        sandbox,
        """
        import os
        opened, links = [], set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                links.add(os.readlink(f"/proc/{pid}/exe"))
            except OSError:
                pass
            try:
                fd = os.open(f"/proc/{pid}/exe", os.O_WRONLY)
                opened.append(pid)
                os.close(fd)
            except OSError:
                pass
        print("OPENED", opened) if opened else print("none")
        print(sorted(links))
        """,
    )
    first, links = out.splitlines()
    assert first == "none", out
    for host_path in ("/var/lib/sandboxd", "/opt/sandboxd/venv", "/work", "sbxhelper-"):
        assert host_path not in links, links


def test_no_descriptor_of_the_host_leaks_into_a_command(sandbox: Sandbox) -> None:
    for user in ("root", "user"):
        _, out, _ = run_as(sandbox, "ls -l /proc/self/fd/ | tail -n +2", user=user)
        fds = [line.split()[-3] for line in out.splitlines()]
        targets = [line.split("-> ")[-1] for line in out.splitlines()]
        assert set(fds) <= {"0", "1", "2", "3"}, out  # stdio and ls's own directory handle
        assert not [t for t in targets if "sandboxd" in t or t.startswith("/var") or "memfd" in t], out


def test_host_abstract_unix_sockets_and_loopback_services_are_unreachable(sandbox: Sandbox) -> None:
    name = f"sandboxd-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + name)
    abstract.listen()
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    accepted: list[str] = []

    def watch(s: socket.socket, what: str) -> None:
        s.settimeout(5)
        try:
            s.accept()
            accepted.append(what)
        except OSError:
            pass

    watchers = [threading.Thread(target=watch, args=(s, w)) for s, w in ((abstract, "abstract"), (tcp, "tcp"))]
    for t in watchers:
        t.start()
    try:
        out = py(
            sandbox,
            f"""
            import socket
            res = []
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                u.connect("\\0{name}"); res.append("ABSTRACT-CONNECTED")
            except OSError as e:
                res.append(f"abstract refused {{e.errno}}")
            t = socket.socket()
            t.settimeout(2)
            try:
                t.connect(("127.0.0.1", {port})); res.append("TCP-CONNECTED")
            except OSError as e:
                res.append(f"tcp refused {{e.errno}}")
            print("; ".join(res))
            """,
        )
    finally:
        for t in watchers:
            t.join()
        abstract.close()
        tcp.close()
    assert "CONNECTED" not in out and not accepted, (out, accepted)


def test_other_sandboxes_loopback_is_unreachable(sandbox: Sandbox) -> None:
    other = Sandbox.create(template="base", timeout=60)
    try:
        other.files.write(
            "/tmp/srv.py",
            "import socket\ns=socket.socket();s.bind(('127.0.0.1',8765));s.listen();"
            "c,_=s.accept();open('/tmp/got','w').write('x')\n",
        )
        h = other.commands.run("python3 /tmp/srv.py", background=True)
        time.sleep(0.5)
        code, out, _ = run_as(sandbox, "python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8765), 2)\"")
        assert code != 0 and "Connection refused" in out + _, (code, out)
        assert not other.files.exists("/tmp/got")
        h.kill()
    finally:
        other.kill()


def test_thread_exhaustion_is_contained(server: Server, sandbox: Sandbox) -> None:
    out = py(
        sandbox,
        """
        import threading, time
        n = 0
        ev = threading.Event()
        try:
            while n < 100000:
                threading.Thread(target=ev.wait, daemon=True).start()
                n += 1
        except RuntimeError:
            pass
        print(n)
        ev.set()
        """,
        user="user",
    )
    assert 0 < int(out) <= 512, out  # the sandbox's PID limit counts threads
    # the host still makes threads and processes; a neighbour still runs commands
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    other = Sandbox.create(template="base", timeout=60)
    try:
        assert other.commands.run("echo ok").stdout == "ok\n"
    finally:
        other.kill()


def test_huge_output_costs_the_server_little(server: Server, sandbox: Sandbox) -> None:
    before = rss_mib(server.proc.pid)
    seen = [0]

    def count(chunk: str) -> None:
        seen[0] += len(chunk)

    r = sandbox.commands.run("head -c 200000000 /dev/zero | tr '\\0' x", on_stdout=count, timeout=120)
    assert seen[0] == 200_000_000 and r.exit_code == 0
    grown = rss_mib(server.proc.pid) - before
    assert grown < 100, f"server RSS grew by {grown:.0f} MiB streaming 200 MB"


def test_pty_flood_is_bounded(server: Server, sandbox: Sandbox) -> None:
    before = rss_mib(server.proc.pid)
    got = [0]

    def on_data(data: bytes) -> None:
        got[0] += len(data)

    from e2b import PtySize

    h = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=60)
    sandbox.pty.send_stdin(h.pid, b"cat /dev/urandom | base64\n")

    def reader() -> None:
        with contextlib.suppress(Exception):
            h.wait(on_pty=on_data)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(3)
    sandbox.pty.kill(h.pid)
    t.join(10)
    assert got[0] > 1_000_000, got  # the flood did flow
    assert rss_mib(server.proc.pid) - before < 100
    assert sandbox.commands.run("echo fine").stdout == "fine\n"


@pytest.mark.parametrize(
    "cmd",
    [
        "echo 65536 > /proc/sys/kernel/pid_max",
        "echo 1 > /proc/sys/vm/drop_caches",
        "sysctl -w net.ipv4.ip_forward=1",
        "echo /tmp/x > /sys/fs/cgroup/release_agent",
        "mkdir -p /tmp/cg && mount -t cgroup -o memory cgroup /tmp/cg",
        "echo x > /sys/kernel/uevent_helper",
        "echo c > /proc/sysrq-trigger",
    ],
)
def test_kernel_knobs_are_read_only(sandbox: Sandbox, cmd: str) -> None:
    knobs = ["/proc/sys/kernel/pid_max", "/proc/sys/vm/drop_caches", "/proc/sys/net/ipv4/ip_forward"]
    before = {k: open(k).read() for k in knobs if os.access(k, os.R_OK)}
    code, _, _ = run_as(sandbox, cmd)
    assert code != 0, cmd
    assert {k: open(k).read() for k in before} == before


def test_device_nodes_cannot_be_made_or_used(sandbox: Sandbox) -> None:
    _, out, err = run_as(sandbox, "mknod /tmp/disk b 8 0 2>&1; mknod /tmp/mem c 1 1 2>&1; ls /tmp/disk /tmp/mem 2>&1")
    assert "No such file" in out + err and "Operation not permitted" in out + err, (out, err)
    _, out, _ = run_as(sandbox, "head -c 1 /dev/mem 2>&1; head -c 1 /dev/sda 2>&1; echo end")
    assert "No such file" in out and out.strip().endswith("end")
