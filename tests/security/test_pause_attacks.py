"""A sandbox paused to its files (core/pausing.py) is reachable by nothing until it is resumed: not
through envd, not through its ports, not through its files on the host; a hostile pause or connect
body is refused before it does anything; a process cannot hide from the pause in a new session or a
double fork; and its files come back owned as they were."""

from __future__ import annotations

import httpx
from e2b import Sandbox

from conftest import Server, host_pids_of


def test_a_sandbox_paused_to_its_files_is_reachable_by_nothing(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        sbx.commands.run("setsid sh -c 'sleep 1000 & sleep 1000' >/dev/null 2>&1 &", user="root")
        sbx.commands.run("nohup python3 -m http.server 8080 >/dev/null 2>&1 &")
        assert sbx.pause(mode="filesystem") is True
        assert not host_pids_of(server, sbx.sandbox_id), "a process escaped the pause"
        routing = {"E2b-Sandbox-Id": sbx.sandbox_id}
        for port, path in (("49983", "/health"), ("49983", "/files?path=/etc/passwd"), ("8080", "/")):
            r = httpx.get(f"{server.url}{path}", headers={**routing, "E2b-Sandbox-Port": port})
            assert r.status_code == 502, (port, path, r.status_code)
        headers = {"X-API-KEY": server.api_key}
        deep = '{"memory": ' + "[" * 64 + "1" + "]" * 64 + "}"
        for body in (deep, '{"memory": "maybe"}', "[1,2]", "x"):
            r = httpx.post(f"{server.url}/sandboxes/{sbx.sandbox_id}/connect", content=body, headers=headers)
            assert r.status_code == 400, (body, r.text)
        assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"  # nothing above resumed it
        resumed = Sandbox.connect(sbx.sandbox_id)
        owners = resumed.commands.run("stat -c %U:%G /home/user /etc/passwd").stdout
        assert owners == "user:user\nroot:root\n"
    finally:
        sbx.kill()
