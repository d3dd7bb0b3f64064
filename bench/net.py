"""Network suite of the benchmark: egress from a sandbox (through NAT, and through the egress proxy that
polices host names) beside the host's own direct transfer, and a sandbox's HTTP port reached through
sandboxd beside the same server on the host's loopback. All in one run, against the tests' lab
namespace (tests/netlab.py): nothing leaves the machine. Called by run.py; see bench/README.md.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netlab import DNS, WEB, Lab

DOWNLOAD_BYTES = 128 << 20
RUNS = 3
REQUESTS = 100
PORT = 8000
PORT_FILE_BYTES = 64 << 20

# New connection per request, as an agent's tools mostly do: median and p90 in ms, as JSON.
LATENCY = textwrap.dedent(
    """
    import http.client, json, statistics, sys, time
    host, n = sys.argv[1], int(sys.argv[2])
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        c = http.client.HTTPConnection(host, 80, timeout=5)
        c.request("GET", "/small"); c.getresponse().read(); c.close()
        xs.append((time.perf_counter() - t) * 1000)
    xs.sort()
    print(json.dumps({"p50": statistics.median(xs), "p90": xs[int(len(xs) * 0.9) - 1]}))
    """
)


# A minimal HTTP/1.1 keep-alive server (small responses in one write, so that Nagle and delayed ACKs do
# not dominate, as they do with http.server), run in the sandbox and on the host alike.
PORT_SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    BIG = b"\\0" * int(sys.argv[2])
    def handle(c):
        f = c.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                break
            path, length = line.split()[1], 0
            while (h := f.readline()) not in (b"\\r\\n", b""):
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            f.read(length)
            body = b"hi\\n" if path == b"/small" else BIG
            head = b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)
            c.sendall(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                c.sendall(body)
        c.close()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(64)
    while True:
        threading.Thread(target=handle, args=(s.accept()[0],), daemon=True).start()
    """
)


def _mbs(seconds: float, size: int) -> float:
    return size / seconds / 1e6


def _curl_seconds(run: Callable[[str], str], url: str) -> float:
    out = run(f"curl -sS -m 60 -o /dev/null -w '%{{time_total}}' {url}")
    return float(out.strip())


def run_net(client: Any, dl: Any, lab: Lab) -> dict[str, Any]:
    """`lab`: started before the server (which trusts its CA: --egress-ca-file)."""
    from e2b import Sandbox

    res: dict[str, Any] = {}
    made: list[Any] = []
    host_http: subprocess.Popen[bytes] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="sandboxd-bench-net-"))
    try:
        url = f"http://{WEB}/bytes/{DOWNLOAD_BYTES}"

        def host(cmd: str) -> str:
            return subprocess.run(
                cmd, shell=True, capture_output=True, text=True, timeout=dl.op_timeout(), check=True
            ).stdout

        nat = Sandbox.create(template="base", timeout=600)
        made.append(nat)
        policy = {"allow_out": ["web.lab.test"], "deny_out": ["0.0.0.0/0"], "dns_servers": [DNS]}
        proxied = Sandbox.create(template="base", timeout=600, network=policy)
        made.append(proxied)
        rules = {"web.lab.test": [{"transform": {"headers": {"Authorization": "Bearer bench"}}}]}
        intercepted = Sandbox.create(template="base", timeout=600, network={**policy, "rules": rules})
        made.append(intercepted)
        ca = lab.ca_pem.read_text()
        for sbx in (nat, proxied):
            sbx.files.write("/tmp/lab-ca.pem", ca)

        def inside(sbx: Any) -> Callable[[str], str]:
            return lambda cmd: sbx.commands.run(cmd, timeout=120).stdout

        rows = {}
        for name, run, target in (
            ("direct (host)", host, url),
            ("sandbox, NAT", inside(nat), url),
            ("sandbox, egress proxy", inside(proxied), f"http://web.lab.test/bytes/{DOWNLOAD_BYTES}"),
        ):
            dl.check()
            secs = [_curl_seconds(run, target) for _ in range(RUNS)]
            rows[name] = {"download_mbs": _mbs(statistics.median(secs), DOWNLOAD_BYTES)}
        https = f"https://web.lab.test/bytes/{DOWNLOAD_BYTES}"
        for name, run, args in (
            ("direct (host)", host, f"--cacert {lab.ca_pem} --resolve web.lab.test:443:{WEB} {https}"),
            ("sandbox, NAT", inside(nat), f"--cacert /tmp/lab-ca.pem https://{WEB}/bytes/{DOWNLOAD_BYTES}"),
            ("sandbox, egress proxy", inside(proxied), f"--cacert /tmp/lab-ca.pem {https}"),
            ("sandbox, TLS intercepted (rules)", inside(intercepted), https),
        ):
            dl.check()
            secs = [_curl_seconds(run, args) for _ in range(RUNS)]
            rows.setdefault(name, {})["https_mbs"] = _mbs(statistics.median(secs), DOWNLOAD_BYTES)
        (workdir / "lat.py").write_text(LATENCY)
        rows["direct (host)"].update(json.loads(host(f"{sys.executable} {workdir / 'lat.py'} {WEB} {REQUESTS}")))
        for name, sbx, target in (("sandbox, NAT", nat, WEB), ("sandbox, egress proxy", proxied, "web.lab.test")):
            dl.check()
            sbx.files.write("/tmp/lat.py", LATENCY)
            rows[name].update(
                json.loads(sbx.commands.run(f"python3 /tmp/lat.py {target} {REQUESTS}", timeout=120).stdout)
            )
        res["egress"] = rows

        # A sandbox's port through sandboxd (header routing) beside the same server on the host's loopback.
        nat.files.write("/tmp/port_server.py", PORT_SERVER)
        nat.commands.run(f"python3 /tmp/port_server.py {PORT} {PORT_FILE_BYTES}", background=True)
        (workdir / "port_server.py").write_text(PORT_SERVER)
        host_port = _free_port()
        host_http = subprocess.Popen(
            [sys.executable, str(workdir / "port_server.py"), str(host_port), str(PORT_FILE_BYTES)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        headers = {"E2b-Sandbox-Id": nat.sandbox_id, "E2b-Sandbox-Port": str(PORT)}
        ports = {}
        for name, base, hdrs in (
            ("direct loopback", f"http://127.0.0.1:{host_port}", {}),
            ("through sandboxd", client.server.url, headers),
        ):
            _wait_http(base + "/small", hdrs, dl)
            lat = []
            with httpx.Client(timeout=10) as c:  # one keep-alive connection, as a browser or the SDK
                for _ in range(REQUESTS):
                    dl.check()
                    t = time.perf_counter()
                    c.get(base + "/small", headers=hdrs).raise_for_status()
                    lat.append((time.perf_counter() - t) * 1000)
            secs = []
            for _ in range(RUNS):
                t = time.perf_counter()
                with httpx.Client(timeout=60) as c, c.stream("GET", base + "/big", headers=hdrs) as r:
                    got = sum(len(b) for b in r.iter_bytes(1 << 20))
                secs.append(time.perf_counter() - t)
                assert got == PORT_FILE_BYTES, got
            lat.sort()
            ports[name] = {
                "p50": statistics.median(lat),
                "p90": lat[int(len(lat) * 0.9) - 1],
                "download_mbs": _mbs(statistics.median(secs), PORT_FILE_BYTES),
            }
        res["port"] = ports
    finally:
        if host_http is not None:
            host_http.terminate()
            host_http.wait(timeout=10)
        for sbx in made:
            try:
                sbx.kill()
            except Exception:
                pass
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return res


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, headers: dict[str, str], dl: Any) -> None:
    end = time.monotonic() + 15
    while True:
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"{url} did not answer")
        dl.check()
        time.sleep(0.1)


