"""Attacks on a sandbox's network, from inside, as its root: reaching other sandboxes, the host and its
services, link-local metadata; changing addresses, routes, ARP or the firewall; raw sockets; spoofed
sources; IPv6 around the firewall; DNS rebinding through the egress proxy; exhausting the address pool.

Every target is this machine's own or the tests' lab namespace (tests/netlab.py): the lab also owns
169.254.169.254, so a metadata request the firewall failed to stop would be answered by the lab, and seen.
"""

from __future__ import annotations

import http.server
import ipaddress
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from netlab import DNS, HOST_SIDE, METADATA, WEB, Lab

from conftest import Server, run_as, start_server

PY = "python3 -c"


def run_root(sbx: Sandbox, cmd: str, timeout: float = 30) -> tuple[int, str, str]:
    return run_as(sbx, cmd, "root", timeout)


def address_of(sbx: Sandbox) -> str:
    return run_root(sbx, "ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1")[1].strip()


def tcp_connects(sbx: Sandbox, host: str, port: int) -> bool:
    code, _, _ = run_root(sbx, f"timeout 3 bash -c 'echo > /dev/tcp/{host}/{port}'")
    return code == 0


@pytest.fixture
def host_listener() -> Iterator[int]:
    """An HTTP server of the host on every address (0.0.0.0), as a host service a sandbox must not reach."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Quiet)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def pair(server: Server, lab: Lab) -> Iterator[tuple[Sandbox, Sandbox]]:
    a = Sandbox.create(template="base", timeout=120)
    b = Sandbox.create(template="base", timeout=120)
    try:
        yield a, b
    finally:
        a.kill()
        b.kill()


def test_other_sandboxes_are_unreachable(pair: tuple[Sandbox, Sandbox]) -> None:
    a, b = pair
    listen = f"{PY} \"import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8000)); s.listen(); time.sleep(30)\""
    b.commands.run(listen, background=True, user="root")
    ip_b = address_of(b)
    assert ip_b and ip_b != address_of(a)
    assert tcp_connects(b, "127.0.0.1", 8000), "the listener runs"
    assert not tcp_connects(a, ip_b, 8000)
    assert run_root(a, f"ping -c 1 -W 1 {ip_b}")[0] != 0


def test_host_services_are_unreachable(sandbox: Sandbox, lab: Lab, host_listener: int) -> None:
    gateway = run_root(sandbox, "awk '/nameserver/ {print $2}' /etc/resolv.conf")[1].strip()
    assert tcp_connects(sandbox, WEB, 80), "the internet is reachable"
    for host in (gateway, HOST_SIDE):
        assert not tcp_connects(sandbox, host, host_listener), host
        assert run_root(sandbox, f"ping -c 1 -W 1 {host}")[0] != 0, host
    # the gateway answers DNS, and nothing else
    assert not tcp_connects(sandbox, gateway, 22)
    assert run_root(sandbox, f"dig +short +time=2 +tries=1 @{gateway} web.lab.test || getent hosts web.lab.test")[
        0
    ] in (0, 2)


def test_metadata_and_link_local_are_unreachable(sandbox: Sandbox, lab: Lab) -> None:
    code, out, _ = run_root(sandbox, f"curl -sS -m 3 http://{METADATA}/latest/meta-data/")
    assert code != 0, out
    assert METADATA not in lab.requests_seen(), "the request reached the lab's stand-in metadata server"


def test_network_configuration_is_out_of_reach(sandbox: Sandbox) -> None:
    me = address_of(sandbox)
    for cmd in (
        "ip addr add 10.99.0.1/32 dev eth0",
        "ip link set eth0 down",
        "ip route add 10.99.0.0/24 dev eth0",
        "ip route del default",
        "ip neigh add 10.213.0.99 lladdr 02:00:00:00:00:01 dev eth0",
        "ip link add x type dummy",
        "sysctl -w net.ipv4.ip_forward=1",
        f'{PY} "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)"',
        f'{PY} "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)"',
        f'{PY} "import socket; s=socket.socket(); s.setsockopt(socket.SOL_IP, 19, 1)"',  # IP_TRANSPARENT
        f'{PY} "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1)"',
    ):
        code, _, _ = run_root(sandbox, cmd)
        assert code != 0, cmd
    assert address_of(sandbox) == me
    assert "default via" in run_root(sandbox, "ip route")[1]


def test_spoofed_source_addresses_are_dropped(sandbox: Sandbox, lab: Lab) -> None:
    """IP_FREEBIND lets anyone bind an address that is not theirs: sending from it fails in the sandbox's
    own kernel (no IP_TRANSPARENT without CAP_NET_ADMIN), and the host would drop it (fib check)."""
    send = (
        f'{PY} "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); '
        "s.setsockopt(socket.SOL_IP, 15, 1); s.bind((sys.argv[1], 0)); "
        f"s.sendto(sys.argv[2].encode(), ('{WEB}', 9999))\""
    )
    me = address_of(sandbox)
    assert run_root(sandbox, f"{send} {me} honest")[0] == 0
    spoofs = ["10.213.250.250", "198.18.0.53", "192.0.2.1", "8.8.8.8"]
    for spoof in spoofs:
        run_root(sandbox, f"{send} {spoof} spoofed-{spoof}")
    seen = lab.udp_seen(wait_for="honest")
    assert "honest" in seen
    assert not [s for s in seen if s.startswith("spoofed")], seen


def test_no_ipv6_around_the_firewall(sandbox: Sandbox, server: Server) -> None:
    # the host's end of the link has no address but the sandbox's router's, fe80::1 (none without IPv6)
    host_if = _host_link_of(sandbox)
    out = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", host_if], capture_output=True, text=True).stdout
    assert [line.split()[3] for line in out.splitlines()] in ([], ["fe80::1/64"]), out
    # and that router answers nothing but neighbour discovery: no echo, no port
    for cmd in ("ping -6 -c 1 -W 1 fe80::1%eth0", "curl -sS -m 3 -g 'http://[fe80::1%eth0]:3000/'"):
        assert run_root(sandbox, cmd)[0] != 0, cmd


def _host_link_of(sbx: Sandbox) -> str:
    peer = run_root(sbx, "cat /sys/class/net/eth0/iflink")[1].strip()
    for p in Path("/sys/class/net").iterdir():
        try:
            if (p / "ifindex").read_text().strip() == peer and p.name.startswith("sx"):
                return p.name
        except OSError:
            continue
    raise AssertionError(f"no host link with index {peer}")


def test_dns_rebinding_through_the_proxy_reaches_nothing_of_the_host(server: Server, lab: Lab) -> None:
    """An allowed name that resolves to the host (or loopback): the proxy's connection is refused by
    the kernel, whatever DNS says."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST_SIDE, 80))
    listener.listen()
    listener.settimeout(0.5)
    sbx = Sandbox.create(
        template="base",
        timeout=120,
        network={"allow_out": ["*.lab.test"], "deny_out": ["0.0.0.0/0"], "dns_servers": [DNS]},
    )
    try:
        assert run_root(sbx, "curl -sS -m 4 -o /dev/null http://web.lab.test/")[0] == 0
        for name in ("rebind-host.lab.test", "rebind-lo.lab.test"):
            code, out, _ = run_root(sbx, f"curl -sS -m 4 http://{name}/")
            assert code != 0, (name, out)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        sbx.kill()
        listener.close()


