"""Pause kinds (core/pausing.py): `full` keeps the processes frozen in memory; `filesystem` (E2B's
`pause(mode="filesystem")`) ends them and keeps the files, and a resume boots the sandbox again from
them, also after a server restart; `connect(on_resume="reboot")` reboots a sandbox paused with memory."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import httpx
from e2b import Sandbox, SandboxState

from conftest import TEMPLATES_DIR, Server, host_pids_of, start_server, start_ticker, ticks_through_port


def _detail(srv: Server, sandbox_id: str) -> dict:
    r = httpx.get(f"{srv.url}/sandboxes/{sandbox_id}", headers={"X-API-KEY": srv.api_key})
    assert r.status_code == 200, r.text
    return r.json()


def _env(srv: Server) -> dict[str, str]:
    return {"api_key": srv.api_key, "api_url": srv.url, "sandbox_url": srv.url}


def test_filesystem_pause_ends_processes_keeps_files_and_resume_boots_again(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        sbx.files.write("/home/user/keep.txt", "kept\n")
        sbx.commands.run("echo root-file > /etc/made-by-root", user="root")
        sbx.commands.run("sleep 1000", background=True)
        first_boot = sbx.commands.run("cat /proc/1/stat").stdout.split()[21]  # init's start time
        assert sbx.pause(mode="filesystem") is True
        detail = _detail(server, sbx.sandbox_id)
        assert detail["state"] == "paused" and detail["pauseMode"] == "filesystem"
        assert not host_pids_of(server, sbx.sandbox_id), "a process of the sandbox outlived its pause"
        hold = TEMPLATES_DIR / ".holds" / sbx.sandbox_id
        assert json.loads(hold.read_text())["lowers"][0].startswith(str(TEMPLATES_DIR)), "its layers are not held"
        assert not sbx.is_running()  # envd: 502 while paused
        assert sbx.pause(mode="filesystem") is False  # 409: paused already
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED

        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.is_running()
        assert resumed.files.read("/home/user/keep.txt") == "kept\n"
        assert resumed.commands.run("cat /etc/made-by-root").stdout == "root-file\n"
        assert resumed.commands.run("pgrep -x sleep || echo none").stdout == "none\n"
        assert resumed.commands.run("cat /proc/1/stat").stdout.split()[21] != first_boot  # booted again
        assert resumed.commands.run("whoami && stat -c %U /home/user/keep.txt").stdout == "user\nuser\n"
        assert "inet " in resumed.commands.run("ip -4 addr show eth0").stdout  # networked again
        assert "pauseMode" not in _detail(server, sbx.sandbox_id)
        assert hold.exists()  # a running sandbox holds its template too (no process of it holds a host file)
    finally:
        sbx.kill()
    assert not (server.data_dir / "sandboxes" / sbx.sandbox_id).exists() and not hold.exists()


def test_full_pause_says_so_and_a_reboot_resume_starts_from_the_files(server: Server) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        sbx.files.write("/home/user/a.txt", "a\n")
        sbx.commands.run("sleep 1000", background=True)
        assert sbx.pause() is True
        assert _detail(server, sbx.sandbox_id)["pauseMode"] == "full"
        assert host_pids_of(server, sbx.sandbox_id), "a full pause keeps the processes (frozen)"
        resumed = Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
        assert resumed.commands.run("pgrep -x sleep || echo none").stdout == "none\n"
        assert resumed.files.read("/home/user/a.txt") == "a\n"
    finally:
        sbx.kill()


def test_code_interpreter_paused_to_its_files_runs_code_again(server: Server) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    ci = CodeSandbox.create(timeout=120)
    try:
        assert ci.run_code("x = 41; x + 1").text == "42"
        ci.files.write("/home/user/data.csv", "a,b\n1,2\n")
        assert ci.pause(mode="filesystem") is True
        again = CodeSandbox.connect(ci.sandbox_id)
        assert again.run_code("import pandas; int(pandas.read_csv('/home/user/data.csv')['b'][0])").text == "2"
        assert again.run_code("x").error.name == "NameError"  # a new kernel: memory was not kept
    finally:
        ci.kill()


def test_a_sandbox_paused_to_its_files_survives_a_server_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, "--pool-size", "0", keep=True)
    port = int(srv.url.rsplit(":", 1)[1])
    sbx = Sandbox.create(template="base", timeout=120, **_env(srv))  # type: ignore[arg-type]
    try:
        sbx.files.write("/home/user/through-restart.txt", "still here\n")
        assert sbx.pause(mode="filesystem") is True
        assert srv.stop() == 0
        srv = start_server(data, "--pool-size", "0", port=port, keep=True)
        assert _detail(srv, sbx.sandbox_id)["pauseMode"] == "filesystem"
        resumed = Sandbox.connect(sbx.sandbox_id, **_env(srv))  # type: ignore[arg-type]
        assert resumed.files.read("/home/user/through-restart.txt") == "still here\n"
        assert resumed.commands.run("echo ok").stdout == "ok\n"
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(sbx.sandbox_id, **_env(srv))  # type: ignore[arg-type]
        srv.stop()
        final = start_server(data, port=port)  # destroys everything at its exit
        assert final.stop() == 0
    assert not list((data / "sandboxes").iterdir())
    assert not (TEMPLATES_DIR / ".holds" / sbx.sandbox_id).exists()


def _wait_state(sandbox_id: str, want: str, seconds: float) -> str:

    from e2b.exceptions import NotFoundException

    deadline = time.monotonic() + seconds
    state = "running"
    while time.monotonic() < deadline:
        try:
            state = Sandbox.get_info(sandbox_id).state.value
        except NotFoundException:
            state = "gone"
        if state == want:
            return state
        time.sleep(0.25)
    return state


def test_an_idle_timeout_pauses_or_kills_a_quiet_sandbox_and_spares_a_busy_one(server: Server) -> None:
    import pytest
    from e2b.exceptions import SandboxException

    for bad in ("0", "abc", "99999999"):
        with pytest.raises(SandboxException):
            Sandbox.create(template="base", timeout=60, metadata={"sandboxd.idle_timeout": bad})
    quiet = Sandbox.create(
        template="base",
        timeout=120,
        metadata={"sandboxd.idle_timeout": "2"},
        lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}},
    )
    busy = Sandbox.create(template="base", timeout=120, metadata={"sandboxd.idle_timeout": "2"})
    try:
        loop = busy.commands.run("sh -c 'while :; do :; done'", background=True)
        assert _wait_state(quiet.sandbox_id, "paused", 15) == "paused"
        assert _detail(server, quiet.sandbox_id)["pauseMode"] == "filesystem"
        assert _wait_state(busy.sandbox_id, "gone", 5) == "running", "a sandbox at work was taken for idle"
        loop.kill()
        assert _wait_state(busy.sandbox_id, "gone", 15) == "gone"  # quiet now: killed (no autoPause)
    finally:
        for s in (quiet, busy):
            with contextlib.suppress(Exception):
                s.kill()


def test_a_pause_to_disk_on_request_is_on_disk_when_answered(server: Server) -> None:
    """sandboxd's extension `toDisk` (the server's own pauses go to disk after --checkpoint-after, 60 s here)."""

    def pause(sandbox_id: str, body: dict) -> httpx.Response:
        return httpx.post(
            f"{server.url}/sandboxes/{sandbox_id}/pause", json=body, headers={"X-API-KEY": server.api_key}, timeout=60
        )

    sbx = Sandbox.create(template="base", timeout=120)
    try:
        counter = sbx.commands.run(
            "n=0; while :; do n=$((n+1)); echo $n > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.05; done", background=True
        )
        r = pause(sbx.sandbox_id, {"toDisk": True})
        assert r.status_code == 204, r.text
        assert _detail(server, sbx.sandbox_id)["pausedTo"] == "disk"
        again = Sandbox.connect(sbx.sandbox_id)
        first = int(again.files.read("/tmp/n"))
        assert counter.pid in [p.pid for p in again.commands.list()]
        # one paused in memory already is written now; one on disk already is paused already
        assert again.pause() is True and _detail(server, sbx.sandbox_id)["pausedTo"] == "memory"
        assert pause(sbx.sandbox_id, {"toDisk": True}).status_code == 204
        assert _detail(server, sbx.sandbox_id)["pausedTo"] == "disk"
        r = pause(sbx.sandbox_id, {"toDisk": True})
        assert r.status_code == 409 and "already paused" in r.text, r.text
        again = Sandbox.connect(sbx.sandbox_id)
        assert int(again.files.read("/tmp/n")) > first  # the same loop, counting on

        # what cannot go to disk (a connection with an end outside the sandbox: a client streaming from one of its
        # services through the port proxy): paused in memory, and the answer says why
        start_ticker(again)
        with ticks_through_port(server, sbx.sandbox_id) as stream:
            lines = stream.iter_lines()  # (held: a dropped iterator closes the stream)
            assert next(lines) == "tick 1"
            r = pause(sbx.sandbox_id, {"toDisk": True})
        assert r.status_code == 409 and "paused in memory, not on disk" in r.text and "outside" in r.text, r.text
        detail = _detail(server, sbx.sandbox_id)
        assert detail["state"] == "paused" and detail["pausedTo"] == "memory"
        Sandbox.connect(sbx.sandbox_id)
        r = pause(sbx.sandbox_id, {"toDisk": True, "memory": False})
        assert r.status_code == 400 and "toDisk" in r.text, r.text
    finally:
        sbx.kill()
