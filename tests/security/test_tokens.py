"""Tokens on every door: envd, the code interpreter's port, and what reaches the sandbox's own services."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

from conftest import Server
from wire import envd_headers


@pytest.fixture(scope="module")
def ci(server: Server):
    sbx = CodeSandbox.create(template="code-interpreter-v1", timeout=300)
    try:
        yield sbx
    finally:
        sbx.kill()


def _interp(sbx: Sandbox, **extra: str) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999", **extra}


def test_code_interpreter_execute_needs_the_access_token(server: Server, ci: CodeSandbox) -> None:
    body = {"code": "open('/tmp/pwned', 'w').write('x')", "language": "python"}
    for headers in (_interp(ci), _interp(ci, **{"X-Access-Token": "wrong"})):
        r = httpx.post(server.url + "/execute", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
    # percent-encoded and trailing-slash spellings of the same path are refused too
    for path in ("/%65xecute", "/execute/", "//execute"):
        r = httpx.post(server.url + path, json=body, headers=_interp(ci), timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text)
    assert not ci.files.exists("/tmp/pwned")
    # The official SDK sends the token: everything it does still works.
    assert ci.run_code("6 * 7").text == "42"
    ctx = ci.create_code_context()
    assert ci.run_code("x = 1; x + 1", context=ctx).text == "2"
    ci.remove_code_context(ctx)


def test_a_foreign_sandboxs_token_opens_nothing(server: Server, sandbox: Sandbox, ci: CodeSandbox) -> None:
    other_token = sandbox._envd_access_token
    r = httpx.post(
        server.url + "/execute",
        json={"code": "1", "language": "python"},
        headers=_interp(ci, **{"X-Access-Token": other_token}),
        timeout=30,
    )
    assert r.status_code == 401
    headers = envd_headers(sandbox, streaming=False)
    headers["E2b-Sandbox-Id"] = ci.sandbox_id
    r = httpx.post(server.url + "/process.Process/List", content=b"{}", headers=headers, timeout=30)
    assert r.status_code == 401


ECHO_SERVER = """
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", 8123), H).serve_forever()
"""


def test_credentials_are_not_forwarded_to_the_sandboxs_services(server: Server, sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/echo.py", ECHO_SERVER)
    sandbox.commands.run("python3 /tmp/echo.py", background=True)
    headers = {
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "8123",
        "X-Access-Token": sandbox._envd_access_token,
        "X-API-KEY": server.api_key,
        "E2B-Traffic-Access-Token": "traffic",
        "Authorization": "Bearer for-the-users-own-app",
        "X-Custom": "kept",
    }
    for _ in range(100):
        r = httpx.get(server.url + "/", headers=headers, timeout=10)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    seen = json.loads(r.text)
    assert seen["x-custom"] == "kept" and seen["authorization"] == "Bearer for-the-users-own-app"
    for secret in ("x-access-token", "x-api-key", "e2b-traffic-access-token"):
        assert secret not in seen, seen
    assert sandbox._envd_access_token not in r.text and server.api_key not in r.text