def test_address_pool_exhaustion_is_a_clear_error_and_leaks_nothing(lab: Lab) -> None:
    from e2b import SandboxException

    tmp = Path(tempfile.mkdtemp(prefix="sandboxd-test-pool-"))
    # a /29: addresses .2 to .6 for sandboxes (.1 is the gateway)
    srv = start_server(tmp / "data", "--network-cidr", "10.213.251.0/29", "--pool-size", "0", "--dns", DNS)
    env = {"api_url": srv.url, "sandbox_url": srv.url, "api_key": srv.api_key}
    made = []
    try:
        with pytest.raises(SandboxException) as exc:
            for _ in range(6):
                made.append(Sandbox.create(template="base", timeout=60, **env))
        assert "no free address" in str(exc.value) and "--network-cidr" in str(exc.value), exc.value
        assert len(made) >= 4
        for sbx in made:
            sbx.kill()
        made.clear()
        sbx = Sandbox.create(template="base", timeout=60, **env)  # addresses came back
        made.append(sbx)
        assert sbx.commands.run(f"curl -sS -m 4 -o /dev/null -w '%{{http_code}}' http://{WEB}/").stdout == "200"
    finally:
        for sbx in made:
            sbx.kill()
        assert srv.stop() == 0
    assert_no_network_leftovers(srv, "10.213.251.0/29")
    shutil.rmtree(tmp, ignore_errors=True)


