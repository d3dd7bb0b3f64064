"""Malformed and oversized requests: nothing a client sends crashes the server or makes it hold much memory.

The first attack here (deeply nested JSON in a Connect message) crashed the whole server process with a
segfault inside protobuf's native JSON reader before the bounds of core/limits.py existed.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import httpx
import pytest
from e2b import Sandbox

from conftest import Server, start_server
from wire import envd_headers

DEEP = 100_000  # crashed the server (depth 10,000 gave a clean 500)


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def assert_alive(server: Server, sandbox: Sandbox) -> None:
    assert server.proc.poll() is None, f"the server died:\n{server.log()[-3000:]}"
    assert sandbox.commands.run("echo alive").stdout == "alive\n"


@pytest.mark.parametrize("method", ["/filesystem.Filesystem/Stat", "/process.Process/List"])
def test_deeply_nested_json_in_unary_connect_call(server: Server, sandbox: Sandbox, method: str) -> None:
    r = httpx.post(
        server.url + method, content=deep_json(DEEP), headers=envd_headers(sandbox, streaming=False), timeout=30
    )
    assert r.status_code in (400, 413, 429), r.text
    body = r.json()
    assert body["code"] == "resource_exhausted" and "32 levels" in body["message"], body
    assert_alive(server, sandbox)


def test_deeply_nested_json_in_streaming_connect_call(server: Server, sandbox: Sandbox) -> None:
    payload = deep_json(DEEP)
    body = struct.pack(">BI", 0, len(payload)) + payload
    with httpx.stream(
        "POST", server.url + "/process.Process/Start", content=body, headers=envd_headers(sandbox), timeout=30
    ) as r:
        raw = r.read()
    # The end-of-stream envelope carries the error.
    end = json.loads(raw[5:])
    assert end["error"]["code"] == "resource_exhausted", end
    assert_alive(server, sandbox)


def test_moderately_deep_json_is_a_clean_error_not_a_500(server: Server, sandbox: Sandbox) -> None:
    # Nested just past the limit inside a field the message has: refused before protobuf sees it.
    doc = {"path": "/"}
    inner: dict = {}
    doc["x"] = inner
    for _ in range(40):
        inner["y"] = {}
        inner = inner["y"]
    r = httpx.post(
        server.url + "/filesystem.Filesystem/Stat",
        content=json.dumps(doc),
        headers=envd_headers(sandbox, streaming=False),
        timeout=30,
    )
    assert r.json()["code"] == "resource_exhausted", r.text
    # Within the limit, unknown fields are ignored as by connect's default codec: the call works.
    r = httpx.post(
        server.url + "/filesystem.Filesystem/Stat",
        content=json.dumps({"path": "/", "unknown": {"a": [1, 2, {"b": 3}]}}),
        headers=envd_headers(sandbox, streaming=False),
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY", r.text
    assert_alive(server, sandbox)


def test_invalid_json_is_invalid_argument(server: Server, sandbox: Sandbox) -> None:
    r = httpx.post(
        server.url + "/process.Process/List",
        content=b'{"a": ',
        headers=envd_headers(sandbox, streaming=False),
        timeout=30,
    )
    assert r.json()["code"] == "invalid_argument", r.text
    assert_alive(server, sandbox)


def test_oversized_connect_message_is_refused_without_holding_memory(server: Server, sandbox: Sandbox) -> None:
    before = rss_kib(server.proc.pid)
    big = {"process": {"cmd": "/bin/true", "args": ["x" * (60 * 1024 * 1024)]}}
    payload = json.dumps(big).encode()
    for _ in range(3):
        r = httpx.post(
            server.url + "/process.Process/Start",
            content=struct.pack(">BI", 0, len(payload)) + payload,
            headers=envd_headers(sandbox),
            timeout=60,
        )
        end = json.loads(r.content[5:]) if r.status_code == 200 else r.json()
        err = end.get("error", end)
        assert err["code"] == "resource_exhausted" and "4194304" in err["message"], err
    # Unary: the body is read only up to the limit.
    r = httpx.post(
        server.url + "/process.Process/SendInput",
        content=b'{"input": {"stdin": "' + b"A" * (8 * 1024 * 1024) + b'"}}',
        headers=envd_headers(sandbox, streaming=False),
        timeout=60,
    )
    assert r.json()["code"] == "resource_exhausted", r.text
    grown_mib = (rss_kib(server.proc.pid) - before) / 1024
    assert grown_mib < 100, f"server RSS grew by {grown_mib:.0f} MiB for refused requests"
    assert_alive(server, sandbox)


def test_deeply_nested_json_to_the_control_plane(server: Server) -> None:
    with server.api() as api:
        for path in ("/sandboxes", "/v2/sandboxes"):
            r = api.post(path, content=deep_json(DEEP), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            assert "levels" in r.json()["message"]
        deep_meta = {"templateID": "base", "metadata": {"k": json.loads(deep_json(20))}}
        r = api.post("/sandboxes", json=deep_meta)
        assert r.status_code == 400, r.text
        assert api.get("/health").status_code == 204


def test_oversized_control_plane_body(server: Server) -> None:
    with server.api() as api:
        body = {"templateID": "base", "metadata": {f"k{i}": "v" * 1000 for i in range(2000)}}
        r = api.post("/sandboxes", json=body)
        assert r.status_code == 413, r.text
        assert "1048576" in r.json()["message"]

        # Without a Content-Length (chunked), the body is still cut at the limit.
        def chunks():
            for _ in range(300):
                yield b" " * 8192

        r = api.post("/sandboxes", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert api.get("/health").status_code == 204


def test_an_endless_header_is_cut_off(server: Server, sandbox: Sandbox) -> None:
    before = rss_kib(server.proc.pid)
    port = int(server.url.rsplit(":", 1)[1])
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            while sent < 64 * 1024 * 1024:
                s.sendall(b"a" * 65536)
                sent += 65536
            answer = s.recv(200)
        except OSError:
            answer = b"reset"
    assert sent < 64 * 1024 * 1024 or answer.startswith(b"HTTP/1.1 431"), (sent, answer)
    assert (rss_kib(server.proc.pid) - before) / 1024 < 32
    assert_alive(server, sandbox)


def test_slow_clients_are_dropped(tmp_path) -> None:
    srv = start_server(tmp_path / "data", "--head-timeout", "1", "--prewarm", "")
    try:
        port = int(srv.url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\nHo")  # and never the rest
        time.sleep(2.5)
        answers = []
        for s in slow:
            try:
                answers.append(s.recv(200))
            except OSError:
                answers.append(b"reset")
            s.close()
        assert all(a.startswith(b"HTTP/1.1 408") or a in (b"", b"reset") for a in answers), answers[:3]
        # an idle keep-alive connection is not a slow head: it stays usable
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/health").status_code == 204
            time.sleep(2)
            assert c.get("/health").status_code == 204
    finally:
        assert srv.stop() == 0
