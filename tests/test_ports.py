"""A sandbox's own servers reached through sandboxd (`E2b-Sandbox-Id` / `E2b-Sandbox-Port` routing)."""

from __future__ import annotations

import time

import httpx
from e2b import Sandbox

from conftest import Server


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