def print_report(res: dict[str, Any]) -> None:
    cr = res.get("create", {})
    if cr:
        base = cr.get("no policy", {}).get("p50")
        print("\nCreate -> first command, pooled, with network options (target: p50 <= 30 ms)")
        print(f"{'option':<34}{'p50 ms':>8}{'p95 ms':>8}{'vs none':>9}{'status':>8}")
        for name, r in cr.items():
            if not r.get("n"):
                continue
            ratio = r["p50"] / base if base else float("nan")
            status = "PASS" if r["p50"] <= 30 else "MISS"
            print(f"{name:<34}{r['p50']:>8.1f}{r['p95']:>8.1f}{ratio:>8.2f}x{status:>8}")
    eg = res.get("egress", {})
    if eg:
        direct = eg.get("direct (host)", {})
        print("\nEgress to the lab (128 MiB download over HTTP and HTTPS; 100 new-connection GETs)")
        head = f"{'path':<34}{'HTTP MB/s':>10}{'ratio':>7}{'HTTPS MB/s':>11}{'ratio':>7}{'p50 ms':>8}{'p90 ms':>8}"
        print(head + f"{'vs direct':>10}")
        for name, r in eg.items():
            http = r.get("download_mbs")
            tls = r.get("https_mbs")
            cells = [
                f"{http:>10.0f}" if http else f"{'-':>10}",
                f"{http / direct['download_mbs']:>7.2f}" if http else f"{'':>7}",
                f"{tls:>11.0f}" if tls else f"{'-':>11}",
                f"{tls / direct['https_mbs']:>7.2f}" if tls else f"{'':>7}",
                f"{r['p50']:>8.2f}{r['p90']:>8.2f}{r['p50'] / direct['p50']:>9.2f}x" if "p50" in r else "",
            ]
            print(f"{name:<34}" + "".join(cells))
    po = res.get("port", {})
    if po:
        direct = po.get("direct loopback", {})
        print(
            f"\nA sandbox's HTTP port ({PORT_FILE_BYTES >> 20} MiB download; 100 keep-alive GETs); "
            "target: ≥ 50 % of direct"
        )
        print(f"{'path':<24}{'MB/s':>10}{'ratio':>8}{'p50 ms':>10}{'p90 ms':>10}{'status':>8}")
        for name, r in po.items():
            ratio = r["download_mbs"] / direct["download_mbs"] if direct else float("nan")
            status = "" if name == "direct loopback" else ("PASS" if ratio >= 0.5 else "MISS")
            print(f"{name:<24}{r['download_mbs']:>10.0f}{ratio:>8.2f}{r['p50']:>10.2f}{r['p90']:>10.2f}{status:>8}")