def assert_no_network_leftovers(srv: Server, cidr: str) -> None:
    """After a server stopped with no sandbox left: no table, gateway, veth or conntrack entry of it."""
    from sandboxd.runtime.cgroups import instance_name

    instance = instance_name(srv.data_dir)
    tag = instance.lstrip("i")[:5]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert f"sandboxd_{instance}" not in tables
    links = [p.name for p in Path("/sys/class/net").iterdir()]
    assert not [n for n in links if n in (f"sg{tag}",) or n.startswith(f"sx{tag}")], links
    # (the mark is every sandboxd's: only this server's pools count)
    from sandboxd.runtime.network import default_cidr6

    pools = [ipaddress.ip_network(cidr), ipaddress.ip_network(default_cidr6(instance))]
    for family in ("ipv4", "ipv6"):
        ct = subprocess.run(["conntrack", "-L", "-f", family, "-m", str(0x5BD00000)], capture_output=True, text=True)
        for line in ct.stdout.splitlines():
            src = next(w[4:] for w in line.split() if w.startswith("src="))
            assert not any(ipaddress.ip_address(src) in p for p in pools), line


def test_an_egress_proxy_cannot_be_the_host_or_a_sandbox(server: Server, lab: Lab) -> None:
    """The server dials a sandbox's SOCKS5 proxy from the host: the address may not be one of the host's
    (its services), another sandbox's, loopback or link-local; the sandbox's traffic then goes nowhere."""
    accepted: list[str] = []
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            accepted.append(peer[0])
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    other = Sandbox.create(template="base", timeout=60)
    listen = f"{PY} \"import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 1080)); s.listen(); time.sleep(60)\""
    other.commands.run(listen, background=True, user="root")
    try:
        for address in (f"{HOST_SIDE}:{port}", f"127.0.0.1:{port}", f"{address_of(other)}:1080", f"{METADATA}:80"):
            sbx = Sandbox.create(template="base", timeout=60, network={"egress_proxy": {"address": address}})
            try:
                code, out, _ = run_root(sbx, f"curl -sS -m 4 -o /dev/null -w '%{{http_code}}' http://{WEB}/")
                assert code != 0, (address, out)
            finally:
                sbx.kill()
        assert METADATA not in lab.requests_seen()
        assert not accepted, f"the host's listener was reached through the egress proxy from {accepted}"
        _, established, _ = run_root(other, "ss -tnH state established '( sport = :1080 )' | wc -l")
        assert established.strip() == "0", "another sandbox was reached as an egress proxy"
    finally:
        other.kill()
        listener.close()


