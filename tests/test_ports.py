"""A sandbox's own servers reached through sandboxd (`E2b-Sandbox-Id` / `E2b-Sandbox-Port` routing)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from netlab import Lab

from conftest import SANDBOXD, Server, free_port, start_server


def _serve(sbx: Sandbox, port: int) -> dict[str, str]:
    sbx.commands.run("mkdir -p /tmp/www && echo hi > /tmp/www/small")
    sbx.commands.run(
        f"python3 -m http.server {port} --protocol HTTP/1.1 --bind 127.0.0.1 --directory /tmp/www", background=True
    )
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(port)}
    return headers


def test_keep_alive_requests_to_a_server_without_chunked_bodies(sandbox: Sandbox, server: Server) -> None:
    """Python's http.server speaks HTTP/1.1 keep-alive but not chunked request bodies: a bodiless GET must
    reach it without body framing, or its next request on the reused connection is garbage."""
    headers = _serve(sandbox, 8000)
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as c:
        while c.get("/small").status_code != 200:
            assert time.monotonic() < deadline, "the sandbox's server did not start"
            time.sleep(0.1)
        statuses = [c.get("/small").status_code for _ in range(60)]
        assert statuses == [200] * 60, statuses
        # a request with a body (http.server answers POST with 501) leaves the connection usable too
        assert c.post("/small", content=b"x" * 1000).status_code == 501
        assert c.get("/small").text == "hi\n"


# -- ports by URL: `sandboxd serve --domain D` ------------------------------------------------------

DOMAIN = "sbx.test"

# A WebSocket echo server and an HTTP server that answers with the Host it was sent, in the sandbox's
# own Python (the template has no WebSocket library): enough of RFC 6455 for short text frames.
SERVICES = r"""
import base64, hashlib, socket, sys, threading
def ws(c, f, key):
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    while True:
        h = f.read(2)
        if len(h) < 2 or h[0] & 0x0F == 8:
            return
        n = h[1] & 0x7F
        if n == 126:
            n = int.from_bytes(f.read(2), "big")
        mask = f.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
        out = b"echo: " + data
        size = bytes([126]) + len(out).to_bytes(2, "big") if len(out) > 125 else bytes([len(out)])
        c.sendall(bytes([0x81]) + size + out)
def handle(c):
    f = c.makefile("rb")
    while True:
        line = f.readline()
        if not line:
            break
        headers = {}
        while (h := f.readline()) not in (b"\r\n", b""):
            k, _, v = h.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if headers.get(b"upgrade", b"").lower() == b"websocket":
            ws(c, f, headers[b"sec-websocket-key"])
            break
        body = b"host=" + headers.get(b"host", b"") + b" auth=" + headers.get(b"authorization", b"-")
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
while True:
    threading.Thread(target=handle, args=(s.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def domain_server(lab: Lab) -> Iterator[tuple[Server, int]]:
    tls_port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="sandboxd-test-domain-"))
    srv = start_server(tmp / "data", "--domain", DOMAIN, "--tls-port", str(tls_port), "--pool-size", "1")
    try:
        yield srv, tls_port
    finally:
        assert srv.stop() == 0
        shutil.rmtree(tmp, ignore_errors=True)


def _env(srv: Server) -> dict[str, str]:
    return {"api_url": srv.url, "sandbox_url": srv.url, "api_key": srv.api_key}


def _start_services(sbx: Sandbox, port: int = 8000) -> None:
    sbx.files.write("/tmp/services.py", SERVICES)
    sbx.commands.run(f"python3 /tmp/services.py {port}", background=True)
    for _ in range(100):
        if sbx.commands.run(f"(echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo up || true").stdout == "up\n":
            return
        time.sleep(0.05)
    raise AssertionError("the sandbox's services did not start")


def _curl(srv: Server, tls_port: int, host: str, *extra: str) -> tuple[int, str]:
    """HTTPS to `host` on the server's TLS port, trusting only the server's CA (`sandboxd ca export`)."""
    ca = subprocess.run(
        [SANDBOXD, "ca", "export", "--data-dir", str(srv.data_dir)], capture_output=True, text=True, check=True
    ).stdout
    ca_file = srv.data_dir.parent / "ca-export.pem"
    ca_file.write_text(ca)
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            str(ca_file),
            "--resolve",
            f"{host}:{tls_port}:127.0.0.1",
            "-w",
            "\n%{http_code}",
            *extra,
            f"https://{host}:{tls_port}/",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def test_ports_by_url_over_https(domain_server: tuple[Server, int]) -> None:
    srv, tls_port = domain_server
    sbx = Sandbox.create(template="base", timeout=120, **_env(srv))
    try:
        assert sbx.get_host(8000) == f"8000-{sbx.sandbox_id}.{DOMAIN}", "the create response names the domain"
        _start_services(sbx)
        code, body = _curl(srv, tls_port, sbx.get_host(8000))
        assert (code, body) == (200, "host=localhost auth=-"), body
        # the control plane answers on api.D (as the SDK calls it with E2B_DOMAIN alone), envd on 49983-<id>.D
        code, body = _curl(srv, tls_port, f"api.{DOMAIN}", "-H", f"X-API-KEY: {srv.api_key}")
        assert code == 404 and "no such endpoint" in body, (code, body)
        code, body = _curl(srv, tls_port, f"49983-{sbx.sandbox_id}.{DOMAIN}")
        assert code == 401 and "X-Access-Token" in body, (code, body)
        # Python's own http.server, as an agent would start it, by URL
        sbx.commands.run("mkdir -p /tmp/site && echo '<h1>agent app</h1>' > /tmp/site/index.html")
        sbx.commands.run("python3 -m http.server 8002 --directory /tmp/site", background=True)
        for _ in range(100):
            code, body = _curl(srv, tls_port, sbx.get_host(8002))
            if code == 200:
                break
            time.sleep(0.05)
        assert (code, body.strip()) == (200, "<h1>agent app</h1>"), (code, body)
        # nothing listens: the text the SDK looks for
        code, body = _curl(srv, tls_port, sbx.get_host(8001))
        assert code == 502 and "port is not open" in body, body
        code, body = _curl(srv, tls_port, f"8000-nosuchsandbox.{DOMAIN}")
        assert code == 502 and "not found" in body, body
    finally:
        sbx.kill()


