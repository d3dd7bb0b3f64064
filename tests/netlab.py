"""The tests' stand-in for the internet: a network namespace that the tests create, with its own HTTP,
HTTPS and DNS servers, routed from the host. Nothing a test sends leaves this machine: sandboxes reach
the lab's addresses (198.18.0.0/24, a range reserved for benchmarking, RFC 2544) through the host's
routing and sandboxd's NAT, and the lab answers names only from its own table.

  lab netns `sbxlab<pid>`:  uplink 198.18.255.2/30  <-veth->  host `lab<pid>` 198.18.255.1/30
                            lo: 198.18.0.10 (web), .11 (web2), .53 (dns), 169.254.169.254 (metadata)
  host: routes 198.18.0.0/24 and 169.254.169.254/32 via 198.18.255.2; IPv6: 2001:db8:5b:ff::1/64 on the
  host side, 2001:db8:5b::/64 (web6 ::10) and fd00:ec2::254 routed into the lab

Servers (each its own process in the lab, ended by PID): `lab_server.py` answers HTTP on :80 and HTTPS on
:443 of web and web2 with a JSON echo of the request (host, path, headers, the client's address);
dnsmasq answers `*.lab.test` from NAMES and refuses the rest; `lab_socks.py` serves SOCKS5 on SOCKS.
What the servers received is logged (`requests_seen`, `udp_seen`: UDP to web:9999, `socks_seen`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WEB = "198.18.0.10"
WEB2 = "198.18.0.11"
DNS = "198.18.0.53"
SOCKS = "198.18.0.20"  # SOCKS5 proxies: :1080 without credentials, :1081 with SOCKS_USER / SOCKS_PASSWORD
SOCKS_USER, SOCKS_PASSWORD = "agent", "s3cret-proxy-pw"
HOST_SIDE = "198.18.255.1"
# The lab also plays the cloud metadata service: a request the firewall let through would be seen here
# instead of leaving the machine.
METADATA = "169.254.169.254"
# IPv6 (documentation prefix 2001:db8::/32, routed into the lab): the web server, the host's side, and the
# IPv6 cloud metadata address, also the lab's.
WEB6 = "2001:db8:5b::10"
HOST_SIDE6 = "2001:db8:5b:ff::1"
METADATA6 = "fd00:ec2::254"
NAMES = {
    "web.lab.test": WEB,
    "api.lab.test": WEB,
    "other.lab.test": WEB2,
    "deep.sub.lab.test": WEB2,
    "rebind-host.lab.test": HOST_SIDE,  # DNS rebinding: an allowed name that points at the host
    "rebind-lo.lab.test": "127.0.0.1",
}
NAMES6 = {"web6.lab.test": WEB6}
SERVER_SCRIPT = Path(__file__).with_name("lab_server.py")
SOCKS_SCRIPT = Path(__file__).with_name("lab_socks.py")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Lab:
    def __init__(self, directory: Path | None = None) -> None:
        tag = os.getpid() % 100000
        self.netns = f"sbxlab{tag}"
        self.host_if = f"lab{tag}"
        self.own_dir = directory is None  # (made here: removed by stop)
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="sandboxd-lab-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ca_pem = self.dir / "ca.pem"
        self.etc = Path("/etc/netns") / self.netns

    def start(self) -> Lab:
        import trustme

        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_pem))
        cert = ca.issue_cert(*NAMES, WEB, WEB2)
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.dir / "server.pem"))  # lab_server.py reads it
        ns = ["ip", "netns", "exec", self.netns]
        # Names looked up inside the lab (its SOCKS proxy resolves what it is asked) go to the lab's DNS:
        # `ip netns exec` gives the lab /etc/netns/<name>/resolv.conf as its /etc/resolv.conf.
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text(f"nameserver {DNS}\n")
        _run("ip", "netns", "add", self.netns)
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "uplink", "netns", self.netns)
            _run("ip", "addr", "add", f"{HOST_SIDE}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run(*ns, "ip", "link", "set", "lo", "up")
            _run(*ns, "ip", "link", "set", "uplink", "up")
            _run(*ns, "ip", "addr", "add", "198.18.255.2/30", "dev", "uplink")
            for addr in (WEB, WEB2, DNS, METADATA, SOCKS):
                _run(*ns, "ip", "addr", "add", f"{addr}/32", "dev", "lo")
            _run("ip", "-6", "addr", "add", f"{HOST_SIDE6}/64", "dev", self.host_if, "nodad")
            _run(*ns, "ip", "-6", "addr", "add", "2001:db8:5b:ff::2/64", "dev", "uplink", "nodad")
            for addr in (WEB6, METADATA6):
                _run(*ns, "ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
            _run(*ns, "ip", "-6", "route", "add", "default", "via", HOST_SIDE6, "dev", "uplink")
            for dst in ("2001:db8:5b::/64", f"{METADATA6}/128"):
                _run("ip", "-6", "route", "add", dst, "via", "2001:db8:5b:ff::2", "dev", self.host_if)
            _run("ip", "route", "add", "198.18.0.0/24", "via", "198.18.255.2", "dev", self.host_if)
            _run("ip", "route", "add", f"{METADATA}/32", "via", "198.18.255.2", "dev", self.host_if)
            log = open(self.dir / "servers.log", "ab")
            self.procs.append(
                subprocess.Popen(
                    [*ns, sys.executable, str(SERVER_SCRIPT), str(self.dir), WEB, WEB2, METADATA, WEB6, METADATA6],
                    stdout=log,
                    stderr=log,
                )
            )
            for extra in ([SOCKS, "1080"], [SOCKS, "1081", SOCKS_USER, SOCKS_PASSWORD]):
                argv = [*ns, sys.executable, str(SOCKS_SCRIPT), str(self.dir), *extra]
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
            dns = [
                *ns,
                "dnsmasq",
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                f"--listen-address={DNS}",
                "--bind-interfaces",
                "--port=53",
                "--local-ttl=60",  # answers may be cached (as real ones are)
                "--pid-file=" + str(self.dir / "dnsmasq.pid"),
                "--user=root",
            ]
            dns += [f"--address=/{name}/{addr}" for name, addr in {**NAMES, **NAMES6}.items()]
            self.procs.append(subprocess.Popen(dns, stdout=log, stderr=log))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import socket

        deadline = time.monotonic() + 15
        for host, port in ((WEB, 80), (WEB, 443), (SOCKS, 1080), (SOCKS, 1081)):
            while True:
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the lab's web server did not start: " + self.log()) from None
                    time.sleep(0.05)

    def socks_seen(self) -> list[str]:
        """The targets the lab's SOCKS5 proxies were asked to connect to (`host:port`, in order)."""
        try:
            return (self.dir / "socks.log").read_text().splitlines()
        except OSError:
            return []

    def requests_seen(self) -> str:
        """Every request the web servers answered, a line each: `server-address path`."""
        try:
            return (self.dir / "requests.log").read_text()
        except OSError:
            return ""

    def udp_seen(self, wait_for: str, timeout: float = 3.0) -> list[str]:
        """The UDP payloads received on web:9999, once `wait_for` is among them (or the time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen = (self.dir / "udp.log").read_text().splitlines()
            except OSError:
                seen = []
            if wait_for in seen or time.monotonic() > deadline:
                time.sleep(0.3)  # anything sent just before it has arrived too
                try:
                    return (self.dir / "udp.log").read_text().splitlines()
                except OSError:
                    return seen
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return (self.dir / "servers.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)  # takes the veth and routes
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