def test_ipv6_reaches_no_other_sandbox_host_or_metadata(pair: tuple[Sandbox, Sandbox], lab: Lab) -> None:
    from netlab import HOST_SIDE6, METADATA6

    a, b = pair
    six_b = run_root(b, "ip -6 -o addr show dev eth0 scope global | awk '{print $4}' | cut -d/ -f1")[1].strip()
    if not six_b:
        pytest.skip("this host has no IPv6 default route: sandboxes get IPv4 only")
    six = "s=socket.socket(socket.AF_INET6); s.bind(('::', 8000)); s.listen(); time.sleep(30)"
    listen = f'{PY} "import socket,time; {six}"'
    b.commands.run(listen, background=True, user="root")
    assert not tcp_connects(a, six_b, 8000), "another sandbox over IPv6"
    for host in ("fe80::1%eth0", HOST_SIDE6):  # the host: its end of the link, its other addresses
        code, _, _ = run_root(a, f"curl -sS -m 3 -g 'http://[{host}]:22/'")
        assert code != 0, host
    code, out, _ = run_root(a, f"curl -sS -m 3 -g 'http://[{METADATA6}]/latest/meta-data/'")
    assert code != 0, out
    assert METADATA6 not in lab.requests_seen()
    # its address and routes are not its to change
    assert run_root(a, "ip -6 addr add fd00::99/128 dev eth0")[0] != 0
    assert run_root(a, "ip -6 route del default")[0] != 0


# The egress proxy and the resolver read what sandboxes send: malformed, oversized, slow and many.
HOSTILE = r"""
import socket, struct, sys, time
gw, web = sys.argv[1], sys.argv[2]
def conn(port):
    s = socket.create_connection((web, port), timeout=5)
    return s
results = []
# a TLS record that lies about its length, a ClientHello cut short, a head with no end
for port, data in ((443, b"\x16\x03\x01\xff\xff" + b"A" * 200), (443, b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c\x03\x03"),
                   (80, b"GET / HTTP/1.1\r\nX: " + b"a" * 40000)):
    s = conn(port)
    try:
        s.sendall(data)
        s.settimeout(12)
        results.append(s.recv(100)[:12])
    except OSError as e:
        results.append(type(e).__name__)
    s.close()
# more connections than a sandbox may hold at the proxy (256): the extra ones are closed, not queued
held = []
for _ in range(300):
    try:
        held.append(conn(80))
    except OSError:
        break
time.sleep(0.5)
closed = 0
for s in held:
    s.settimeout(0.05)
    try:
        if s.recv(1) == b"":
            closed += 1
    except OSError:
        pass
for s in held:
    s.close()
# the resolver: garbage, a reply instead of a query, a TCP length that never comes
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for junk in (b"\x00", b"\xff" * 4096, struct.pack("!HHHHHH", 1, 0x8000, 1, 0, 0, 0)):
    u.sendto(junk, (gw, 53))
t = socket.create_connection((gw, 53), timeout=5)
t.sendall(b"\xff\xff" + b"x" * 10)
print(results, len(held), closed)
"""


def test_hostile_input_to_the_egress_proxy_and_the_resolver(server: Server, lab: Lab) -> None:
    sbx = Sandbox.create(
        template="base",
        timeout=120,
        network={"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"], "dns_servers": [DNS]},
    )
    try:
        sbx.files.write("/tmp/hostile.py", HOSTILE)
        gateway = run_root(sbx, "awk '/nameserver/ {print $2}' /etc/resolv.conf")[1].strip()
        code, out, err = run_root(sbx, f"python3 /tmp/hostile.py {gateway} {WEB}", timeout=120)
        assert code == 0, err
        held, closed = (int(x) for x in out.split()[-2:])
        assert held - closed <= 256, out  # the proxy holds at most 256 connections of one sandbox
        # and both still serve this sandbox, and the server its API
        assert run_root(sbx, "getent hosts web.lab.test")[1].split()[0] == WEB
        assert run_root(sbx, "curl -sS -m 5 -o /dev/null -w '%{http_code}' http://web.lab.test/")[1] == "200"
        assert httpx.get(server.url + "/health").status_code == 204
    finally:
        sbx.kill()