def test_websocket_through_host_and_header_routing(domain_server: tuple[Server, int]) -> None:
    import ssl

    from websockets.sync.client import connect

    srv, tls_port = domain_server
    sbx = Sandbox.create(template="base", timeout=120, **_env(srv))
    try:
        _start_services(sbx)
        ca = subprocess.run(
            [SANDBOXD, "ca", "export", "--data-dir", str(srv.data_dir)], capture_output=True, text=True, check=True
        ).stdout
        ctx = ssl.create_default_context(cadata=ca)
        host = sbx.get_host(8000)
        with socket.create_connection(("127.0.0.1", tls_port)) as raw:
            with connect(f"wss://{host}:{tls_port}/", sock=raw, ssl=ctx, server_hostname=host) as ws:
                ws.send("hello")
                assert ws.recv(timeout=5) == "echo: hello"
                ws.send("x" * 1000)
                assert ws.recv(timeout=5) == "echo: " + "x" * 1000
        port = srv.url.rsplit(":", 1)[1]
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
        with connect(f"ws://127.0.0.1:{port}/", additional_headers=headers) as ws:
            ws.send("plain")
            assert ws.recv(timeout=5) == "echo: plain"
    finally:
        sbx.kill()


def test_traffic_token_and_masked_host(domain_server: tuple[Server, int]) -> None:
    srv, tls_port = domain_server
    network = {"allow_public_traffic": False, "mask_request_host": "${PORT}-myapp.example.com"}
    sbx = Sandbox.create(template="base", timeout=120, network=network, **_env(srv))
    try:
        token = sbx.traffic_access_token
        assert token, "a sandbox that is not public has a traffic access token"
        _start_services(sbx)  # envd itself needs no traffic token
        host = sbx.get_host(8000)
        code, body = _curl(srv, tls_port, host)
        assert code == 403 and "e2b-traffic-access-token" in body.lower(), body
        code, body = _curl(srv, tls_port, host, "-H", "e2b-traffic-access-token: wrong")
        assert code == 403, body
        code, body = _curl(srv, tls_port, host, "-H", f"e2b-traffic-access-token: {token}")
        assert code == 200 and body.startswith("host=8000-myapp.example.com"), body
        # the token never reaches the sandbox's service; Authorization (the user's own app's) does
        code, body = _curl(
            srv, tls_port, host, "-H", f"e2b-traffic-access-token: {token}", "-H", "Authorization: Bearer app"
        )
        assert body.endswith("auth=Bearer app") and token not in body
        info = Sandbox.get_info(sbx.sandbox_id, **_env(srv))
        assert info.network and info.network.get("allow_public_traffic") is False
        assert info.network.get("mask_request_host") == "${PORT}-myapp.example.com"
    finally:
        sbx.kill()


def test_a_request_resumes_a_paused_sandbox_with_auto_resume(domain_server: tuple[Server, int]) -> None:
    srv, tls_port = domain_server
    env = _env(srv)
    sbx = Sandbox.create(template="base", timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True}, **env)
    plain = Sandbox.create(template="base", timeout=120, **env)
    try:
        for s in (sbx, plain):
            _start_services(s)
            s.pause()
        code, body = _curl(srv, tls_port, sbx.get_host(8000))
        assert code == 200 and body.startswith("host="), body
        assert Sandbox.get_info(sbx.sandbox_id, **env).state.value == "running"
        port = srv.url.rsplit(":", 1)[1]
        r = httpx.get(
            f"http://127.0.0.1:{port}/", headers={"E2b-Sandbox-Id": plain.sandbox_id, "E2b-Sandbox-Port": "8000"}
        )
        assert r.status_code == 502, "without auto_resume a paused sandbox stays paused"
        assert Sandbox.get_info(plain.sandbox_id, **env).state.value == "paused"
        sbx.pause()  # and a request to envd wakes it too (a command)
        assert Sandbox.get_info(sbx.sandbox_id, **env).state.value == "paused"
        assert sbx.commands.run("echo awake").stdout == "awake\n"
        assert Sandbox.get_info(sbx.sandbox_id, **env).state.value == "running"
    finally:
        sbx.kill()
        plain.kill()


def test_ca_export_and_the_certificate_it_signs(domain_server: tuple[Server, int]) -> None:
    from cryptography import x509

    srv, _ = domain_server
    pem = subprocess.run(
        [SANDBOXD, "ca", "export", "--data-dir", str(srv.data_dir)], capture_output=True, text=True, check=True
    ).stdout
    ca = x509.load_pem_x509_certificate(pem.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert oct((srv.data_dir / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
